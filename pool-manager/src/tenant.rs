//! Who is asking: the tenant of a client connection, from the kernel only.
//!
//! `SO_PEERCRED` gives the uid and pid of the process that connected. Where the kernel has
//! `SO_PEERPIDFD` (6.5+) we also take a pidfd, find the cgroup (its id from the pidfd with
//! `PIDFD_GET_INFO` on 6.13+, its path from a cache by id, else from `/proc/PID/cgroup`), and
//! then confirm with the pidfd that the process still lives: if it had exited, the pid could
//! belong to someone else by now and what we read through it would be theirs. The network
//! namespace comes from the pidfd too (see `tenancy::netns`); a client outside the daemon's
//! own namespace holds a [`Member`] of it for as long as it is connected.
//!
//! A process that ended before it could be identified (a program that links at load time and
//! exits at once) is [`TenantError::Gone`], told apart from real failures by
//! [`TenantError::is_gone`]: the first sign of its end stops the work for it.
//!
//! A privileged client can also hand over a pidfd (`Msg::Delegate`): [`identify_pidfd`]
//! then identifies that process the same way (its pid and uid from the pidfd, or from its
//! fdinfo and `/proc/<pid>/status` before 6.13, confirmed by the pidfd still being alive
//! afterwards).

use crate::config::TenantBy;
use crate::netns::{Member, Namespaces};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use tenancy::pidfd::{self, PeerPidfd};
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
    /// A delegated fd is not a pidfd of a live process in the daemon's pid namespace.
    #[error("the delegated fd is not a pidfd of a live process")]
    NotAPidfd,
    /// `DelegateAs` for a process that no longer runs as root: its own uid stands.
    #[error("pid {pid} already runs as uid {uid}: a uid can be named only for a process that is still root")]
    NotRoot {
        /// Pid.
        pid: i32,
        /// Its uid.
        uid: u32,
    },
    /// The delegated process's credentials could not be read.
    #[error("uid of pid {pid}: {source}")]
    Uid {
        /// Pid.
        pid: i32,
        /// Cause.
        source: std::io::Error,
    },
}

impl TenantError {
    /// Whether this says only that the process ended before it could be identified: normal
    /// for a program that links at load time and exits at once (`/bin/true`, shell helpers).
    #[must_use]
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone(_) | Self::Netns(NetNsError::Gone(_)))
    }
}

