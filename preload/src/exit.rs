//! Normal exit (`exit()`, a return from `main`): sockets the program still holds go back.
//!
//! HTTP clients with keep-alive pools (and C programs that never close) hold their pooled
//! sockets until the process exits and never call `close()`; without this, the daemon would
//! see each lease end with the link and could never reuse them. At exit, from the library's
//! destructor, every still-leased fd is let go the way `close()` would let it go:
//!
//! - leases marked shared (duplicated, inherited by a child): `Release(Shared)`; leases the
//!   program altered beyond repair (an option that cannot be undone): `Release(Implicit)`;
//! - an fd number that no longer holds the very socket granted on it (closed behind our
//!   back, the number reused): `Release(Implicit)`, the fd is left alone;
//! - otherwise the fd number is first pointed at `/dev/null` (`dup3`), so that nothing still
//!   running in this process (another thread, a later destructor) can reach the socket, and
//!   then `Release(Clean)`: the daemon runs the same checks as for a `close()`.
//!
//! Only the process the sockets were granted to does this: a `vfork` child (or a child made
//! without fork handlers) that calls `exit()` runs on the owner's memory and does nothing;
//! a `fork` child has already forgotten the parent's leases. `_exit` and fatal signals do not
//! run destructors: those leases end with the link, and the daemon decides.
//!
//! No lock and no allocation: only system calls on fds, like the close path.

use crate::{client, hooks, owner, real, table};
use wire::Disposition;

/// What the leased fd numbers are pointed at before their sockets go back.
fn placeholder() -> i32 {
    crate::sys::open(c"/dev/null", libc::O_RDWR | libc::O_CLOEXEC)
}

/// Give back every socket this process still holds (see the module comment).
pub(crate) fn give_back_leases() {
    // No lease at all (most processes): nothing to do, not even the owner's `getpid`.
    if crate::HOT.active.load(std::sync::atomic::Ordering::Relaxed) == 0 || !owner::is_owner() {
        return;
    }
    let real = real::get();
    let mut null = -2; // not opened yet
    table::for_each(|fd| {
        let Some(lease) = table::take(fd) else { return };
        let how = hooks::ending(lease, Disposition::Clean);
        if how != Disposition::Clean {
            // Shared, or altered beyond repair: never reusable.
            client::release(lease.id, how);
            return;
        }
        if !table::still_holds(fd) {
            client::release(lease.id, Disposition::Implicit);
            return;
        }
        if null == -2 {
            null = placeholder();
        }
        // SAFETY: replaces our own leased fd number with /dev/null (or, without one, closes
        // it: the process is exiting and the number is ours).
        let gone = unsafe {
            if null >= 0 {
                (real.dup3)(null, fd, libc::O_CLOEXEC) >= 0
            } else {
                (real.close)(fd) == 0
            }
        };
        client::release(lease.id, if gone { Disposition::Clean } else { Disposition::Implicit });
    });
    if null >= 0 {
        // SAFETY: the placeholder we opened.
        unsafe { (real.close)(null) };
    }
}
