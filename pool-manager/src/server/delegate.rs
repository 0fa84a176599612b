//! Links that act for another process: `Msg::Delegate` and the OCI hook's `Msg::Container`.
//!
//! A client that is uid 0 in the daemon's own network namespace (an OCI hook, a seccomp
//! agent: programs of the node, not of a function) may start its connection with
//! `Delegate` and a pidfd. The daemon identifies that process from the kernel
//! ([`crate::tenant::identify_pidfd`]) and serves the rest of the connection as its tenant,
//! sockets made in its network namespace: the client never says who the tenant is.
//!
//! `Container { Create, id }` on a delegated connection registers the container: the
//! registry keeps a [`Member`] of its namespace (so that the namespace stays served between
//! the hook and the container's first client), fills the tenant's configured pools and
//! answers once their connects are done (bounded by [`defaults::CONTAINER_WARM_WAIT`]).
//! `Container { Stop, id }`, or the exit of the delegated process (its pidfd polls
//! readable; watched by a task, in case the runtime never runs the stop hook), closes the
//! tenant's pools at once and lets go of its namespace.
//!
//! These two kinds are taken out of the request stream by [`intercept`] before the usual
//! dispatch, which refuses any message carrying an fd.

use super::session::{send_reply, Reply};
use super::Shared;
use crate::defaults;
use crate::netns::Member;
use crate::tenant::{Peer, Tenant, TenantError};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wire::{ContainerStage, ErrorCode, Kind, Msg};

/// What a client connection has been identified as (see `session::identify`).
pub(super) type Identified = Result<(Peer, Option<String>), TenantError>;

