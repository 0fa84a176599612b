//! A measurement, not a product: the floor of a `no_std` interposing library, i.e. what
//! warmpool's preload would cost every process if it were written without std. At load it
//! resolves the same 12 libc functions the preload resolves (`dlsym(RTLD_NEXT)`) and forwards
//! every interposed call; it pools nothing. Built on its own (outside the workspace: it needs
//! `panic = "abort"`): `cargo build --release --manifest-path preload/nostd-floor/Cargo.toml`,
//! then compare spawn→exit of a program under it, under an empty library and under
//! `libwarmpool_preload.so` with `WARMPOOL_PASSTHROUGH=1` (README, *Whole function against
//! local keepalive proxies*). 7 KB, 6 imported symbols, against 0.4 MB and 61.
#![no_std]
use core::sync::atomic::{AtomicUsize, Ordering};
use libc::{c_char, c_int, c_uint, c_void, sockaddr, socklen_t};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

static REAL: [AtomicUsize; 12] = [const { AtomicUsize::new(0) }; 12];
const NAMES: [&[u8]; 12] = [b"connect\0", b"close\0", b"dup\0", b"dup2\0", b"dup3\0", b"fcntl\0", b"fcntl64\0", b"close_range\0", b"posix_spawn\0", b"posix_spawnp\0", b"execve\0", b"setsockopt\0"];

extern "C" fn init() {
    for (i, n) in NAMES.iter().enumerate() {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, n.as_ptr().cast()) };
        REAL[i].store(p as usize, Ordering::Relaxed);
    }
}
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

fn real(i: usize) -> usize {
    REAL[i].load(Ordering::Relaxed)
}

#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, a: *const sockaddr, l: socklen_t) -> c_int {
    let f: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int = core::mem::transmute(real(0));
    f(fd, a, l)
}
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    let f: unsafe extern "C" fn(c_int) -> c_int = core::mem::transmute(real(1));
    f(fd)
}
#[no_mangle]
pub unsafe extern "C" fn dup2(a: c_int, b: c_int) -> c_int {
    let f: unsafe extern "C" fn(c_int, c_int) -> c_int = core::mem::transmute(real(3));
    f(a, b)
}
#[no_mangle]
pub unsafe extern "C" fn dup3(a: c_int, b: c_int, fl: c_int) -> c_int {
    let f: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int = core::mem::transmute(real(4));
    f(a, b, fl)
}
#[no_mangle]
pub unsafe extern "C" fn close_range(a: c_uint, b: c_uint, fl: c_int) -> c_int {
    let f: unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int = core::mem::transmute(real(7));
    f(a, b, fl)
}
#[no_mangle]
pub unsafe extern "C" fn execve(p: *const c_char, a: *const *const c_char, e: *const *const c_char) -> c_int {
    let f: unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int = core::mem::transmute(real(10));
    f(p, a, e)
}
#[no_mangle]
pub unsafe extern "C" fn setsockopt(fd: c_int, l: c_int, n: c_int, v: *const c_void, len: socklen_t) -> c_int {
    let f: unsafe extern "C" fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int = core::mem::transmute(real(11));
    f(fd, l, n, v, len)
}
