//! Nothing of a function's socket state reaches the next function.
//!
//! A function's fd is a duplicate of the daemon's socket: every option it sets
//! (`setsockopt`) and the open file description's status flags (`O_NONBLOCK`, `O_ASYNC`, the
//! `F_SETOWN` owner) land on the pooled socket itself. When a socket is made, the daemon
//! takes a [`Snapshot`] of every option in [`OPTIONS`] (one table, each option once); on
//! give-back [`reset`] checks that the peer is still the lease's destination, puts back
//! whatever differs from the snapshot and discards the socket where that is impossible:
//!
//! * [`How::Restore`]: set back to the snapshot's value, then read again to make sure.
//! * [`How::NotBelow`]: `SO_RCVBUF`/`SO_SNDBUF`. Setting either locks the size for good
//!   (`SOCK_RCVBUF_LOCK`/`SOCK_SNDBUF_LOCK` cannot be cleared: autotuning is off for every
//!   later user). Autotuning only grows them, so a value below the snapshot was set by the
//!   function: discard. A size set *above* the snapshot looks like autotuning from here;
//!   the preload reports those (it sees the `setsockopt`) and the socket is not reused.
//! * [`How::Fixed`]: cannot be undone (`TCP_ULP`, `SO_LOCK_FILTER`, `TCP_REPAIR`): discard
//!   if it changed.
//!
//! A classic or eBPF socket filter is detached (a locked one discards the socket), and a
//! socket with an error queue or urgent data waiting is discarded. Everything is a
//! non-blocking system call on the daemon's own reference, off the function's path.

use crate::sock::Discard;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};

/// Constants libc does not name on Linux (asm-generic values, which x86_64 and aarch64 use).
mod sol {
    pub(super) const SO_LOCK_FILTER: libc::c_int = 44;
    pub(super) const SO_SELECT_ERR_QUEUE: libc::c_int = 45;
    pub(super) const SO_MAX_PACING_RATE: libc::c_int = 47;
    pub(super) const SO_ZEROCOPY: libc::c_int = 60;
    pub(super) const SO_PREFER_BUSY_POLL: libc::c_int = 69;
    pub(super) const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
    pub(super) const SO_TXREHASH: libc::c_int = 74;
    pub(super) const SO_RCVMARK: libc::c_int = 75;
    /// linux/tcp.h.
    pub(super) const TCP_TX_DELAY: libc::c_int = 37;
    /// asm-generic/fcntl.h.
    pub(super) const F_SETSIG: libc::c_int = 10;
    pub(super) const F_GETSIG: libc::c_int = 11;
}

/// What to do when an option differs from the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Set it back.
    Restore,
    /// Cannot be set back; autotuning only raises it: lower than the snapshot = discard.
    NotBelow,
    /// Cannot be set back: any change = discard.
    Fixed,
}

/// One socket option.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// `SOL_SOCKET`, `IPPROTO_TCP`, `IPPROTO_IP`, `IPPROTO_IPV6`.
    pub level: libc::c_int,
    /// The option.
    pub name: libc::c_int,
    /// Its name, for logs and tests.
    pub label: &'static str,
    /// See [`How`].
    pub how: How,
}

const fn r(level: libc::c_int, name: libc::c_int, label: &'static str) -> Opt {
    Opt {
        level,
        name,
        label,
        how: How::Restore,
    }
}

const S: libc::c_int = libc::SOL_SOCKET;
const T: libc::c_int = libc::IPPROTO_TCP;
const IP: libc::c_int = libc::IPPROTO_IP;
const IP6: libc::c_int = libc::IPPROTO_IPV6;