/// The registered containers (by the runtime's id).
#[derive(Debug, Default)]
pub struct Containers {
    by_id: Mutex<HashMap<String, Registered>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Registered {
    /// Its tenants: one, or two when its process changed uid between the two create hooks
    /// (`createRuntime` sees the runtime's init still as root; `poststart` the program).
    tenants: Vec<Tenant>,
    /// Keep the container's namespace served until it stops.
    _members: Vec<Member>,
    /// Tells this registration apart from a later one under the same id.
    generation: u64,
    /// Ends the task that watches the container's process.
    watch: CancellationToken,
}

impl Containers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Containers registered (for status and tests).
    #[must_use]
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

/// Per-connection state for these two kinds.
#[derive(Debug)]
pub(super) struct Link {
    /// The peer that connected is uid 0 in the daemon's own network namespace.
    privileged: bool,
    /// No request has been read yet (only the first may be `Delegate`).
    first: bool,
    /// The pidfd of the process this connection acts for, once delegated.
    pidfd: Option<Arc<OwnedFd>>,
}

impl Link {
    pub(super) fn new(peer: &Identified) -> Self {
        let privileged = matches!(peer, Ok((p, _)) if p.tenant.uid == 0 && p.tenant.netns.is_none());
        Self { privileged, first: true, pidfd: None }
    }
}

/// What the client loop does with a request after [`intercept`].
pub(super) enum Step {
    /// Not ours: dispatch it as usual.
    Pass(wire::unix::Received),
    /// Answered here (or the connection is done).
    Done { close: bool },
}

/// Take `Delegate` and `Container` requests out of the stream and answer them.
pub(super) async fn intercept(
    shared: &Arc<Shared>,
    conn: &AsyncFd<OwnedFd>,
    link: &mut Link,
    got: wire::unix::Received,
    buf: &[u8],
    peer: &mut Identified,
) -> Step {
    let first = std::mem::take(&mut link.first);
    let kind = if got.len >= wire::HEADER_LEN && !got.truncated { buf[3] } else { 0 };
    if ![Kind::Delegate as u8, Kind::DelegateAs as u8, Kind::Container as u8].contains(&kind) {
        return Step::Pass(got);
    }
    let reply = match wire::decode(&buf[..got.len]) {
        Err(e) => Reply::error(0, e.code(), e.to_string()),
        Ok((_, seq)) if !link.privileged => {
            drop(got); // (a pidfd that came along is closed before answering)
            Reply::error(seq, ErrorCode::Denied, "Delegate and Container are accepted only from uid 0 in the pool manager's own network namespace".into())
        }
        Ok((Msg::Delegate, seq)) => delegate(shared, link, got, first, peer, None, seq),
        Ok((Msg::DelegateAs { uid }, seq)) => delegate(shared, link, got, first, peer, Some(uid), seq),
        Ok((Msg::Container { stage: ContainerStage::Create, id }, seq)) if got.fd.is_none() => create(shared, link, peer, id, seq).await,
        Ok((Msg::Container { stage: ContainerStage::Stop, id }, seq)) if got.fd.is_none() => {
            let text = stop(shared, id, None);
            Reply::msg(&Msg::StatusReply(&text), seq)
        }
        Ok((_, seq)) => Reply::error(seq, ErrorCode::UnexpectedFd, "Container carries no file descriptor".into()),
    };
    Step::Done { close: !send_reply(conn, reply).await }
}

/// `Delegate`: identify the process behind the attached pidfd; from now on the connection
/// is served as its tenant. A refused delegation leaves the connection unidentified (no
/// socket for anyone), never served as the privileged client itself. `DelegateAs` (`as_uid`)
/// names the uid a process that is still root is about to switch to.
fn delegate(shared: &Shared, link: &mut Link, got: wire::unix::Received, first: bool, peer: &mut Identified, as_uid: Option<u32>, seq: u32) -> Reply {
    let Some(pidfd) = got.fd.filter(|_| got.extra_fds == 0 && !got.ctrunc) else {
        return Reply::error(seq, ErrorCode::Malformed, "Delegate carries exactly one pidfd".into());
    };
    if !first {
        return Reply::error(seq, ErrorCode::Denied, "Delegate must be the first message of a connection".into());
    }
    let by = shared.config.tenant_by;
    let read_cgroup = if shared.config.allow_cgroups.is_some() { crate::config::TenantBy::UidAndCgroup } else { by };
    let identified = crate::tenant::identify_pidfd(&pidfd, read_cgroup, &shared.netns).and_then(|mut p| match as_uid {
        Some(_) if p.tenant.uid != 0 => Err(TenantError::NotRoot { pid: p.pid, uid: p.tenant.uid }),
        Some(uid) => {
            p.tenant.uid = uid;
            Ok(p)
        }
        None => Ok(p),
    });
    match identified {
        Ok(p) => {
            let (p, refusal) = super::session::admit(shared, p);
            let text = format!("delegated: pid {} uid {} cgroup {} netns {}", p.pid, p.tenant.uid, p.tenant.cgroup, p.tenant.netns.map_or("own".into(), |n| n.to_string()));
            info!(pid = p.pid, uid = p.tenant.uid, cgroup = %p.tenant.cgroup, refused = refusal.is_some(), "connection delegated");
            *peer = Ok((p, refusal));
            link.pidfd = Some(Arc::new(pidfd));
            Reply::msg(&Msg::StatusReply(&text), seq)
        }
        Err(e) => {
            let text = format!("delegation refused: {e}");
            warn!(error = %e, "delegation refused");
            *peer = Err(e);
            Reply::error(seq, ErrorCode::Denied, text)
        }
    }
}

/// `Container { Create }`: register the delegated tenant under `id`, fill its configured
/// pools and answer once their connects are done.
async fn create(shared: &Arc<Shared>, link: &Link, peer: &Identified, id: &str, seq: u32) -> Reply {
    let (Some(pidfd), Ok((p, None))) = (&link.pidfd, peer) else {
        let why = match peer {
            Ok((_, Some(why))) => why.clone(),
            _ => "Container { Create } needs a delegated connection (Delegate first)".into(),
        };
        return Reply::error(seq, ErrorCode::Denied, why);
    };
    register(shared, id, p, pidfd);
    let dests: Vec<_> = {
        let resolved = shared.resolved.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The IPv4-mapped twin of an IPv4 destination is left out: programs that connect to
        // an IPv4 address do so from an AF_INET socket (the annotation can still name it).
        let mapped = |d: &SocketAddr| matches!(d.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
        shared.config.pools.iter().chain(resolved.iter()).filter(|(d, s)| s.min_idle > 0 && !mapped(d)).map(|(d, _)| *d).collect()
    };
    for d in dests {
        // (A destination refused here is simply not prewarmed.)
        let _ = super::grant::prewarm(shared, &p.tenant, d, seq);
    }
    let (pools, idle) = wait_filled(shared, &p.tenant).await;
    info!(container = %id, pid = p.pid, uid = p.tenant.uid, cgroup = %p.tenant.cgroup, pools, idle, "container registered");
    Reply::msg(&Msg::StatusReply(&format!("container {id}: {pools} pool(s), {idle} idle socket(s)")), seq)
}

/// Remember `id` as `p`'s container; a second create hook of the same container adds its
/// tenant if that changed (a program that runs as another uid than the runtime's init).
fn register(shared: &Arc<Shared>, id: &str, p: &Peer, pidfd: &Arc<OwnedFd>) {
    let mut by_id = shared.containers.lock();
    if let Some(r) = by_id.get_mut(id) {
        if !r.tenants.contains(&p.tenant) {
            r.tenants.push(p.tenant.clone());
            r._members.extend(p.netns.as_ref().map(Member::another));
        }
        return;
    }
    let generation = shared.containers.next.fetch_add(1, Ordering::Relaxed);
    let watch = CancellationToken::new();
    let members = p.netns.as_ref().map(Member::another).into_iter().collect();
    by_id.insert(id.to_owned(), Registered { tenants: vec![p.tenant.clone()], _members: members, generation, watch: watch.clone() });
    drop(by_id);
    spawn_exit_watch(shared.clone(), id.to_owned(), generation, pidfd.clone(), watch);
}

/// Wait (bounded) until no pool of `tenant` has a connect in flight; its pool and idle
/// socket counts then.
async fn wait_filled(shared: &Shared, tenant: &Tenant) -> (usize, usize) {
    let deadline = Instant::now() + defaults::CONTAINER_WARM_WAIT;
    loop {
        let (pools, idle, connecting) = {
            let table = shared.lock();
            table.iter().filter(|(k, _)| k.tenant == *tenant).fold((0, 0, 0), |(n, i, c), (_, p)| {
                let (idle, _, _, connecting) = p.counts();
                (n + 1, i + idle, c + connecting)
            })
        };
        if connecting == 0 || Instant::now() >= deadline {
            return (pools, idle);
        }
        tokio::time::sleep(defaults::CONTAINER_WARM_POLL).await;
    }
}

/// When the container's process exits, do what `Stop` does (a runtime that never runs the
/// stop hook must not leave the namespace pinned).
fn spawn_exit_watch(shared: Arc<Shared>, id: String, generation: u64, pidfd: Arc<OwnedFd>, cancel: CancellationToken) {
    let bg = shared.clone();
    bg.background.spawn(async move {
        // SAFETY: the AsyncFd owns (a reference to) the pidfd, so the fd stays open and the
        // same for as long as it is registered.
        let Ok(fd) = (unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }) else {
            warn!(container = %id, "cannot watch the container's process: its pools close at the stop hook only");
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => {}
            _ = fd.readable() => {
                stop(&shared, &id, Some(generation));
            }
        }
    });
}

/// `Container { Stop }` (or the process's exit, for registration `generation`): close the
/// container's pools and let its namespace go. The text of the answer.
fn stop(shared: &Shared, id: &str, generation: Option<u64>) -> String {
    let reg = {
        let mut by_id = shared.containers.lock();
        match by_id.get(id) {
            Some(r) if generation.is_none_or(|g| g == r.generation) => by_id.remove(id),
            _ => None,
        }
    };
    let Some(reg) = reg else {
        if generation.is_none() {
            info!(container = %id, "stop hook for a container not registered (closed already, or never warmed)");
        }
        return format!("container {id} is not registered (closed already)");
    };
    reg.watch.cancel();
    let closed: usize = reg.tenants.iter().map(|t| super::tenants::close_tenant(shared, t, super::CloseReason::Stopped).pools).sum();
    let mut namespaces: Vec<_> = reg.tenants.iter().filter_map(|t| t.netns).collect();
    namespaces.dedup();
    drop(reg);
    let mut freed = false;
    for n in namespaces {
        freed |= crate::netns::close_now(shared, n);
    }
    let why = if generation.is_some() { "its process exited" } else { "stop hook" };
    info!(container = %id, pools = closed, netns_freed = freed, "container stopped ({why}): its pools are closed");
    format!("container {id}: {closed} pool(s) closed, network namespace {}", if freed { "let go" } else { "let go after its last client" })
}
