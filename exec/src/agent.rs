//! The seccomp agent (`pool-manager seccomp-agent --listen PATH --socket DAEMON`): pooled
//! connections for every process of a container, whatever its libc, without `LD_PRELOAD` and
//! without a supervisor parent.
//!
//! A container's seccomp profile turns `connect()` into a user notification
//! (`SCMP_ACT_NOTIFY`) and names this agent's socket as its `listenerPath`. The OCI runtime
//! (runc 1.1+) installs the filter in the container's first process and, before that process
//! runs the container's program, connects to `PATH` (a `SOCK_STREAM` Unix socket), sends the
//! container's process state — runc's `specs.ContainerProcessState` as JSON: `ociVersion`,
//! `fds` (`["seccompFd"]`), `pid`, `metadata`, `state` (`id`, `status`, `pid`, `bundle`,
//! `annotations`) — in one `sendmsg` with the notification fd in `SCM_RIGHTS`, and closes the
//! connection. [`run`] accepts these one after the other ([`receive`]: bounded in size and
//! time); each container gets a thread of its own ([`container`]) that enters the container's
//! network namespace, opens a pidfd for the state's `pid`, and answers the notifications with
//! the same loop as `pool-manager exec` (module [`crate::notify`]) over a daemon link of its
//! own: a link delegated to the container's process, so the daemon serves it as that
//! process's tenant (uid, cgroup, network namespace, all read from the kernel through the
//! pidfd) and makes its sockets in the container's namespace. A connect is served only for a
//! thread with exactly the identity of the container's process; every other connect, and
//! every connect the daemon does not serve, continues (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`):
//! the container's own `connect()` runs, as without the agent. The thread ends when no task
//! of the container uses the filter any more (the listener reports `POLLHUP`); the sockets it
//! placed are then given back to the daemon, whose return check decides about reuse.
//!
//! If the agent dies: the kernel answers every later notified `connect()` of the container
//! with `ENOSYS` once the last copy of the listener fd is closed (there is no fallback to
//! "allow" in the kernel), so the container's programs can no longer make TCP connections
//! until the container is restarted with the agent up; and if the agent is down when a
//! container is created, runc fails to create it (it cannot connect to `listenerPath`). What
//! the agent does about it: nothing on the path of a notification can panic on input (every
//! parse and system call result is checked and any doubt continues the call; a panic would
//! still be caught per notification and answered with "continue"); a state it cannot parse
//! still gets its fd served (every call continues); one thread per container, each with a
//! small stack, at most [`MAX_CONTAINERS`] at once (past it a container's fd is closed and
//! the error logged: its connects then fail with `ENOSYS`); a bounded wait on each runtime
//! connection, so a stuck client cannot stop the accept loop. Run it as a supervised service
//! (a systemd unit with `Restart=always`, a DaemonSet container) and only give the profile to
//! containers on nodes where it runs.
//!
//! The agent must see the host's pid namespace (the state's `pid` is the runtime's view) and
//! needs root (pidfds of other users' processes, `pidfd_getfd`, `setns`, `/proc/PID/mem`).

use crate::caller::Identity;
use crate::notify::{self, Dial, Notifier};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::client::Link;
use wire::{Disposition, Msg};

/// Most containers served at once (one thread each).
pub const MAX_CONTAINERS: usize = 4096;
/// Largest process state accepted (runc's is well under 4 KiB plus annotations).
const MAX_STATE: usize = 64 * 1024;
/// Longest time a runtime connection may take to deliver its state.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Stack of a container thread (it holds a few small buffers).
const STACK: usize = 256 * 1024;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The listening socket could not be made.
    #[error("listening on {0}: {1}")]
    Listen(PathBuf, #[source] io::Error),
}

/// Why one runtime connection gave no notification fd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// Reading failed (or timed out).
    #[error("reading the process state: {0}")]
    Read(#[source] io::Error),
    /// The connection closed without an fd.
    #[error("no notification fd came with the process state")]
    NoFd,
    /// The state is larger than [`MAX_STATE`].
    #[error("process state larger than {MAX_STATE} bytes")]
    TooLarge,
}

