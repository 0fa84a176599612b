//! The shim ⇄ pool-manager wire protocol, version 1.
//!
//! Both ends speak over one Unix `SOCK_SEQPACKET` connection per client process. Every
//! message is exactly one datagram (so no framing), little endian, and starts with the same
//! 8-byte header:
//!
//! | bytes | field   | meaning                                                    |
//! |-------|---------|------------------------------------------------------------|
//! | 0..2  | magic   | `0x5057` (`"WP"` on the wire)                              |
//! | 2     | version | [`VERSION`]; a daemon answers any other with `Error(Version)` |
//! | 3     | kind    | [`Kind`]                                                   |
//! | 4..8  | seq     | chosen by the client, echoed in the reply                  |
//!
//! Requests (client → daemon):
//!
//! * `Acquire` (32 bytes): `domain: u8` (4 = `AF_INET`, 6 = `AF_INET6`, the family of the
//!   *application's* socket), `flags: u8` (0), `port: u16`, `addr: [u8; 16]` (IPv4 in the
//!   first 4 bytes), `scope_id: u32`. The tenant is never part of the message: the daemon
//!   takes it from the kernel (`SO_PEERCRED`, `SO_PEERPIDFD`, the peer's cgroup).
//! * `Release` (17 bytes): `lease: u64` (a [`LeaseId`]: 1 to 2^48 − 1), `disposition: u8` ([`Disposition`]). Sent after the
//!   application's fd was closed. No reply. No fd: the daemon holds its own reference to
//!   every socket it hands out.
//! * `Status` (8 bytes): asks for the pool table. Reply: `StatusReply`.
//! * `Prewarm` (32 bytes, laid out as `Acquire`): create the caller's pool for a destination
//!   and fill it to `min_idle` now, before any function asks. Reply: `StatusReply` (a short
//!   confirmation) or `Error`.
//! * `AcquirePeer` (11..=266 bytes): `port: u16` (the channel), then the peer's name
//!   `JOB/NAME` in UTF-8 (1..=256 bytes). Asks for this side's end of a link to another
//!   function (see the pool manager's `peer` module). Reply: `Grant`, `Miss` or `Error`;
//!   possibly preceded by `Miss(Pending)`.
//! * `Prefetch` (8 bytes): sent once, at load time, without waiting: "I am starting; give me
//!   now a socket for each destination of mine whose pool prefetches". Reply: one `Offer`
//!   per such socket (at most [`MAX_OFFERS`]) (the last one flagged), or `Miss(Empty)` if there is none. Offered
//!   sockets are leased to the process like granted ones: one the program connects with is
//!   released as usual when closed; one it never used is released with
//!   `Disposition::Unused` (at exit or `execve`). An offer whose process dies without either
//!   is closed, never pooled again (the process may have passed it on).
//! * `Takeover` (8 bytes): sent by a successor pool manager (same uid as the running one, or
//!   root) on its own connection: the running daemon stops accepting, and answers with
//!   `Handover` records carrying its listening socket, its metrics listener, its pooled
//!   sockets, its client connections and their leases, then `Done`; it exits once the
//!   successor sends `Commit`, and serves on if it does not (see [`handover`]).
//! * `Delegate` (8 bytes + one fd in `SCM_RIGHTS`: a pidfd of another process): only as the
//!   first message of a connection, and only from a peer that is uid 0 in the daemon's own
//!   network namespace (an OCI hook, a seccomp agent). The daemon identifies the pidfd's
//!   process from the kernel (uid, cgroup, network namespace) and serves the whole
//!   connection as that process's tenant from then on. Reply: `StatusReply` (a short
//!   confirmation) or `Error(Denied)` (not privileged, not first, process gone).
//! * `DelegateAs` (12 bytes + a pidfd): `Delegate` with `uid: u32`, the uid the process is
//!   about to run as. For OCI hooks at `createRuntime`, when the runtime's init is still
//!   root and switches to the container's user only when it starts the program: accepted
//!   only while the process is uid 0 (the cgroup and namespace still come from the kernel).
//! * `Container` (10..=265 bytes): `stage: u8` ([`ContainerStage`]), then the container's
//!   id in UTF-8 (1..=[`MAX_CONTAINER_ID`] bytes), from the same privileged peers. `Create`,
//!   on a delegated connection: remember the container as the delegated tenant, keep its
//!   network namespace served, fill its configured pools and answer once they are filled
//!   (bounded). `Stop`, on any privileged connection: close that container's pools at once
//!   and let its namespace go. Reply: `StatusReply` or `Error`.
//!
//! Replies (daemon → client):
//!
//! * `Grant` (17 bytes + one fd in `SCM_RIGHTS`): `lease: u64` (a [`LeaseId`]), `source: u8` ([`Source`]).
//!   The fd is a connected TCP socket to the requested destination, owned by the caller from
//!   now on; the daemon keeps a duplicate until the lease ends.
//! * `Offer` (41 bytes + one fd): `lease: u64` (a [`LeaseId`]), `source: u8`, `last: u8` (1 on the final
//!   offer of the reply), then the destination as in `Acquire` (`domain: u8`, `port: u16`,
//!   `addr: [u8; 16]`, `scope_id: u32`, without the flags byte).
//! * `Miss` (13 bytes): `reason: u8` ([`MissReason`]), `retry_after_ms: u32`. The client runs
//!   its own connect. A non-zero `retry_after_ms` means "do not ask for this destination
//!   again within that time" so that unpooled destinations cost no round trip.
//!   `Miss(Pending)` is not final: the daemon is making the socket (a peer link) and the
//!   final answer, with the same `seq`, follows within `retry_after_ms`.
//! * `StatusReply` (8 bytes + UTF-8 text): one pool per line, tab-separated columns.
//! * `Error` (10 bytes + UTF-8 text): `code: u16` ([`ErrorCode`]) and a human-readable reason.
//!   The client treats it as a miss.
//! * `Handover` (kind `0x86`; 9 bytes or more, an fd with some): one binary hand-over
//!   [`handover::Record`], in both directions between a daemon and its successor (see
//!   [`handover`]). Kind `0x84` (the retired text form) is not decoded.
//!
//! A receiver closes any fd attached to a message that must not carry one, and treats a
//! truncated control message (`MSG_CTRUNC`) as an error. Any message shorter than its kind
//! requires, with a bad magic or an unknown kind, or with a lease id out of range (0 or 2^48
//! and above), is answered with `Error` and changes nothing. [`client`] is the one client.

