//! `pool-manager oci-hook <stage>`: an OCI runtime hook that warms a container's pools before
//! its program starts and closes them when it stops.
//!
//! The runtime (runc, run by podman or CRI-O from a hooks directory) starts the hook with
//! the container's state on stdin (`id`, `pid`, `annotations`, `bundle`). At `createRuntime`
//! or `poststart` the hook opens a pidfd of the container's process and sends it to the
//! daemon as the first message of a connection (`Msg::Delegate`): the daemon identifies the
//! container from the kernel (uid, cgroup, network namespace), never from anything the hook
//! says. One exception, at `createRuntime` only: the runtime's init is still root then and
//! switches to the container's user (`process.user.uid` of the bundle's `config.json`, which
//! the runtime enforces) only when it starts the program; the hook names that uid
//! (`Msg::DelegateAs`), which the daemon accepts only while the process is still root. The hook then asks for the destinations of the annotation `warmpool.prewarm`
//! (`HOST:PORT,...`) and registers the container (`Msg::Container { Create }`), which also
//! fills the configured pools and answers once they are filled. At `poststop` it sends
//! `Msg::Container { Stop }`: the daemon closes the container's pools and lets its
//! namespace go at once.
//!
//! Every daemon call has a timeout ([`defaults::HOOK_IO_TIMEOUT`]): the runtime waits for the
//! hook. The caller (`main`) turns any error into a line on stderr and exit status 0.

use crate::defaults;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use wire::client::Link;
use std::path::Path;
use wire::{ContainerStage, Dest, Msg};

/// The annotation naming destinations to prewarm: `HOST:PORT,HOST:PORT,...`.
pub const PREWARM_ANNOTATION: &str = "warmpool.prewarm";

/// The hook stages this program handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// After the container's namespaces exist, before `pivot_root` (runc runs it in the
    /// runtime's namespace; the process is runc's init, still waiting to exec the program).
    CreateRuntime,
    /// After the program started (its process now has its final uid).
    Poststart,
    /// After the container stopped.
    Poststop,
    /// From the state's `status` (one hook definition for every stage): `creating` is
    /// createRuntime, `created` or `running` poststart, `stopped` poststop.
    Auto,
}

impl std::str::FromStr for Stage {
    type Err = HookError;
    fn from_str(s: &str) -> Result<Self, HookError> {
        match s {
            "createRuntime" | "prestart" => Ok(Self::CreateRuntime),
            "poststart" => Ok(Self::Poststart),
            "poststop" => Ok(Self::Poststop),
            "auto" => Ok(Self::Auto),
            other => Err(HookError::Stage(other.to_owned())),
        }
    }
}

/// What the hook reads of the OCI state (runtime-spec `state.json`).
#[derive(Debug, serde::Deserialize)]
pub struct State {
    /// The container's id.
    pub id: String,
    /// Its process (absent or 0 once it stopped).
    #[serde(default)]
    pub pid: Option<i32>,
    /// Its annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// Its bundle directory (for logs).
    #[serde(default)]
    pub bundle: Option<String>,
    /// `creating`, `created`, `running` or `stopped`.
    #[serde(default)]
    pub status: String,
}

