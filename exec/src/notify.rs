//! Serving seccomp user notifications for `connect()` from the pool: the part shared by the
//! `exec` supervisor (which made the filter itself) and the seccomp agent (which is handed a
//! container's notification fd by the OCI runtime).
//!
//! Data flow: [`serve`] polls a listener fd; each notification goes to
//! [`Notifier::answer`], which reads the trapped call (module [`crate::caller`]), asks the
//! daemon over a [`Link`] (the wire crate's client) it gets from a [`Dial`], and answers the kernel: the pooled socket placed
//! on the caller's fd number (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SETFD`) and success, a refusal
//! (a peer link the daemon took on and then could not make), or — for everything else, and on
//! any doubt — `SECCOMP_USER_NOTIF_FLAG_CONTINUE`: the program's own `connect()` runs.
//!
//! Peer links: a connect to a peer's virtual address is answered by the daemon with
//! `Miss(Pending)` and then, within the wait it names, the link (`Grant`) or a refusal. The
//! notifier waits for that final answer (the caller stays blocked in `connect()` meanwhile)
//! and fails the call with `ECONNREFUSED` on a refusal, as the preload library does: a virtual
//! address is nobody's real address, so the program's own connect could only hang.

use crate::caller::{self, Caller, Identity};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use wire::client::{Answer, Link};
use wire::{Dest, Disposition, LeaseId, Msg};

/// Most destinations remembered as not pooled (the oldest answers expire first anyway).
const MAX_UNPOOLED: usize = 32;
/// Most leases a notifier keeps to give back when its program ends; past it the oldest is
/// given back at once as possibly shared (never reused), so a long-lived container costs
/// bounded memory here and in the daemon.
const MAX_LEASES: usize = 4096;
/// Send and receive timeout of the daemon link.
pub(crate) const LINK_TIMEOUT: Duration = Duration::from_millis(100);

#[repr(C)]
#[derive(Default, Debug)]
pub(crate) struct SeccompData {
    pub(crate) nr: i32,
    pub(crate) arch: u32,
    instruction_pointer: u64,
    pub(crate) args: [u64; 6],
}

/// `struct seccomp_notif`.
#[repr(C)]
#[derive(Default, Debug)]
pub(crate) struct Notif {
    pub(crate) id: u64,
    pub(crate) pid: u32,
    flags: u32,
    pub(crate) data: SeccompData,
}

#[repr(C)]
#[derive(Default)]
struct NotifResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct NotifAddfd {
    id: u64,
    flags: u32,
    srcfd: u32,
    newfd: u32,
    newfd_flags: u32,
}

const IOCTL_NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const IOCTL_NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const IOCTL_NOTIF_ID_VALID: libc::c_ulong = 0x4008_2102;
const IOCTL_NOTIF_ADDFD: libc::c_ulong = 0x4018_2103;
const SECCOMP_USER_NOTIF_FLAG_CONTINUE: u32 = 1;
const SECCOMP_ADDFD_FLAG_SETFD: u32 = 1;

/// Opens the daemon link a [`Notifier`] asks through.
pub(crate) trait Dial {
    /// A fresh link to the daemon, and the identity (uids, cgroup, network namespace) of the
    /// tenant the daemon serves it as: only a caller with exactly that identity is served.
    fn dial(&mut self) -> Option<(Link, Identity)>;
}

/// A link to the daemon at `socket`, with the link timeouts set.
pub(crate) fn connect_link(socket: &Path) -> Option<Link> {
    Link::connect(socket, Some(LINK_TIMEOUT)).ok()
}

/// What to tell the kernel about one trapped `connect()`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A pooled socket is in place: the call returns 0.
    Served,
    /// The program's own `connect()` runs.
    Continue,
    /// The call fails with this errno.
    Fail(i32),
}

/// A socket the daemon gave, or its refusal to let the program connect on its own.
enum Pooled {
    Grant(OwnedFd, LeaseId),
    /// Taken on (`Miss(Pending)`) and then refused: fail the call.
    Refused,
}

/// A trapped `connect()` that passed the checks.
struct Call {
    dest: Dest,
    /// The caller's fd number.
    fd: RawFd,
    /// The caller's `FD_CLOEXEC` on it.
    cloexec: bool,
    /// The caller's file status flags on it.
    status: OFlags,
}