#![warn(missing_docs)]

pub mod client;
pub mod handover;
mod lease;
pub mod rdv;
pub mod sockaddr;
pub mod unix;

pub use handover::Record;
pub use lease::{LeaseId, LeaseIdOutOfRange, MAX_OFFERS};

/// Protocol version spoken by this crate.
pub const VERSION: u8 = 1;
/// First two bytes of every message.
pub const MAGIC: u16 = 0x5057;
/// Length of the common header.
pub const HEADER_LEN: usize = 8;
/// Largest message either side sends (a status reply may be this long).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest peer name in `AcquirePeer`.
pub const MAX_PEER_NAME: usize = 256;
/// Longest container id in `Container` (runc's ids are 64 hex digits; OCI sets no limit).
pub const MAX_CONTAINER_ID: usize = 256;

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Ask for a connected socket.
    Acquire = 1,
    /// Give a leased socket back.
    Release = 2,
    /// Ask for the pool table.
    Status = 3,
    /// Fill the caller's pool for a destination ahead of demand.
    Prewarm = 4,
    /// Ask for this side's end of a link to a peer function, by name.
    AcquirePeer = 5,
    /// A successor asks the running daemon to hand everything over.
    Takeover = 6,
    /// Ask, at load time, for sockets to the destinations that prefetch.
    Prefetch = 7,
    /// Serve this connection as the tenant of the attached pidfd's process.
    Delegate = 8,
    /// A container's lifecycle event (OCI hook).
    Container = 9,
    /// `Delegate`, for a process about to switch to another uid.
    DelegateAs = 10,
    /// A socket is attached.
    Grant = 0x81,
    /// No socket: connect yourself.
    Miss = 0x82,
    /// The pool table.
    StatusReply = 0x83,
    /// One record of a hand-over to a successor (binary; `0x84` was the retired text form).
    Handover = 0x86,
    /// A socket offered ahead of demand; a destination is attached.
    Offer = 0x85,
    /// The request was refused.
    Error = 0x8f,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Acquire,
            2 => Self::Release,
            3 => Self::Status,
            4 => Self::Prewarm,
            5 => Self::AcquirePeer,
            6 => Self::Takeover,
            7 => Self::Prefetch,
            8 => Self::Delegate,
            9 => Self::Container,
            10 => Self::DelegateAs,
            0x85 => Self::Offer,
            0x86 => Self::Handover,
            0x81 => Self::Grant,
            0x82 => Self::Miss,
            0x83 => Self::StatusReply,
            0x8f => Self::Error,
            _ => return None,
        })
    }
}