/// Whether the other end of a client connection has closed it (`POLLHUP`: the process exited
/// or closed its link). A half-closed link (`shutdown(SHUT_WR)`) is not hung up.
#[must_use]
pub fn link_hung_up(sock: impl AsFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&sock, PollFlags::empty())];
    matches!(poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(1)) && fds[0].revents().contains(PollFlags::HUP)
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
pub fn identify(sock: impl AsFd, by: TenantBy, namespaces: &Arc<Namespaces>) -> Result<Peer, TenantError> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred. libc, not rustix's `socket_peercred`: its `UCred`
    // holds a non-zero `Pid`, and the kernel reports pid 0 for a peer outside our pid namespace.
    let r = unsafe { libc::getsockopt(sock.as_fd().as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    if r != 0 {
        return Err(TenantError::Cred(std::io::Error::last_os_error()));
    }
    let pidfd = match pidfd::peer_pidfd(sock.as_fd()) {
        PeerPidfd::Pidfd(p) => Some(p),
        PeerPidfd::Unavailable => None,
        PeerPidfd::Gone => return Err(TenantError::Gone(cred.pid)),
    };
    // Made by the kernel for this connection: a pidfd, which PIDFD_GET_INFO may be asked.
    of_process(cred.pid, cred.uid, pidfd.as_ref(), pidfd.as_ref(), by, namespaces)
}

/// Identify the process behind `pidfd`, handed over by a privileged client
/// (`Msg::Delegate`): the same tenant it would be if it had connected itself.
///
/// # Errors
/// [`TenantError::NotAPidfd`] (not a pidfd, or its process is gone), [`TenantError::Uid`],
/// and those of [`identify`].
pub fn identify_pidfd(pidfd: &OwnedFd, by: TenantBy, namespaces: &Arc<Namespaces>) -> Result<Peer, TenantError> {
    // The fd is whatever the client sent: PIDFD_GET_INFO only for a file the kernel shows as a pidfd.
    let pidfs = pidfd::is_pidfs(pidfd.as_fd());
    let (pid, uid) = match pidfs.then(|| pidfd::info(pidfd.as_fd())) {
        Some(Ok(i)) => (i.pid, i.euid),
        Some(Err(pidfd::InfoError::Gone)) => return Err(TenantError::NotAPidfd),
        _ => {
            let pid = pid_of_pidfd(pidfd.as_raw_fd()).ok_or(TenantError::NotAPidfd)?;
            (pid, euid_of(pid).map_err(|source| TenantError::Uid { pid, source })?)
        }
    };
    of_process(pid, uid, Some(pidfd).filter(|_| pidfs), Some(pidfd), by, namespaces)
}

/// The rest of identifying a process whose pid and uid are known: its cgroup and network
/// namespace, then the check that it still lives (else the pid may name another process).
/// A failure of a process that has exited meanwhile is [`TenantError::Gone`]: what failed
/// was only the race with its exit. `pidfs`: the same pidfd where it is known to be one
/// (`PIDFD_GET_INFO` may be asked of it).
fn of_process(
    pid: i32,
    uid: u32,
    pidfs: Option<&OwnedFd>,
    pidfd: Option<&OwnedFd>,
    by: TenantBy,
    namespaces: &Arc<Namespaces>,
) -> Result<Peer, TenantError> {
    let exited = || match pidfd {
        Some(p) => pidfd::pidfd_exited(p.as_fd()),
        None => std::fs::symlink_metadata(format!("/proc/{pid}")).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
    };
    let read = || -> Result<_, TenantError> {
        let (cgroup, cgroup_id) = match by {
            TenantBy::Uid => (Arc::from(""), 0),
            TenantBy::UidAndCgroup => cgroup_of(pid, pidfs, pidfd)?,
        };
        Ok((cgroup, cgroup_id, netns_of(pidfd, pid)?))
    };
    let (cgroup, cgroup_id, ns) = match read() {
        Ok(_) if pidfd.is_some() && exited() => return Err(TenantError::Gone(pid)),
        Ok(found) => found,
        Err(e) if !e.is_gone() && exited() => return Err(TenantError::Gone(pid)),
        Err(e) => return Err(e),
    };
    let member = namespaces.join(ns);
    let netns = member.as_ref().map(Member::id);
    Ok(Peer { tenant: Tenant { uid, cgroup, cgroup_id, netns }, pid, netns: member })
}

/// The cgroup path of a process and its id. With a pidfd on 6.13+ the id comes from the
/// pidfd (`PIDFD_GET_INFO`) and the path from [`CgroupPaths`], so that `/proc/PID/cgroup` is
/// read once per cgroup rather than once per process; otherwise the path from
/// `/proc/PID/cgroup` and the id from the directory it names.
fn cgroup_of(pid: i32, pidfs: Option<&OwnedFd>, pidfd: Option<&OwnedFd>) -> Result<(Arc<str>, u64), TenantError> {
    let read = || tenancy::cgroup::cgroup_of(pid).map(Arc::<str>::from).map_err(|source| TenantError::Cgroup { pid, source });
    let id = match pidfs.map(|p| pidfd::info(p.as_fd())) {
        Some(Ok(pidfd::Info { cgroup_id: Some(id), .. })) => id,
        Some(Err(pidfd::InfoError::Gone)) => return Err(TenantError::Gone(pid)),
        _ => {
            // No id from the pidfd (before 6.13): one poll first, so that a process that is
            // gone already costs no `/proc` read.
            if pidfd.is_some_and(|p| pidfd::pidfd_exited(p.as_fd())) {
                return Err(TenantError::Gone(pid));
            }
            let path = read()?;
            let id = crate::server::tenants::cgroup_id_of_member(&path);
            return Ok((path, id));
        }
    };
    if let Some(path) = CgroupPaths::get(id) {
        return Ok((path, id));
    }
    let path = read()?;
    // Remembered only when the directory at that path is the cgroup the kernel named (the
    // process was not moved in between, the path maps to the daemon's cgroup2 mount).
    let at_path = crate::server::tenants::cgroup_id_of_member(&path);
    if at_path == id {
        CgroupPaths::insert(id, &path);
    }
    Ok((path, at_path))
}

/// Cgroup v2 paths by cgroup id, as this daemon sees them: a cgroup id is never reused and a
/// cgroup v2 directory cannot be renamed, so an entry stays true for the cgroup's whole life
/// (and is never asked for again after). Bounded: emptied when full.
struct CgroupPaths;

static CGROUP_PATHS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u64, Arc<str>>>> = std::sync::LazyLock::new(Default::default);

impl CgroupPaths {
    fn get(id: u64) -> Option<Arc<str>> {
        CGROUP_PATHS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id).cloned()
    }

    fn insert(id: u64, path: &Arc<str>) {
        let mut m = CGROUP_PATHS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= crate::defaults::CGROUP_PATHS_REMEMBERED {
            m.clear();
        }
        m.insert(id, path.clone());
    }
}

