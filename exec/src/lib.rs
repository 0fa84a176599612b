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
//! The notification loop itself is module [`notify`]; the seccomp agent ([`agent`], run as
//! `pool-manager seccomp-agent`) drives the same loop with a container's notification fd,
//! handed over by the OCI runtime.
//!
//! System calls go through rustix where it has them; what it does not cover (`fork`,
//! `execvp`, the `seccomp` system call and its notification ioctls, `SIOCGSKNS`) stays on
//! libc in `unsafe` blocks.

pub mod agent;
mod caller;
mod notify;

use caller::Identity;
use notify::{Dial, Notifier};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::process::{Pid, WaitId, WaitIdOptions, WaitOptions};
use std::ffi::{CString, NulError};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use wire::Disposition;

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

const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_uint = 1 << 3;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;

#[cfg(target_arch = "x86_64")]
pub(crate) const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
pub(crate) const AUDIT_ARCH: u32 = 0xc000_00b7;

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
    let mut notifier = Notifier::new(OwnLink { socket: socket.to_path_buf() });
    // Quiet: stop once the program has exited (kernels that do not report POLLHUP).
    let exited = || !matches!(rustix::process::waitid(WaitId::Pid(pid), WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT), Ok(None));
    if let notify::Ended::Poll(e) = notify::serve(&listener, &mut notifier, exited) {
        return Err(sys("poll")(e));
    }
    let status = wait_child(pid)?;
    // The program exited: its copies of the pooled sockets are gone. If nothing else of its
    // process group lives on (it could hold inherited copies), give them back clean. Signal 0
    // to the group only checks whether it has members.
    let survivors = rustix::process::test_kill_process_group(pid).is_ok();
    notifier.give_back(if survivors { Disposition::Shared } else { Disposition::Clean });
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

/// The supervisor's link: its own, served as its own tenant.
#[derive(Debug)]
struct OwnLink {
    socket: PathBuf,
}

impl Dial for OwnLink {
    fn dial(&mut self) -> Option<(wire::client::Link, Identity)> {
        let own = Identity::own()?;
        Some((notify::connect_link(&self.socket)?, own))
    }
}
