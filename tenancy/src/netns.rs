//! Network-namespace identity of a peer, from the kernel.
//!
//! A client's namespace comes from its pidfd (`SO_PEERPIDFD` on the Unix connection):
//! `ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)` (Linux 6.11+) gives an fd of the namespace
//! itself. Where that ioctl is missing, `/proc/<pid>/ns/net` is opened and the pidfd is
//! checked afterwards: if the process had exited, the pid could name another process by now.
//! The identity is the (device, inode) of the namespace file; it cannot be reused while the
//! [`NetNs`] (which holds the fd, and so the namespace) lives.

use crate::pidfd::pidfd_exited;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Identity of a network namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetNsId {
    /// `st_dev` of the namespace file.
    pub dev: u64,
    /// `st_ino` of the namespace file (what `lsns` and `/proc/PID/ns/net` show).
    pub ino: u64,
}

impl std::fmt::Display for NetNsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// An open network namespace: its fd (which keeps it alive) and its identity.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    id: NetNsId,
}

/// Errors finding or entering a network namespace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetNsError {
    /// The namespace file could not be opened or examined.
    #[error("network namespace of pid {pid}: {source}")]
    Open {
        /// Pid.
        pid: i32,
        /// Cause.
        source: std::io::Error,
    },
    /// The process exited before its namespace could be tied to it.
    #[error("pid {0} exited before its network namespace could be read")]
    Gone(i32),
    /// `setns` failed.
    #[error("entering {id}: {source}")]
    Enter {
        /// The namespace.
        id: NetNsId,
        /// Cause.
        source: std::io::Error,
    },
}

/// `PIDFD_GET_NET_NAMESPACE` = `_IO(PIDFS_IOCTL_MAGIC 0xFF, 4)` (linux/pidfd.h, 6.11+).
const PIDFD_GET_NET_NAMESPACE: libc::c_ulong = 0xFF04;

impl NetNs {
    /// Wrap an fd that refers to a network namespace (an nsfs file).
    ///
    /// # Errors
    /// The `fstat` error.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        let id = id_of(fd.as_fd())?;
        Ok(Self { fd, id })
    }

    /// The namespace of the calling thread.
    ///
    /// # Errors
    /// The open error.
    pub fn current() -> std::io::Result<Self> {
        Self::from_fd(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    }

    /// Open the namespace at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`).
    ///
    /// # Errors
    /// The open error.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Self::from_fd(std::fs::File::open(path)?.into())
    }

    /// The network namespace of the process behind `pidfd` (its pid is `pid`, for the
    /// fallback and for errors).
    ///
    /// # Errors
    /// [`NetNsError::Open`], or [`NetNsError::Gone`] if the process exited meanwhile.
    pub fn of_pidfd(pidfd: BorrowedFd<'_>, pid: i32) -> Result<Self, NetNsError> {
        // SAFETY: the ioctl takes no argument and returns a new fd (owned by us) or -1.
        // libc: rustix's ioctl API has no fd-returning request type.
        let fd = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_NET_NAMESPACE as _, 0) };
        let fd = if fd >= 0 {
            // SAFETY: the kernel installed a new fd for us.
            unsafe { OwnedFd::from_raw_fd(fd) }
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            // The ioctl exists and says the process has exited (it has no namespaces left).
            return Err(NetNsError::Gone(pid));
        } else {
            let f = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|source| NetNsError::Open { pid, source })?;
            if pidfd_exited(pidfd) {
                return Err(NetNsError::Gone(pid));
            }
            f.into()
        };
        Self::from_fd(fd).map_err(|source| NetNsError::Open { pid, source })
    }

    /// Identity.
    #[must_use]
    pub fn id(&self) -> NetNsId {
        self.id
    }

    /// Move the calling thread into this namespace (needs `CAP_SYS_ADMIN`). Only the
    /// calling thread changes; sockets it creates afterwards belong to this namespace.
    ///
    /// # Errors
    /// [`NetNsError::Enter`].
    pub fn enter(&self) -> Result<(), NetNsError> {
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
        move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(|e| NetNsError::Enter { id: self.id, source: e.into() })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn id_of(fd: BorrowedFd<'_>) -> std::io::Result<NetNsId> {
    let st = rustix::fs::fstat(fd)?;
    Ok(NetNsId { dev: st.st_dev, ino: st.st_ino })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_through_a_pidfd_matches_proc() {
        let own = NetNs::current().expect("own netns");
        let ino = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).expect("stat");
        assert_eq!(own.id().ino, ino);
        let pidfd = rustix::process::pidfd_open(rustix::process::getpid(), rustix::process::PidfdFlags::empty()).expect("pidfd_open");
        let via = NetNs::of_pidfd(pidfd.as_fd(), std::process::id() as i32).expect("netns through pidfd");
        assert_eq!(via.id(), own.id());
        assert!(!pidfd_exited(pidfd.as_fd()));
    }
}