/// What the agent uses of runc's `ContainerProcessState`.
#[derive(Debug, Default, serde::Deserialize)]
struct ProcessState {
    /// The container's process, in the runtime's (the host's) pid namespace.
    pid: i32,
    #[serde(default)]
    state: ContainerState,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ContainerState {
    #[serde(default)]
    id: String,
}

/// A container's notification fd and what the runtime said about it.
#[derive(Debug)]
pub struct Handed {
    /// The seccomp listener fd.
    pub listener: OwnedFd,
    /// The container's process (`None`: the state did not parse; every call continues).
    pub pid: Option<i32>,
    /// The container id (for logs).
    pub id: String,
}

/// Serve the runtime connections of `listen` forever, answering each container's
/// notifications from the pool manager at `socket`.
///
/// # Errors
/// If `listen` cannot be bound.
pub fn run(listen: &Path, socket: &Path) -> Result<(), AgentError> {
    // A socket file left by an earlier agent would make bind fail.
    if std::fs::symlink_metadata(listen).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = std::fs::remove_file(listen);
    }
    let listener = UnixListener::bind(listen).map_err(|e| AgentError::Listen(listen.to_path_buf(), e))?;
    eprintln!("seccomp-agent: listening on {}, pool manager at {}", listen.display(), socket.display());
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("seccomp-agent: accept: {e}");
                // Out of fds or memory: give the running containers a moment to free some.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match receive(&conn) {
            Ok(handed) => spawn(socket, handed, &live),
            Err(e) => eprintln!("seccomp-agent: {e}"),
        }
    }
    Ok(())
}

/// Read one runtime connection: the process state JSON (until the runtime closes) with the
/// notification fd.
///
/// # Errors
/// If no fd came, or reading failed before it did.
pub fn receive(conn: &UnixStream) -> Result<Handed, ReceiveError> {
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    let mut data = Vec::new();
    let mut fd = None;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        conn.set_read_timeout(Some(left)).map_err(ReceiveError::Read)?;
        let got = match wire::unix::recv(conn.as_raw_fd(), &mut buf, 0) {
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The fd already received is served even if the rest of the state is lost.
            Err(e) if fd.is_some() => {
                eprintln!("seccomp-agent: reading the process state: {e}");
                break;
            }
            Err(e) => return Err(ReceiveError::Read(e)),
        };
        if fd.is_none() {
            fd = got.fd;
        }
        if got.len == 0 {
            break;
        }
        if data.len() + got.len > MAX_STATE {
            if fd.is_some() {
                break;
            }
            return Err(ReceiveError::TooLarge);
        }
        data.extend_from_slice(&buf[..got.len]);
    }
    let listener = fd.ok_or(ReceiveError::NoFd)?;
    let state: Option<ProcessState> = serde_json::from_slice(&data).ok();
    if state.is_none() {
        eprintln!("seccomp-agent: a process state that does not parse ({} bytes): its connects all continue", data.len());
    }
    let pid = state.as_ref().map(|s| s.pid).filter(|p| *p > 0);
    Ok(Handed { listener, pid, id: state.map(|s| s.state.id).unwrap_or_default() })
}

/// Start the thread of one container (or close its fd past [`MAX_CONTAINERS`]).
fn spawn(socket: &Path, handed: Handed, live: &Arc<AtomicUsize>) {
    if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONTAINERS {
        live.fetch_sub(1, Ordering::AcqRel);
        eprintln!("seccomp-agent: {MAX_CONTAINERS} containers served already: container {:?} is not (its connects fail with ENOSYS)", handed.id);
        return;
    }
    let (socket, done) = (socket.to_path_buf(), Arc::clone(live));
    let id = handed.id.clone();
    let started = std::thread::Builder::new().name("container".into()).stack_size(STACK).spawn(move || {
        container(socket, handed);
        done.fetch_sub(1, Ordering::AcqRel);
    });
    if let Err(e) = started {
        live.fetch_sub(1, Ordering::AcqRel);
        eprintln!("seccomp-agent: no thread for container {id:?}: {e} (its connects fail with ENOSYS)");
    }
}

/// Serve one container until no task of it uses the filter any more.
pub fn container(socket: PathBuf, handed: Handed) {
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let pidfd = handed.pid.and_then(Pid::from_raw).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok());
    // This thread lives in the container's network namespace: the checks on a caller's socket
    // (made in our namespace, options as on a fresh socket) are then against the container's.
    // SAFETY: setns on a pidfd we hold; it moves only this thread, which we own.
    let entered = pidfd.as_ref().is_some_and(|p| unsafe { libc::setns(p.as_raw_fd(), libc::CLONE_NEWNET) } == 0);
    if !entered {
        eprintln!("seccomp-agent: container {:?}: cannot enter its network namespace: every connect continues", handed.id);
    }
    let dial = Delegated { socket, pid: handed.pid.unwrap_or(0), pidfd: pidfd.filter(|_| entered), retry_at: None };
    let mut notifier = Notifier::new(dial);
    if let notify::Ended::Poll(e) = notify::serve(&handed.listener, &mut notifier, || false) {
        eprintln!("seccomp-agent: container {:?}: poll: {e}", handed.id);
    }
    // No task of the container is left: nothing of it holds the placed sockets any more.
    notifier.give_back(Disposition::Clean);
}

