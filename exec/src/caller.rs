//! What the `exec` supervisor reads about a trapped `connect()` before it may place a pooled
//! socket: who made the call ([`Caller`], [`Identity`]) and what the socket already is
//! ([`plain_unbound_tcp`]).
//!
//! Who: the supervisor asks the daemon over its own link, so the daemon serves every
//! placement from the *supervisor's* tenant. A connect is served only when the thread that
//! made it has exactly the supervisor's identity: the same uids and gids (real, effective,
//! saved, filesystem), the same cgroup and the same network namespace. A program that
//! dropped privileges, moved to another cgroup or entered another namespace gets its own
//! connect (pass through): never another tenant's socket.
//!
//! What: a pooled socket replaces the caller's socket whole, so it may replace only a socket
//! the program has not shaped yet: unbound (no source address, no port), in the
//! supervisor's network namespace, and with every option we know of as a fresh socket has
//! it. Options the program set before `connect()` (a receive timeout, a device, a
//! congestion control, a mark, ...) are not copied: the connect passes through, and the
//! program's own connection honours them.
//!
//! Pid reuse: the notification names a thread id. Everything is read through `/proc/TID`
//! and a pidfd opened on the thread's process; the caller then checks with
//! `SECCOMP_IOCTL_NOTIF_ID_VALID` that the notification is still pending. A pending
//! notification means the thread is still blocked in `connect()`, so its id was never
//! freed in between and everything read belongs to it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// The credentials and place of a thread, as far as the daemon's tenancy is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    /// `Uid:` and `Gid:` of `/proc/TID/status` (real, effective, saved, filesystem).
    ids: [u32; 8],
    /// `/proc/TID/cgroup`, whole.
    cgroup: String,
    /// Device and inode of the network namespace.
    netns: (u64, u64),
}

/// `(st_dev, st_ino)` of a path (following links: `/proc/*/ns/*`, `/proc/*/fd/*`).
fn inode_of(path: &str) -> Option<(u64, u64)> {
    let st = std::fs::metadata(path).ok()?;
    use std::os::unix::fs::MetadataExt;
    Some((st.dev(), st.ino()))
}

/// `(st_dev, st_ino)` of an open fd.
fn inode_of_fd(fd: impl std::os::fd::AsFd) -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// The numbers after `key` on the line of `status` that starts with it.
fn status_numbers<'a>(status: &'a str, key: &str) -> impl Iterator<Item = u32> + 'a {
    let line = status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("");
    line.split_whitespace().filter_map(|v| v.parse().ok())
}

impl Identity {
    /// Identity of the thread whose `/proc` directory is `dir` (`/proc/self`, `/proc/TID`),
    /// with that directory's `status` text.
    fn read(dir: &str, status: &str) -> Option<Identity> {
        let mut ids = [0u32; 8];
        let mut n = 0;
        for v in status_numbers(status, "Uid:").take(4).chain(status_numbers(status, "Gid:").take(4)) {
            ids[n] = v;
            n += 1;
        }
        if n != ids.len() {
            return None;
        }
        let cgroup = std::fs::read_to_string(format!("{dir}/cgroup")).ok()?;
        let netns = inode_of(&format!("{dir}/ns/net"))?;
        Some(Identity { ids, cgroup, netns })
    }

    /// The identity of process `pid` (its leader thread), as the daemon reads it for a link
    /// delegated to that process.
    pub(super) fn of_process(pid: i32) -> Option<Identity> {
        let dir = format!("/proc/{pid}");
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        Identity::read(&dir, &status)
    }

    /// The supervisor's own identity (what the daemon sees on its link).
    pub(super) fn own() -> Option<Identity> {
        let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
        Identity::read("/proc/thread-self", &status)
    }
}

/// Read `buf.len()` bytes of thread `tid`'s memory at `addr` (the caller confirms the
/// notification afterwards: module comment).
pub(super) fn read_mem(tid: u32, addr: u64, buf: &mut [u8]) -> Option<()> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{tid}/mem")).ok()?;
    mem.read_exact_at(buf, addr).ok()
}

