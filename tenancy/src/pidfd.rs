//! The process behind a pidfd, asked of the pidfd itself (no pid, so no pid reuse).
//!
//! - [`peer_pidfd`]: the pidfd of the process at the other end of a Unix connection
//!   (`SO_PEERPIDFD`, 6.5+), told apart from "this kernel has none" and "that process is gone".
//! - [`info`]: `PIDFD_GET_INFO` (6.13+): the process's pid, effective uid and cgroup v2 id in
//!   one `ioctl`, where reading `/proc/PID/...` would take an open, reads and a close each.
//! - [`pidfd_exited`]: whether it has exited (the pidfd polls readable).
//!
//! Every answer is about the process when the call ran: a caller that reads something about a
//! process through its pid confirms with [`pidfd_exited`] afterwards that it still lives.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const SO_PEERPIDFD: libc::c_int = 77;

/// `struct pidfd_info` (linux/pidfd.h, `PIDFD_INFO_SIZE_VER0` = 64 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct RawInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

const PIDFD_INFO_PID: u64 = 1 << 0;
const PIDFD_INFO_CREDS: u64 = 1 << 1;
const PIDFD_INFO_CGROUPID: u64 = 1 << 2;
/// `_IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info)`: the size is part of the request.
const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | ((std::mem::size_of::<RawInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;
const _: () = assert!(std::mem::size_of::<RawInfo>() == 64);

/// The peer of a Unix connection, as a pidfd.
#[derive(Debug)]
pub enum PeerPidfd {
    /// Its pidfd.
    Pidfd(OwnedFd),
    /// This kernel has no `SO_PEERPIDFD` (before 6.5), or it failed for a reason that says
    /// nothing about the process: identify it by its pid.
    Unavailable,
    /// The process is gone (reaped) already: a kernel that cannot make a pidfd for it says so.
    Gone,
}

/// The pidfd of the process at the other end of a Unix connection (`SO_PEERPIDFD`).
#[must_use]
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> PeerPidfd {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int (a new fd, owned by us). libc: rustix has no
    // SO_PEERPIDFD getter (only SO_PEERCRED).
    let r = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&mut fd as *mut libc::c_int).cast(), &mut len) };
    if r == 0 && fd >= 0 {
        // SAFETY: on success the kernel installed a new fd for us.
        return PeerPidfd::Pidfd(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // 6.5-6.15 refuse a pidfd for a reaped peer (ESRCH, or EINVAL from pidfd_prepare);
    // ENOPROTOOPT: no such option on this kernel.
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH | libc::EINVAL) if r != 0 => PeerPidfd::Gone,
        _ => PeerPidfd::Unavailable,
    }
}

/// What `PIDFD_GET_INFO` says about a live (or not yet reaped) process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// Its pid in the caller's pid namespace.
    pub pid: i32,
    /// Its effective uid.
    pub euid: u32,
    /// The id of its cgroup v2 (the inode of the cgroup's directory); `None` if the kernel
    /// did not say (no cgroup support).
    pub cgroup_id: Option<u64>,
}

/// Why [`info`] has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// No `PIDFD_GET_INFO` on this kernel (before 6.13), or the fd is not a pidfd.
    #[error("PIDFD_GET_INFO is not available")]
    Unsupported,
    /// The process has been reaped, or lives in no pid namespace the caller sees.
    #[error("the process is gone")]
    Gone,
    /// Another error.
    #[error("PIDFD_GET_INFO: {0}")]
    Other(std::io::Error),
}

