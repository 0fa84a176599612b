//! Peer links: direct TCP connections between functions on different (NATed) hosts, made by
//! hole punching through a rendezvous server, relayed through it when no direct path
//! exists, authenticated end to end, and held in the pool like any other socket.
//!
//! How the pieces fit:
//!
//! ```text
//!  node A: pool-manager serve (peer job/a)        public: pool-manager rendezvous
//!                                                  (crate warmpool-rendezvous)
//!    control connection ──────── Hello/Auth ──────►  members {job/a, job/b}
//!    LinkRequest{b, port} ──────────────────────────► pairs requests, LinkStart to both
//!    link connection from local port Lx ──────────► observes A's public endpoint, RTT
//!          ◄── Punch{B's endpoint, delay} ─────────  (B gets the mirror image)
//!    connect(Lx → B's endpoint) ═══ TCP simultaneous open ═══ connect(Ly → A's endpoint)
//!    end-to-end proof on the new link (job secret), then hand-out over SCM_RIGHTS
//!    (or, if no SYN got through: Verdict{relay} and the link connection *is* the link)
//! ```
//!
//! A function asks by `connect()`ing to the peer's virtual address ([`VirtualRange`]) or by
//! `warmpool_connect_peer("job/b")` in the preload library; both ends of a link ask for the
//! same channel (the port). Submodules: [`agent`] (the daemon side), [`link`] (making one
//! link), [`settings`] (`[peer]` in the configuration: who may
//! have links).

pub mod agent;
mod error;
pub mod link;
pub mod settings;

pub use error::{AcquireError, ControlError, NameError, RangeError, Refusal};

use std::fmt;
use std::net::Ipv4Addr;

/// `JOB/NAME`: a function's identity among its job's peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerName {
    /// The job (the authentication domain: one secret per job).
    pub job: String,
    /// The function's name within the job.
    pub name: String,
}

/// Longest job or name part.
pub use wire::rdv::auth::MAX_NAME_PART as MAX_PART;
use wire::rdv::auth::valid_name_part as valid_part;

impl PeerName {
    /// Parse `JOB/NAME` (each part 1..=64 of `[A-Za-z0-9._-]`).
    ///
    /// # Errors
    /// [`NameError`].
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (job, name) = s.split_once('/').ok_or_else(|| NameError::NoSlash(s.into()))?;
        if !valid_part(job) || !valid_part(name) {
            return Err(NameError::BadPart(s.into()));
        }
        Ok(Self { job: job.into(), name: name.into() })
    }

    /// Parse `JOB/NAME[:PORT]` (the port is the channel; 0 when absent).
    ///
    /// # Errors
    /// [`NameError`].
    pub fn parse_with_port(s: &str) -> Result<(Self, u16), NameError> {
        match s.rsplit_once(':') {
            Some((n, p)) => Ok((Self::parse(n)?, p.parse().map_err(|_| NameError::BadPort(s.into(), p.into()))?)),
            None => Ok((Self::parse(s)?, 0)),
        }
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.job, self.name)
    }
}

pub use wire::rdv::auth::{mac, nonce, read_secret, verify, Key, Keys, SecretError};

/// The IPv4 range whose addresses stand for peers: `connect()` to one of them asks for a link
/// to the peer it names. Every node computes the same address for a name (a hash), so
/// functions can be given addresses without asking a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtualRange {
    base: u32,
    prefix: u8,
}

impl Default for VirtualRange {
    fn default() -> Self {
        Self::parse(crate::defaults::PEER_VIRTUAL_RANGE).expect("valid default")
    }
}

impl VirtualRange {
    /// Parse `A.B.C.D/N` with 8 <= N <= 30.
    ///
    /// # Errors
    /// [`RangeError`].
    pub fn parse(s: &str) -> Result<Self, RangeError> {
        let (a, n) = s.split_once('/').ok_or_else(|| RangeError::NoSlash(s.into()))?;
        let a: Ipv4Addr = a.parse().map_err(|_| RangeError::BadAddress(s.into(), a.into()))?;
        let prefix: u8 = n.parse().ok().filter(|p| (8..=30).contains(p)).ok_or_else(|| RangeError::BadPrefix(s.into()))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Self { base: u32::from(a) & mask, prefix })
    }

    /// Whether `ip` is in the range.
    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == self.base
    }

    /// The address standing for `peer` (never the network or broadcast address).
    #[must_use]
    pub fn addr_of(&self, peer: &PeerName) -> Ipv4Addr {
        let hosts = (1u64 << (32 - self.prefix)) - 2;
        // FNV-1a, 64 bit: stable across versions and machines.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in peer.to_string().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ipv4Addr::from(self.base + 1 + (h % hosts) as u32)
    }
}

impl fmt::Display for VirtualRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let p = PeerName::parse("shuffle-1/mapper.3").unwrap();
        assert_eq!(p.to_string(), "shuffle-1/mapper.3");
        assert_eq!(PeerName::parse_with_port("j/r:7000").unwrap(), (PeerName::parse("j/r").unwrap(), 7000));
        assert_eq!(PeerName::parse_with_port("j/r").unwrap().1, 0);
        for bad in ["", "j", "/n", "j/", "j/n/x", "j/n m", &format!("j/{}", "x".repeat(65))] {
            assert!(PeerName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(PeerName::parse_with_port("j/r:99999").is_err());
    }

    #[test]
    fn virtual_addresses_are_stable_and_in_range() {
        let r = VirtualRange::parse("198.19.192.0/18").unwrap();
        let a = r.addr_of(&PeerName::parse("job/a").unwrap());
        assert!(r.contains(a));
        assert_eq!(a, r.addr_of(&PeerName::parse("job/a").unwrap()));
        assert_ne!(a, r.addr_of(&PeerName::parse("job/b").unwrap()));
        assert!(!r.contains("198.19.1.2".parse().unwrap()));
        let tiny = VirtualRange::parse("198.18.7.4/30").unwrap();
        for i in 0..100 {
            let v = tiny.addr_of(&PeerName::parse(&format!("j/n{i}")).unwrap());
            assert!(v == Ipv4Addr::new(198, 18, 7, 5) || v == Ipv4Addr::new(198, 18, 7, 6), "{v}");
        }
        assert!(VirtualRange::parse("198.19.0.0/31").is_err());
        assert!(VirtualRange::parse("nope/8").is_err());
    }
}
