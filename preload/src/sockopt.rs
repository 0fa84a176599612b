//! Carrying the program's pre-connect socket options over to the pooled socket.
//!
//! The program configured *its* socket; it will use ours. The interposed `setsockopt`
//! records, per fd, which of the options below the program set (one atomic OR, no syscall);
//! at a pooled connect we read each recorded option from the program's socket and set it on
//! the pooled one. Options that shape the connection itself and cannot be applied after the
//! handshake ([`BLOCKING`]) make the whole connect a bypass instead. Options the program
//! never set cost nothing on the connect path.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Clone, Copy)]
struct Opt {
    level: libc::c_int,
    name: libc::c_int,
    /// The kernel reports twice the value that was set (SO_SNDBUF, SO_RCVBUF).
    doubled: bool,
}

const fn o(level: libc::c_int, name: libc::c_int) -> Opt {
    Opt { level, name, doubled: false }
}

const REPLAYED: [Opt; 15] = [
    o(libc::IPPROTO_TCP, libc::TCP_NODELAY),
    o(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    o(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    o(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    o(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    o(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    o(libc::IPPROTO_TCP, libc::TCP_QUICKACK),
    Opt { level: libc::SOL_SOCKET, name: libc::SO_SNDBUF, doubled: true },
    Opt { level: libc::SOL_SOCKET, name: libc::SO_RCVBUF, doubled: true },
    o(libc::SOL_SOCKET, libc::SO_LINGER),
    o(libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    o(libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    o(libc::SOL_SOCKET, libc::SO_PRIORITY),
    o(libc::IPPROTO_IP, libc::IP_TOS),
    o(libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
];

/// Non-default values of these mean "do not pool this connect".
const BLOCKING: [Opt; 4] = [
    o(libc::SOL_SOCKET, libc::SO_MARK),
    o(libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT),
    o(libc::IPPROTO_TCP, libc::TCP_MAXSEG),
    o(libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP),
];

/// Bit `i` = `REPLAYED[i]` was set; bit `16 + j` = `BLOCKING[j]` was set.
static SET: [AtomicU32; crate::table::MAX_FD] = [const { AtomicU32::new(0) }; crate::table::MAX_FD];
const BLOCKING_SHIFT: u32 = 16;

fn slot(fd: RawFd) -> Option<&'static AtomicU32> {
    usize::try_from(fd).ok().and_then(|i| SET.get(i))
}

/// Note that the program set `level`/`name` on `fd` (called by the interposed `setsockopt`).
pub(crate) fn record(fd: RawFd, level: libc::c_int, name: libc::c_int) {
    let hit = |o: &Opt| o.level == level && o.name == name;
    let bit = REPLAYED
        .iter()
        .position(hit)
        .map(|i| 1u32 << i)
        .or_else(|| BLOCKING.iter().position(hit).map(|j| 1u32 << (BLOCKING_SHIFT + j as u32)));
    if let (Some(bit), Some(s)) = (bit, slot(fd)) {
        s.fetch_or(bit, Ordering::Relaxed);
    }
}

/// Whether anything is recorded for `fd`.
pub(crate) fn recorded(fd: RawFd) -> bool {
    slot(fd).is_some_and(|s| s.load(Ordering::Relaxed) != 0)
}

/// Forget what was recorded for `fd` (it was closed).
pub(crate) fn forget(fd: RawFd) {
    if let Some(s) = slot(fd) {
        if s.load(Ordering::Relaxed) != 0 {
            s.store(0, Ordering::Relaxed);
        }
    }
}

/// Whether the program set an option we cannot honour on an already-connected socket.
pub(crate) fn has_blocking_option(app: RawFd) -> bool {
    slot(app).is_some_and(|s| s.load(Ordering::Relaxed) >> BLOCKING_SHIFT != 0)
}

/// Copy every option the program set on `app` to `pooled`.
pub(crate) fn replay(app: RawFd, pooled: RawFd) {
    let mask = slot(app).map_or(0, |s| s.load(Ordering::Relaxed)) & ((1 << BLOCKING_SHIFT) - 1);
    if mask == 0 {
        return;
    }
    let set = crate::real::get().setsockopt;
    for (i, opt) in REPLAYED.iter().enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let mut v = [0u8; 16];
        let mut len = v.len() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into our buffer.
        if unsafe { libc::getsockopt(app, opt.level, opt.name, v.as_mut_ptr().cast(), &mut len) } != 0 {
            continue;
        }
        if opt.doubled && len as usize == std::mem::size_of::<libc::c_int>() {
            let mut n = [0u8; 4];
            n.copy_from_slice(&v[..4]);
            v[..4].copy_from_slice(&(libc::c_int::from_ne_bytes(n) / 2).to_ne_bytes());
        }
        // SAFETY: setting an option with the bytes the kernel gave us for it.
        unsafe { set(pooled, opt.level, opt.name, v.as_ptr().cast(), len) };
    }
}
