//! The one blocking client of the pool manager's socket, for every program that speaks to it:
//! the preload library, the exec supervisor and seccomp agent, the CLI, the OCI hook, and a
//! successor daemon taking over.
//!
//! A [`Link`] is one `SOCK_SEQPACKET` connection. [`connect`] opens it (close-on-exec, with an
//! optional send/receive timeout, optionally moved to a high fd number); [`Link::send`] and
//! [`Link::recv`] move one message (with at most one fd) through a buffer of the caller's;
//! [`Link::request`] sends with the next sequence number and returns the answer that carries
//! it; [`Link::acquire`] is the whole exchange for a socket (`Acquire`, `AcquirePeer`):
//! answers to requests given up on are skipped (their grants closed and released),
//! `Miss(Pending)` is followed to its final answer.
//!
//! Rules (the preload library's): no heap allocation, no locks, nothing that is unsafe
//! between `fork` and `exec`. The calls the preload library interposes (`connect`, `close`,
//! `fcntl`, `setsockopt`) are made here as raw system calls, so a link never passes through
//! the interposer. A received fd is closed at once when its message must not carry one, and
//! every fd of an answer that is refused (truncated, garbage, stale) is closed too.

use crate::{decode, encode, DecodeError, Disposition, Kind, LeaseId, MissReason, Msg, Source, HEADER_LEN};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Answers to other (abandoned) requests skipped before a link counts as broken.
pub const MAX_STALE: usize = 8;
/// Longest wait the daemon may ask for with `Miss(Pending)`; one second of slack is added.
pub const MAX_PENDING: Duration = Duration::from_secs(60);
/// Largest message [`Link::send`] encodes (the longest request, `AcquirePeer`, is 266 bytes).
const SEND_BUF: usize = 320;

/// Why a link could not be opened or an exchange failed. Nothing here allocates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket path does not fit a `sockaddr_un`.
    #[error("socket path longer than {max} bytes")]
    PathTooLong {
        /// The longest path that fits.
        max: usize,
    },
    /// Making the socket, connecting it or setting its options failed.
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    /// `sendmsg` failed (a timeout is `WouldBlock`).
    #[error("sending: {0}")]
    Send(#[source] io::Error),
    /// `recvmsg` failed (a timeout is `WouldBlock`).
    #[error("receiving: {0}")]
    Recv(#[source] io::Error),
    /// The daemon closed the connection.
    #[error("the pool manager closed the connection")]
    Closed,
    /// An answer longer than the buffer, or whose fds the kernel cut.
    #[error("an answer longer than the buffer, or with its fds cut")]
    Truncated,
    /// An answer with more than one fd (all closed).
    #[error("an answer with more than one fd")]
    ExtraFds,
    /// An answer that does not decode.
    #[error("an answer that does not decode: {0}")]
    Decode(#[from] DecodeError),
    /// A message too long for [`Link::send`].
    #[error("a message too long to send")]
    TooLong,
    /// Only answers to other requests came.
    #[error("no answer to request {seq} among {MAX_STALE} answers")]
    Stale {
        /// The request's sequence number.
        seq: u32,
    },
    /// `Miss(Pending)` and no final answer within the wait it named.
    #[error("no final answer within the wait the pool manager asked for")]
    PendingTimeout,
    /// An answer of a kind the request does not have.
    #[error("unexpected answer {0:?}")]
    Unexpected(Kind),
}

/// How [`connect`] opens a link.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `SO_RCVTIMEO` and `SO_SNDTIMEO` (`None`: block).
    pub timeout: Option<Duration>,
    /// Move the link to the lowest free fd number at or above this one (out of the low
    /// numbers programs assume are theirs); `None`: where the kernel put it.
    pub min_fd: Option<RawFd>,
}

/// `syscall(2)` result as an `io::Result`.
fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Close `fd` with the system call (not through a `close` an interposer may define).
fn sys_close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and never uses it again.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

/// An fd owned while a link is being opened, closed with the system call if it goes wrong.
struct Opening(RawFd);

impl Drop for Opening {
    fn drop(&mut self) {
        sys_close(self.0);
    }
}

/// Open a link to the daemon listening at `path` (the bytes of a filesystem path, no NUL).
///
/// # Errors
/// [`ClientError::PathTooLong`], or [`ClientError::Connect`] with the failing call's error.
pub fn connect(path: &[u8], opts: &Options) -> Result<OwnedFd, ClientError> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid empty address.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // One byte stays for the terminating NUL.
    if path.len() >= sun.sun_path.len() {
        return Err(ClientError::PathTooLong { max: sun.sun_path.len() - 1 });
    }
    for (d, s) in sun.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned by `Opening` at once.
    let raw = cvt(unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) }).map_err(ClientError::Connect)?;
    let mut sock = Opening(raw as RawFd);
    if let Some(t) = opts.timeout {
        set_timeout_raw(sock.0, Some(t)).map_err(ClientError::Connect)?;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>();
    // SAFETY: `sun` is a valid address of `len` bytes for the duration of the call.
    cvt(unsafe { libc::syscall(libc::SYS_connect, sock.0, &sun as *const libc::sockaddr_un, len) }).map_err(ClientError::Connect)?;
    if let Some(min) = opts.min_fd {
        // SAFETY: F_DUPFD_CLOEXEC on our own fd; the duplicate is owned by `Opening` at once.
        if let Ok(high) = cvt(unsafe { libc::syscall(libc::SYS_fcntl, sock.0, libc::F_DUPFD_CLOEXEC, min) }) {
            sock = Opening(high as RawFd);
        }
    }
    let fd = sock.0;
    std::mem::forget(sock);
    // SAFETY: a connected socket we own and nobody else refers to.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Set `SO_RCVTIMEO` and `SO_SNDTIMEO` of `fd` (`None`: block).
fn set_timeout_raw(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let t = timeout.unwrap_or(Duration::ZERO);
    // A timeout that rounds to zero would mean "block": make it the smallest one instead.
    let usec = if timeout.is_some() { t.subsec_micros().max(u32::from(t.as_secs() == 0)) } else { 0 };
    let tv = libc::timeval { tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t, tv_usec: usec as libc::suseconds_t };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        let size = std::mem::size_of::<libc::timeval>();
        // SAFETY: setsockopt reads one timeval of `size` bytes.
        cvt(unsafe { libc::syscall(libc::SYS_setsockopt, fd, libc::SOL_SOCKET, opt, &tv as *const libc::timeval, size) })?;
    }
    Ok(())
}