/// The pid (in the daemon's pid namespace) of the process behind a pidfd, from the `Pid:`
/// line of its fdinfo; `None` for an fd that is not a pidfd, or whose process has been
/// reaped (`Pid: -1`) or lives in no pid namespace the daemon sees (`Pid: 0`).
fn pid_of_pidfd(fd: RawFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let pid: i32 = info.lines().find_map(|l| l.strip_prefix("Pid:"))?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

/// The effective uid of `pid` (as `SO_PEERCRED` reports it for a connecting process).
fn euid_of(pid: i32) -> std::io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("no Uid line in /proc/{pid}/status"));
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:")).ok_or_else(bad)?;
    uids.split_whitespace().nth(1).and_then(|u| u.parse().ok()).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pidfd_open(pid: i32) -> OwnedFd {
        let pid = rustix::process::Pid::from_raw(pid).expect("a positive pid");
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).expect("pidfd_open")
    }

    #[test]
    fn a_pidfd_identifies_its_process() {
        let ns = Namespaces::new(std::time::Duration::from_secs(5));
        let me = std::process::id() as i32;
        let peer = identify_pidfd(&pidfd_open(me), TenantBy::UidAndCgroup, &ns).expect("identified");
        assert_eq!(peer.pid, me);
        assert_eq!(peer.tenant.uid, rustix::process::geteuid().as_raw());
        assert_eq!(&*peer.tenant.cgroup, tenancy::cgroup::cgroup_of(me).unwrap());
        assert_eq!(peer.tenant.netns, None, "our own namespace is the daemon's");
    }

    #[test]
    fn a_cgroup_path_is_read_once_and_then_known_by_its_id() {
        let ns = Namespaces::new(std::time::Duration::from_secs(5));
        let me = pidfd_open(std::process::id() as i32);
        let first = identify_pidfd(&me, TenantBy::UidAndCgroup, &ns).expect("identified");
        let Ok(pidfd::Info { cgroup_id: Some(id), .. }) = pidfd::info(me.as_fd()) else {
            return eprintln!("no PIDFD_GET_INFO here: every identification reads /proc");
        };
        if first.tenant.cgroup_id == 0 {
            return eprintln!("cgroup paths do not map to the cgroup2 mount here: nothing is remembered");
        }
        assert_eq!(first.tenant.cgroup_id, id, "the id the kernel names is the directory's inode");
        assert_eq!(CgroupPaths::get(id).as_deref(), Some(&*first.tenant.cgroup), "remembered after the first read");
        let again = identify_pidfd(&me, TenantBy::UidAndCgroup, &ns).expect("identified");
        assert_eq!(again.tenant, first.tenant);
    }

    #[test]
    fn gone_is_told_apart_from_failures() {
        assert!(TenantError::Gone(1).is_gone());
        assert!(TenantError::Netns(NetNsError::Gone(1)).is_gone());
        assert!(!TenantError::NotAPidfd.is_gone());
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        assert!(!link_hung_up(&a));
        drop(b);
        assert!(link_hung_up(&a), "the other end closed");
    }

    #[test]
    fn a_dead_process_or_another_fd_is_refused() {
        let ns = Namespaces::new(std::time::Duration::from_secs(5));
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pidfd = pidfd_open(child.id() as i32);
        child.wait().expect("reap");
        let r = identify_pidfd(&pidfd, TenantBy::UidAndCgroup, &ns);
        assert!(matches!(r, Err(TenantError::NotAPidfd)), "{r:?}");
        let file: OwnedFd = std::fs::File::open("/proc/self/status").expect("open").into();
        let r = identify_pidfd(&file, TenantBy::Uid, &ns);
        assert!(matches!(r, Err(TenantError::NotAPidfd)), "{r:?}");
        assert_eq!(ns.count(), 0);
    }
}
