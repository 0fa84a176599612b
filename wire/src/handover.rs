//! Hand-over records: what a running pool manager and its successor (`serve --takeover`)
//! exchange, one [`Record`] per `Handover` message (kind `0x86`), the fd (if any) in
//! `SCM_RIGHTS`.
//!
//! Binary and length-prefixed, so that any byte a cgroup name may hold (a tab, a newline:
//! anyone with a delegated cgroup subtree chooses them) travels as it is. Body after the
//! common header, little endian:
//!
//! | tag | record | fd | fields |
//! |---|---|---|---|
//! | 0 | `Done` | - | `idle: u32`, `clients: u32`, `leases: u32` (what was sent) |
//! | 1 | `Listener` | the listening socket | - |
//! | 2 | `Idle` | a pooled socket | `uid: u32`, dest (23 bytes), `reuse: u8`, `age_ms: u64`, `cgroup_len: u16`, cgroup |
//! | 3 | `Client` | a function's link to the daemon | `uid: u32`, `pid: i32`, `cgroup_len: u16`, cgroup |
//! | 4 | `Lease` | a socket the last `Client` holds | `id: u64`, dest (23 bytes), `age_ms: u64`, `reuse: u8`, `peer: u8`, `acked: u64`, `received: u64` |
//! | 5 | `Metrics` | the metrics listener | - |
//! | 6 | `Commit` | - | successor → daemon: everything arrived and was checked; stop |
//! | 7 | `Committed` | - | daemon → successor: stopping; all is yours |
//! | 8 | `Aborted` | - | daemon → successor: serving on; keep nothing |
//!
//! A dest is `domain: u8` (4 or 6), `port: u16`, `addr: [u8; 16]`, `scope_id: u32`, as in
//! `Acquire`. Flags are 0 or 1; a cgroup is at most [`MAX_CGROUP`] bytes, any bytes. A
//! record is exactly as long as its fields: trailing bytes are an error.
//!
//! The order: the successor sends `Takeover`; the daemon sends `Listener`, `Metrics` (when
//! it has an endpoint), every `Idle`, every `Client` followed by its `Lease`s, then `Done`,
//! and waits. The successor checks all of it and prepares everything that can fail, then
//! sends `Commit`; the daemon answers `Committed` and stops. Anything else (the successor
//! closes, sends something else, or is silent too long) and the daemon answers `Aborted`
//! (if it can) and serves on with everything it had. Kind `0x84` (tab-separated text
//! records, no commit) is retired: a successor that receives it knows its predecessor
//! stops whatever happens.

use crate::{dest_from, put_dest_rest, DecodeError, Dest, LeaseId};

/// Longest cgroup path a record carries (Linux `PATH_MAX`).
pub const MAX_CGROUP: usize = 4096;
/// The kind byte of the retired text hand-over.
pub const LEGACY_KIND: u8 = 0x84;

/// One hand-over record (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// The end of what the daemon sends: counts of what it sent.
    Done {
        /// `Idle` records sent.
        idle: u32,
        /// `Client` records sent.
        clients: u32,
        /// `Lease` records sent.
        leases: u32,
    },
    /// The listening socket.
    Listener,
    /// An idle pooled socket.
    Idle {
        /// Tenant uid.
        uid: u32,
        /// Tenant cgroup (empty when tenants are uids only); any bytes.
        cgroup: &'a [u8],
        /// Where it is connected.
        dest: Dest,
        /// Given back by a function (else warm).
        reuse: bool,
        /// Since it was connected.
        age_ms: u64,
    },
    /// A client connection.
    Client {
        /// Tenant uid.
        uid: u32,
        /// Tenant cgroup; any bytes.
        cgroup: &'a [u8],
        /// Pid at connect time.
        pid: i32,
    },
    /// A socket the last `Client` holds.
    Lease {
        /// Lease id.
        id: LeaseId,
        /// Where it is connected.
        dest: Dest,
        /// Since it was connected.
        age_ms: u64,
        /// Its pool's policy is reuse (else warm).
        reuse: bool,
        /// A peer link.
        peer: bool,
        /// Bytes acked at hand-out.
        acked: u64,
        /// Bytes received at hand-out.
        received: u64,
    },
    /// The metrics endpoint's listening socket.
    Metrics,
    /// Successor → daemon: stop, everything is mine.
    Commit,
    /// Daemon → successor: stopping.
    Committed,
    /// Daemon → successor: the take-over is off; I serve on.
    Aborted,
}

const DEST_LEN: usize = 23;