/// A daemon link delegated to the container's process.
#[derive(Debug)]
struct Delegated {
    socket: PathBuf,
    pid: i32,
    /// `None`: nothing is served.
    pidfd: Option<OwnedFd>,
    /// After a failed dial, none before this (a refused delegation costs a round trip).
    retry_at: Option<Instant>,
}

impl Dial for Delegated {
    fn dial(&mut self) -> Option<(Link, Identity)> {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let got = self.try_dial();
        self.retry_at = got.is_none().then(|| Instant::now() + DIAL_BACKOFF);
        got
    }
}

impl Delegated {
    fn try_dial(&self) -> Option<(Link, Identity)> {
        let pidfd = self.pidfd.as_ref()?;
        let identity = Identity::of_process(self.pid)?;
        // Read through the pid: it is the container's process only if that still lives.
        // SAFETY: signal 0 through a pidfd we hold only checks that the process lives.
        if unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0) } != 0 {
            return None;
        }
        let mut link = notify::connect_link(&self.socket)?;
        delegate(&mut link, pidfd)?;
        Some((link, identity))
    }
}

/// No new link for this long after one could not be made (as the preload library's back-off).
const DIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait for the daemon to identify a delegated process.
const DELEGATE_TIMEOUT: Duration = Duration::from_secs(1);

/// Make `link` the link of the process of `pidfd` (`Msg::Delegate`, answered with
/// `StatusReply`; anything else — a refusal — leaves the link unusable).
fn delegate(link: &mut Link, pidfd: &OwnedFd) -> Option<()> {
    // The daemon reads the process from the kernel first: allow it longer than a request.
    link.set_timeout(Some(DELEGATE_TIMEOUT)).ok()?;
    let mut buf = [0u8; 512];
    let reply = link.request(&Msg::Delegate, Some(pidfd.as_fd()), &mut buf);
    let delegated = match reply.map(|r| r.msg) {
        Ok(Msg::StatusReply(_)) => Some(()),
        Ok(Msg::Error { text, .. }) => {
            eprintln!("seccomp-agent: the pool manager refused the delegation: {text}");
            None
        }
        _ => None,
    };
    link.set_timeout(Some(notify::LINK_TIMEOUT)).ok()?;
    delegated
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What runc sends: the state JSON in one `sendmsg` with one fd, then it closes.
    fn handed(data: &[u8], with_fd: bool) -> Result<Handed, ReceiveError> {
        let (runtime, agent) = UnixStream::pair().expect("socketpair");
        // (Any fd stands for the listener; not one of the pair, which would keep it open.)
        let fd = with_fd.then(|| std::fs::File::open("/dev/null").expect("open /dev/null"));
        wire::unix::send(runtime.as_raw_fd(), data, fd.as_ref().map(AsRawFd::as_raw_fd), 0).expect("send");
        drop(runtime);
        receive(&agent)
    }

    #[test]
    fn runc_process_state_gives_pid_and_id() {
        let state = br#"{"ociVersion":"1.0.2","fds":["seccompFd"],"pid":4242,"metadata":"",
            "state":{"ociVersion":"1.0.2","id":"fn-1","status":"creating","pid":4242,"bundle":"/b","annotations":{"a":"b"}}}"#;
        let h = handed(state, true).expect("handed");
        assert_eq!((h.pid, h.id.as_str()), (Some(4242), "fn-1"));
    }

    #[test]
    fn any_input_with_an_fd_is_served_and_without_one_refused() {
        // (A stream socket carries no fd without at least one byte: no empty case.)
        for junk in [&b"not json"[..], b"{\"pid\": -7}", b"{\"pid\": 99999999999}", &[0xff; 300][..]] {
            let h = handed(junk, true).unwrap_or_else(|e| panic!("{junk:?}: {e}"));
            assert_eq!(h.pid, None, "{junk:?}");
        }
        assert!(matches!(handed(b"{\"pid\": 1}", false), Err(ReceiveError::NoFd)));
    }
}