/// Whether a message of this kind may come with an fd.
fn carries_fd(msg: &Msg<'_>) -> bool {
    matches!(msg, Msg::Grant { .. } | Msg::Offer { .. } | Msg::Handover(_))
}

/// One message as received: the message decoded from the caller's buffer, its sequence
/// number, and its fd (only for the kinds that carry one; any other fd is closed).
#[derive(Debug)]
pub struct Reply<'b> {
    /// The message.
    pub msg: Msg<'b>,
    /// Its sequence number.
    pub seq: u32,
    /// The fd it carried (`MSG_CMSG_CLOEXEC`).
    pub fd: Option<OwnedFd>,
}

/// What the daemon answered to a request for a socket ([`Link::acquire`]).
#[derive(Debug)]
pub enum Answer<'b> {
    /// A connected socket, the caller's from now on, under this lease.
    Grant {
        /// The socket.
        fd: OwnedFd,
        /// Its lease, to be named in `Release`.
        lease: LeaseId,
        /// Warm or reused.
        source: Source,
    },
    /// No socket: connect yourself; `retry_after_ms > 0`: not pooled, do not ask again for
    /// that long.
    Miss {
        /// Why.
        reason: MissReason,
        /// Negative-cache hint.
        retry_after_ms: u32,
    },
    /// A `Grant` that came without its fd: its lease is already given back (`Implicit`);
    /// connect yourself (treat as a miss).
    NoFd,
    /// The daemon refused (treat as a miss).
    Error {
        /// The reason it gave.
        text: &'b str,
    },
    /// The daemon took the request on (`Miss(Pending)`) and then said no: the destination
    /// exists only through the daemon (a peer link); fail the program's call.
    Refused {
        /// The reason it gave, if it was an `Error`.
        text: Option<&'b str>,
    },
}