/// The thread that made a trapped `connect()`.
#[derive(Debug)]
pub(super) struct Caller {
    tid: u32,
    pub(super) identity: Identity,
    /// The thread's process (pidfds name thread-group leaders).
    pidfd: OwnedFd,
}

impl Caller {
    /// Read the thread `tid` (see the module comment on pid reuse: the caller must confirm
    /// the notification afterwards).
    pub(super) fn open(tid: u32) -> Option<Caller> {
        let dir = format!("/proc/{tid}");
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        let tgid = status_numbers(&status, "Tgid:").next()?;
        let pid = rustix::process::Pid::from_raw(i32::try_from(tgid).ok()?)?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
        Some(Caller { tid, identity: Identity::read(&dir, &status)?, pidfd })
    }

    /// A duplicate of the caller's `fd` (`pidfd_getfd`) and its `FD_CLOEXEC`. Checked
    /// against the thread's own fd table: a thread with a private table (`unshare(CLONE_FILES)`)
    /// may hold something else under that number than its process's leader.
    pub(super) fn socket(&self, fd: RawFd) -> Option<(OwnedFd, bool)> {
        let dup = rustix::process::pidfd_getfd(&self.pidfd, fd, rustix::process::PidfdGetfdFlags::empty()).ok()?;
        let theirs = inode_of(&format!("/proc/{}/fd/{fd}", self.tid))?;
        if inode_of_fd(&dup)? != theirs {
            return None;
        }
        Some((dup, self.cloexec(fd)))
    }

    /// The caller's `FD_CLOEXEC` for `fd`, from `/proc/TID/fdinfo` (octal `flags:` line).
    fn cloexec(&self, fd: RawFd) -> bool {
        std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", self.tid))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("flags:").map(|v| u32::from_str_radix(v.trim(), 8).ok())).flatten())
            .is_some_and(|f| f & libc::O_CLOEXEC as u32 != 0)
    }
}

/// Options compared with a fresh socket: any difference means the program shaped its socket.
const OPTIONS: [(libc::c_int, libc::c_int); 35] = [
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_BINDTODEVICE),
    (libc::SOL_SOCKET, libc::SO_MARK),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMP),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
    (libc::SOL_SOCKET, libc::SO_ZEROCOPY),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    (libc::IPPROTO_TCP, libc::TCP_CONGESTION),
    (libc::IPPROTO_TCP, libc::TCP_MAXSEG),
    (libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
    (libc::IPPROTO_TCP, libc::TCP_QUICKACK),
    (libc::IPPROTO_TCP, libc::TCP_ULP),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_IP, libc::IP_TRANSPARENT),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
    (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

/// An option's value as bytes (`None`: the kernel refused to say, e.g. an IPv6 option on an
/// IPv4 socket).
fn option(fd: RawFd, (level, name): (libc::c_int, libc::c_int)) -> Option<Vec<u8>> {
    let mut v = [0u8; 64];
    let mut len = v.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into our buffer. libc: one generic read
    // for the whole table; rustix and nix only have a typed function per option, not for all.
    let r = unsafe { libc::getsockopt(fd, level, name, v.as_mut_ptr().cast(), &mut len) };
    (r == 0).then(|| v[..len as usize].to_vec())
}

/// The value of each of [`OPTIONS`], in order.
type Values = Vec<Option<Vec<u8>>>;

thread_local! {
    /// [`OPTIONS`] as a fresh TCP socket of each family has them, read once per thread (a
    /// sysctl changed since only makes later connects pass through). Per thread because a
    /// thread of the seccomp agent lives in its container's network namespace, whose sysctls
    /// (buffer sizes, congestion control) may differ from ours.
    static FRESH: [OnceLock<Option<Values>>; 2] = const { [OnceLock::new(), OnceLock::new()] };
}

/// Whether every option of `fd` is as on a fresh socket of `family` in this thread's namespace.
fn options_fresh(fd: RawFd, family: libc::c_int) -> bool {
    FRESH.with(|cells| {
        let Some(fresh) = cells[usize::from(family == libc::AF_INET6)].get_or_init(|| fresh_values(family)) else { return false };
        OPTIONS.iter().zip(fresh).all(|(&o, want)| option(fd, o) == *want)
    })
}

fn fresh_values(family: libc::c_int) -> Option<Values> {
    use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
    let family = AddressFamily::from_raw(u16::try_from(family).ok()?);
    let fresh = socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None).ok()?;
    Some(OPTIONS.iter().map(|&o| option(fresh.as_raw_fd(), o)).collect())
}

