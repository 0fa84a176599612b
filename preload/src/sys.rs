//! The preload's own system calls and libc queries, as small safe wrappers: every raw libc
//! call of the library outside [`crate::real`] (the interposed functions' next definitions)
//! is here, with its `// SAFETY:` reason.
//!
//! Why not rustix or nix, as in the daemon: these wrappers must stay allocation-free and
//! lock-free (they run on the `close()` path, in fork handlers, possibly in a signal handler
//! or a `vfork` child), and they must make the very calls the library always made (glibc's
//! `getenv`, `getauxval`, `getpid`, ...), so that what strace shows does not change. None of
//! these functions is one the shim interposes; calls that must get past the shim's own hooks
//! (`close`, `dup3`, `fcntl`, `setsockopt`) go through [`crate::real`] instead.
//!
//! Functions that take an fd number only query the kernel about it (`fstat`, `getsockopt`):
//! a wrong number makes them fail, nothing more.

use libc::c_int;
use std::ffi::CStr;

/// This thread's `errno`.
pub(crate) fn errno() -> c_int {
    // SAFETY: __errno_location returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Set this thread's `errno`.
pub(crate) fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}

/// `getenv(name)`: the value of an environment variable. Read only while the library
/// initialises (nothing changes the environment under us then).
pub(crate) fn getenv(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv with a NUL-terminated name; the result lives as long as the environment
    // entry, which we only read during initialisation.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: getenv returns a NUL-terminated string (see above for its lifetime).
        Some(unsafe { CStr::from_ptr(p) }.to_bytes())
    }
}

/// The file name the kernel executed (`AT_EXECFN` in the auxiliary vector: no system call).
pub(crate) fn execfn() -> Option<&'static [u8]> {
    // SAFETY: getauxval has no preconditions.
    let p = unsafe { libc::getauxval(libc::AT_EXECFN) } as *const libc::c_char;
    if p.is_null() {
        return None;
    }
    // SAFETY: AT_EXECFN points at the NUL-terminated file name on the initial stack, which
    // lives as long as the process.
    Some(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// Whether the process runs in secure-execution mode (`AT_SECURE`: setuid, setgid, file
/// capabilities).
pub(crate) fn secure_execution() -> bool {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// `access(path, F_OK) == 0`.
pub(crate) fn exists(path: &CStr) -> bool {
    // SAFETY: access with a NUL-terminated path.
    unsafe { libc::access(path.as_ptr(), libc::F_OK) == 0 }
}

/// `open(path, flags)`: the new fd, or -1.
pub(crate) fn open(path: &CStr, flags: c_int) -> c_int {
    // SAFETY: open with a NUL-terminated path and no mode (no O_CREAT); the fd is the caller's.
    unsafe { libc::open(path.as_ptr(), flags) }
}

/// One `write(2)` of `buf` to stderr (fd 2); a closed stderr just fails.
pub(crate) fn write_stderr(buf: &[u8]) {
    // SAFETY: writes from our own buffer, at most its length.
    unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
}

/// `getpid()` (a system call: glibc caches nothing since 2.25, so a `vfork` child gets its
/// own pid, not its parent's).
pub(crate) fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Effective uid and gid.
pub(crate) fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid have no preconditions.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// `CLOCK_MONOTONIC_COARSE` in milliseconds (a vDSO read, no system call).
pub(crate) fn monotonic_coarse_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// A fork handler: a plain function that never unwinds.
pub(crate) type ForkHandler = extern "C" fn();

/// `pthread_atfork(prepare, parent, child)`.
pub(crate) fn atfork(prepare: Option<ForkHandler>, parent: Option<ForkHandler>, child: Option<ForkHandler>) {
    let c = |f: Option<ForkHandler>| f.map(|f| f as unsafe extern "C" fn());
    // SAFETY: registers plain extern "C" functions that never unwind and live as long as the
    // library (never unloaded: it is preloaded).
    unsafe { libc::pthread_atfork(c(prepare), c(parent), c(child)) };
}

/// `(st_dev, st_ino)` of what `fd` refers to now (`fstat`).
pub(crate) fn identity(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain old data: all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills our stat or fails.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// An int-sized socket option of `fd` (0 if it cannot be read: nothing set).
pub(crate) fn getsockopt_int(fd: c_int, level: c_int, name: c_int) -> c_int {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: an int-sized option into an int; the kernel writes at most `len` bytes.
    unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut c_int).cast(), &mut len) };
    v
}

/// A socket option of `fd` into `buf`: the length the kernel wrote, or `None` on failure.
pub(crate) fn getsockopt_bytes(fd: c_int, level: c_int, name: c_int, buf: &mut [u8]) -> Option<libc::socklen_t> {
    let mut len = libc::socklen_t::try_from(buf.len()).ok()?;
    // SAFETY: the kernel writes at most `len` bytes into our buffer.
    let r = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    (r == 0).then_some(len)
}
