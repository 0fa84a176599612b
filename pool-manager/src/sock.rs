//! Kernel-state inspection of pooled TCP sockets, and the daemon's own connects.
//!
//! Every check is a non-blocking system call on the daemon's reference to the socket
//! (`MSG_DONTWAIT`, ioctls, `TCP_INFO`), so it works whatever `O_NONBLOCK` a function left on
//! the shared file description, and pooled sockets are never registered with the reactor.
//! The checks borrow the socket (`impl AsFd`: callers pass `&s.fd`). They go through rustix
//! where it has the call (the peek, `SO_ERROR`, `FIONREAD`); `TCP_INFO`, `SIOCOUTQ` and
//! `SIOCOUTQNSD`, which it lacks, are the two libc calls left here.

use rustix::net::RecvFlags;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Why a socket left the pool without being handed out (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Discard {
    /// Past `max_lifetime`.
    Lifetime,
    /// Idle past `idle_timeout`.
    IdleTimeout,
    /// The peer sent FIN.
    PeerClosed,
    /// The socket reported an error (RST, timeout).
    Error,
    /// Bytes arrived that nobody asked for (including during quarantine).
    UnreadData,
    /// Bytes still queued to send or unacknowledged.
    Unsent,
    /// TCP state is not ESTABLISHED.
    NotEstablished,
    /// The function sent a request and left before the reply.
    PendingReply,
    /// The fd was duplicated or inherited by a child.
    Shared,
    /// Closed implicitly (dup2 over it, close_range) or replaced.
    Implicit,
    /// The process ended (or its link closed) without giving the socket back.
    LeaseLost,
    /// A `warm` pool never reuses returned sockets.
    WarmPolicy,
    /// The hand-out probe failed.
    ProbeFailed,
    /// The pool already holds `max_idle`.
    OverCapacity,
    /// The pool was removed (unused auto pool, shutdown).
    PoolRemoved,
    /// Given back connected to another peer than the lease's destination.
    PeerChanged,
    /// Socket options or file status flags the function set cannot be put back.
    Sockopt,
    /// The end-of-exchange proof got other bytes than its reply (or more).
    CheckFailed,
    /// The end-of-exchange proof got no complete reply within `check_timeout`.
    CheckTimeout,
    /// Another process still holds the socket (an inherited or passed copy).
    HeldElsewhere,
}

impl Discard {
    /// Every reason, for exporting zero counters.
    pub const ALL: [Self; 20] = [
        Self::Lifetime,
        Self::IdleTimeout,
        Self::PeerClosed,
        Self::Error,
        Self::UnreadData,
        Self::Unsent,
        Self::NotEstablished,
        Self::PendingReply,
        Self::Shared,
        Self::Implicit,
        Self::LeaseLost,
        Self::WarmPolicy,
        Self::ProbeFailed,
        Self::OverCapacity,
        Self::PoolRemoved,
        Self::PeerChanged,
        Self::Sockopt,
        Self::CheckFailed,
        Self::CheckTimeout,
        Self::HeldElsewhere,
    ];

    /// Label value.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Lifetime => "lifetime",
            Self::IdleTimeout => "idle_timeout",
            Self::PeerClosed => "peer_closed",
            Self::Error => "error",
            Self::UnreadData => "unread_data",
            Self::Unsent => "unsent",
            Self::NotEstablished => "not_established",
            Self::PendingReply => "pending_reply",
            Self::Shared => "shared",
            Self::Implicit => "implicit",
            Self::LeaseLost => "lease_lost",
            Self::WarmPolicy => "warm_policy",
            Self::ProbeFailed => "probe_failed",
            Self::OverCapacity => "over_capacity",
            Self::PoolRemoved => "pool_removed",
            Self::PeerChanged => "peer_changed",
            Self::Sockopt => "sockopt",
            Self::CheckFailed => "check_failed",
            Self::CheckTimeout => "check_timeout",
            Self::HeldElsewhere => "held_elsewhere",
        }
    }
}

