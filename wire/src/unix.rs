//! Sending and receiving one datagram with at most one fd over a Unix socket.
//!
//! No allocation and no locks: the preload library calls these from `connect()` and
//! `close()`. Received fds are always opened with `MSG_CMSG_CLOEXEC` and wrapped in
//! `OwnedFd` at once; any fd beyond the first is closed here.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Control buffer big enough for `MAX_FDS` fds (aligned for `cmsghdr`).
const MAX_FDS: usize = 4;
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// What `recv` got.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the datagram.
    pub len: usize,
    /// The first fd attached, if any.
    pub fd: Option<OwnedFd>,
    /// The kernel truncated the control data (fds were lost): treat as an error.
    pub ctrunc: bool,
    /// The datagram was longer than the buffer.
    pub truncated: bool,
    /// How many fds beyond the first arrived (already closed).
    pub extra_fds: usize,
}

/// Send `data` as one datagram on `sock`, with `fd` attached if given.
///
/// # Errors
/// The `sendmsg` error.
pub fn send(sock: RawFd, data: &[u8], fd: Option<RawFd>, flags: libc::c_int) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    // The field types differ between libcs (glibc: size_t; musl: c_int, socklen_t): `as _`.
    msg.msg_iovlen = 1 as _;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes of our aligned buffer, so the first
        // header and its data fit; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, flags | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receive one datagram into `buf`, taking attached fds with `MSG_CMSG_CLOEXEC`.
///
/// # Errors
/// The `recvmsg` error (`WouldBlock` on a non-blocking socket with nothing queued).
pub fn recv(sock: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: see `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1 as _;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    debug_assert!(space <= cbuf.0.len());
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Received {
        len: n as usize,
        fd: None,
        ctrunc: msg.msg_flags & libc::MSG_CTRUNC != 0,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        extra_fds: 0,
    };
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
    // headers; we walk them with the CMSG macros and read each fd unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // Every fd the kernel installed is ours to close: wrap it at once.
                    let owned = OwnedFd::from_raw_fd(fd);
                    if out.fd.is_none() {
                        out.fd = Some(owned);
                    } else {
                        out.extra_fds += 1;
                        drop(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A connected `SOCK_SEQPACKET` pair (for this crate's tests).
    pub(crate) fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: freshly created, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn fd_travels_and_arrives_cloexec() {
        let (a, b) = pair();
        let (x, _y) = pair();
        send(a.as_raw_fd(), b"hello", Some(x.as_raw_fd()), 0).unwrap();
        let mut buf = [0u8; 16];
        let r = recv(b.as_raw_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        let fd = r.fd.expect("fd attached");
        // SAFETY: fcntl on an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        assert!(!r.ctrunc && !r.truncated);
        send(a.as_raw_fd(), b"plain", None, 0).unwrap();
        let r = recv(b.as_raw_fd(), &mut buf, 0).unwrap();
        assert!(r.fd.is_none());
    }
}