/// Errors of the hook (all reported on stderr; the hook still exits 0).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// Not a stage this hook handles.
    #[error("unknown hook stage {0:?} (expected createRuntime, poststart, poststop or auto)")]
    Stage(String),
    /// The state on stdin is not an OCI state.
    #[error("container state on stdin: {0}")]
    State(#[from] serde_json::Error),
    /// The state has no live process to delegate.
    #[error("container {0}: the state names no process")]
    NoPid(String),
    /// A destination of the annotation is not `HOST:PORT`, or does not resolve.
    #[error("annotation {PREWARM_ANNOTATION}: {entry:?}: {reason}")]
    Destination {
        /// The entry as written.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The daemon connection failed (timeouts included).
    #[error("{what}: {source}")]
    Link {
        /// What we were doing.
        what: &'static str,
        /// Cause.
        source: wire::client::ClientError,
    },
    /// The daemon refused or answered something else.
    #[error("the pool manager answered {0}")]
    Refused(String),
}

fn link_error(what: &'static str) -> impl FnOnce(wire::client::ClientError) -> HookError {
    move |source| HookError::Link { what, source }
}

/// The destinations of the `warmpool.prewarm` annotation (none if absent). Host names are
/// resolved here, on the host: write addresses where the container's resolver answers
/// differently.
///
/// # Errors
/// [`HookError::Destination`] for an entry that is not `HOST:PORT` or does not resolve.
pub fn prewarm_destinations(annotations: &HashMap<String, String>) -> Result<Vec<SocketAddr>, HookError> {
    let Some(list) = annotations.get(PREWARM_ANNOTATION) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |reason: String| HookError::Destination { entry: entry.to_owned(), reason };
        let addrs = entry.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
        let before = out.len();
        out.extend(addrs.filter(|a| a.port() != 0));
        if out.len() == before {
            return Err(bad("no address with a port".into()));
        }
    }
    out.dedup();
    Ok(out)
}

/// Run the hook for `stage` with the OCI state `state` (the JSON text from stdin), talking
/// to the daemon at `socket`. Returns what to log on success.
///
/// # Errors
/// See [`HookError`].
pub fn run(stage: Stage, socket: &Path, state: &str) -> Result<String, HookError> {
    let state: State = serde_json::from_str(state)?;
    let stage = match (stage, state.status.as_str()) {
        (Stage::Auto, "creating") => Stage::CreateRuntime,
        (Stage::Auto, "created" | "running") => Stage::Poststart,
        (Stage::Auto, "stopped") => Stage::Poststop,
        (Stage::Auto, other) => return Err(HookError::Stage(format!("auto, with status {other:?}"))),
        (s, _) => s,
    };
    match stage {
        Stage::CreateRuntime | Stage::Auto => create(socket, &state, future_uid(state.bundle.as_deref())),
        Stage::Poststart => create(socket, &state, None),
        Stage::Poststop => {
            let mut link = connect(socket)?;
            ask(&mut link, &Msg::Container { stage: ContainerStage::Stop, id: &state.id }, None)
        }
    }
}

