//! Socket addresses in their kernel form: a [`Dest`] from the raw bytes of a `sockaddr_in`
//! or `sockaddr_in6` and back, and the "unbound, nothing chosen yet" check on a socket's local
//! address. Written once here for the preload's `connect()` hook and the exec supervisor
//! (which reads the address out of the traced program's memory).
//!
//! No allocation and no locks: the preload calls these from `connect()`.

use crate::Dest;
use std::os::fd::RawFd;

/// Room for the largest address handled here (`sockaddr_in6`, 28 bytes).
pub const SOCKADDR_MAX: usize = core::mem::size_of::<libc::sockaddr_in6>();
const SIN_LEN: usize = core::mem::size_of::<libc::sockaddr_in>();

/// The address family of `domain` (4 or 6, as in [`Dest::domain`]).
#[must_use]
pub fn family_of(domain: u8) -> libc::c_int {
    if domain == 4 {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

impl Dest {
    /// The destination in the first `b.len()` bytes of a socket address as the kernel lays it
    /// out (family in native order, port and IPv4 address in network order); `None` for any
    /// other family or a length too short for its family.
    #[must_use]
    pub fn from_sockaddr(b: &[u8]) -> Option<Self> {
        let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]);
        match libc::c_int::from(family) {
            libc::AF_INET if b.len() >= SIN_LEN => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&b[4..8]);
                Some(Self { domain: 4, port: u16::from_be_bytes([b[2], b[3]]), addr, scope_id: 0 })
            }
            libc::AF_INET6 if b.len() >= SOCKADDR_MAX => {
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&b[8..24]);
                let scope_id = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
                Some(Self { domain: 6, port: u16::from_be_bytes([b[2], b[3]]), addr, scope_id })
            }
            _ => None,
        }
    }

    /// The destination at `addr` (`len` bytes), as `connect()` received it.
    ///
    /// # Safety
    /// `addr` must be null or point at `len` readable bytes.
    #[must_use]
    pub unsafe fn from_raw_sockaddr(addr: *const libc::sockaddr, len: libc::socklen_t) -> Option<Self> {
        if addr.is_null() {
            return None;
        }
        // SAFETY: the caller promises `len` readable bytes at `addr`; u8 has no alignment.
        Self::from_sockaddr(unsafe { core::slice::from_raw_parts(addr.cast::<u8>(), len as usize) })
    }

    /// The kernel form of this destination into `out`; returns its length (16 or 28).
    pub fn write_sockaddr(&self, out: &mut [u8; SOCKADDR_MAX]) -> usize {
        *out = [0; SOCKADDR_MAX];
        out[0..2].copy_from_slice(&(family_of(self.domain) as u16).to_ne_bytes());
        out[2..4].copy_from_slice(&self.port.to_be_bytes());
        if self.domain == 4 {
            out[4..8].copy_from_slice(&self.addr[..4]);
            SIN_LEN
        } else {
            out[8..24].copy_from_slice(&self.addr);
            out[24..28].copy_from_slice(&self.scope_id.to_ne_bytes());
            SOCKADDR_MAX
        }
    }
}

/// Whether `local` (a socket's own address, as `getsockname` returns it) is of the family of
/// `domain` and names nothing: every byte after the family is zero (no source address, no
/// port, no flow label or scope). A socket like that is one the program has not shaped yet.
#[must_use]
pub fn unbound_of_family(local: &[u8], domain: u8) -> bool {
    local.len() > 2 && libc::c_int::from(u16::from_ne_bytes([local[0], local[1]])) == family_of(domain) && local[2..].iter().all(|b| *b == 0)
}

/// The local (`peer` false) or remote address of `fd` in kernel form into `out`; its length.
#[must_use]
pub fn address_of(fd: RawFd, peer: bool, out: &mut [u8; SOCKADDR_MAX]) -> Option<usize> {
    #[repr(C, align(8))]
    struct Buf([u8; SOCKADDR_MAX]);
    let mut buf = Buf([0; SOCKADDR_MAX]);
    let mut len = SOCKADDR_MAX as libc::socklen_t;
    let p = buf.0.as_mut_ptr().cast::<libc::sockaddr>();
    // SAFETY: `buf` has `len` writable bytes, aligned for any sockaddr; the kernel writes at most `len`.
    let r = unsafe { if peer { libc::getpeername(fd, p, &mut len) } else { libc::getsockname(fd, p, &mut len) } };
    if r != 0 {
        return None;
    }
    let n = (len as usize).min(SOCKADDR_MAX);
    out[..n].copy_from_slice(&buf.0[..n]);
    Some(n)
}

/// Whether the socket `fd` is of the family of `domain` and unbound ([`unbound_of_family`]).
#[must_use]
pub fn socket_unbound(fd: RawFd, domain: u8) -> bool {
    let mut b = [0u8; SOCKADDR_MAX];
    address_of(fd, false, &mut b).is_some_and(|n| unbound_of_family(&b[..n], domain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn roundtrips_both_families_and_rejects_short_or_foreign() {
        for s in ["198.18.0.7:8080", "[2001:db8::5%3]:443", "[::1]:1"] {
            let d = Dest::from_socket_addr(s.parse::<SocketAddr>().unwrap());
            let mut b = [0u8; SOCKADDR_MAX];
            let n = d.write_sockaddr(&mut b);
            assert_eq!(Dest::from_sockaddr(&b[..n]), Some(d), "{s}");
            assert_eq!(Dest::from_sockaddr(&b[..n - 1]), None, "{s} cut short");
            assert!(!unbound_of_family(&b[..n], d.domain));
        }
        assert_eq!(Dest::from_sockaddr(&[]), None);
        assert_eq!(Dest::from_sockaddr(&(libc::AF_UNIX as u16).to_ne_bytes()), None);
        // SAFETY: null is allowed.
        assert_eq!(unsafe { Dest::from_raw_sockaddr(core::ptr::null(), 16) }, None);
    }

    fn tcp(family: libc::c_int) -> OwnedFd {
        // SAFETY: a plain socket call; the fd is checked and owned at once.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn fresh_sockets_are_unbound_bound_ones_are_not() {
        let (v4, v6) = (tcp(libc::AF_INET), tcp(libc::AF_INET6));
        assert!(socket_unbound(v4.as_raw_fd(), 4) && socket_unbound(v6.as_raw_fd(), 6));
        assert!(!socket_unbound(v4.as_raw_fd(), 6) && !socket_unbound(v6.as_raw_fd(), 4), "family mismatch");
        let mut b = [0u8; SOCKADDR_MAX];
        let n = Dest::from_socket_addr("127.0.0.1:0".parse().unwrap()).write_sockaddr(&mut b);
        // SAFETY: binding our socket to a sockaddr_in of `n` bytes.
        assert_eq!(unsafe { libc::bind(v4.as_raw_fd(), b.as_ptr().cast(), n as libc::socklen_t) }, 0);
        assert!(!socket_unbound(v4.as_raw_fd(), 4), "a source address without a port is a choice");
    }
}