/// How the application let go of a leased socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Disposition {
    /// `close()` of the only fd that referred to it: may be reused if the policy allows.
    Clean = 0,
    /// The fd had been duplicated or inherited by a child: another reference may live on.
    Shared = 1,
    /// Closed implicitly (dup2 over it, close_range) or by an unusual path: never reuse.
    Implicit = 2,
    /// An offered socket (`Offer`) the program never had: back to its pool as it was.
    Unused = 3,
}

/// Where a granted socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    /// Pre-connected, never carried application bytes.
    Warm = 1,
    /// Given back clean by an earlier function.
    Reuse = 2,
}

/// Which point of a container's life a `Container` message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ContainerStage {
    /// Created (its namespaces exist, its process has not started the program yet).
    Create = 1,
    /// Stopped: its pools can go.
    Stop = 2,
}

/// Why the daemon answered `Miss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MissReason {
    /// The destination is pooled but nothing idle is ready right now.
    Empty = 1,
    /// The destination is not pooled (and will not be for `retry_after_ms`).
    NotPooled = 2,
    /// The pool is at `max_per_destination`.
    AtLimit = 3,
    /// Not final: the socket is being made; the answer follows within `retry_after_ms`.
    Pending = 4,
}

/// Error codes carried by `Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not a message of this protocol (bad magic, truncated, unknown kind).
    Malformed = 1,
    /// Another protocol version.
    Version = 2,
    /// An fd was attached where none is expected.
    UnexpectedFd = 3,
    /// The caller is not allowed to do this.
    Denied = 4,
    /// The daemon failed internally.
    Internal = 5,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Self {
        match v {
            2 => Self::Version,
            3 => Self::UnexpectedFd,
            4 => Self::Denied,
            5 => Self::Internal,
            _ => Self::Malformed,
        }
    }
}

/// A destination as the application asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dest {
    /// 4 or 6: the family of the application's socket.
    pub domain: u8,
    /// Port, host order.
    pub port: u16,
    /// Address bytes (IPv4 in the first 4).
    pub addr: [u8; 16],
    /// IPv6 scope id.
    pub scope_id: u32,
}

impl Dest {
    /// The destination as a `core::net::SocketAddr`.
    #[must_use]
    pub fn socket_addr(&self) -> core::net::SocketAddr {
        use core::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
        if self.domain == 4 {
            let a = Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]);
            SocketAddrV4::new(a, self.port).into()
        } else {
            SocketAddrV6::new(Ipv6Addr::from(self.addr), self.port, 0, self.scope_id).into()
        }
    }

    /// Build from a `SocketAddr` (family taken from the address).
    #[must_use]
    pub fn from_socket_addr(sa: core::net::SocketAddr) -> Self {
        let mut addr = [0u8; 16];
        match sa {
            core::net::SocketAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.ip().octets());
                Self { domain: 4, port: v4.port(), addr, scope_id: 0 }
            }
            core::net::SocketAddr::V6(v6) => {
                Self { domain: 6, port: v6.port(), addr: v6.ip().octets(), scope_id: v6.scope_id() }
            }
        }
    }
}

