//! Carrying the program's pre-connect socket options over to the pooled socket, or
//! letting the connect pass through where they cannot be carried.
//!
//! The program configured *its* socket; it will use ours. The interposed `setsockopt`
//! records, per fd, which of the options below the program set (one atomic OR, no syscall);
//! at a pooled connect we read each recorded option of [`REPLAYED`] from the program's
//! socket and set it on the pooled one (the pool manager puts them back at give-back).
//! Options that shape the connection itself or cannot be undone ([`PERMANENT`], and what
//! [`bypass_reason`] reads from the socket: a device binding, a mark, transparent or
//! free binding, TCP Fast Open; a congestion control other than the pooled socket's) make
//! the connect a bypass instead, with a named reason ([`Bypass`]).

use crate::bypass::Bypass;
use crate::sys::getsockopt_int as int;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Clone, Copy)]
struct Opt {
    level: libc::c_int,
    name: libc::c_int,
    /// The bypass it makes (for `PERMANENT`; `REPLAYED` ones make none).
    why: Option<Bypass>,
}

/// A carried option.
const fn o(level: libc::c_int, name: libc::c_int, _label: &'static str) -> Opt {
    Opt { level, name, why: None }
}

/// An option that makes `connect()` a bypass for `why`.
const fn p(level: libc::c_int, name: libc::c_int, why: Bypass) -> Opt {
    Opt { level, name, why: Some(why) }
}

const S: libc::c_int = libc::SOL_SOCKET;
const T: libc::c_int = libc::IPPROTO_TCP;

