//! The rendezvous protocol: pool managers ⇄ the rendezvous server (`warmpool-rendezvous`),
//! over TCP. Keys, MACs and async framing for both ends: [`auth`] (feature `rdv`).
//!
//! A stream of frames, `len: u32` (little endian, counting the type byte and the body, at
//! most [`MAX_FRAME`]) then `type: u8` then the body. Strings are `len: u8` + UTF-8;
//! endpoints are `family: u8` (4 or 6) + `port: u16` + `addr: [u8; 16]`.
//!
//! Every connection starts with a mutual challenge–response on the job's rendezvous key
//! (`HMAC-SHA256(job secret, "warmpool rendezvous v1")`; the rendezvous server never holds
//! the job secret itself):
//!
//! ```text
//! manager                                   rendezvous
//!   Hello{job, name, purpose, link, nonce_m} ─►
//!                                          ◄─ Challenge{nonce_r}
//!   Auth{mac_m}                             ─►   mac_m = H(k, "m" job name purpose link nonce_m nonce_r)
//!                                          ◄─ Welcome{observed endpoint, mac_r}
//!                                                mac_r = H(k, "r" job name purpose link nonce_m nonce_r observed)
//! ```
//!
//! A *control* connection (one per manager, long-lived) then carries `LinkRequest` /
//! `Assigned`, `LinkStart`, `Claimed`. A *link* connection (one per link end, made from the
//! local port the manager will punch from) carries `Ping`/`Pong` (RTT), `Punch` (the peer's
//! observed endpoint and a start delay so both ends start together), `Verdict`, and, when
//! both ends ask for the relay, `Relaying`, after which it is a raw byte stream to the peer.
//! A *spare* link connection (`Hello` with link 0) is made ahead of demand: it is
//! authenticated, its endpoint and RTT are known, and it waits for a `Punch` that names its
//! link, which saves a new connection, a handshake and an RTT probe when a link is needed.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[cfg(feature = "rdv")]
pub mod auth;

/// Largest frame (type byte + body).
pub const MAX_FRAME: usize = 4096;
/// Length of nonces.
pub const NONCE_LEN: usize = 16;
/// Length of MACs (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Each step of a handshake or a link's set-up that involves only the rendezvous server or
/// the proofs must finish within this long (both ends time out on it).
pub const STEP_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(5);
/// The rendezvous server forgets an unfinished link after this long.
pub const LINK_TTL: core::time::Duration = core::time::Duration::from_secs(30);
/// The rendezvous server keeps at most this many spare link connections per member.
pub const MAX_SPARES: usize = 16;

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// The manager's long-lived signalling connection.
    Control = 1,
    /// One end of one link: endpoint discovery, punch timing, relay.
    Link = 2,
}

/// A rendezvous frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Manager → rendezvous: who I am.
    Hello {
        /// Job.
        job: String,
        /// Name within the job.
        name: String,
        /// Connection purpose.
        purpose: Purpose,
        /// Link id for `Purpose::Link`, else 0.
        link: u64,
        /// Manager's nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Rendezvous → manager: prove it.
    Challenge {
        /// Rendezvous' nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Manager → rendezvous: the proof.
    Auth {
        /// `mac_m`.
        mac: [u8; MAC_LEN],
    },
    /// Rendezvous → manager: accepted; what the rendezvous saw as the manager's address.
    Welcome {
        /// The source address of this connection as seen by the rendezvous (after NAT).
        observed: SocketAddr,
        /// `mac_r`: the rendezvous knows the key too.
        mac: [u8; MAC_LEN],
    },
    /// Manager → rendezvous (control): a function here wants a link to `peer`.
    /// `prewarm` links are made for the pool and claimed by nobody yet.
    LinkRequest {
        /// Request id, echoed in `Assigned`.
        req: u32,
        /// Peer name within the job.
        peer: String,
        /// Channel.
        port: u16,
        /// Made ahead of demand.
        prewarm: bool,
    },
    /// Rendezvous → manager (control): the link that answers request `req`.
    Assigned {
        /// Request id.
        req: u32,
        /// Link id (0: refused, see `Refused`).
        link: u64,
    },
    /// Rendezvous → manager (control): make your end of `link` to `peer`; with `spare`,
    /// one of your spare link connections already got the punch order, only note the link.
    LinkStart {
        /// Link id.
        link: u64,
        /// Peer name within the job.
        peer: String,
        /// Channel.
        port: u16,
        /// Handled by a spare link connection.
        spare: bool,
    },
    /// Manager → rendezvous (control): a function here took `link` from the pool.
    Claimed {
        /// Link id.
        link: u64,
    },
    /// Rendezvous → manager (link): echo this.
    Ping {
        /// Opaque.
        token: u64,
    },
    /// Manager → rendezvous (link): the echo.
    Pong {
        /// As received.
        token: u64,
    },
    /// Rendezvous → manager (link): connect to `peer` from this connection's local port
    /// after `delay_us`. Names the link, so that a spare link connection (a `Hello` with
    /// link 0, made ahead of demand) learns what it is for.
    Punch {
        /// The peer's observed endpoint.
        peer: SocketAddr,
        /// Wait this long first, so both ends start together.
        delay_us: u32,
        /// The sum of both ends' RTTs to the rendezvous server: an upper estimate of the
        /// RTT between them, which bounds how long one connect attempt may wait.
        rtt_hint_us: u32,
        /// Link id.
        link: u64,
        /// Peer name within the job.
        name: String,
        /// Channel.
        port: u16,
    },
    /// Manager → rendezvous (link): `relay = false`: the direct link works, forget this
    /// connection; `true`: splice me to the peer.
    Verdict {
        /// Ask for the relay.
        relay: bool,
    },
    /// Rendezvous → manager (link): from the next byte on, this connection is the peer.
    Relaying,
    /// Either way: refused, with a reason; the sender closes the connection.
    Refused {
        /// Human-readable reason.
        reason: String,
    },
}

/// Why bytes did not decode as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Length field out of range (0 or above [`MAX_FRAME`]).
    BadLength(u32),
    /// Unknown type byte.
    UnknownType(u8),
    /// The body is shorter than its type needs, or has bytes left over.
    BadBody,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadLength(n) => write!(f, "frame length {n} out of range (1..={MAX_FRAME})"),
            Self::UnknownType(t) => write!(f, "unknown frame type {t:#x}"),
            Self::BadBody => f.write_str("malformed frame body"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Check a frame's length prefix; returns the number of bytes that follow it.
///
/// # Errors
/// [`FrameError::BadLength`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let n = u32::from_le_bytes(prefix);
    if n == 0 || n as usize > MAX_FRAME {
        return Err(FrameError::BadLength(n));
    }
    Ok(n as usize)
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        // Names are validated to be at most 255 bytes before they are sent; cut defensively.
        let mut n = s.len().min(255);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.u8(n as u8);
        self.bytes(&s.as_bytes()[..n]);
    }
    fn addr(&mut self, a: SocketAddr) {
        let mut b = [0u8; 16];
        match a.ip() {
            IpAddr::V4(v4) => {
                self.u8(4);
                b[..4].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                b = v6.octets();
            }
        }
        self.u16(a.port());
        self.bytes(&b);
    }
}

struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::BadBody);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn str(&mut self) -> Result<String, FrameError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        core::str::from_utf8(b).map(str::to_owned).map_err(|_| FrameError::BadBody)
    }
    fn addr(&mut self) -> Result<SocketAddr, FrameError> {
        let fam = self.u8()?;
        let port = self.u16()?;
        let b: [u8; 16] = self.array()?;
        let ip = match fam {
            4 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            6 => IpAddr::V6(Ipv6Addr::from(b)),
            _ => return Err(FrameError::BadBody),
        };
        Ok(SocketAddr::new(ip, port))
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::BadBody),
        }
    }
}

impl Frame {
    fn type_byte(&self) -> u8 {
        match self {
            Self::Hello { .. } => 1,
            Self::Auth { .. } => 2,
            Self::LinkRequest { .. } => 3,
            Self::Claimed { .. } => 4,
            Self::Pong { .. } => 5,
            Self::Verdict { .. } => 6,
            Self::Challenge { .. } => 0x81,
            Self::Welcome { .. } => 0x82,
            Self::Assigned { .. } => 0x83,
            Self::LinkStart { .. } => 0x84,
            Self::Ping { .. } => 0x85,
            Self::Punch { .. } => 0x86,
            Self::Relaying => 0x87,
            Self::Refused { .. } => 0x8f,
        }
    }