impl Record<'_> {
    /// Encoded length of the body (after the common header).
    #[must_use]
    pub fn len(&self) -> usize {
        1 + match self {
            Self::Done { .. } => 12,
            Self::Idle { cgroup, .. } => 4 + DEST_LEN + 1 + 8 + 2 + cgroup.len(),
            Self::Client { cgroup, .. } => 4 + 4 + 2 + cgroup.len(),
            Self::Lease { .. } => 8 + DEST_LEN + 8 + 1 + 1 + 8 + 8,
            Self::Listener | Self::Metrics | Self::Commit | Self::Committed | Self::Aborted => 0,
        }
    }

    /// Never empty (a tag byte at least); for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Write the body into `out`; returns its length.
    ///
    /// # Panics
    /// If `out` is shorter than [`Record::len`] or a cgroup is longer than [`MAX_CGROUP`].
    pub fn write(&self, out: &mut [u8]) -> usize {
        let n = self.len();
        assert!(out.len() >= n, "a {self:?} record needs {n} bytes");
        let mut w = Writer { out, at: 0 };
        match *self {
            Self::Done { idle, clients, leases } => {
                w.u8(0);
                w.bytes(&idle.to_le_bytes());
                w.bytes(&clients.to_le_bytes());
                w.bytes(&leases.to_le_bytes());
            }
            Self::Listener => w.u8(1),
            Self::Idle { uid, cgroup, dest, reuse, age_ms } => {
                w.u8(2);
                w.bytes(&uid.to_le_bytes());
                w.dest(&dest);
                w.u8(u8::from(reuse));
                w.bytes(&age_ms.to_le_bytes());
                w.cgroup(cgroup);
            }
            Self::Client { uid, cgroup, pid } => {
                w.u8(3);
                w.bytes(&uid.to_le_bytes());
                w.bytes(&pid.to_le_bytes());
                w.cgroup(cgroup);
            }
            Self::Lease { id, dest, age_ms, reuse, peer, acked, received } => {
                w.u8(4);
                w.bytes(&id.get().to_le_bytes());
                w.dest(&dest);
                w.bytes(&age_ms.to_le_bytes());
                w.u8(u8::from(reuse));
                w.u8(u8::from(peer));
                w.bytes(&acked.to_le_bytes());
                w.bytes(&received.to_le_bytes());
            }
            Self::Metrics => w.u8(5),
            Self::Commit => w.u8(6),
            Self::Committed => w.u8(7),
            Self::Aborted => w.u8(8),
        }
        debug_assert_eq!(w.at, n);
        n
    }

    /// Read a body (everything after the common header).
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] when too short, [`DecodeError::BadField`] (or [`DecodeError::BadLease`] for a lease id out of range) for an unknown
    /// tag, a flag other than 0 or 1, a bad dest, a cgroup over [`MAX_CGROUP`] or trailing
    /// bytes.
    pub fn read(body: &[u8]) -> Result<Record<'_>, DecodeError> {
        let mut r = Reader { body, at: 0 };
        let rec = match r.u8()? {
            0 => Record::Done { idle: r.u32()?, clients: r.u32()?, leases: r.u32()? },
            1 => Record::Listener,
            2 => {
                let (uid, dest, reuse, age_ms) = (r.u32()?, r.dest()?, r.flag()?, r.u64()?);
                Record::Idle { uid, cgroup: r.cgroup()?, dest, reuse, age_ms }
            }
            3 => {
                let (uid, pid) = (r.u32()?, r.u32()? as i32);
                Record::Client { uid, cgroup: r.cgroup()?, pid }
            }
            4 => Record::Lease {
                id: LeaseId::new(r.u64()?).ok_or(DecodeError::BadLease)?,
                dest: r.dest()?,
                age_ms: r.u64()?,
                reuse: r.flag()?,
                peer: r.flag()?,
                acked: r.u64()?,
                received: r.u64()?,
            },
            5 => Record::Metrics,
            6 => Record::Commit,
            7 => Record::Committed,
            8 => Record::Aborted,
            _ => return Err(DecodeError::BadField),
        };
        if r.at != body.len() {
            return Err(DecodeError::BadField);
        }
        Ok(rec)
    }
}

struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn dest(&mut self, d: &Dest) {
        self.out[self.at] = d.domain;
        put_dest_rest(d, &mut self.out[self.at + 1..self.at + DEST_LEN]);
        self.at += DEST_LEN;
    }
    fn cgroup(&mut self, c: &[u8]) {
        assert!(c.len() <= MAX_CGROUP, "a cgroup of {} bytes (at most {MAX_CGROUP})", c.len());
        self.bytes(&(c.len() as u16).to_le_bytes());
        self.bytes(c);
    }
}