/// `PIDFD_GET_INFO` (Linux 6.13+): pid, effective uid and cgroup id of the process behind
/// `pidfd`, in one `ioctl` on the pidfd itself.
///
/// # Errors
/// See [`InfoError`].
pub fn info(pidfd: BorrowedFd<'_>) -> Result<Info, InfoError> {
    let mut raw = RawInfo { mask: PIDFD_INFO_PID | PIDFD_INFO_CREDS | PIDFD_INFO_CGROUPID, ..RawInfo::default() };
    // SAFETY: PIDFD_GET_INFO reads the request mask from and writes at most
    // size_of::<RawInfo>() bytes (encoded in the request number) into `raw`. libc: rustix's
    // ioctl API would need an `Ioctl` impl for this one call.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, &mut raw as *mut RawInfo) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ESRCH) => InfoError::Gone,
            Some(libc::ENOTTY | libc::EINVAL | libc::EBADF) => InfoError::Unsupported,
            _ => InfoError::Other(e),
        });
    }
    if raw.mask & (PIDFD_INFO_PID | PIDFD_INFO_CREDS) != PIDFD_INFO_PID | PIDFD_INFO_CREDS {
        return Err(InfoError::Unsupported);
    }
    let pid = i32::try_from(raw.pid).ok().filter(|p| *p > 0).ok_or(InfoError::Gone)?;
    Ok(Info { pid, euid: raw.euid, cgroup_id: (raw.mask & PIDFD_INFO_CGROUPID != 0).then_some(raw.cgroupid) })
}

/// Whether `fd` is a pidfd as the kernel made it (a file of the pidfs file system, 6.9+). For
/// an fd some client handed over: [`info`] is asked only of one, never of another file whose
/// driver might answer the same request number with anything it likes.
#[must_use]
pub fn is_pidfs(fd: BorrowedFd<'_>) -> bool {
    /// `PID_FS_MAGIC` (linux/magic.h): "PIDF".
    const PID_FS_MAGIC: u64 = 0x5049_4446;
    #[allow(clippy::unnecessary_cast, reason = "f_type is i64 or u32 depending on the target")]
    rustix::fs::fstatfs(fd).is_ok_and(|s| s.f_type as u64 == PID_FS_MAGIC)
}

/// Whether the process behind a pidfd has exited (its pidfd polls readable).
#[must_use]
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // A poll that fails proves nothing about the process: counted as exited (refused).
    !matches!(poll(&mut [PollFd::new(&pidfd, PollFlags::IN)], Some(&Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pidfd_open(pid: u32) -> OwnedFd {
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a positive pid");
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).expect("pidfd_open")
    }

    #[test]
    fn info_names_the_process_and_its_cgroup() {
        let me = pidfd_open(std::process::id());
        match info(me.as_fd()) {
            Ok(i) => {
                assert_eq!(i.pid, std::process::id() as i32);
                assert_eq!(i.euid, rustix::process::geteuid().as_raw());
                if let (Some(id), Ok(dir)) = (i.cgroup_id, crate::cgroup::own_cgroup_dir()) {
                    use std::os::unix::fs::MetadataExt;
                    assert_eq!(std::fs::metadata(dir).expect("own cgroup dir").ino(), id, "the cgroup id is its directory's inode");
                }
            }
            Err(InfoError::Unsupported) => eprintln!("PIDFD_GET_INFO not available on this kernel"),
            Err(e) => panic!("{e}"),
        }
        assert!(!pidfd_exited(me.as_fd()));
        assert!(is_pidfs(me.as_fd()) || info(me.as_fd()).is_err(), "every kernel with PIDFD_GET_INFO has pidfs");
        let file = std::fs::File::open("/proc/self/status").expect("open");
        assert!(!is_pidfs(file.as_fd()));
    }

    #[test]
    fn a_reaped_process_is_gone() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pidfd = pidfd_open(child.id());
        child.wait().expect("reap");
        assert!(pidfd_exited(pidfd.as_fd()));
        assert!(matches!(info(pidfd.as_fd()), Err(InfoError::Gone | InfoError::Unsupported)));
    }

    #[test]
    fn a_socketpair_peer_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        match peer_pidfd(a.as_fd()) {
            PeerPidfd::Pidfd(p) => {
                if let Ok(i) = info(p.as_fd()) {
                    assert_eq!(i.pid, std::process::id() as i32);
                }
            }
            PeerPidfd::Unavailable => eprintln!("no SO_PEERPIDFD on this kernel"),
            PeerPidfd::Gone => panic!("this process is not gone"),
        }
    }
}
