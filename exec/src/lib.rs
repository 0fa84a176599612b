//! The exec supervisor, a client of the pool manager (crate `warmpool-exec`, run as
//! `pool-manager exec -- CMD ARGS...`): pooled connections for programs that ignore
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
//!
//! System calls go through rustix where it has them; what it does not cover (`fork`,
//! `execvp`, the `seccomp` system call and its notification ioctls, `SIOCGSKNS`) stays on
//! libc in `unsafe` blocks.

mod caller;

use caller::{Caller, Identity};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::{Pid, WaitId, WaitIdOptions, WaitOptions};
use std::ffi::{CString, NulError};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use wire::{Dest, Disposition, Msg};

/// Why the supervisor could not run the program.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No program was named.
    #[error("no command")]
    NoCommand,
    /// An argument holds a NUL byte.
    #[error("argument {0:?} holds a NUL byte")]
    Nul(String, #[source] NulError),
    /// A system call the supervisor needs failed.
    #[error("{0}: {1}")]
    Sys(&'static str, #[source] std::io::Error),
}

fn sys(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ExecError {
    move |e| ExecError::Sys(what, e.into())
}

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

/// Run `argv` under the supervisor; returns its exit code.
///
/// # Errors
/// If the program cannot be started.
pub fn run(socket: &Path, argv: &[String]) -> Result<i32, ExecError> {
    let cstr = |a: &String| CString::new(a.as_str()).map_err(|e| ExecError::Nul(a.clone(), e));
    let prog = cstr(argv.first().ok_or(ExecError::NoCommand)?)?;
    let args: Vec<CString> = argv.iter().map(cstr).collect::<Result<_, _>>()?;
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let filter = filter();
    let (ours, theirs) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).map_err(sys("socketpair"))?;
    // SAFETY: single-threaded here (no runtime started yet); the child only makes system calls
    // on memory prepared before the fork, then execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ExecError::Sys("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: child side, see above; on any failure it exits with 127 without returning.
        unsafe { child(&filter, theirs.as_raw_fd(), prog.as_ptr(), arg_ptrs.as_ptr()) }
    }
    let pid = Pid::from_raw(pid).expect("fork returned a positive pid");
    drop(theirs);
    let mut buf = [0u8; 8];
    let got = wire::unix::recv(ours.as_raw_fd(), &mut buf, 0).map_err(|e| ExecError::Sys("receiving the seccomp listener", e))?;
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

fn wait_child(pid: Pid) -> Result<i32, ExecError> {
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                return Ok(status.exit_status().or_else(|| status.terminating_signal().map(|s| 128 + s)).unwrap_or(128));
            }
            Ok(None) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(sys("waitpid")(e)),
        }
    }
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
    child: Pid,
}

impl Supervisor {
    /// Answer notifications until the program and its descendants are gone.
    fn serve(&mut self, listener: &OwnedFd) -> Result<(), ExecError> {
        let tick = Timespec { tv_sec: 0, tv_nsec: 200_000_000 };
        loop {
            let mut p = [PollFd::new(listener, PollFlags::IN)];
            match poll(&mut p, Some(&tick)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(sys("poll")(e)),
            }
            let revents = p[0].revents();
            if revents.contains(PollFlags::IN) {
                let mut n = Notif::default();
                // SAFETY: NOTIF_RECV fills one seccomp_notif.
                if unsafe { libc::ioctl(listener.as_raw_fd(), IOCTL_NOTIF_RECV, &mut n) } == 0 {
                    self.answer(listener.as_raw_fd(), &n);
                }
                continue;
            }
            if revents.intersects(PollFlags::HUP | PollFlags::ERR) {
                return Ok(()); // no task uses the filter any more
            }
            // Quiet: stop once the program has exited (kernels that do not report POLLHUP).
            let exited = rustix::process::waitid(WaitId::Pid(self.child), WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT);
            if !matches!(exited, Ok(None)) {
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
        // The duplicate shares the caller's file description: its status flags are the caller's.
        let status = fcntl_getfl(&theirs).ok()?;
        drop(theirs);
        let (pooled, lease) = self.acquire(dest)?;
        // The caller's blocking mode wins.
        let _ = fcntl_setfl(&pooled, status & OFlags::NONBLOCK | OFlags::RDWR);
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
            let l = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).ok()?;
            rustix::net::connect(&l, &SocketAddrUnix::new(self.socket.as_path()).ok()?).ok()?;
            for t in [rustix::net::sockopt::Timeout::Recv, rustix::net::sockopt::Timeout::Send] {
                rustix::net::sockopt::set_socket_timeout(&l, t, Some(Duration::from_millis(100))).ok()?;
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
        // Signal 0 to the group only checks whether it has members.
        let survivors = rustix::process::test_kill_process_group(self.child).is_ok();
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