struct Reader<'b> {
    body: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8], DecodeError> {
        let b = self.body.get(self.at..self.at + n).ok_or(DecodeError::Truncated)?;
        self.at += n;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(v))
    }
    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadField),
        }
    }
    fn dest(&mut self) -> Result<Dest, DecodeError> {
        let b = self.take(DEST_LEN)?;
        dest_from(b[0], &b[1..])
    }
    fn cgroup(&mut self) -> Result<&'b [u8], DecodeError> {
        let b = self.take(2)?;
        let n = usize::from(u16::from_le_bytes([b[0], b[1]]));
        if n > MAX_CGROUP {
            return Err(DecodeError::BadField);
        }
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, Msg, MAX_MESSAGE};

    fn roundtrip(r: Record<'_>) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = encode(&Msg::Handover(r), 9, &mut buf);
        assert_eq!(n, crate::HEADER_LEN + r.len());
        assert_eq!(decode(&buf[..n]), Ok((Msg::Handover(r), 9)));
        // Every strict prefix and every extension is rejected, never misread.
        for cut in crate::HEADER_LEN..n {
            assert!(decode(&buf[..cut]).is_err(), "{r:?} cut at {cut}");
        }
        assert_eq!(decode(&buf[..n + 1]), Err(DecodeError::BadField), "{r:?} with a trailing byte");
    }

    #[test]
    fn records_carry_any_bytes() {
        let v4 = Dest::from_socket_addr("198.18.0.2:80".parse().unwrap());
        let v6 = Dest::from_socket_addr("[2001:db8::1]:443".parse().unwrap());
        let every_byte: Vec<u8> = (0..=255u8).collect();
        roundtrip(Record::Listener);
        roundtrip(Record::Metrics);
        roundtrip(Record::Commit);
        roundtrip(Record::Committed);
        roundtrip(Record::Aborted);
        roundtrip(Record::Done { idle: 3, clients: u32::MAX, leases: 0 });
        roundtrip(Record::Idle { uid: 1000, cgroup: b"/wpsec/fn\tx\n\"y\"", dest: v4, reuse: true, age_ms: 1234 });
        roundtrip(Record::Idle { uid: 0, cgroup: b"", dest: v6, reuse: false, age_ms: u64::MAX });
        roundtrip(Record::Client { uid: 65534, cgroup: &every_byte, pid: -1 });
        roundtrip(Record::Client { uid: 1, cgroup: &[b'a'; MAX_CGROUP], pid: 42 });
        roundtrip(Record::Lease { id: LeaseId::new(7).unwrap(), dest: v4, age_ms: 5, reuse: true, peer: false, acked: 1 << 40, received: 3 });
    }

    #[test]
    fn bad_records_are_rejected() {
        let mut body = vec![0u8; 64];
        let v4 = Dest::from_socket_addr("198.18.0.2:80".parse().unwrap());
        let n = Record::Idle { uid: 1, cgroup: b"/a", dest: v4, reuse: true, age_ms: 1 }.write(&mut body);
        let idle = &body[..n];
        assert!(Record::read(idle).is_ok());
        let with = |at: usize, v: u8| {
            let mut b = idle.to_vec();
            b[at] = v;
            Record::read(&b).map(|_| ())
        };
        assert_eq!(with(0, 9), Err(DecodeError::BadField), "unknown tag");
        assert_eq!(with(5, 5), Err(DecodeError::BadField), "bad domain");
        assert_eq!(with(28, 2), Err(DecodeError::BadField), "reuse flag 2");
        assert_eq!(with(37, 3), Err(DecodeError::Truncated), "cgroup longer than the record");
        let mut long = vec![3u8, 0, 0, 0, 0, 0, 0, 0, 0];
        long.extend_from_slice(&((MAX_CGROUP + 1) as u16).to_le_bytes());
        long.resize(long.len() + MAX_CGROUP + 1, b'x');
        assert_eq!(Record::read(&long).map(|_| ()), Err(DecodeError::BadField), "cgroup over MAX_CGROUP");
        assert_eq!(Record::read(&[]), Err(DecodeError::Truncated));
        let lease = Record::Lease { id: LeaseId::MAX, dest: v4, age_ms: 1, reuse: false, peer: false, acked: 0, received: 0 };
        let n = lease.write(&mut body);
        for bad in [0, 1 << 48] {
            body[1..9].copy_from_slice(&u64::to_le_bytes(bad));
            assert_eq!(Record::read(&body[..n]).map(|_| ()), Err(DecodeError::BadLease), "lease id {bad}");
        }
    }
}
