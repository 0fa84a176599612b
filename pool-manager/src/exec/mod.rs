//! `pool-manager exec -- CMD ARGS...`: pooled connections for programs that ignore
//! `LD_PRELOAD` (static binaries: Go programs, Debian's `busybox-static`).
//!
//! CMD runs under a seccomp filter that turns its `connect()` calls into user
//! notifications. This process (the supervisor) answers each one: for an unbound TCP socket
//! to a destination the pool manager grants, it places the pooled socket on the caller's
//! fd number with `SECCOMP_IOCTL_NOTIF_ADDFD` (`SECCOMP_ADDFD_FLAG_SETFD`) and makes the
//! call return success; otherwise it lets the real `connect()` continue
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). When CMD exits, sockets it was given go back to the
//! pool (the daemon's return check decides whether they are reused).
//!
//! The daemon serves the supervisor's link as the supervisor's tenant, so a connect is served
//! only for a thread with the supervisor's own identity, and only on a socket the program has
//! not shaped (no bound address, no option set): see [`caller`]. Everything else continues.
//!
//! Why the supervisor, not the daemon, holds the listener: if the listener's holder dies,
//! every later `connect()` of the program fails with `ENOSYS`. Here the holder is the
//! program's own parent, which lives exactly as long as the program, so the rule that the
//! program keeps working without the daemon holds: with no daemon, every connect continues.

mod caller;

use crate::server::connect_client;
use anyhow::{bail, Context, Result};
use caller::{Caller, Identity};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use wire::{Dest, Disposition, Msg};

/// Most destinations remembered as not pooled (the oldest answers expire first anyway).
const MAX_UNPOOLED: usize = 32;

#[repr(C)]
#[derive(Default)]
struct SeccompData {
    nr: i32,
    arch: u32,
    instruction_pointer: u64,
    args: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct Notif {
    id: u64,
    pid: u32,
    flags: u32,
    data: SeccompData,
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
const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_uint = 1 << 3;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
const SECCOMP_USER_NOTIF_FLAG_CONTINUE: u32 = 1;
const SECCOMP_ADDFD_FLAG_SETFD: u32 = 1;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Filter: `connect` of this architecture → user notification; everything else allowed.
fn filter() -> Vec<libc::sock_filter> {
    let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let (ld_abs, jeq, ret) = ((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, (libc::BPF_RET | libc::BPF_K) as u16);
    vec![
        stmt(ld_abs, 4),                                  // seccomp_data.arch
        jump(jeq, AUDIT_ARCH, 0, 3),                      // other ABI: allow
        stmt(ld_abs, 0),                                  // seccomp_data.nr
        jump(jeq, libc::SYS_connect as u32, 0, 1),
        stmt(ret, SECCOMP_RET_USER_NOTIF),
        stmt(ret, SECCOMP_RET_ALLOW),
    ]
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Run `argv` under the supervisor; returns its exit code.
///
/// # Errors
/// If the program cannot be started.
pub fn run(socket: &Path, argv: &[String]) -> Result<i32> {
    let prog = CString::new(argv.first().context("no command")?.as_str())?;
    let args: Vec<CString> = argv.iter().map(|a| CString::new(a.as_str())).collect::<Result<_, _>>()?;
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let filter = filter();
    let mut pair = [0; 2];
    // SAFETY: pair has room for two fds.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) })?;
    // SAFETY: fresh fds we own.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // SAFETY: single-threaded here (no runtime started yet); the child only makes system calls
    // on memory prepared before the fork, then execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side, see above; on any failure it exits with 127 without returning.
        unsafe { child(&filter, theirs.as_raw_fd(), prog.as_ptr(), arg_ptrs.as_ptr()) }
    }
    drop(theirs);
    let mut buf = [0u8; 8];
    let got = wire::unix::recv(ours.as_raw_fd(), &mut buf, 0)?;
    let Some(listener) = got.fd else {
        // The child could not install the filter (it said why and exited) or exec'd without.
        return wait_child(pid);
    };
    let mut sup = Supervisor { socket: socket.to_path_buf(), link: None, own: None, unpooled: Vec::new(), seq: 0, leases: Vec::new(), child: pid };
    sup.serve(&listener)?;
    let status = wait_child(pid)?;
    sup.give_back();
    Ok(status)
}

/// # Safety
/// Only in the freshly forked child of a single-threaded process.
unsafe fn child(filter: &[libc::sock_filter], report: RawFd, prog: *const libc::c_char, argv: *const *const libc::c_char) -> ! {
    let fprog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: plain system calls on prepared memory.
    unsafe {
        libc::setpgid(0, 0);
        let ok = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
        let listener = if ok {
            libc::syscall(libc::SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &fprog) as RawFd
        } else {
            -1
        };
        if listener >= 0 {
            let _ = wire::unix::send(report, b"L", Some(listener), 0);
            libc::close(listener);
        } else {
            // Fail open: run the program without the filter.
            let _ = wire::unix::send(report, b"-", None, 0);
        }
        libc::close(report);
        libc::execvp(prog, argv);
        libc::_exit(127)
    }
}

fn wait_child(pid: libc::pid_t) -> Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            bail!("waitpid: {}", std::io::Error::last_os_error());
        }
    }
    Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) })
}