/// Every option a function can leave behind on a connected TCP socket, each once. An
/// option the kernel does not know on this socket (an IPv6 one on IPv4, an older kernel)
/// is skipped: the snapshot records it as absent.
///
/// Left out on purpose: `TCP_QUICKACK` (a transient mode the stack changes by itself),
/// `TCP_WINDOW_CLAMP` and `TCP_MAXSEG` (autotuning and path MTU move them; the preload
/// reports a function that sets them), `TCP_MD5SIG`/`TCP_AO` (not readable; reported by
/// the preload), options that act only before connect or on listeners (`SO_INCOMING_CPU`).
pub const OPTIONS: [Opt; 45] = [
    r(S, libc::SO_RCVTIMEO, "SO_RCVTIMEO"),
    r(S, libc::SO_SNDTIMEO, "SO_SNDTIMEO"),
    r(S, libc::SO_RCVLOWAT, "SO_RCVLOWAT"),
    r(S, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    r(S, libc::SO_LINGER, "SO_LINGER"),
    r(S, libc::SO_PRIORITY, "SO_PRIORITY"),
    r(S, libc::SO_MARK, "SO_MARK"),
    r(S, libc::SO_OOBINLINE, "SO_OOBINLINE"),
    r(S, libc::SO_DONTROUTE, "SO_DONTROUTE"),
    r(S, libc::SO_BINDTOIFINDEX, "SO_BINDTOIFINDEX"),
    r(S, libc::SO_TIMESTAMP, "SO_TIMESTAMP"),
    r(S, libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"),
    r(S, libc::SO_TIMESTAMPING, "SO_TIMESTAMPING"),
    r(S, libc::SO_BUSY_POLL, "SO_BUSY_POLL"),
    r(S, sol::SO_PREFER_BUSY_POLL, "SO_PREFER_BUSY_POLL"),
    r(S, sol::SO_BUSY_POLL_BUDGET, "SO_BUSY_POLL_BUDGET"),
    r(S, sol::SO_MAX_PACING_RATE, "SO_MAX_PACING_RATE"),
    r(S, sol::SO_ZEROCOPY, "SO_ZEROCOPY"),
    r(S, sol::SO_TXREHASH, "SO_TXREHASH"),
    r(S, sol::SO_RCVMARK, "SO_RCVMARK"),
    r(S, sol::SO_SELECT_ERR_QUEUE, "SO_SELECT_ERR_QUEUE"),
    r(S, libc::SO_PEEK_OFF, "SO_PEEK_OFF"),
    Opt {
        level: S,
        name: libc::SO_RCVBUF,
        label: "SO_RCVBUF",
        how: How::NotBelow,
    },
    Opt {
        level: S,
        name: libc::SO_SNDBUF,
        label: "SO_SNDBUF",
        how: How::NotBelow,
    },
    Opt {
        level: S,
        name: sol::SO_LOCK_FILTER,
        label: "SO_LOCK_FILTER",
        how: How::Fixed,
    },
    r(T, libc::TCP_NODELAY, "TCP_NODELAY"),
    r(T, libc::TCP_CORK, "TCP_CORK"),
    r(T, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    r(T, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    r(T, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    r(T, libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"),
    r(T, libc::TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT"),
    r(
        T,
        libc::TCP_THIN_LINEAR_TIMEOUTS,
        "TCP_THIN_LINEAR_TIMEOUTS",
    ),
    r(T, libc::TCP_LINGER2, "TCP_LINGER2"),
    r(T, sol::TCP_TX_DELAY, "TCP_TX_DELAY"),
    r(T, libc::TCP_INQ, "TCP_INQ"),
    r(T, libc::TCP_CONGESTION, "TCP_CONGESTION"),
    Opt {
        level: T,
        name: libc::TCP_ULP,
        label: "TCP_ULP",
        how: How::Fixed,
    },
    Opt {
        level: T,
        name: libc::TCP_REPAIR,
        label: "TCP_REPAIR",
        how: How::Fixed,
    },
    r(IP, libc::IP_TOS, "IP_TOS"),
    r(IP, libc::IP_TTL, "IP_TTL"),
    r(IP, libc::IP_MTU_DISCOVER, "IP_MTU_DISCOVER"),
    r(IP6, libc::IPV6_TCLASS, "IPV6_TCLASS"),
    r(IP6, libc::IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS"),
    r(IP6, libc::IPV6_MTU_DISCOVER, "IPV6_MTU_DISCOVER"),
];

/// Longest option value we keep (`TCP_CONGESTION`'s name: `TCP_CA_NAME_MAX` = 16).
const MAX_VALUE: usize = 16;

/// One option's value as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Value {
    len: u8,
    bytes: [u8; MAX_VALUE],
}

impl Value {
    fn int(&self) -> i64 {
        let mut b = [0u8; 8];
        let n = usize::from(self.len).min(8);
        b[..n].copy_from_slice(&self.bytes[..n]);
        match n {
            4 => i64::from(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            _ => i64::from_ne_bytes(b),
        }
    }
}

/// The values a socket had when the daemon made it: what every function finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `OPTIONS[i]`'s value, or `None` if this socket has no such option.
    values: [Option<Value>; OPTIONS.len()],
    /// File status flags (`F_GETFL`).
    status: libc::c_int,
}

// The option table is read and written as raw bytes, one generic `getsockopt`/`setsockopt`
// for every row: rustix and nix only have a typed function per option, and not for all of
// [`OPTIONS`] (`SO_LOCK_FILTER`, `SO_BUSY_POLL`, `TCP_TX_DELAY`, ...). So these stay libc.

fn get(fd: RawFd, o: &Opt) -> Option<Value> {
    let mut v = Value {
        len: 0,
        bytes: [0; MAX_VALUE],
    };
    let mut len = MAX_VALUE as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into our buffer.
    let r = unsafe { libc::getsockopt(fd, o.level, o.name, v.bytes.as_mut_ptr().cast(), &mut len) };
    if r != 0 {
        return None;
    }
    v.len = u8::try_from(len)
        .ok()
        .filter(|n| usize::from(*n) <= MAX_VALUE)?;
    Some(v)
}

fn set(fd: RawFd, o: &Opt, v: &Value) -> bool {
    // SAFETY: the bytes and length the kernel gave us for this very option.
    unsafe {
        libc::setsockopt(
            fd,
            o.level,
            o.name,
            v.bytes.as_ptr().cast(),
            libc::socklen_t::from(v.len),
        ) == 0
    }
}

fn fcntl(fd: RawFd, cmd: libc::c_int, arg: libc::c_int) -> libc::c_int {
    // SAFETY: the fcntl commands used here take (at most) one int. libc: rustix has
    // F_GETFL/F_SETFL but not F_GETOWN/F_SETOWN/F_GETSIG/F_SETSIG, and one path for all is simpler.
    unsafe { libc::fcntl(fd, cmd, arg) }
}

impl Snapshot {
    /// The current values of `fd` (a socket the daemon just made: the pool's values).
    #[must_use]
    pub fn take(fd: impl AsFd) -> Self {
        let fd = fd.as_fd().as_raw_fd();
        Self {
            values: std::array::from_fn(|i| get(fd, &OPTIONS[i])),
            status: fcntl(fd, libc::F_GETFL, 0),
        }
    }

    /// The values of a fresh socket of `dest`'s family, made by the daemon as the pool makes
    /// them (for sockets whose own snapshot is lost: leases adopted from a predecessor).
    /// Unconnected and connected sockets agree on every option of [`OPTIONS`] but the
    /// buffer sizes, which only grow from there.
    ///
    /// # Errors
    /// If no socket can be made.
    pub fn fresh(dest: SocketAddr) -> std::io::Result<Self> {
        use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
        let domain = if dest.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = socket_with(domain, SocketType::STREAM, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?;
        Ok(Self::take(&fd))
    }

    /// The recorded value of the option called `label` as an integer (tests, diagnostics).
    #[must_use]
    pub fn int(&self, label: &str) -> Option<i64> {
        let i = OPTIONS.iter().position(|o| o.label == label)?;
        self.values[i].map(|v| v.int())
    }
}

/// Why a socket cannot be put back as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unrestorable {
    /// An option that can only be read or only grow differs.
    #[error("{0} was changed and cannot be set back")]
    Option(&'static str),
    /// Setting an option back failed or did not take.
    #[error("{0} could not be set back")]
    Failed(&'static str),
    /// A socket filter is attached and locked.
    #[error("a locked socket filter is attached")]
    LockedFilter,
    /// The file status flags or owner could not be set back.
    #[error("file status flags could not be set back")]
    Status,
}

/// Put every option of `fd` back to `base` (see the module docs).
///
/// # Errors
/// What could not be put back: the socket must not be reused.
pub fn restore(fd: impl AsFd, base: &Snapshot) -> Result<(), Unrestorable> {
    let fd = fd.as_fd().as_raw_fd();
    for (o, want) in OPTIONS.iter().zip(&base.values) {
        let Some(want) = want else { continue };
        let Some(now) = get(fd, o) else {
            return Err(Unrestorable::Failed(o.label));
        };
        if now == *want {
            continue;
        }
        match o.how {
            How::NotBelow if now.int() >= want.int() => {}
            How::NotBelow | How::Fixed => return Err(Unrestorable::Option(o.label)),
            How::Restore => {
                if !set(fd, o, want) || get(fd, o) != Some(*want) {
                    return Err(Unrestorable::Failed(o.label));
                }
            }
        }
    }
    // A filter the function attached (classic or eBPF); ENOENT: there was none.
    let unused: libc::c_int = 0;
    // SAFETY: SO_DETACH_FILTER ignores its value, but the kernel wants an int's length.
    // libc: rustix has no SO_DETACH_FILTER.
    if unsafe {
        libc::setsockopt(
            fd,
            S,
            libc::SO_DETACH_FILTER,
            (&unused as *const libc::c_int).cast(),
            4,
        )
    } != 0
        && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
    {
        return Err(Unrestorable::LockedFilter);
    }
    restore_status(fd, base.status)
}

/// File status flags, `F_SETOWN` and `F_SETSIG` of the open file description (shared with
/// the function's fd) back to what the daemon's socket had.
fn restore_status(fd: RawFd, status: libc::c_int) -> Result<(), Unrestorable> {
    if fcntl(fd, libc::F_GETFL, 0) != status
        && (fcntl(fd, libc::F_SETFL, status) != 0 || fcntl(fd, libc::F_GETFL, 0) != status)
    {
        return Err(Unrestorable::Status);
    }
    if fcntl(fd, libc::F_GETOWN, 0) != 0 && fcntl(fd, libc::F_SETOWN, 0) != 0 {
        return Err(Unrestorable::Status);
    }
    if fcntl(fd, sol::F_GETSIG, 0) != 0 && fcntl(fd, sol::F_SETSIG, 0) != 0 {
        return Err(Unrestorable::Status);
    }
    Ok(())
}

/// Whether `fd` is still connected to `dest` (a function may have disconnected it with
/// `connect(AF_UNSPEC)` and connected it elsewhere).
#[must_use]
pub fn peer_is(fd: impl AsFd, dest: SocketAddr) -> bool {
    // Address and port only: an IPv6 peer's flow label and scope are not the destination's.
    let peer = rustix::net::getpeername(fd).ok().flatten().and_then(|a| SocketAddr::try_from(a).ok());
    peer.is_some_and(|p| p.ip() == dest.ip() && p.port() == dest.port())
}

/// Nothing waits on the error queue and no urgent byte is pending (`POLLERR`/`POLLPRI`).
fn quiet(fd: impl AsFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    matches!(poll(&mut [PollFd::new(&fd, PollFlags::PRI)], Some(&Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(0))
}

/// The give-back check for a socket's state: same peer as the lease, nothing on the error
/// queue, every option back to `base`.
///
/// # Errors
/// The reason to discard it ([`Discard::PeerChanged`], [`Discard::Error`],
/// [`Discard::Sockopt`]).
pub fn reset(fd: impl AsFd, dest: SocketAddr, base: &Snapshot) -> Result<(), Discard> {
    let fd = fd.as_fd();
    if !peer_is(fd, dest) {
        return Err(Discard::PeerChanged);
    }
    if !quiet(fd) {
        return Err(Discard::Error);
    }
    restore(fd, base).map_err(|e| {
        tracing::debug!(%dest, reason = %e, "socket options cannot be put back: discarded");
        Discard::Sockopt
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        let c = TcpStream::connect(a).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s, a)
    }

    fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
        // SAFETY: an int option from an int.
        let r = unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), 4) };
        assert_eq!(
            r,
            0,
            "setsockopt {level}/{name}: {}",
            std::io::Error::last_os_error()
        );
    }

    fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = 4;
        // SAFETY: an int option into an int.
        unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        v
    }

    #[test]
    fn options_a_function_set_are_put_back() {
        let (c, _s, a) = pair();
        let fd = c.as_raw_fd();
        let base = Snapshot::take(&c);
        use rustix::net::sockopt;
        let ms = Some(std::time::Duration::from_millis(1));
        sockopt::set_socket_timeout(&c, sockopt::Timeout::Recv, ms).expect("SO_RCVTIMEO");
        set_int(fd, S, libc::SO_RCVLOWAT, 4096);
        set_int(fd, T, libc::TCP_NODELAY, 1);
        set_int(fd, S, libc::SO_KEEPALIVE, 1);
        set_int(fd, T, libc::TCP_KEEPIDLE, 5);
        set_int(fd, T, libc::TCP_USER_TIMEOUT, 1234);
        set_int(fd, T, libc::TCP_NOTSENT_LOWAT, 777);
        set_int(fd, S, libc::SO_PRIORITY, 6);
        set_int(fd, IP, libc::IP_TOS, 0x10);
        set_int(fd, IP, libc::IP_TTL, 3);
        sockopt::set_socket_linger(&c, Some(std::time::Duration::ZERO)).expect("SO_LINGER");
        sockopt::set_tcp_congestion(&c, "reno").expect("TCP_CONGESTION");
        let fl = fcntl(fd, libc::F_GETFL, 0);
        assert_eq!(
            fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK | libc::O_ASYNC),
            0
        );
        // SIGIO goes to a child that can die of it (its default action), never to us.
        let mut sigio_to = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("spawn sleep");
        assert_eq!(fcntl(fd, libc::F_SETOWN, sigio_to.id() as libc::c_int), 0);
        assert_ne!(Snapshot::take(&c), base, "the options did not change");
        assert_eq!(restore(&c, &base), Ok(()));
        assert_eq!(reset(&c, a, &base), Ok(()));
        assert_eq!(Snapshot::take(&c), base);
        assert_eq!(get_int(fd, T, libc::TCP_NODELAY), 0);
        assert_eq!(get_int(fd, S, libc::SO_RCVLOWAT), 1);
        assert_eq!(fcntl(fd, libc::F_GETFL, 0), fl);
        assert_eq!(fcntl(fd, libc::F_GETOWN, 0), 0);
        let _ = sigio_to.kill();
        let _ = sigio_to.wait();
    }

    #[test]
    fn a_buffer_size_the_function_locked_discards_the_socket() {
        for name in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            let (c, _s, a) = pair();
            let fd = c.as_raw_fd();
            let base = Snapshot::take(&c);
            set_int(fd, S, name, 4096);
            assert_eq!(reset(&c, a, &base), Err(Discard::Sockopt), "option {name}");
        }
    }

    fn attach(fd: RawFd, prog: &libc::sock_fprog) -> libc::c_int {
        let sz = std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t;
        // SAFETY: a valid sock_fprog (and its instructions) for the duration of the call.
        unsafe {
            libc::setsockopt(
                fd,
                S,
                libc::SO_ATTACH_FILTER,
                (prog as *const libc::sock_fprog).cast(),
                sz,
            )
        }
    }

    #[test]
    fn a_socket_filter_is_detached() {
        let (c, _s, a) = pair();
        let fd = c.as_raw_fd();
        let base = Snapshot::take(&c);
        // "accept nothing": one classic BPF instruction, ret 0.
        let mut insn = [libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: insn.as_mut_ptr(),
        };
        assert_eq!(attach(fd, &prog), 0);
        assert_eq!(restore(&c, &base), Ok(()));
        assert_eq!(reset(&c, a, &base), Ok(()));
        // Locked: cannot be detached.
        assert_eq!(attach(fd, &prog), 0);
        set_int(fd, S, sol::SO_LOCK_FILTER, 1);
        assert_eq!(reset(&c, a, &base), Err(Discard::Sockopt));
    }

    #[test]
    fn another_peer_is_never_given_back() {
        let (c, _s, a) = pair();
        let (_, _, other) = pair();
        assert_eq!(
            reset(&c, other, &Snapshot::take(&c)),
            Err(Discard::PeerChanged)
        );
        assert!(peer_is(&c, a));
    }

    #[test]
    fn a_fresh_socket_agrees_with_a_connected_one() {
        let (c, _s, a) = pair();
        let fresh = Snapshot::fresh(a).expect("socket");
        // Nothing to put back on a connected socket nobody touched.
        assert_eq!(restore(&c, &fresh), Ok(()));
        let taken = Snapshot::take(&c);
        for (i, o) in OPTIONS.iter().enumerate() {
            if o.how == How::Restore {
                assert_eq!(taken.values[i], fresh.values[i], "{}", o.label);
            }
        }
        assert_eq!(taken.int("SO_RCVLOWAT"), Some(1));
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// `cargo test --release -p pool-manager --lib sockstate::cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn reset_of_an_untouched_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        let c = std::net::TcpStream::connect(a).expect("connect");
        let base = Snapshot::take(&c);
        let n = 20_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(reset(&c, a, &base), Ok(()));
        }
        eprintln!(
            "reset: {:.2} µs per give-back",
            t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
        );
    }
}