/// Answers the notifications of one filter from the pool, over its own daemon link.
#[derive(Debug)]
pub(crate) struct Notifier<D: Dial> {
    dial: D,
    /// The link and the identity the daemon serves it as (opened on first use).
    link: Option<(Link, Identity)>,
    /// Destinations the daemon said are not pooled, until when (as the shim's negative cache).
    unpooled: Vec<(Dest, Instant)>,
    leases: VecDeque<LeaseId>,
}

impl<D: Dial> Notifier<D> {
    pub(crate) fn new(dial: D) -> Notifier<D> {
        Notifier { dial, link: None, unpooled: Vec::new(), leases: VecDeque::new() }
    }

    /// Answer one notification (always: a notification left unanswered blocks its caller).
    pub(crate) fn answer(&mut self, listener: RawFd, n: &Notif) {
        // Nothing here should panic; if something does, the program still gets its connect.
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.try_pool(listener, n))).unwrap_or(Verdict::Continue);
        let resp = match verdict {
            Verdict::Served => NotifResp { id: n.id, val: 0, error: 0, flags: 0 },
            Verdict::Continue => NotifResp { id: n.id, val: 0, error: 0, flags: SECCOMP_USER_NOTIF_FLAG_CONTINUE },
            Verdict::Fail(errno) => NotifResp { id: n.id, val: -1, error: -errno, flags: 0 },
        };
        // SAFETY: NOTIF_SEND reads one response; a vanished caller just makes it fail.
        unsafe { libc::ioctl(listener, IOCTL_NOTIF_SEND, &resp) };
    }

    /// Place a pooled socket on the caller's fd, or say why not.
    fn try_pool(&mut self, listener: RawFd, n: &Notif) -> Verdict {
        let Some(call) = self.check(listener, n) else { return Verdict::Continue };
        let (pooled, lease) = match self.acquire(call.dest) {
            Some(Pooled::Grant(pooled, lease)) => (pooled, lease),
            Some(Pooled::Refused) => return Verdict::Fail(libc::ECONNREFUSED),
            None => return Verdict::Continue,
        };
        // The caller's blocking mode wins.
        let _ = fcntl_setfl(&pooled, call.status & OFlags::NONBLOCK | OFlags::RDWR);
        let newfd_flags = if call.cloexec { libc::O_CLOEXEC as u32 } else { 0 };
        let add = NotifAddfd { id: n.id, flags: SECCOMP_ADDFD_FLAG_SETFD, srcfd: pooled.as_raw_fd() as u32, newfd: call.fd as u32, newfd_flags };
        // SAFETY: NOTIF_ADDFD reads one seccomp_notif_addfd.
        if unsafe { libc::ioctl(listener, IOCTL_NOTIF_ADDFD, &add) } < 0 {
            self.release(lease, Disposition::Implicit);
            return Verdict::Continue;
        }
        if self.leases.len() >= MAX_LEASES {
            if let Some(oldest) = self.leases.pop_front() {
                self.release(oldest, Disposition::Shared);
            }
        }
        self.leases.push_back(lease);
        Verdict::Served
    }

    /// The checks of module [`crate::caller`] on a trapped call: `Some` if a pooled socket may
    /// replace the caller's.
    fn check(&mut self, listener: RawFd, n: &Notif) -> Option<Call> {
        let (fd, addr_ptr, len) = (n.data.args[0] as i32, n.data.args[1], n.data.args[2] as usize);
        // A profile may notify other ABIs' connect too (another number, another layout).
        if n.data.arch != crate::AUDIT_ARCH || n.data.nr != libc::SYS_connect as i32 || !(16..=128).contains(&len) {
            return None;
        }
        let mut addr = [0u8; 128];
        caller::read_mem(n.pid, addr_ptr, &mut addr[..len])?;
        let dest = Dest::from_sockaddr(&addr[..len])?;
        if self.known_unpooled(&dest) {
            return None;
        }
        let caller = Caller::open(n.pid)?;
        let (theirs, cloexec) = caller.socket(fd)?;
        // Everything above was read through the thread's pid: it is the caller's only if the
        // caller is still blocked in this very connect (module `caller`, pid reuse).
        // SAFETY: NOTIF_ID_VALID reads one u64.
        if unsafe { libc::ioctl(listener, IOCTL_NOTIF_ID_VALID, &n.id) } != 0 {
            return None;
        }
        // The daemon serves the link as one tenant: only a caller that is that tenant (a
        // program that dropped privileges or moved connects on its own).
        if self.link()?.1 != caller.identity || !caller::plain_unbound_tcp(theirs.as_raw_fd(), dest.domain) {
            return None;
        }
        // The duplicate shares the caller's file description: its status flags are the caller's.
        let status = fcntl_getfl(&theirs).ok()?;
        Some(Call { dest, fd, cloexec, status })
    }

    /// The link to the daemon and who it is served as, opened on first use.
    fn link(&mut self) -> Option<&mut (Link, Identity)> {
        if self.link.is_none() {
            self.link = self.dial.dial();
        }
        self.link.as_mut()
    }

    /// Ask for a socket to `dest`; remembers "not pooled" answers. `None`: not served (a
    /// miss, a refusal to serve, a broken link, which is dropped).
    fn acquire(&mut self, dest: Dest) -> Option<Pooled> {
        let (link, _) = self.link()?;
        let mut buf = [0u8; 512];
        let answer = match link.acquire(&Msg::Acquire(dest), &mut buf) {
            Ok(answer) => answer,
            Err(_) => {
                self.link = None;
                return None;
            }
        };
        match answer {
            Answer::Grant { fd, lease, .. } => Some(Pooled::Grant(fd, lease)),
            Answer::Refused { .. } => Some(Pooled::Refused),
            Answer::Miss { retry_after_ms, .. } => {
                if retry_after_ms > 0 {
                    // "Not pooled": the next connects there continue without a round trip.
                    let until = Instant::now() + Duration::from_millis(u64::from(retry_after_ms));
                    self.unpooled.retain(|(d, _)| *d != dest);
                    if self.unpooled.len() < MAX_UNPOOLED {
                        self.unpooled.push((dest, until));
                    }
                }
                None
            }
            Answer::Error { .. } | Answer::NoFd => None,
        }
    }

    /// Whether the daemon said recently that `dest` is not pooled.
    fn known_unpooled(&mut self, dest: &Dest) -> bool {
        let now = Instant::now();
        self.unpooled.retain(|(_, until)| *until > now);
        self.unpooled.iter().any(|(d, _)| d == dest)
    }

    fn release(&mut self, lease: LeaseId, disposition: Disposition) {
        if let Some((link, _)) = &self.link {
            let _ = link.release(lease, disposition, 0);
        }
    }

    /// The program is gone: give back every socket placed, as `how`, and let the daemon read
    /// the releases before the link closes.
    pub(crate) fn give_back(&mut self, how: Disposition) {
        for lease in std::mem::take(&mut self.leases) {
            self.release(lease, how);
        }
        if let Some((link, _)) = &mut self.link {
            let mut buf = [0u8; 512];
            let _ = link.request(&Msg::Status, None, &mut buf);
        }
    }
}

