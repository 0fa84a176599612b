//! Who is asking: the tenant of a client connection, from the kernel only.
//!
//! `SO_PEERCRED` gives the uid and pid of the process that connected. Where the kernel has
//! `SO_PEERPIDFD` (6.5+) we also take a pidfd, read the cgroup through the pid, and then
//! confirm with the pidfd that the process still lives: if it had exited, the pid could
//! belong to someone else by now and the cgroup we read would be theirs.

use crate::config::TenantBy;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// A tenant: pools never cross tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant {
    /// Peer uid.
    pub uid: u32,
    /// Peer cgroup v2 path (empty when grouping by uid only).
    pub cgroup: Arc<str>,
}

/// Credentials of a connected peer.
#[derive(Debug)]
pub struct Peer {
    /// Tenant.
    pub tenant: Tenant,
    /// Pid at connect time (for logs).
    pub pid: i32,
}

/// Errors identifying a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TenantError {
    /// `SO_PEERCRED` failed.
    #[error("SO_PEERCRED: {0}")]
    Cred(std::io::Error),
    /// The peer's cgroup could not be read.
    #[error("cgroup of pid {pid}: {source}")]
    Cgroup {
        /// Pid.
        pid: i32,
        /// Cause.
        source: shim_user::CgroupError,
    },
    /// The peer exited before it could be identified.
    #[error("peer pid {0} exited before it could be identified")]
    Gone(i32),
}

const SO_PEERPIDFD: libc::c_int = 77;

fn peer_pidfd(sock: RawFd) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int (a new fd, owned by us).
    let r = unsafe { libc::getsockopt(sock, libc::SOL_SOCKET, SO_PEERPIDFD, (&mut fd as *mut libc::c_int).cast(), &mut len) };
    // SAFETY: on success the kernel installed a new fd for us.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has exited (its pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r != 0
}

/// Identify the peer of an accepted connection.
///
/// # Errors
/// See [`TenantError`].
pub fn identify(sock: RawFd, by: TenantBy) -> Result<Peer, TenantError> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred.
    let r = unsafe { libc::getsockopt(sock, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    if r != 0 {
        return Err(TenantError::Cred(std::io::Error::last_os_error()));
    }
    let cgroup: Arc<str> = match by {
        TenantBy::Uid => Arc::from(""),
        TenantBy::UidAndCgroup => {
            let pidfd = peer_pidfd(sock);
            let cg = shim_user::cgroup_of(cred.pid).map_err(|source| TenantError::Cgroup { pid: cred.pid, source })?;
            if pidfd.as_ref().is_some_and(exited) {
                return Err(TenantError::Gone(cred.pid));
            }
            Arc::from(cg)
        }
    };
    Ok(Peer { tenant: Tenant { uid: cred.uid, cgroup }, pid: cred.pid })
}
