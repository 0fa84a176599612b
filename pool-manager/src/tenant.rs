//! Who is asking: the tenant of a client connection, from the kernel only.
//!
//! `SO_PEERCRED` gives the uid and pid of the process that connected. Where the kernel has
//! `SO_PEERPIDFD` (6.5+) we also take a pidfd, read the cgroup through the pid, and then
//! confirm with the pidfd that the process still lives: if it had exited, the pid could
//! belong to someone else by now and the cgroup we read would be theirs. The network
//! namespace comes from the pidfd too (see `tenancy::netns`); a client outside the daemon's
//! own namespace holds a [`Member`] of it for as long as it is connected.

use crate::config::TenantBy;
use crate::netns::{Member, Namespaces};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;
use tenancy::{NetNs, NetNsError, NetNsId};

/// A tenant: pools never cross tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant {
    /// Peer uid.
    pub uid: u32,
    /// Peer cgroup v2 path (empty when grouping by uid only).
    pub cgroup: Arc<str>,
    /// That cgroup's id (the inode of its directory, as the kernel's connect hooks see it)
    /// when the tenant was identified: a cgroup removed and made again under the same path
    /// is another tenant. 0: not known (grouping by uid only, or no usable cgroup2 mount).
    pub cgroup_id: u64,
    /// The peer's network namespace; `None`: the daemon's own.
    pub netns: Option<NetNsId>,
}

/// Credentials of a connected peer.
#[derive(Debug)]
pub struct Peer {
    /// Tenant.
    pub tenant: Tenant,
    /// Pid at connect time (for logs).
    pub pid: i32,
    /// Membership of a namespace other than the daemon's (keeps its pools open).
    pub netns: Option<Member>,
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
        source: tenancy::CgroupError,
    },
    /// The peer's network namespace could not be identified: it gets no sockets (its own
    /// connect() runs), never one made elsewhere.
    #[error(transparent)]
    Netns(#[from] NetNsError),
    /// The peer exited before it could be identified.
    #[error("peer pid {0} exited before it could be identified")]
    Gone(i32),
}

fn netns_of(pidfd: Option<&OwnedFd>, pid: i32) -> Result<NetNs, NetNsError> {
    match pidfd {
        Some(p) => NetNs::of_pidfd(p.as_fd(), pid),
        // No pidfd on this kernel: the pid from SO_PEERCRED, as for the cgroup.
        None => NetNs::open(std::path::Path::new(&format!("/proc/{pid}/ns/net"))).map_err(|source| NetNsError::Open { pid, source }),
    }
}

/// Identify the peer of an accepted connection; a client of another network namespace
/// joins that namespace in `namespaces`.
///
/// # Errors
/// See [`TenantError`].
pub fn identify(sock: RawFd, by: TenantBy, namespaces: &Arc<Namespaces>) -> Result<Peer, TenantError> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred.
    let r = unsafe { libc::getsockopt(sock, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    if r != 0 {
        return Err(TenantError::Cred(std::io::Error::last_os_error()));
    }
    let pidfd = tenancy::netns::peer_pidfd(sock);
    let cgroup: Arc<str> = match by {
        TenantBy::Uid => Arc::from(""),
        TenantBy::UidAndCgroup => Arc::from(tenancy::cgroup::cgroup_of(cred.pid).map_err(|source| TenantError::Cgroup { pid: cred.pid, source })?),
    };
    let cgroup_id = crate::server::tenants::cgroup_id_of_member(&cgroup);
    let ns = netns_of(pidfd.as_ref(), cred.pid)?;
    if pidfd.as_ref().is_some_and(|p| tenancy::netns::pidfd_exited(p.as_fd())) {
        return Err(TenantError::Gone(cred.pid));
    }
    let member = namespaces.join(ns);
    let netns = member.as_ref().map(Member::id);
    Ok(Peer { tenant: Tenant { uid: cred.uid, cgroup, cgroup_id, netns }, pid: cred.pid, netns: member })
}