/// A decoded message (the body of `StatusReply` and `Error` borrows from the buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    /// See the module docs.
    Acquire(Dest),
    /// See the module docs.
    Release {
        /// Lease id from the grant.
        lease: LeaseId,
        /// How the fd was let go.
        disposition: Disposition,
    },
    /// See the module docs.
    Status,
    /// See the module docs.
    Prewarm(Dest),
    /// See the module docs.
    AcquirePeer {
        /// The channel: both ends of a link name the same one.
        port: u16,
        /// `JOB/NAME` of the other function.
        name: &'a str,
    },
    /// See the module docs.
    Grant {
        /// Lease id, to be named in `Release`.
        lease: LeaseId,
        /// Warm or reused.
        source: Source,
    },
    /// See the module docs.
    Miss {
        /// Why.
        reason: MissReason,
        /// Negative-cache hint.
        retry_after_ms: u32,
    },
    /// See the module docs.
    StatusReply(&'a str),
    /// See the module docs.
    Takeover,
    /// See the module docs.
    Prefetch,
    /// See the module docs (the pidfd travels beside the message).
    Delegate,
    /// See the module docs (the pidfd travels beside the message).
    DelegateAs {
        /// The uid the process is about to run as.
        uid: u32,
    },
    /// See the module docs.
    Container {
        /// Which event.
        stage: ContainerStage,
        /// The container's id, as the runtime names it.
        id: &'a str,
    },
    /// See the module docs.
    Offer {
        /// Lease id, to be named in `Release`.
        lease: LeaseId,
        /// Warm or reused.
        source: Source,
        /// The final offer of this reply.
        last: bool,
        /// Where the attached socket is connected to (as a program would ask for it).
        dest: Dest,
    },
    /// See the module docs and [`handover`].
    Handover(Record<'a>),
    /// See the module docs.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// Human-readable reason.
        text: &'a str,
    },
}

impl Msg<'_> {
    /// The message's kind.
    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            Self::Acquire(_) => Kind::Acquire,
            Self::Release { .. } => Kind::Release,
            Self::Status => Kind::Status,
            Self::Prewarm(_) => Kind::Prewarm,
            Self::AcquirePeer { .. } => Kind::AcquirePeer,
            Self::Grant { .. } => Kind::Grant,
            Self::Miss { .. } => Kind::Miss,
            Self::StatusReply(_) => Kind::StatusReply,
            Self::Takeover => Kind::Takeover,
            Self::Prefetch => Kind::Prefetch,
            Self::Delegate => Kind::Delegate,
            Self::DelegateAs { .. } => Kind::DelegateAs,
            Self::Container { .. } => Kind::Container,
            Self::Offer { .. } => Kind::Offer,
            Self::Handover(_) => Kind::Handover,
            Self::Error { .. } => Kind::Error,
        }
    }
}

/// Why a buffer did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its kind needs.
    Truncated,
    /// Wrong magic.
    BadMagic,
    /// Another version; carries the version seen.
    Version(u8),
    /// Unknown kind byte.
    UnknownKind(u8),
    /// A field holds a value outside its enum.
    BadField,
    /// A lease id outside [`LeaseId`]'s range (0, or 2^48 and above).
    BadLease,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated => f.write_str("message truncated"),
            Self::BadMagic => f.write_str("bad magic (not a warmpool message)"),
            Self::Version(v) => write!(f, "protocol version {v} not supported (this side speaks {VERSION})"),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k:#x}"),
            Self::BadField => f.write_str("field value out of range"),
            Self::BadLease => f.write_str("lease id out of range (1 to 2^48 - 1)"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// The error code a daemon answers this with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Version(_) => ErrorCode::Version,
            _ => ErrorCode::Malformed,
        }
    }
}