/// The part of `struct tcp_info` (linux/tcp.h) we read; the kernel copies
/// `min(len, sizeof)` bytes, so older kernels just leave the tail zero.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpInfo {
    pub state: u8,
    pub ca_state: u8,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub options: u8,
    pub wscale: u8,
    pub flags: u8,
    pub rto: u32,
    pub ato: u32,
    pub snd_mss: u32,
    pub rcv_mss: u32,
    pub unacked: u32,
    pub sacked: u32,
    pub lost: u32,
    pub retrans: u32,
    pub fackets: u32,
    pub last_data_sent: u32,
    pub last_ack_sent: u32,
    pub last_data_recv: u32,
    pub last_ack_recv: u32,
    pub pmtu: u32,
    pub rcv_ssthresh: u32,
    pub rtt: u32,
    pub rttvar: u32,
    pub snd_ssthresh: u32,
    pub snd_cwnd: u32,
    pub advmss: u32,
    pub reordering: u32,
    pub rcv_rtt: u32,
    pub rcv_space: u32,
    pub total_retrans: u32,
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub notsent_bytes: u32,
    pub min_rtt: u32,
    pub data_segs_in: u32,
    pub data_segs_out: u32,
    pub delivery_rate: u64,
    pub busy_time: u64,
    pub rwnd_limited: u64,
    pub sndbuf_limited: u64,
    pub delivered: u32,
    pub delivered_ce: u32,
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
}