/// A connection to the daemon and the sequence number of its last request. `F` is an
/// [`OwnedFd`], or a [`BorrowedFd`] for a caller that keeps the fd itself (the preload
/// library, whose close path reads it without a lock).
#[derive(Debug)]
pub struct Link<F: AsFd = OwnedFd> {
    fd: F,
    seq: u32,
}

impl Link<OwnedFd> {
    /// [`connect`] to `path`, with `timeout` on every send and receive.
    ///
    /// # Errors
    /// See [`connect`].
    pub fn connect(path: &std::path::Path, timeout: Option<Duration>) -> Result<Self, ClientError> {
        use std::os::unix::ffi::OsStrExt;
        Ok(Self::new(connect(path.as_os_str().as_bytes(), &Options { timeout, min_fd: None })?))
    }

    /// The connection's fd.
    #[must_use]
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl<F: AsFd> Link<F> {
    /// A link over `fd`, no request sent yet.
    pub fn new(fd: F) -> Self {
        Self::with_seq(fd, 0)
    }

    /// A link over `fd` whose last request had sequence number `seq`.
    pub fn with_seq(fd: F, seq: u32) -> Self {
        Self { fd, seq }
    }

    /// The sequence number of the last request.
    #[must_use]
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// The connection.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A new sequence number for a request (never 0: 0 is for messages with no answer).
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Set the send and receive timeout (`None`: block).
    ///
    /// # Errors
    /// The `setsockopt` error.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        set_timeout_raw(self.fd.as_fd().as_raw_fd(), timeout).map_err(ClientError::Connect)
    }

    /// Send `msg` as `seq`, with `fd` attached; `flags` for `sendmsg` (`MSG_DONTWAIT`).
    ///
    /// # Errors
    /// [`ClientError::Send`], or [`ClientError::TooLong`] for a hand-over record longer than
    /// a request.
    pub fn send(&self, msg: &Msg<'_>, seq: u32, fd: Option<BorrowedFd<'_>>, flags: libc::c_int) -> Result<(), ClientError> {
        if matches!(msg, Msg::Handover(r) if HEADER_LEN + r.len() > SEND_BUF) {
            return Err(ClientError::TooLong);
        }
        let mut buf = [0u8; SEND_BUF];
        let n = encode(msg, seq, &mut buf);
        crate::unix::send(self.fd.as_fd().as_raw_fd(), &buf[..n], fd.map(|f| f.as_raw_fd()), flags).map_err(ClientError::Send)?;
        Ok(())
    }

    /// Tell the daemon a lease ended (no answer). `flags` for `sendmsg`: `MSG_DONTWAIT` on a
    /// path that must not block. Uses 32 bytes of stack (a signal handler's close).
    ///
    /// # Errors
    /// [`ClientError::Send`].
    pub fn release(&self, lease: LeaseId, disposition: Disposition, flags: libc::c_int) -> Result<(), ClientError> {
        let mut buf = [0u8; 32];
        let n = encode(&Msg::Release { lease, disposition }, 0, &mut buf);
        crate::unix::send(self.fd.as_fd().as_raw_fd(), &buf[..n], None, flags).map_err(ClientError::Send)?;
        Ok(())
    }