/// The uid the runtime will start the container's program as (`process.user.uid` of the
/// bundle's `config.json`), when it is not root; `None` if it is root or cannot be read (the
/// process's own uid then stands, and `poststart` adds the program's).
fn future_uid(bundle: Option<&str>) -> Option<u32> {
    let text = std::fs::read_to_string(Path::new(bundle?).join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let uid = u32::try_from(config.pointer("/process/user/uid")?.as_u64()?).ok()?;
    (uid != 0).then_some(uid)
}

fn create(socket: &Path, state: &State, as_uid: Option<u32>) -> Result<String, HookError> {
    let pid = state.pid.filter(|p| *p > 0).ok_or_else(|| HookError::NoPid(state.id.clone()))?;
    // Read before anything reaches the daemon: a bad annotation warms nothing.
    let dests = prewarm_destinations(&state.annotations)?;
    let pidfd = pidfd_open(pid)?;
    let mut link = connect(socket)?;
    let delegate = as_uid.map_or(Msg::Delegate, |uid| Msg::DelegateAs { uid });
    let mut said = vec![ask(&mut link, &delegate, Some(pidfd.as_fd()))?];
    drop(pidfd);
    for d in dests {
        said.push(ask(&mut link, &Msg::Prewarm(Dest::from_socket_addr(d)), None)?);
    }
    said.push(ask(&mut link, &Msg::Container { stage: ContainerStage::Create, id: &state.id }, None)?);
    Ok(said.join("; "))
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, HookError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(HookError::Io { what: "pidfd_open of the container's process", source: std::io::Error::last_os_error() });
    }
    // SAFETY: a new fd, ours (it fits an int: fds are ints).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One connection to the daemon, with timeouts on every send and receive.
fn connect(socket: &Path) -> Result<Link, HookError> {
    Link::connect(socket, Some(defaults::HOOK_IO_TIMEOUT)).map_err(link_error("connecting to the pool manager"))
}

/// Send `msg` (with `fd` attached) and read the answer: its text, or the refusal.
fn ask(link: &mut Link, msg: &Msg<'_>, fd: Option<BorrowedFd<'_>>) -> Result<String, HookError> {
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    match link.request(msg, fd, &mut buf) {
        Ok(r) => match r.msg {
            Msg::StatusReply(t) => Ok(t.to_owned()),
            Msg::Error { text, .. } => Err(HookError::Refused(format!("an error: {text}"))),
            other => Err(HookError::Refused(format!("{other:?}"))),
        },
        Err(e @ wire::client::ClientError::Decode(_)) => Err(HookError::Refused(format!("garbage ({e})"))),
        Err(e) => Err(link_error("talking to the pool manager")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_and_the_annotation_are_read() {
        let json = r#"{"ociVersion":"1.0.2","id":"abc","status":"created","pid":42,"bundle":"/b",
            "annotations":{"warmpool.prewarm":"198.18.0.1:80, 198.18.0.2:6379,,[2001:db8::1]:443","other":"x"}}"#;
        let s: State = serde_json::from_str(json).expect("parses");
        assert_eq!((s.id.as_str(), s.pid), ("abc", Some(42)));
        let d = prewarm_destinations(&s.annotations).expect("destinations");
        let want: Vec<SocketAddr> = ["198.18.0.1:80", "198.18.0.2:6379", "[2001:db8::1]:443"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(d, want);
        // A stopped container's state has no pid; no annotation means nothing to add.
        let s: State = serde_json::from_str(r#"{"id":"abc","status":"stopped"}"#).expect("parses");
        assert_eq!(s.pid, None);
        assert!(prewarm_destinations(&s.annotations).unwrap().is_empty());
    }

    #[test]
    fn the_future_uid_comes_from_the_bundle() {
        let dir = std::env::temp_dir().join(format!("warmpool-hook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = dir.to_str().unwrap();
        std::fs::write(dir.join("config.json"), r#"{"process":{"user":{"uid":1000,"gid":1000},"args":["sh"]}}"#).unwrap();
        assert_eq!(future_uid(Some(bundle)), Some(1000));
        std::fs::write(dir.join("config.json"), r#"{"process":{"user":{"uid":0,"gid":0}}}"#).unwrap();
        assert_eq!(future_uid(Some(bundle)), None, "root: the process's own uid stands");
        std::fs::write(dir.join("config.json"), "{").unwrap();
        assert_eq!(future_uid(Some(bundle)), None);
        assert_eq!(future_uid(None), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_input_is_an_error_not_a_guess() {
        let a = |v: &str| HashMap::from([(PREWARM_ANNOTATION.to_owned(), v.to_owned())]);
        assert!(matches!(prewarm_destinations(&a("198.18.0.1")), Err(HookError::Destination { .. })));
        assert!(matches!(prewarm_destinations(&a("198.18.0.1:0")), Err(HookError::Destination { .. })));
        assert!(matches!(run(Stage::Poststop, Path::new("/nonexistent"), "not json"), Err(HookError::State(_))));
        assert!(matches!(run(Stage::CreateRuntime, Path::new("/nonexistent"), r#"{"id":"x","pid":0}"#), Err(HookError::NoPid(_))));
        assert!(matches!("prestop".parse::<Stage>(), Err(HookError::Stage(_))));
        assert!(matches!(run(Stage::Auto, Path::new("/nonexistent"), r#"{"id":"x","status":"paused"}"#), Err(HookError::Stage(_))));
        // `auto` at stop needs no pid, and reaches for the daemon (absent here).
        let r = run(Stage::Auto, Path::new("/nonexistent"), r#"{"id":"x","status":"stopped"}"#);
        assert!(matches!(r, Err(HookError::Link { what: "connecting to the pool manager", .. })), "{r:?}");
    }
}
