//! The real libc functions behind our interposed ones, resolved once with
//! `dlsym(RTLD_NEXT)`. If a symbol cannot be found, the raw system call stands in, so a
//! bypass always has somewhere to go.

use libc::{c_char, c_int, c_uint, c_void, pid_t, sockaddr, socklen_t};
use std::sync::OnceLock;

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type CloseRangeFn = unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
pub(crate) type SpawnFn = unsafe extern "C" fn(
    *mut pid_t,
    *const c_char,
    *const c_void,
    *const c_void,
    *const *mut c_char,
    *const *mut c_char,
) -> c_int;
type SetsockoptFn = unsafe extern "C" fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int;
type ExecveFn = unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;

/// Pointers to the next definitions of the functions we interpose.
#[derive(Debug)]
pub(crate) struct Real {
    pub(crate) connect: ConnectFn,
    pub(crate) close: CloseFn,
    pub(crate) dup: DupFn,
    pub(crate) dup2: Dup2Fn,
    pub(crate) dup3: Dup3Fn,
    pub(crate) fcntl: FcntlFn,
    pub(crate) fcntl64: FcntlFn,
    pub(crate) close_range: CloseRangeFn,
    pub(crate) posix_spawn: Option<SpawnFn>,
    pub(crate) posix_spawnp: Option<SpawnFn>,
    pub(crate) execve: ExecveFn,
    pub(crate) setsockopt: SetsockoptFn,
}

static REAL: OnceLock<Real> = OnceLock::new();

unsafe extern "C" fn sys_connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwards the caller's arguments to the system call unchanged.
    unsafe { libc::syscall(libc::SYS_connect, fd, addr, len) as c_int }
}
unsafe extern "C" fn sys_close(fd: c_int) -> c_int {
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_close, fd) as c_int }
}
unsafe extern "C" fn sys_dup(fd: c_int) -> c_int {
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_dup, fd) as c_int }
}
unsafe extern "C" fn sys_dup2(a: c_int, b: c_int) -> c_int {
    // SAFETY: dup2 is dup3 without flags unless a == b, where it only validates a.
    unsafe {
        if a == b {
            if libc::syscall(libc::SYS_fcntl, a, libc::F_GETFD) < 0 {
                return -1;
            }
            return b;
        }
        libc::syscall(libc::SYS_dup3, a, b, 0) as c_int
    }
}
unsafe extern "C" fn sys_dup3(a: c_int, b: c_int, f: c_int) -> c_int {
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_dup3, a, b, f) as c_int }
}
unsafe extern "C" fn sys_fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    // SAFETY: plain system call; fcntl's third argument is always one machine word.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as c_int }
}
unsafe extern "C" fn sys_close_range(a: c_uint, b: c_uint, f: c_int) -> c_int {
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_close_range, a, b, f) as c_int }
}
unsafe extern "C" fn sys_setsockopt(fd: c_int, l: c_int, n: c_int, v: *const c_void, len: socklen_t) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    unsafe { libc::syscall(libc::SYS_setsockopt, fd, l, n, v, len) as c_int }
}
unsafe extern "C" fn sys_execve(p: *const c_char, a: *const *const c_char, e: *const *const c_char) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    unsafe { libc::syscall(libc::SYS_execve, p, a, e) as c_int }
}

fn sym(name: &std::ffi::CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

macro_rules! pick {
    ($name:literal, $ty:ty, $fallback:expr) => {{
        let p = sym($name);
        if p.is_null() {
            $fallback
        } else {
            // SAFETY: the symbol named is the libc function with exactly this signature.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }
    }};
}

/// Resolve every pointer (idempotent).
pub(crate) fn resolve() -> &'static Real {
    REAL.get_or_init(|| {
        // SAFETY: on the Linux ABIs we build for, a variadic call passing one word-sized
        // integer reaches a non-variadic callee with the same registers.
        let fallback = unsafe {
            std::mem::transmute::<unsafe extern "C" fn(c_int, c_int, usize) -> c_int, FcntlFn>(sys_fcntl)
        };
        let fcntl: FcntlFn = pick!(c"fcntl", FcntlFn, fallback);
        Real {
            connect: pick!(c"connect", ConnectFn, sys_connect as ConnectFn),
            close: pick!(c"close", CloseFn, sys_close as CloseFn),
            dup: pick!(c"dup", DupFn, sys_dup as DupFn),
            dup2: pick!(c"dup2", Dup2Fn, sys_dup2 as Dup2Fn),
            dup3: pick!(c"dup3", Dup3Fn, sys_dup3 as Dup3Fn),
            fcntl,
            fcntl64: pick!(c"fcntl64", FcntlFn, fcntl),
            close_range: pick!(c"close_range", CloseRangeFn, sys_close_range as CloseRangeFn),
            posix_spawn: {
                let p = sym(c"posix_spawn");
                // SAFETY: as in `pick!`.
                (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, SpawnFn>(p) })
            },
            posix_spawnp: {
                let p = sym(c"posix_spawnp");
                // SAFETY: as in `pick!`.
                (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, SpawnFn>(p) })
            },
            execve: pick!(c"execve", ExecveFn, sys_execve as ExecveFn),
            setsockopt: pick!(c"setsockopt", SetsockoptFn, sys_setsockopt as SetsockoptFn),
        }
    })
}

/// The real functions (resolved on first use if the constructor has not run yet).
pub(crate) fn get() -> &'static Real {
    resolve()
}