struct Supervisor {
    socket: std::path::PathBuf,
    link: Option<OwnedFd>,
    /// The supervisor's identity when the link was opened: the tenant the daemon serves.
    own: Option<Identity>,
    /// Destinations the daemon said are not pooled, until when (as the shim's negative cache).
    unpooled: Vec<(Dest, Instant)>,
    seq: u32,
    leases: Vec<u64>,
    child: libc::pid_t,
}

impl Supervisor {
    /// Answer notifications until the program and its descendants are gone.
    fn serve(&mut self, listener: &OwnedFd) -> Result<()> {
        loop {
            let mut p = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd.
            let r = unsafe { libc::poll(&mut p, 1, 200) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("poll: {}", std::io::Error::last_os_error());
            }
            if p.revents & libc::POLLIN != 0 {
                let mut n = Notif::default();
                // SAFETY: NOTIF_RECV fills one seccomp_notif.
                if unsafe { libc::ioctl(listener.as_raw_fd(), IOCTL_NOTIF_RECV, &mut n) } == 0 {
                    self.answer(listener.as_raw_fd(), &n);
                }
                continue;
            }
            if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(()); // no task uses the filter any more
            }
            // Quiet: stop once the program has exited (kernels that do not report POLLHUP).
            // SAFETY: siginfo_t is plain old data; waitid fills it without reaping.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: a non-reaping status check on our own child.
            let r = unsafe {
                libc::waitid(libc::P_PID, self.child as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
            };
            // SAFETY: si_pid is valid to read after waitid.
            if r < 0 || unsafe { info.si_pid() } != 0 {
                return Ok(());
            }
        }
    }

    fn answer(&mut self, listener: RawFd, n: &Notif) {
        let handled = self.try_pool(listener, n);
        let resp = match handled {
            Some(()) => NotifResp { id: n.id, val: 0, error: 0, flags: 0 },
            None => NotifResp { id: n.id, val: 0, error: 0, flags: SECCOMP_USER_NOTIF_FLAG_CONTINUE },
        };
        // SAFETY: NOTIF_SEND reads one response; a vanished caller just makes it fail.
        unsafe { libc::ioctl(listener, IOCTL_NOTIF_SEND, &resp) };
    }