/// Why [`serve`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// No task uses the filter any more (`POLLHUP`), or `quiet` said stop.
    Done,
    /// `poll` failed with this errno.
    Poll(rustix::io::Errno),
}

/// Answer the notifications of `listener` until no task uses its filter any more. `quiet` is
/// asked every 200 ms without a notification; `true` stops (for kernels that do not report
/// `POLLHUP`).
pub(crate) fn serve<D: Dial>(listener: &OwnedFd, notifier: &mut Notifier<D>, mut quiet: impl FnMut() -> bool) -> Ended {
    let tick = Timespec { tv_sec: 0, tv_nsec: 200_000_000 };
    loop {
        let mut p = [PollFd::new(listener, PollFlags::IN)];
        match poll(&mut p, Some(&tick)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Ended::Poll(e),
        }
        let revents = p[0].revents();
        if revents.contains(PollFlags::IN) {
            let mut n = Notif::default();
            // SAFETY: NOTIF_RECV fills one seccomp_notif.
            if unsafe { libc::ioctl(listener.as_raw_fd(), IOCTL_NOTIF_RECV, &mut n) } == 0 {
                notifier.answer(listener.as_raw_fd(), &n);
            }
            continue;
        }
        if revents.intersects(PollFlags::HUP | PollFlags::ERR) || (revents.is_empty() && quiet()) {
            return Ended::Done;
        }
    }
}