fn header(buf: &mut [u8], kind: Kind, seq: u32) {
    buf[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    buf[2] = VERSION;
    buf[3] = kind as u8;
    buf[4..8].copy_from_slice(&seq.to_le_bytes());
}

/// Length of an `Offer`, the longest fixed-size message.
pub const OFFER_LEN: usize = 41;

/// Encode `msg` into `buf`, returning the length written. Text bodies are cut to fit.
///
/// # Panics
/// If `buf` is shorter than 32 bytes (every fixed-size message but `Offer` fits in 32),
/// shorter than [`OFFER_LEN`] for an `Offer`, or shorter than [`HEADER_LEN`] plus
/// [`Record::len`] for a `Handover` (at most about 4.2 KB: see [`handover::MAX_CGROUP`]).
pub fn encode(msg: &Msg<'_>, seq: u32, buf: &mut [u8]) -> usize {
    assert!(buf.len() >= 32, "encode buffer must hold at least 32 bytes");
    match *msg {
        Msg::Acquire(d) | Msg::Prewarm(d) => {
            header(buf, if matches!(msg, Msg::Acquire(_)) { Kind::Acquire } else { Kind::Prewarm }, seq);
            buf[8] = d.domain;
            buf[9] = 0;
            put_dest_rest(&d, &mut buf[10..32]);
            32
        }
        Msg::Release { lease, disposition } => {
            header(buf, Kind::Release, seq);
            buf[8..16].copy_from_slice(&lease.get().to_le_bytes());
            buf[16] = disposition as u8;
            17
        }
        Msg::Status => {
            header(buf, Kind::Status, seq);
            HEADER_LEN
        }
        Msg::Takeover => {
            header(buf, Kind::Takeover, seq);
            HEADER_LEN
        }
        Msg::Prefetch => {
            header(buf, Kind::Prefetch, seq);
            HEADER_LEN
        }
        Msg::Delegate => {
            header(buf, Kind::Delegate, seq);
            HEADER_LEN
        }
        Msg::DelegateAs { uid } => {
            header(buf, Kind::DelegateAs, seq);
            buf[8..12].copy_from_slice(&uid.to_le_bytes());
            12
        }
        Msg::Container { stage, id } => {
            header(buf, Kind::Container, seq);
            buf[8] = stage as u8;
            let end = buf.len().min(9 + MAX_CONTAINER_ID);
            9 + copy_text(id, &mut buf[9..end])
        }
        Msg::Offer { lease, source, last, dest } => {
            assert!(buf.len() >= OFFER_LEN, "an Offer needs {OFFER_LEN} bytes");
            header(buf, Kind::Offer, seq);
            buf[8..16].copy_from_slice(&lease.get().to_le_bytes());
            buf[16] = source as u8;
            buf[17] = u8::from(last);
            buf[18] = dest.domain;
            put_dest_rest(&dest, &mut buf[19..OFFER_LEN]);
            OFFER_LEN
        }
        Msg::Handover(r) => {
            header(buf, Kind::Handover, seq);
            HEADER_LEN + r.write(&mut buf[HEADER_LEN..])
        }
        Msg::AcquirePeer { port, name } => {
            header(buf, Kind::AcquirePeer, seq);
            buf[8..10].copy_from_slice(&port.to_le_bytes());
            let end = buf.len().min(10 + MAX_PEER_NAME);
            10 + copy_text(name, &mut buf[10..end])
        }
        Msg::Grant { lease, source } => {
            header(buf, Kind::Grant, seq);
            buf[8..16].copy_from_slice(&lease.get().to_le_bytes());
            buf[16] = source as u8;
            17
        }
        Msg::Miss { reason, retry_after_ms } => {
            header(buf, Kind::Miss, seq);
            buf[8] = reason as u8;
            buf[9..13].copy_from_slice(&retry_after_ms.to_le_bytes());
            13
        }
        Msg::StatusReply(text) => {
            header(buf, Kind::StatusReply, seq);
            HEADER_LEN + copy_text(text, &mut buf[HEADER_LEN..])
        }
        Msg::Error { code, text } => {
            header(buf, Kind::Error, seq);
            buf[8..10].copy_from_slice(&(code as u16).to_le_bytes());
            10 + copy_text(text, &mut buf[10..])
        }
    }
}

/// Copy as much of `text` as fits, cutting on a char boundary.
fn copy_text(text: &str, out: &mut [u8]) -> usize {
    let mut n = text.len().min(out.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    n
}

/// A destination's port, address and scope id (22 bytes), as `Acquire` and `Offer` carry them.
pub(crate) fn put_dest_rest(d: &Dest, out: &mut [u8]) {
    out[0..2].copy_from_slice(&d.port.to_le_bytes());
    out[2..18].copy_from_slice(&d.addr);
    out[18..22].copy_from_slice(&d.scope_id.to_le_bytes());
}

/// The inverse of [`put_dest_rest`], with the domain byte (4 or 6) beside it.
pub(crate) fn dest_from(domain: u8, rest: &[u8]) -> Result<Dest, DecodeError> {
    if domain != 4 && domain != 6 {
        return Err(DecodeError::BadField);
    }
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&rest[2..18]);
    Ok(Dest {
        domain,
        port: u16::from_le_bytes([rest[0], rest[1]]),
        addr,
        scope_id: u32::from_le_bytes([rest[18], rest[19], rest[20], rest[21]]),
    })
}

fn source_of(b: u8) -> Result<Source, DecodeError> {
    match b {
        1 => Ok(Source::Warm),
        2 => Ok(Source::Reuse),
        _ => Err(DecodeError::BadField),
    }
}

fn disposition_of(b: u8) -> Result<Disposition, DecodeError> {
    Ok(match b {
        0 => Disposition::Clean,
        1 => Disposition::Shared,
        2 => Disposition::Implicit,
        3 => Disposition::Unused,
        _ => return Err(DecodeError::BadField),
    })
}

fn miss_reason_of(b: u8) -> Result<MissReason, DecodeError> {
    Ok(match b {
        1 => MissReason::Empty,
        2 => MissReason::NotPooled,
        3 => MissReason::AtLimit,
        4 => MissReason::Pending,
        _ => return Err(DecodeError::BadField),
    })
}

/// Decode one datagram. Returns the message and the sequence number.
///
/// # Errors
/// See [`DecodeError`].
pub fn decode(buf: &[u8]) -> Result<(Msg<'_>, u32), DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if u16::from_le_bytes([buf[0], buf[1]]) != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if buf[2] != VERSION {
        return Err(DecodeError::Version(buf[2]));
    }
    let kind = Kind::from_u8(buf[3]).ok_or(DecodeError::UnknownKind(buf[3]))?;
    let seq = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let need = |n: usize| if buf.len() < n { Err(DecodeError::Truncated) } else { Ok(()) };
    // A lease id out of range (0, or 2^48 and above) is a field out of range.
    let lease_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i..i + 8]);
        LeaseId::new(u64::from_le_bytes(b)).ok_or(DecodeError::BadLease)
    };
    let msg = match kind {
        Kind::Acquire | Kind::Prewarm => {
            need(32)?;
            let d = dest_from(buf[8], &buf[10..32])?;
            if kind == Kind::Acquire {
                Msg::Acquire(d)
            } else {
                Msg::Prewarm(d)
            }
        }
        Kind::Release => {
            need(17)?;
            Msg::Release { lease: lease_at(8)?, disposition: disposition_of(buf[16])? }
        }
        Kind::Status => Msg::Status,
        Kind::Takeover => Msg::Takeover,
        Kind::Prefetch => Msg::Prefetch,
        Kind::Delegate => Msg::Delegate,
        Kind::DelegateAs => {
            need(12)?;
            Msg::DelegateAs { uid: u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) }
        }
        Kind::Container => {
            need(10)?;
            let stage = match buf[8] {
                1 => ContainerStage::Create,
                2 => ContainerStage::Stop,
                _ => return Err(DecodeError::BadField),
            };
            let id = core::str::from_utf8(&buf[9..]).map_err(|_| DecodeError::BadField)?;
            if id.len() > MAX_CONTAINER_ID {
                return Err(DecodeError::BadField);
            }
            Msg::Container { stage, id }
        }
        Kind::Offer => {
            need(OFFER_LEN)?;
            let source = source_of(buf[16])?;
            let last = match buf[17] {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::BadField),
            };
            let dest = dest_from(buf[18], &buf[19..OFFER_LEN])?;
            Msg::Offer { lease: lease_at(8)?, source, last, dest }
        }
        Kind::Handover => Msg::Handover(Record::read(&buf[HEADER_LEN..])?),
        Kind::AcquirePeer => {
            need(11)?;
            let name = core::str::from_utf8(&buf[10..]).map_err(|_| DecodeError::BadField)?;
            if name.len() > MAX_PEER_NAME {
                return Err(DecodeError::BadField);
            }
            Msg::AcquirePeer { port: u16::from_le_bytes([buf[8], buf[9]]), name }
        }
        Kind::Grant => {
            need(17)?;
            Msg::Grant { lease: lease_at(8)?, source: source_of(buf[16])? }
        }
        Kind::Miss => {
            need(13)?;
            Msg::Miss { reason: miss_reason_of(buf[8])?, retry_after_ms: u32::from_le_bytes([buf[9], buf[10], buf[11], buf[12]]) }
        }
        Kind::StatusReply => Msg::StatusReply(core::str::from_utf8(&buf[8..]).map_err(|_| DecodeError::BadField)?),
        Kind::Error => {
            need(10)?;
            let code = ErrorCode::from_u16(u16::from_le_bytes([buf[8], buf[9]]));
            Msg::Error { code, text: core::str::from_utf8(&buf[10..]).unwrap_or("(not UTF-8)") }
        }
    };
    Ok((msg, seq))
}

#[cfg(test)]
mod tests;