/// Carried over: read from the program's socket and set on the pooled one. The pool
/// manager puts every one of them back when the socket is given back.
const REPLAYED: [Opt; 20] = [
    o(T, libc::TCP_NODELAY, "TCP_NODELAY"),
    o(S, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    o(T, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    o(T, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    o(T, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    o(T, libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"),
    o(T, libc::TCP_QUICKACK, "TCP_QUICKACK"),
    o(T, libc::TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT"),
    o(T, libc::TCP_CORK, "TCP_CORK"),
    o(T, libc::TCP_LINGER2, "TCP_LINGER2"),
    o(S, libc::SO_LINGER, "SO_LINGER"),
    o(S, libc::SO_RCVTIMEO, "SO_RCVTIMEO"),
    o(S, libc::SO_SNDTIMEO, "SO_SNDTIMEO"),
    o(S, libc::SO_RCVLOWAT, "SO_RCVLOWAT"),
    o(S, libc::SO_OOBINLINE, "SO_OOBINLINE"),
    o(S, libc::SO_PRIORITY, "SO_PRIORITY"),
    o(libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS"),
    o(libc::IPPROTO_IP, libc::IP_TTL, "IP_TTL"),
    o(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS"),
    o(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS"),
];

/// Options whose effect can neither be carried onto a connected socket nor undone on one
/// (a buffer size locks autotuning off for good; MSS, window clamp and MD5 keys shape the
/// connection; a ULP cannot be removed). Set before `connect()`: the connect passes
/// through. Set on a pooled socket: it is given back as not reusable. Tracked (one atomic
/// OR per `setsockopt`) because the kernel cannot tell a set value from a default one.
const PERMANENT: [Opt; 10] = [
    p(S, libc::SO_RCVBUF, Bypass::BufferSize),
    p(S, libc::SO_SNDBUF, Bypass::BufferSize),
    p(S, libc::SO_RCVBUFFORCE, Bypass::BufferSize),
    p(S, libc::SO_SNDBUFFORCE, Bypass::BufferSize),
    p(T, libc::TCP_MAXSEG, Bypass::Maxseg),
    p(T, libc::TCP_WINDOW_CLAMP, Bypass::WindowClamp),
    p(T, libc::TCP_MD5SIG, Bypass::Md5sig),
    p(T, libc::TCP_MD5SIG_EXT, Bypass::Md5sig),
    p(T, libc::TCP_ULP, Bypass::Ulp),
    p(T, libc::TCP_REPAIR, Bypass::Repair),
];

/// Bit `i` = `REPLAYED[i]` was set; bit `PERMANENT_SHIFT + j` = `PERMANENT[j]` was set.
static SET: [AtomicU32; crate::table::MAX_FD] = [const { AtomicU32::new(0) }; crate::table::MAX_FD];
const PERMANENT_SHIFT: u32 = 20;
const _: () = assert!(REPLAYED.len() <= PERMANENT_SHIFT as usize && PERMANENT.len() <= 32 - PERMANENT_SHIFT as usize);

fn slot(fd: RawFd) -> Option<&'static AtomicU32> {
    usize::try_from(fd).ok().and_then(|i| SET.get(i))
}

/// Note that the program set `level`/`name` on `fd` (called by the interposed `setsockopt`);
/// an option of [`PERMANENT`] on a pooled socket makes it not reusable.
pub(crate) fn record(fd: RawFd, level: libc::c_int, name: libc::c_int) {
    let hit = |o: &Opt| o.level == level && o.name == name;
    let permanent = PERMANENT.iter().position(hit);
    if permanent.is_some() {
        crate::table::mark_altered(fd);
    }
    let bit = REPLAYED
        .iter()
        .position(hit)
        .map(|i| 1u32 << i)
        .or_else(|| permanent.map(|j| 1u32 << (PERMANENT_SHIFT + j as u32)));
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

/// Why a `connect()` of the program's socket `app` (of family `domain`: 4 or 6) cannot be
/// served with a pooled socket, if it cannot: an option set on it that a socket connected
/// by someone else cannot have. Read from the socket itself where the kernel tells (no
/// allocation, no lock), tracked otherwise ([`PERMANENT`]).
pub(crate) fn bypass_reason(app: RawFd, domain: u8) -> Option<Bypass> {
    let set = slot(app).map_or(0, |s| s.load(Ordering::Relaxed)) >> PERMANENT_SHIFT;
    if set != 0 {
        return PERMANENT[set.trailing_zeros() as usize].why;
    }
    let (ip, transparent, freebind) = if domain == 6 {
        (libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, libc::IPV6_FREEBIND)
    } else {
        (libc::IPPROTO_IP, libc::IP_TRANSPARENT, libc::IP_FREEBIND)
    };
    let checks = [
        p(S, libc::SO_BINDTOIFINDEX, Bypass::BindToDevice),
        p(S, libc::SO_MARK, Bypass::Mark),
        p(ip, transparent, Bypass::Transparent),
        p(ip, freebind, Bypass::Freebind),
        p(T, libc::TCP_FASTOPEN_CONNECT, Bypass::FastopenConnect),
    ];
    checks.iter().find(|c| int(app, c.level, c.name) != 0).and_then(|c| c.why)
}

/// The congestion control algorithm of `fd` (`TCP_CONGESTION`), NUL-padded.
fn congestion(fd: RawFd) -> Option<[u8; 16]> {
    let mut v = [0u8; 16];
    crate::sys::getsockopt_bytes(fd, T, libc::TCP_CONGESTION, &mut v).map(|_| v)
}

/// Whether the program chose another congestion control for `app` than `pooled` runs:
/// the pooled connection cannot be it (its state was built by its own algorithm).
pub(crate) fn congestion_differs(app: RawFd, pooled: RawFd) -> bool {
    congestion(app) != congestion(pooled)
}

/// Copy every option the program set on `app` to `pooled`.
pub(crate) fn replay(app: RawFd, pooled: RawFd) {
    let mask = slot(app).map_or(0, |s| s.load(Ordering::Relaxed)) & ((1 << PERMANENT_SHIFT) - 1);
    if mask == 0 {
        return;
    }
    let set = crate::real::get().setsockopt;
    for (i, opt) in REPLAYED.iter().enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let mut v = [0u8; 16];
        let Some(len) = crate::sys::getsockopt_bytes(app, opt.level, opt.name, &mut v) else { continue };
        // SAFETY: setting an option with the bytes the kernel gave us for it.
        unsafe { set(pooled, opt.level, opt.name, v.as_ptr().cast(), len) };
    }
}
