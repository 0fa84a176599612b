//! Carrying the program's pre-connect socket options over to the pooled socket.
//!
//! The program configured *its* socket; it will use ours. For each option in [`REPLAYED`]
//! we read the program's value and, where it differs from a fresh socket's default (read
//! once per family from a probe socket), set it on the pooled socket. Options that shape
//! the connection itself and cannot be applied after the handshake ([`BLOCKING`]) make the
//! whole connect a bypass instead.

use std::os::fd::RawFd;
use std::sync::OnceLock;

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

const REPLAYED: [Opt; 13] = [
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
];

/// Non-default values of these mean "do not pool this connect".
const BLOCKING: [Opt; 4] = [
    o(libc::SOL_SOCKET, libc::SO_MARK),
    o(libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT),
    o(libc::IPPROTO_TCP, libc::TCP_MAXSEG),
    o(libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP),
];

/// An option value: up to 16 bytes (`struct timeval`, `struct linger`, ints).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Val {
    len: libc::socklen_t,
    bytes: [u8; 16],
}

fn get(fd: RawFd, opt: Opt) -> Option<Val> {
    let mut v = Val { len: 16, bytes: [0; 16] };
    // SAFETY: the kernel writes at most `len` bytes into our buffer.
    let r = unsafe { libc::getsockopt(fd, opt.level, opt.name, v.bytes.as_mut_ptr().cast(), &mut v.len) };
    (r == 0).then_some(v)
}

struct Defaults {
    replayed: [Option<Val>; REPLAYED.len()],
    blocking: [Option<Val>; BLOCKING.len()],
}

static DEFAULTS_V4: OnceLock<Defaults> = OnceLock::new();
static DEFAULTS_V6: OnceLock<Defaults> = OnceLock::new();

fn defaults(domain: libc::c_int) -> &'static Defaults {
    let cell = if domain == libc::AF_INET6 { &DEFAULTS_V6 } else { &DEFAULTS_V4 };
    cell.get_or_init(|| {
        // SAFETY: a probe socket we create and close right here.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        let d = Defaults {
            replayed: REPLAYED.map(|o| if fd >= 0 { get(fd, o) } else { None }),
            blocking: BLOCKING.map(|o| if fd >= 0 { get(fd, o) } else { None }),
        };
        if fd >= 0 {
            // SAFETY: our probe fd, closed through the real close.
            unsafe { (crate::real::get().close)(fd) };
        }
        d
    })
}

/// Whether the program set an option we cannot honour on an already-connected socket.
pub(crate) fn has_blocking_option(app: RawFd, domain: libc::c_int) -> bool {
    let d = defaults(domain);
    BLOCKING.iter().zip(d.blocking.iter()).any(|(o, def)| get(app, *o) != *def)
}

/// Copy every non-default option from `app` to `pooled`.
pub(crate) fn replay(app: RawFd, pooled: RawFd, domain: libc::c_int) {
    let d = defaults(domain);
    for (opt, def) in REPLAYED.iter().zip(d.replayed.iter()) {
        let Some(mut v) = get(app, *opt) else { continue };
        if Some(v) == *def {
            continue;
        }
        if opt.doubled && v.len as usize == std::mem::size_of::<libc::c_int>() {
            let mut n = [0u8; 4];
            n.copy_from_slice(&v.bytes[..4]);
            v.bytes[..4].copy_from_slice(&(libc::c_int::from_ne_bytes(n) / 2).to_ne_bytes());
        }
        // SAFETY: setting an option with the bytes the kernel gave us for it.
        unsafe { libc::setsockopt(pooled, opt.level, opt.name, v.bytes.as_ptr().cast(), v.len) };
    }
    // IP_TOS / IPV6_TCLASS depend on the family.
    let tos = if domain == libc::AF_INET6 { o(libc::IPPROTO_IPV6, libc::IPV6_TCLASS) } else { o(libc::IPPROTO_IP, libc::IP_TOS) };
    if let Some(v) = get(app, tos) {
        if v.bytes[..4] != [0; 4] {
            // SAFETY: as above.
            unsafe { libc::setsockopt(pooled, tos.level, tos.name, v.bytes.as_ptr().cast(), v.len) };
        }
    }
}
