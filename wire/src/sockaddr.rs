//! Socket addresses in their kernel form: a [`Dest`] from the raw bytes of a `sockaddr_in`
//! or `sockaddr_in6` and back, and the check that a socket is one a pooled socket may stand
//! in for ([`unshaped_tcp`]: a TCP stream socket, never connected, nothing bound). Written
//! once here for the preload's `connect()` hook and the exec supervisor (which reads the
//! address out of the traced program's memory).
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

/// Why a socket is not one a pooled socket may replace ([`unshaped_tcp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shaped {
    /// Not a TCP stream socket, or not in state CLOSE (connecting or connected already), or
    /// its options could not be read.
    NotFreshTcp,
    /// Bound: a source address or port was chosen, or the family differs from the address's.
    Bound,
}

/// `TCP_INFO`'s `tcpi_state` of a socket that never connected.
const TCP_CLOSE: u8 = 7;

fn int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = core::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized option into an int; the kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// `tcpi_state` (byte 0 of `TCP_INFO`) of `fd`.
fn tcp_state(fd: RawFd) -> Option<u8> {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the kernel copies at most `len` bytes of tcp_info; byte 0 is tcpi_state.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) };
    (r == 0 && len >= 1).then_some(info[0])
}

/// Whether `fd` is a TCP stream socket of the family of `domain` that never connected and has
/// nothing bound ([`socket_unbound`]): the only kind a pooled socket may replace. Options the
/// program set are the caller's to check (the preload replays some; exec refuses any).
///
/// # Errors
/// What makes it unfit, [`Shaped`].
pub fn unshaped_tcp(fd: RawFd, domain: u8) -> Result<(), Shaped> {
    if int_option(fd, libc::SOL_SOCKET, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || int_option(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP)
        || tcp_state(fd) != Some(TCP_CLOSE)
    {
        return Err(Shaped::NotFreshTcp);
    }
    if socket_unbound(fd, domain) {
        Ok(())
    } else {
        Err(Shaped::Bound)
    }
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
        assert_eq!(unshaped_tcp(v4.as_raw_fd(), 4), Err(Shaped::Bound));
        assert_eq!(unshaped_tcp(v6.as_raw_fd(), 6), Ok(()));
        assert_eq!(unshaped_tcp(v6.as_raw_fd(), 4), Err(Shaped::Bound), "family mismatch");
        // SAFETY: a plain socket call; the fd is checked and owned at once.
        let udp = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)) };
        assert_eq!(unshaped_tcp(udp.as_raw_fd(), 4), Err(Shaped::NotFreshTcp));
        // A listening socket is not in CLOSE.
        let l = tcp(libc::AF_INET);
        // SAFETY: listen on our own socket.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 1) }, 0);
        assert_eq!(unshaped_tcp(l.as_raw_fd(), 4), Err(Shaped::NotFreshTcp));
    }
}
