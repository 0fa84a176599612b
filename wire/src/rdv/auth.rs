//! The rendezvous protocol's keys and MACs, written once for both ends: the daemon's peer
//! agent (a member, and one end of every link) and the rendezvous server.
//!
//! Every MAC is `HMAC-SHA256(key, len-prefixed parts...)`. What each one covers:
//!
//! * `mac_m` (member → server) and `mac_r` (server → member): [`Transcript`], the fields of
//!   one handshake, keyed with [`Keys::rendezvous`].
//! * the end-to-end link proof: [`link_proof_input`], keyed with [`Keys::link`], which the
//!   rendezvous server never holds.
//!
//! Also framing on a tokio stream ([`read_frame_async`], [`write_frame_async`]) and
//! the rule for job and member names ([`valid_name_part`]). Behind the `rdv` feature: the
//! preload library never needs any of it.

use super::{frame_len, Frame, Purpose, NONCE_LEN};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A 32-byte key.
pub type Key = [u8; 32];

/// The keys derived from a job secret. The rendezvous server gets only [`Keys::rendezvous`],
/// so it can authenticate members but cannot forge the end-to-end proof on a link.
#[derive(Clone)]
pub struct Keys {
    /// Authenticates managers to the rendezvous server and back.
    pub rendezvous: Key,
    /// Authenticates the two ends of a link to each other.
    pub link: Key,
}

impl core::fmt::Debug for Keys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Keys {
    /// Derive from the job secret.
    #[must_use]
    pub fn derive(secret: &[u8]) -> Self {
        Self { rendezvous: mac(secret, &[b"warmpool rendezvous v1"]), link: mac(secret, &[b"warmpool link v1"]) }
    }
}

fn keyed(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m
}

/// `HMAC-SHA256(key, len-prefixed parts...)`: length prefixes make the concatenation
/// unambiguous.
#[must_use]
pub fn mac(key: &[u8], parts: &[&[u8]]) -> Key {
    keyed(key, parts).finalize().into_bytes().into()
}

/// Constant-time check of a MAC.
#[must_use]
pub fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    keyed(key, parts).verify_slice(tag).is_ok()
}

/// Fresh random bytes from the kernel.
///
/// # Panics
/// If `getrandom` fails for a reason other than an interruption (no kernel entropy API).
#[must_use]
pub fn nonce<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: getrandom writes at most N - filled bytes into our buffer.
        let r = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    b
}

/// The fields of one rendezvous handshake that `mac_m` and `mac_r` cover.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    job: &'a [u8],
    name: &'a [u8],
    purpose: [u8; 1],
    link: [u8; 8],
    nonce_m: &'a [u8; NONCE_LEN],
    nonce_r: &'a [u8; NONCE_LEN],
}

impl<'a> Transcript<'a> {
    /// The handshake of `Hello{job, name, purpose, link, nonce_m}` answered by `Challenge{nonce_r}`.
    #[must_use]
    pub fn new(job: &'a str, name: &'a str, purpose: Purpose, link: u64, nonce_m: &'a [u8; NONCE_LEN], nonce_r: &'a [u8; NONCE_LEN]) -> Self {
        Self { job: job.as_bytes(), name: name.as_bytes(), purpose: [purpose as u8], link: link.to_le_bytes(), nonce_m, nonce_r }
    }

    /// What `mac_m` (the member's `Auth`) covers.
    #[must_use]
    pub fn member_input(&self) -> [&[u8]; 7] {
        [b"m", self.job, self.name, &self.purpose, &self.link, self.nonce_m, self.nonce_r]
    }

    /// What `mac_r` (the server's `Welcome`) covers: the same and the endpoint it observed
    /// (as text, `SocketAddr`'s `Display`).
    #[must_use]
    pub fn server_input<'b>(&'b self, observed: &'b str) -> [&'b [u8]; 8] {
        [b"r", self.job, self.name, &self.purpose, &self.link, self.nonce_m, self.nonce_r, observed.as_bytes()]
    }
}