const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Whether the socket was made in this process's network namespace (unknown — the ioctl
/// needs CAP_NET_ADMIN — counts as yes: the caller's namespace was already compared).
fn in_our_netns(fd: RawFd) -> bool {
    // SAFETY: SIOCGSKNS returns a new fd for the socket's network namespace (or fails).
    // libc: rustix's ioctl API has no fd-returning request type.
    let raw = unsafe { libc::ioctl(fd, SIOCGSKNS) };
    if raw < 0 {
        return true;
    }
    // SAFETY: a fresh fd we own.
    let ns = unsafe { OwnedFd::from_raw_fd(raw) };
    inode_of_fd(&ns) == inode_of("/proc/thread-self/ns/net")
}

/// Whether `fd` (a duplicate of the caller's socket) is a TCP socket of `domain` (4 or 6)
/// that a pooled socket may replace: never connected, nothing bound, made in our network
/// namespace, every option in [`OPTIONS`] as on a fresh socket of its family.
pub(super) fn plain_unbound_tcp(fd: RawFd, domain: u8) -> bool {
    if wire::sockaddr::unshaped_tcp(fd, domain).is_err() || !in_our_netns(fd) {
        return false;
    }
    options_fresh(fd, wire::sockaddr::family_of(domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(family: libc::c_int) -> OwnedFd {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        rustix::net::socket_with(AddressFamily::from_raw(family as u16), SocketType::STREAM, SocketFlags::CLOEXEC, None).expect("socket")
    }

    fn set_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
        // SAFETY: an int option. libc: any (level, name), as the table it tests.
        let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&v as *const libc::c_int).cast(), 4) };
        assert_eq!(r, 0, "setsockopt {level}/{name}: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_fresh_socket_is_plain_and_any_option_set_is_seen() {
        for (family, domain) in [(libc::AF_INET, 4), (libc::AF_INET6, 6)] {
            assert!(plain_unbound_tcp(socket(family).as_raw_fd(), domain));
            assert!(!plain_unbound_tcp(socket(family).as_raw_fd(), if domain == 4 { 6 } else { 4 }), "family mismatch");
            for (level, name) in
                [(libc::IPPROTO_TCP, libc::TCP_NODELAY), (libc::SOL_SOCKET, libc::SO_KEEPALIVE), (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)]
            {
                let s = socket(family);
                set_int(&s, level, name, 1000);
                assert!(!plain_unbound_tcp(s.as_raw_fd(), domain), "option {level}/{name} on family {family}");
            }
            let s = socket(family);
            use rustix::net::sockopt::{set_socket_timeout, Timeout};
            set_socket_timeout(&s, Timeout::Recv, Some(std::time::Duration::from_secs(1))).expect("SO_RCVTIMEO");
            assert!(!plain_unbound_tcp(s.as_raw_fd(), domain), "SO_RCVTIMEO");
        }
    }

    #[test]
    fn a_bound_source_address_is_seen_even_without_a_port() {
        let s = socket(libc::AF_INET);
        set_int(&s, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
        rustix::net::bind(&s, &std::net::SocketAddrV4::new([127, 0, 0, 2].into(), 0)).expect("bind");
        assert!(!plain_unbound_tcp(s.as_raw_fd(), 4));
    }

    #[test]
    fn own_identity_reads_ids_cgroup_and_namespace() {
        let me = Identity::own().expect("own identity");
        assert_eq!(me.ids[1], rustix::process::geteuid().as_raw());
        assert!(!me.cgroup.is_empty());
        assert_eq!(Some(me.netns), inode_of("/proc/self/ns/net"));
    }
}