    /// Receive one message into `buf` (blocking, bounded by the link's timeout).
    ///
    /// # Errors
    /// [`ClientError::Recv`], [`ClientError::Closed`], [`ClientError::Truncated`],
    /// [`ClientError::ExtraFds`], [`ClientError::Decode`]; any fd that came is closed.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> Result<Reply<'b>, ClientError> {
        let (len, fd) = self.recv_raw(buf)?;
        let (msg, seq) = decode(&buf[..len])?;
        Ok(Reply { msg, seq, fd: fd.filter(|_| carries_fd(&msg)) })
    }

    /// One datagram: its length and fd, checked for truncation and extra fds.
    fn recv_raw(&self, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>), ClientError> {
        let got = crate::unix::recv(self.fd.as_fd().as_raw_fd(), buf, 0).map_err(ClientError::Recv)?;
        if got.truncated || got.ctrunc {
            return Err(ClientError::Truncated);
        }
        if got.extra_fds > 0 {
            return Err(ClientError::ExtraFds);
        }
        if got.len == 0 {
            return Err(ClientError::Closed);
        }
        Ok((got.len, got.fd))
    }

    /// Receive until the answer to `seq`: its length in `buf` and its fd. Answers to other
    /// requests (given up on earlier) are dropped, a grant among them closed and released.
    fn recv_for(&self, seq: u32, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>), ClientError> {
        for _ in 0..=MAX_STALE {
            let (len, fd) = self.recv_raw(buf)?;
            let (msg, got) = decode(&buf[..len])?;
            if got == seq {
                return Ok((len, fd.filter(|_| carries_fd(&msg))));
            }
            if let Msg::Grant { lease, .. } = msg {
                // Its fd is dropped here; the daemon ends the lease when it reads this.
                let _ = self.release(lease, Disposition::Implicit, libc::MSG_DONTWAIT);
            }
        }
        Err(ClientError::Stale { seq })
    }

    /// Send `msg` with the next sequence number (and `fd` attached) and receive its answer
    /// into `buf`, skipping answers to earlier requests.
    ///
    /// # Errors
    /// See [`Link::send`] and [`Link::recv`]; [`ClientError::Stale`].
    pub fn request<'b>(&mut self, msg: &Msg<'_>, fd: Option<BorrowedFd<'_>>, buf: &'b mut [u8]) -> Result<Reply<'b>, ClientError> {
        let seq = self.next_seq();
        self.send(msg, seq, fd, 0)?;
        let (len, fd) = self.recv_for(seq, buf)?;
        let (msg, seq) = decode(&buf[..len])?;
        Ok(Reply { msg, seq, fd })
    }

    /// Ask for a socket (`msg` is `Acquire` or `AcquirePeer`) and wait for the final answer,
    /// following `Miss(Pending)` for as long as it names (at most [`MAX_PENDING`] and a
    /// second). `buf` holds the answer (512 bytes are plenty).
    ///
    /// # Errors
    /// See [`Link::request`]; [`ClientError::PendingTimeout`]; [`ClientError::Unexpected`]
    /// for an answer that is not a grant, a miss or an error. After any error the link is
    /// best closed: an answer may still be on its way.
    pub fn acquire<'b>(&mut self, msg: &Msg<'_>, buf: &'b mut [u8]) -> Result<Answer<'b>, ClientError> {
        let seq = self.next_seq();
        self.send(msg, seq, None, 0)?;
        let mut pending_until: Option<Instant> = None;
        let (len, fd) = loop {
            if let Some(deadline) = pending_until {
                if !wait_readable(self.fd.as_fd(), deadline) {
                    return Err(ClientError::PendingTimeout);
                }
            }
            let (len, fd) = self.recv_for(seq, buf)?;
            match decode(&buf[..len])?.0 {
                Msg::Miss { reason: MissReason::Pending, retry_after_ms } if pending_until.is_none() => {
                    let wait = Duration::from_millis(u64::from(retry_after_ms)).min(MAX_PENDING);
                    pending_until = Some(Instant::now() + wait + Duration::from_secs(1));
                }
                _ => break (len, fd),
            }
        };
        // (Decoded again outside the loop: a borrow of `buf` may only leave it from here.)
        Ok(match decode(&buf[..len])?.0 {
            Msg::Grant { lease, source } => match fd {
                Some(fd) => Answer::Grant { fd, lease, source },
                None => {
                    let _ = self.release(lease, Disposition::Implicit, libc::MSG_DONTWAIT);
                    Answer::NoFd
                }
            },
            Msg::Miss { .. } if pending_until.is_some() => Answer::Refused { text: None },
            Msg::Error { text, .. } if pending_until.is_some() => Answer::Refused { text: Some(text) },
            Msg::Miss { reason, retry_after_ms } => Answer::Miss { reason, retry_after_ms },
            Msg::Error { text, .. } => Answer::Error { text },
            other => return Err(ClientError::Unexpected(other.kind())),
        })
    }
}

/// Wait until `fd` is readable or `deadline` passes (`poll`, restarted after a signal).
pub fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // Rounded up: a wait of less than a millisecond must not become a busy loop.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