    /// Place a pooled socket on the caller's fd; `None` means "let the real connect run".
    fn try_pool(&mut self, listener: RawFd, n: &Notif) -> Option<()> {
        let (fd, addr_ptr, len) = (n.data.args[0] as i32, n.data.args[1], n.data.args[2] as usize);
        if n.data.nr != libc::SYS_connect as i32 || !(16..=128).contains(&len) {
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
        // The daemon serves this link as the supervisor's tenant: only for a caller that is
        // that tenant (a program that dropped privileges connects on its own).
        self.link()?;
        if self.own.as_ref() != Some(&caller.identity) {
            return None;
        }
        if !caller::plain_unbound_tcp(theirs.as_raw_fd(), dest.domain) {
            return None;
        }
        // SAFETY: F_GETFL on a duplicate of the caller's fd (same file description).
        let status = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_GETFL) };
        drop(theirs);
        let (pooled, lease) = self.acquire(dest)?;
        // SAFETY: F_SETFL on our pooled socket: the caller's blocking mode wins.
        unsafe { libc::fcntl(pooled.as_raw_fd(), libc::F_SETFL, status & libc::O_NONBLOCK | libc::O_RDWR) };
        let add = NotifAddfd {
            id: n.id,
            flags: SECCOMP_ADDFD_FLAG_SETFD,
            srcfd: pooled.as_raw_fd() as u32,
            newfd: fd as u32,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        // SAFETY: NOTIF_ADDFD reads one seccomp_notif_addfd.
        if unsafe { libc::ioctl(listener, IOCTL_NOTIF_ADDFD, &add) } < 0 {
            self.release(lease, Disposition::Implicit);
            return None;
        }
        self.leases.push(lease);
        Some(())
    }

    /// The link to the daemon, opened on first use; [`Supervisor::own`] is what the daemon
    /// identified it as.
    fn link(&mut self) -> Option<RawFd> {
        if self.link.is_none() {
            self.own = Identity::own();
            let l = connect_client(&self.socket).ok()?;
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
                // SAFETY: a timeval option.
                unsafe {
                    libc::setsockopt(l.as_raw_fd(), libc::SOL_SOCKET, opt, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32)
                };
            }
            self.link = Some(l);
        }
        self.link.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn acquire(&mut self, dest: Dest) -> Option<(OwnedFd, u64)> {
        let link = self.link()?;
        self.seq = self.seq.wrapping_add(1);
        let mut buf = [0u8; 256];
        let n = wire::encode(&Msg::Acquire(dest), self.seq, &mut buf);
        if wire::unix::send(link, &buf[..n], None, 0).is_err() {
            self.link = None;
            return None;
        }
        let Ok(got) = wire::unix::recv(link, &mut buf, 0) else {
            self.link = None;
            return None;
        };
        match wire::decode(&buf[..got.len]) {
            Ok((Msg::Grant { lease, .. }, seq)) if seq == self.seq => got.fd.map(|f| (f, lease)),
            Ok((Msg::Miss { retry_after_ms, .. }, seq)) if seq == self.seq && retry_after_ms > 0 => {
                // "Not pooled": the next connects there continue without a round trip.
                let until = Instant::now() + Duration::from_millis(u64::from(retry_after_ms));
                self.unpooled.retain(|(d, _)| *d != dest);
                if self.unpooled.len() < MAX_UNPOOLED {
                    self.unpooled.push((dest, until));
                }
                None
            }
            _ => None,
        }
    }

    /// Whether the daemon said recently that `dest` is not pooled.
    fn known_unpooled(&mut self, dest: &Dest) -> bool {
        let now = Instant::now();
        self.unpooled.retain(|(_, until)| *until > now);
        self.unpooled.iter().any(|(d, _)| d == dest)
    }

    fn release(&mut self, lease: u64, disposition: Disposition) {
        if let Some(link) = self.link() {
            let mut buf = [0u8; 32];
            let n = wire::encode(&Msg::Release { lease, disposition }, 0, &mut buf);
            let _ = wire::unix::send(link, &buf[..n], None, 0);
        }
    }

    /// The program exited: its copies of the pooled sockets are gone. If nothing else of its
    /// process group lives on (it could hold inherited copies), give them back clean.
    fn give_back(&mut self) {
        // SAFETY: signal 0 only checks whether the process group has members.
        let survivors = unsafe { libc::kill(-self.child, 0) } == 0;
        let how = if survivors { Disposition::Shared } else { Disposition::Clean };
        for lease in std::mem::take(&mut self.leases) {
            self.release(lease, how);
        }
        // Let the daemon read the releases before the link closes.
        if let Some(link) = self.link() {
            let mut buf = [0u8; 512];
            let n = wire::encode(&Msg::Status, 0, &mut buf);
            if wire::unix::send(link, &buf[..n], None, 0).is_ok() {
                let _ = wire::unix::recv(link, &mut buf, 0);
            }
        }
    }
}
