//! Which process this memory belongs to: the one whose link, leases and offers the shim's
//! state describes.
//!
//! A `vfork` child (Python's `subprocess`, glibc's `system()` on some paths, `posix_spawn`
//! emulations) runs on its parent's memory until it calls `execve` or `_exit`: every hook it
//! calls (`close_range`, `close`, `dup2`, `execve`, even `exit`) sees the *parent's* link
//! number, lease table and offers, but acts on the child's own fd table. Such a hook must
//! neither change that state (the parent would lose its link and leases) nor send anything
//! on the link (the daemon would take the child's words for the parent's). A child made
//! without `pthread_atfork` handlers (`_Fork`, a raw `clone`) holds a copy of the state that
//! is not its own either. Both are told apart from the owner by their pid: the owner's is
//! recorded at load time and by the fork handler in each `fork` child; any other process
//! running here is a *guest* and the shim does nothing for it (fail open).
//!
//! `getpid` is a system call: callers ask only when a hook is about to touch the state (an
//! fd that holds a lease, the link or an offer), never on every `close()`.

use crate::sys::getpid as pid;
use std::sync::atomic::Ordering;

/// The pid of the process the state belongs to (0: not initialised, nobody owns it). It lives
/// in [`crate::HOT`]: its write at load time is what makes that page present.
fn owner() -> &'static std::sync::atomic::AtomicI32 {
    &crate::HOT.owner
}

/// The calling process owns the state from now on (at load time, and in a `fork` child
/// once its handler has forgotten the parent's link and leases).
pub(crate) fn claim() {
    owner().store(pid(), Ordering::Release);
}

/// Whether the calling process owns the state (false in a `vfork` child, or in a child
/// made without fork handlers).
pub(crate) fn is_owner() -> bool {
    owner().load(Ordering::Acquire) == pid()
}