    /// The frame with its length prefix, ready to write.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(64));
        o.u32(0);
        o.u8(self.type_byte());
        match self {
            Self::Hello { job, name, purpose, link, nonce } => {
                o.str(job);
                o.str(name);
                o.u8(*purpose as u8);
                o.u64(*link);
                o.bytes(nonce);
            }
            Self::Challenge { nonce } => o.bytes(nonce),
            Self::Auth { mac } => o.bytes(mac),
            Self::Welcome { observed, mac } => {
                o.addr(*observed);
                o.bytes(mac);
            }
            Self::LinkRequest { req, peer, port, prewarm } => {
                o.u32(*req);
                o.str(peer);
                o.u16(*port);
                o.u8(u8::from(*prewarm));
            }
            Self::Assigned { req, link } => {
                o.u32(*req);
                o.u64(*link);
            }
            Self::LinkStart { link, peer, port, spare } => {
                o.u64(*link);
                o.str(peer);
                o.u16(*port);
                o.u8(u8::from(*spare));
            }
            Self::Claimed { link } => o.u64(*link),
            Self::Ping { token } | Self::Pong { token } => o.u64(*token),
            Self::Punch { peer, delay_us, rtt_hint_us, link, name, port } => {
                o.addr(*peer);
                o.u32(*delay_us);
                o.u32(*rtt_hint_us);
                o.u64(*link);
                o.str(name);
                o.u16(*port);
            }
            Self::Verdict { relay } => o.u8(u8::from(*relay)),
            Self::Relaying => {}
            Self::Refused { reason } => o.str(reason),
        }
        let n = (o.0.len() - 4) as u32;
        o.0[..4].copy_from_slice(&n.to_le_bytes());
        o.0
    }

    /// Decode one frame's type byte and body (the bytes after the length prefix).
    ///
    /// # Errors
    /// See [`FrameError`].
    pub fn decode(buf: &[u8]) -> Result<Self, FrameError> {
        if buf.is_empty() || buf.len() > MAX_FRAME {
            return Err(FrameError::BadLength(buf.len() as u32));
        }
        let mut i = In(&buf[1..]);
        let f = match buf[0] {
            1 => Self::Hello {
                job: i.str()?,
                name: i.str()?,
                purpose: match i.u8()? {
                    1 => Purpose::Control,
                    2 => Purpose::Link,
                    _ => return Err(FrameError::BadBody),
                },
                link: i.u64()?,
                nonce: i.array()?,
            },
            2 => Self::Auth { mac: i.array()? },
            3 => Self::LinkRequest { req: i.u32()?, peer: i.str()?, port: i.u16()?, prewarm: i.bool()? },
            4 => Self::Claimed { link: i.u64()? },
            5 => Self::Pong { token: i.u64()? },
            6 => Self::Verdict { relay: i.bool()? },
            0x81 => Self::Challenge { nonce: i.array()? },
            0x82 => Self::Welcome { observed: i.addr()?, mac: i.array()? },
            0x83 => Self::Assigned { req: i.u32()?, link: i.u64()? },
            0x84 => Self::LinkStart { link: i.u64()?, peer: i.str()?, port: i.u16()?, spare: i.bool()? },
            0x85 => Self::Ping { token: i.u64()? },
            0x86 => Self::Punch { peer: i.addr()?, delay_us: i.u32()?, rtt_hint_us: i.u32()?, link: i.u64()?, name: i.str()?, port: i.u16()? },
            0x87 => Self::Relaying,
            0x8f => Self::Refused { reason: i.str()? },
            t => return Err(FrameError::UnknownType(t)),
        };
        if !i.0.is_empty() {
            return Err(FrameError::BadBody);
        }
        Ok(f)
    }
}

/// Read one frame from a blocking reader (exactly its bytes: nothing is read ahead, so a
/// stream can turn into a relayed byte stream right after a frame).
///
/// # Errors
/// I/O errors; malformed frames as `InvalidData`.
pub fn read_frame(r: &mut impl std::io::Read) -> std::io::Result<Frame> {
    let mut p = [0u8; 4];
    r.read_exact(&mut p)?;
    let n = frame_len(p).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Frame::decode(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        let v4: SocketAddr = "198.18.0.11:40000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:1".parse().unwrap();
        vec![
            Frame::Hello { job: "j".into(), name: "mapper-1".into(), purpose: Purpose::Link, link: 9, nonce: [7; 16] },
            Frame::Challenge { nonce: [1; 16] },
            Frame::Auth { mac: [2; 32] },
            Frame::Welcome { observed: v4, mac: [3; 32] },
            Frame::Welcome { observed: v6, mac: [3; 32] },
            Frame::LinkRequest { req: 5, peer: "reducer-1".into(), port: 7000, prewarm: true },
            Frame::Assigned { req: 5, link: 77 },
            Frame::LinkStart { link: 77, peer: "mapper-1".into(), port: 7000, spare: true },
            Frame::Claimed { link: 77 },
            Frame::Ping { token: 42 },
            Frame::Pong { token: 42 },
            Frame::Punch { peer: v4, delay_us: 1500, rtt_hint_us: 3000, link: 77, name: "reducer-1".into(), port: 7000 },
            Frame::Verdict { relay: true },
            Frame::Relaying,
            Frame::Refused { reason: "bad mac".into() },
        ]
    }

    #[test]
    fn frames_roundtrip_and_prefixes_fail() {
        for f in all() {
            let bytes = f.encode();
            let n = frame_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, bytes.len() - 4);
            assert_eq!(Frame::decode(&bytes[4..]).unwrap(), f);
            let mut r = &bytes[..];
            assert_eq!(read_frame(&mut r).unwrap(), f);
            for cut in 5..bytes.len() {
                assert!(Frame::decode(&bytes[4..cut]).is_err(), "{f:?} cut at {cut}");
            }
            let mut long = bytes[4..].to_vec();
            long.push(0);
            assert_eq!(Frame::decode(&long), Err(FrameError::BadBody));
        }
    }

    #[test]
    fn bad_lengths_and_types() {
        assert_eq!(frame_len([0; 4]), Err(FrameError::BadLength(0)));
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()).is_err());
        assert_eq!(Frame::decode(&[0x77]), Err(FrameError::UnknownType(0x77)));
        assert_eq!(Frame::decode(&[6, 2]), Err(FrameError::BadBody));
    }
}