/// What the end-to-end proof on a link covers when `from` proves itself to `to`: the link id,
/// both names (`JOB/NAME`) and both nonces, the prover's first. Each end sends
/// `mac(link key, link_proof_input(link, me, peer, mine, theirs))` and checks the other's
/// with the roles swapped.
#[must_use]
pub fn link_proof_input<'a>(link: &'a [u8; 8], from: &'a str, to: &'a str, from_nonce: &'a [u8], to_nonce: &'a [u8]) -> [&'a [u8]; 6] {
    [b"link", link, from.as_bytes(), to.as_bytes(), from_nonce, to_nonce]
}

/// A job secret file that cannot be used.
#[derive(Debug)]
pub enum SecretError {
    /// It could not be read.
    Read(std::path::PathBuf, std::io::Error),
    /// Fewer than [`MIN_SECRET`] bytes once surrounding whitespace is removed.
    TooShort(std::path::PathBuf),
}

impl core::fmt::Display for SecretError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Read(p, e) => write!(f, "reading secret {}: {e}", p.display()),
            Self::TooShort(p) => write!(f, "secret {} is shorter than {MIN_SECRET} bytes", p.display()),
        }
    }
}

impl std::error::Error for SecretError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read(_, e) => Some(e),
            Self::TooShort(_) => None,
        }
    }
}

/// Shortest job secret.
pub const MIN_SECRET: usize = 16;

/// Read a job secret file: at least [`MIN_SECRET`] bytes once surrounding whitespace is removed.
///
/// # Errors
/// Unreadable or too short.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, SecretError> {
    let raw = std::fs::read(path).map_err(|e| SecretError::Read(path.to_owned(), e))?;
    let s = raw.trim_ascii().to_vec();
    if s.len() < MIN_SECRET {
        return Err(SecretError::TooShort(path.to_owned()));
    }
    Ok(s)
}

/// Longest job or name part.
pub const MAX_NAME_PART: usize = 64;

/// Whether `s` is a valid job or member name: 1..=64 of `[A-Za-z0-9._-]`.
#[must_use]
pub fn valid_name_part(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_PART && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Write one frame.
///
/// # Errors
/// I/O.
pub async fn write_frame_async(s: &mut (impl AsyncWrite + Unpin), f: &Frame) -> std::io::Result<()> {
    s.write_all(&f.encode()).await
}

/// Read exactly one frame (nothing is read ahead: a link connection turns into a relayed byte
/// stream right after one).
///
/// # Errors
/// I/O; malformed frames as `InvalidData`.
pub async fn read_frame_async(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut p = [0u8; 4];
    s.read_exact(&mut p).await?;
    let n = frame_len(p).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).await?;
    Frame::decode(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_macs() {
        let k = Keys::derive(b"0123456789abcdef");
        assert_ne!(k.rendezvous, k.link);
        let t = mac(&k.link, &[b"a", b"bc"]);
        assert!(verify(&k.link, &[b"a", b"bc"], &t));
        assert!(!verify(&k.link, &[b"ab", b"c"], &t), "length prefixes keep parts apart");
        assert!(!verify(&k.rendezvous, &[b"a", b"bc"], &t));
        assert_eq!(format!("{k:?}"), "Keys(<redacted>)");
        assert_ne!(nonce::<16>(), nonce::<16>());
    }

    #[test]
    fn member_and_server_macs_differ_and_bind_every_field() {
        let (nm, nr) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let t = Transcript::new("job", "a", Purpose::Link, 7, &nm, &nr);
        let k = [9u8; 32];
        let m = mac(&k, &t.member_input());
        assert_ne!(m, mac(&k, &t.server_input("198.18.0.1:5")));
        for other in [
            Transcript::new("job", "b", Purpose::Link, 7, &nm, &nr),
            Transcript::new("job", "a", Purpose::Control, 7, &nm, &nr),
            Transcript::new("job", "a", Purpose::Link, 8, &nm, &nr),
            Transcript::new("job", "a", Purpose::Link, 7, &nr, &nm),
        ] {
            assert!(!verify(&k, &other.member_input(), &m));
        }
        let l = 7u64.to_le_bytes();
        assert_ne!(mac(&k, &link_proof_input(&l, "j/a", "j/b", &nm, &nr)), mac(&k, &link_proof_input(&l, "j/b", "j/a", &nr, &nm)));
    }
}