/// `TCP_ESTABLISHED` in `tcpi_state`.
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT`: the peer sent FIN.
pub const TCP_CLOSE_WAIT: u8 = 8;

/// TCP state and unread bytes of a socket (state 0 if TCP_INFO fails).
#[must_use]
pub fn state_and_unread(fd: impl AsFd) -> (u8, i32) {
    let fd = fd.as_fd();
    let state = tcp_info(fd).map_or(0, |i| i.state);
    (state, unread(fd).map_or(0, |n| i32::try_from(n).unwrap_or(i32::MAX)))
}

/// `TCP_INFO` of `fd`. libc: rustix has no `TCP_INFO` (nor a `struct tcp_info`).
#[must_use]
pub fn tcp_info(fd: impl AsFd) -> Option<TcpInfo> {
    let mut info = TcpInfo::default();
    let mut len = std::mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into our repr(C) struct.
    let r = unsafe {
        libc::getsockopt(fd.as_fd().as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut TcpInfo).cast(), &mut len)
    };
    (r == 0).then_some(info)
}

/// Bytes received and not read yet (`SIOCINQ`, which is `FIONREAD`).
fn unread(fd: impl AsFd) -> Option<u64> {
    rustix::io::ioctl_fionread(fd).ok()
}

/// An int-valued socket ioctl. libc: rustix wraps neither `SIOCOUTQ` nor `SIOCOUTQNSD` (its
/// generic `ioctl` would need an unsafe opcode getter just the same).
fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> Option<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) };
    (r == 0).then_some(v)
}

/// Bytes queued to send or unacknowledged (linux/sockios.h).
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ;
/// Bytes written but not yet sent (linux/sockios.h).
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Peek one byte: `Ok(0)` = FIN seen, `Ok(n)` = data waiting, `Err(WouldBlock)` = quiet.
pub(crate) fn peek(fd: impl AsFd) -> std::io::Result<usize> {
    let mut b = [0u8; 1];
    // Never consuming (PEEK), never blocking (DONTWAIT).
    Ok(rustix::net::recv(fd, &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT)?.0)
}

/// Whether `SO_ERROR` (read and cleared) is clear; a socket it cannot be read from is not.
fn no_error(fd: impl AsFd) -> bool {
    matches!(rustix::net::sockopt::socket_error(fd), Ok(Ok(())))
}

/// The check every socket passes before hand-out and after quarantine: ESTABLISHED, no error,
/// no FIN, nothing unread, nothing queued or unacknowledged.
///
/// # Errors
/// The reason to discard it.
pub fn idle_check(fd: impl AsFd) -> Result<(), Discard> {
    let fd = fd.as_fd();
    if !no_error(fd) {
        return Err(Discard::Error);
    }
    match peek(fd) {
        Ok(0) => return Err(Discard::PeerClosed),
        Ok(_) => return Err(Discard::UnreadData),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => return Err(Discard::Error),
    }
    let info = tcp_info(fd).ok_or(Discard::Error)?;
    if info.state != TCP_ESTABLISHED {
        return Err(Discard::NotEstablished);
    }
    if ioctl_int(fd, SIOCOUTQ).is_none_or(|n| n != 0) {
        return Err(Discard::Unsent);
    }
    Ok(())
}

/// Byte counters at hand-out, to judge the socket when it comes back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// `tcpi_bytes_acked`.
    pub acked: u64,
    /// `tcpi_bytes_received`.
    pub received: u64,
}

/// Counters now.
#[must_use]
pub fn counters(fd: impl AsFd) -> Counters {
    tcp_info(fd).map(|i| Counters { acked: i.bytes_acked, received: i.bytes_received }).unwrap_or_default()
}

/// The check on give-back: the function left the socket as it found it, between requests.
///
/// # Errors
/// The reason to discard it.
pub fn return_check(fd: impl AsFd, at_handout: Counters) -> Result<(), Discard> {
    let fd = fd.as_fd();
    if unread(fd).is_none_or(|n| n != 0) {
        return Err(Discard::UnreadData);
    }
    if ioctl_int(fd, SIOCOUTQNSD).is_none_or(|n| n != 0) {
        return Err(Discard::Unsent);
    }
    let info = tcp_info(fd).ok_or(Discard::Error)?;
    if info.state != TCP_ESTABLISHED {
        return Err(Discard::NotEstablished);
    }
    // A request without any reply yet: the reply would reach the next function.
    let sent = info.bytes_acked.saturating_sub(at_handout.acked) > 0 || info.unacked > 0;
    let received = info.bytes_received > at_handout.received;
    if sent && !received {
        return Err(Discard::PendingReply);
    }
    // Data sent strictly after the last data received (ms clock): a request is outstanding.
    if sent && info.last_data_sent < info.last_data_recv {
        return Err(Discard::PendingReply);
    }
    match peek(fd) {
        Ok(0) => Err(Discard::PeerClosed),
        Ok(_) => Err(Discard::UnreadData),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(_) => Err(Discard::Error),
    }
}

/// The check on an offer that comes back unused: as [`return_check`], and not a byte sent
/// or received since `at_offer`.
///
/// # Errors
/// The reason to discard it.
pub fn untouched(fd: impl AsFd, at_offer: Counters) -> Result<(), Discard> {
    let fd = fd.as_fd();
    return_check(fd, at_offer)?;
    let now = counters(fd);
    if now.acked != at_offer.acked || now.received != at_offer.received {
        return Err(Discard::Shared);
    }
    Ok(())
}

/// Congestion window in segments (0 if unknown).
#[must_use]
pub fn cwnd(fd: impl AsFd) -> u32 {
    tcp_info(fd).map_or(0, |i| i.snd_cwnd)
}

/// Local port (for metrics labels).
#[must_use]
pub fn local_port(fd: impl AsFd) -> u16 {
    let mut b = [0u8; wire::sockaddr::SOCKADDR_MAX];
    wire::sockaddr::address_of(fd.as_fd().as_raw_fd(), false, &mut b).and_then(|n| wire::Dest::from_sockaddr(&b[..n])).map_or(0, |d| d.port)
}

/// Connect a new socket to `dest` (non-blocking, bounded by `timeout`) and detach it from
/// the reactor.
///
/// # Errors
/// The connect error or a timeout.
pub async fn connect(dest: std::net::SocketAddr, timeout: Duration) -> std::io::Result<OwnedFd> {
    let s = if dest.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    connect_with(s, dest, timeout).await
}

/// Connect an existing socket (one made in another network namespace, say) to `dest`, as
/// [`connect`] does.
///
/// # Errors
/// The connect error or a timeout.
pub async fn connect_with(s: tokio::net::TcpSocket, dest: std::net::SocketAddr, timeout: Duration) -> std::io::Result<OwnedFd> {
    let stream = tokio::time::timeout(timeout, s.connect(dest))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(stream.into_std()?.into())
}

/// Send Redis `PING` and expect `+PONG` within `timeout`; leaves the socket as it was.
///
/// # Errors
/// The reason to discard the socket.
pub fn redis_ping(fd: &OwnedFd, timeout: Duration) -> Result<(), Discard> {
    const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
    const PONG: &[u8] = b"+PONG\r\n";
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::net::SendFlags;
    if rustix::net::send(fd, PING, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) != Ok(PING.len()) {
        return Err(Discard::ProbeFailed);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < PONG.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Discard::ProbeFailed);
        }
        let wait = Timespec::try_from(left.max(Duration::from_millis(1))).unwrap_or(Timespec { tv_sec: 1, tv_nsec: 0 });
        let _ = poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&wait));
        match rustix::net::recv(fd, &mut buf[got..PONG.len()], RecvFlags::DONTWAIT) {
            Ok((0, _)) => return Err(Discard::PeerClosed),
            Ok((n, _)) => got += n,
            Err(rustix::io::Errno::AGAIN) => {}
            Err(_) => return Err(Discard::Error),
        }
    }
    if &buf[..got] == PONG {
        idle_check(fd)
    } else {
        Err(Discard::ProbeFailed)
    }
}
