//! The daemon: a Unix `SOCK_SEQPACKET` listener, one task per client process, a maintenance
//! task, and the pool table they share.
//!
//! Data flow: a client task decodes a request, takes a socket from its tenant's [`Pool`]
//! under the table lock (no I/O under the lock beyond non-blocking checks), and sends it with
//! `SCM_RIGHTS`. The socket itself stays in the task's lease map: the daemon's own reference,
//! so a process that dies without `close()` cannot leak or smuggle it back. A `Release`
//! moves it through the return check into quarantine or closes it; quarantine ends in the
//! checker ([`crate::checker`]: holders walk, end-of-exchange proof) before the socket is
//! idle again. The end of the client connection puts every lease it still holds through the
//! same path (the process ended without close(): keep-alive clients, `_exit`, a signal);
//! peer links and `warm` pools close them. Refills run as spawned connect tasks that put
//! their socket into the pool when done. The maintenance task sweeps every
//! [`defaults::SWEEP_INTERVAL`].

use crate::config::{Config, Lookup, Policy, Probe};
use crate::metrics::Metrics;
use crate::pool::{Pool, Take};
use crate::sock::{self, Discard};
use crate::tenant::{self, Peer, Tenant};
use crate::{defaults, status};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::{Disposition, ErrorCode, Msg, MissReason, Source};

/// A socket held by the daemon.
#[derive(Debug)]
pub struct PooledSock {
    /// The daemon's reference.
    pub fd: OwnedFd,
    /// Its options as the daemon made it: what it is put back to on give-back.
    pub base: Arc<crate::sockstate::Snapshot>,
}

impl PooledSock {
    /// A socket the daemon just made (or one known to be as it was made): its own options
    /// are the pool's.
    #[must_use]
    pub fn new(fd: OwnedFd) -> Self {
        let base = Arc::new(crate::sockstate::Snapshot::take(fd.as_raw_fd()));
        Self { fd, base }
    }
}

/// Pools are keyed by tenant and destination: they never cross tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Who.
    pub tenant: Tenant,
    /// Where (as the application asked: IPv4, IPv6 or IPv4-mapped IPv6).
    pub dest: SocketAddr,
}

/// State shared by every task.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: Config,
    /// The pool table.
    pub pools: Mutex<HashMap<PoolKey, Pool<PooledSock>>>,
    /// Counters.
    pub metrics: Metrics,
    next_lease: AtomicU64,
    daemon_uid: u32,
    /// The eBPF kernel assist, when attached (detached when dropped).
    pub assist: Option<Mutex<shim_user::assist::KernelAssist>>,
    /// Peer links, when `[peer]` is configured.
    pub peer: Option<Arc<crate::peer::agent::Agent>>,
    /// Fired when a successor takes over: client tasks hand their connections over. A new
    /// token replaces it when a take-over fails (see [`Shared::handover_token`]).
    pub(crate) handover: Mutex<CancellationToken>,
    /// A take-over is in progress (a second successor is refused meanwhile).
    pub(crate) taking_over: std::sync::atomic::AtomicBool,
    /// Client connections (with their leases) collected for the successor.
    pub(crate) handed: Mutex<Vec<crate::handover::HandedClient>>,
    /// Client tasks alive.
    pub(crate) active_clients: AtomicUsize,
    /// The listening socket's fd number while `run` holds it.
    pub(crate) listener_fd: std::sync::atomic::AtomicI32,
    /// The metrics endpoint's listening socket, handed to a successor with the rest (-1:
    /// none).
    pub metrics_fd: std::sync::atomic::AtomicI32,
    /// Set once everything went to a successor: the socket file now belongs to it.
    pub handed_over: std::sync::atomic::AtomicBool,
    pub(crate) handover_done: tokio::sync::Notify,
    /// The addresses `config.names` resolved to at the resolver's last turn (beside the
    /// load-time ones in `config.pools`).
    pub resolved: std::sync::RwLock<HashMap<SocketAddr, Arc<crate::config::PoolSettings>>>,
    /// Wakes the checker: a socket entered quarantine.
    pub(crate) check_wake: tokio::sync::Notify,
}

impl Shared {
    /// Fresh state for a configuration.
    #[must_use]
    pub fn new(config: Config) -> Self {
        Self {
            config,
            pools: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            next_lease: AtomicU64::new(1),
            // SAFETY: geteuid has no preconditions.
            daemon_uid: unsafe { libc::geteuid() },
            assist: None,
            peer: None,
            handover: Mutex::new(CancellationToken::new()),
            taking_over: std::sync::atomic::AtomicBool::new(false),
            handed: Mutex::new(Vec::new()),
            active_clients: AtomicUsize::new(0),
            listener_fd: std::sync::atomic::AtomicI32::new(-1),
            metrics_fd: std::sync::atomic::AtomicI32::new(-1),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            handover_done: tokio::sync::Notify::new(),
            resolved: std::sync::RwLock::new(HashMap::new()),
            check_wake: tokio::sync::Notify::new(),
        }
    }

    /// Settings for a destination: configured (at load, or by a name's later resolution),
    /// auto, or not pooled.
    #[must_use]
    pub fn lookup(&self, dest: &SocketAddr) -> Lookup {
        match self.config.lookup(dest) {
            Lookup::Configured(s) => Lookup::Configured(s),
            other => {
                let resolved = self.resolved.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                match resolved.get(dest) {
                    Some(s) => Lookup::Configured(s.clone()),
                    None => other,
                }
            }
        }
    }

    /// Connect counts the kernel saw: (cgroup id, uid, destination, connects).
    pub fn demand(&self) -> Vec<(u64, u32, SocketAddr, u64)> {
        let Some(a) = &self.assist else { return vec![] };
        a.lock().unwrap_or_else(std::sync::PoisonError::into_inner).demand()
    }

    /// What the kernel assist learned: (destination, cwnd segments, srtt µs, samples).
    pub fn learned(&self) -> Vec<(SocketAddr, u32, u32, u32)> {
        let Some(a) = &self.assist else { return vec![] };
        let a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = a.learned().into_iter().map(|(d, w)| (d, w.cwnd, w.srtt_us, w.samples)).collect();
        v.sort();
        v
    }

    /// The current take-over signal (a client task takes it when it starts).
    pub(crate) fn handover_token(&self) -> CancellationToken {
        self.handover.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Lease ids continue above those a predecessor handed out.
    pub(crate) fn raise_next_lease(&self, min: u64) {
        self.next_lease.fetch_max(min, Ordering::Relaxed);
    }

    /// The daemon's effective uid.
    #[must_use]
    pub fn daemon_uid(&self) -> u32 {
        self.daemon_uid
    }

    /// Lock the pool table (a panic elsewhere must not wedge the daemon).
    pub fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Pool<PooledSock>>> {
        self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn discard_all(&self, discarded: Vec<(PooledSock, Discard)>) {
        for (s, why) in discarded {
            self.metrics.discard(why);
            drop(s);
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Another daemon answers on the socket path.
    #[error("{0} is in use by a running pool manager")]
    InUse(PathBuf),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr_un(path: &Path) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain old data.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= sun.sun_path.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (d, s) in sun.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok((sun, std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd goes straight into an OwnedFd.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) })?;
    // SAFETY: fresh fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connect to a daemon's socket (blocking, for the CLI).
///
/// # Errors
/// The connect error.
pub fn connect_client(path: &Path) -> std::io::Result<OwnedFd> {
    let (sun, len) = sockaddr_un(path)?;
    // SAFETY: plain socket creation.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh fd.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sun is a valid address of `len` bytes.
    cvt(unsafe { libc::connect(sock.as_raw_fd(), (&sun as *const libc::sockaddr_un).cast(), len) })?;
    Ok(sock)
}

/// Bind the listening socket: creates the directory, refuses to steal a live daemon's socket,
/// replaces a stale one, applies `mode`.
///
/// # Errors
/// See [`ServeError`].
pub fn bind(path: &Path, mode: u32) -> Result<OwnedFd, ServeError> {
    let io = |what, source| ServeError::Io { what, path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    if path.exists() {
        if connect_client(path).is_ok() {
            return Err(ServeError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(|e| io("removing stale socket", e))?;
    }
    let (sun, len) = sockaddr_un(path).map_err(|e| io("socket path", e))?;
    let sock = seqpacket().map_err(|e| io("creating socket for", e))?;
    // SAFETY: sun is a valid address of `len` bytes.
    cvt(unsafe { libc::bind(sock.as_raw_fd(), (&sun as *const libc::sockaddr_un).cast(), len) }).map_err(|e| io("binding", e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io("setting permissions of", e))?;
    // SAFETY: listen on our bound socket.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), defaults::LISTEN_BACKLOG) }).map_err(|e| io("listening on", e))?;
    Ok(sock)
}

/// Run the daemon on a bound listener until `cancel` fires; then close every pooled and
/// leased socket and return. The caller removes the socket file.
///
/// # Errors
/// If the listener cannot be registered with the reactor.
pub async fn run(listener: OwnedFd, shared: Arc<Shared>, cancel: CancellationToken) -> std::io::Result<()> {
    run_with(listener, shared, cancel, Vec::new()).await
}

/// [`run`], serving also client connections (with their leases) adopted from a predecessor.
///
/// # Errors
/// If the listener cannot be registered with the reactor.
pub async fn run_with(
    listener: OwnedFd,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    adopted: Vec<crate::handover::HandedClient>,
) -> std::io::Result<()> {
    shared.listener_fd.store(listener.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: AsyncFd owns the OwnedFd, so the fd stays open exactly as long as it is registered.
    let listener = unsafe { AsyncFd::register(listener) }.map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tasks = JoinSet::new();
    serve_handed(&shared, &mut tasks, adopted, &cancel);
    tasks.spawn(maintain(shared.clone(), cancel.clone()));
    tasks.spawn(crate::checker::run(shared.clone(), cancel.clone()));
    tasks.spawn(resolver(shared.clone(), cancel.clone()));
    if let Some(agent) = &shared.peer {
        tasks.spawn(crate::peer::agent::run(agent.clone(), cancel.clone()));
    }
    loop {
        accept_until(&listener, &shared, &mut tasks, &cancel).await?;
        if cancel.is_cancelled() {
            break;
        }
        // A successor is taking over: wait until it committed (stop) or failed (serve on).
        tokio::select! {
            () = shared.handover_done.notified() => {}
            () = cancel.cancelled() => break,
        }
        if shared.handed_over.load(Ordering::Relaxed) {
            break;
        }
        let back = std::mem::take(&mut *shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        info!(clients = back.len(), "serving on after the failed take-over");
        serve_handed(&shared, &mut tasks, back, &cancel);
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let mut pools = shared.lock();
    let mut n = 0;
    for pool in pools.values_mut() {
        n += pool.drain().len();
    }
    pools.clear();
    info!(closed = n, "pool manager stopped; pooled sockets closed");
    Ok(())
}

/// Serve client connections (with their leases) taken over from a predecessor, or back from
/// a take-over that failed.
fn serve_handed(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, handed: Vec<crate::handover::HandedClient>, cancel: &CancellationToken) {
    for h in handed {
        shared.active_clients.fetch_add(1, Ordering::Relaxed);
        let leases: HashMap<u64, Lease> = h.leases.into_iter().collect();
        // Judge the client by this daemon's configuration (it may differ from the
        // predecessor's); the tenant stays the one its leases were made for.
        let refusal = match identify(shared, &h.conn) {
            Ok((_, refusal)) => refusal,
            Err(_) => shared.config.admits(h.peer.tenant.uid, &h.peer.tenant.cgroup).err(),
        };
        tasks.spawn(client_with(shared.clone(), h.conn, Ok((h.peer, refusal)), leases, cancel.clone()));
    }
}

/// Accept client connections until `cancel` fires or a successor takes over.
async fn accept_until(listener: &AsyncFd<OwnedFd>, shared: &Arc<Shared>, tasks: &mut JoinSet<()>, cancel: &CancellationToken) -> std::io::Result<()> {
    let handover = shared.handover_token();
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = handover.cancelled() => return Ok(()),
            g = listener.readable() => g?,
        };
        let accepted = guard.try_io(|l| {
            // SAFETY: accept4 on our listener; the new fd goes straight into an OwnedFd.
            let fd = unsafe {
                libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            };
            // SAFETY: on success, a fresh fd we own.
            cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        });
        match accepted {
            Ok(Ok(conn)) => {
                shared.metrics.clients.fetch_add(1, Ordering::Relaxed);
                shared.active_clients.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(client(shared.clone(), conn, cancel.clone()));
            }
            Ok(Err(e)) => {
                warn!(error = %e, "accept failed");
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            Err(_would_block) => {}
        }
        // Reap finished client tasks so the set does not grow with every client ever seen.
        while tasks.try_join_next().is_some() {}
    }
}

/// A socket handed out, as the daemon remembers it.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) sock: PooledSock,
    pub(crate) key: PoolKey,
    pub(crate) created: Instant,
    pub(crate) at_handout: sock::Counters,
    pub(crate) policy: Policy,
    /// A peer link: never pooled again (the other end's function may still be using it).
    pub(crate) peer: bool,
    /// Offered at load time (`Prefetch`): where it came from, so that an offer the process
    /// releases as `Unused` goes back to its pool as it was.
    pub(crate) offered: Option<Source>,
}

/// Identify a client and check it against `allow_uids` / `allow_cgroups`: the peer, and the
/// refusal its requests get when it is not allowed.
fn identify(shared: &Shared, conn: &OwnedFd) -> Result<(Peer, Option<String>), tenant::TenantError> {
    use crate::config::TenantBy;
    let by = shared.config.tenant_by;
    // The cgroup allow-list needs the cgroup even where tenants are told apart by uid only.
    let read_cgroup = if shared.config.allow_cgroups.is_some() { TenantBy::UidAndCgroup } else { by };
    let mut peer = tenant::identify(conn.as_raw_fd(), read_cgroup)?;
    let refusal = shared.config.admits(peer.tenant.uid, &peer.tenant.cgroup).err();
    if by == TenantBy::Uid {
        peer.tenant.cgroup = Arc::from("");
    }
    Ok((peer, refusal))
}

/// Serves one client process (one connection) until it goes away.
async fn client(shared: Arc<Shared>, conn: OwnedFd, cancel: CancellationToken) {
    let peer = identify(&shared, &conn);
    match &peer {
        Ok((p, _)) => debug!(pid = p.pid, uid = p.tenant.uid, cgroup = %p.tenant.cgroup, "client connected"),
        Err(e) => warn!(error = %e, "cannot identify client; it will get no sockets"),
    }
    client_with(shared, conn, peer, HashMap::new(), cancel).await;
}

/// Decrements the live-client count when a client task ends, however it ends.
struct ActiveClient(Arc<Shared>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.active_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn client_with(
    shared: Arc<Shared>,
    conn: OwnedFd,
    peer: Result<(Peer, Option<String>), tenant::TenantError>,
    mut leases: HashMap<u64, Lease>,
    cancel: CancellationToken,
) {
    let _active = ActiveClient(shared.clone());
    let mut refusal_logged = false;
    // SAFETY: AsyncFd owns the OwnedFd, so the fd stays open exactly as long as it is registered.
    let Ok(conn) = (unsafe { AsyncFd::register(conn) }) else { return };
    let mut buf = vec![0u8; 512];
    let mut handing_over = false;
    // Made once: a fresh `cancelled()` future per request would register a waiter with the
    // token (a lock) every time round.
    let stop = cancel.cancelled();
    let handover_token = shared.handover_token();
    let handover = handover_token.cancelled();
    tokio::pin!(stop, handover);
    // A new client has usually sent its first request already (the shim's `Prefetch` right
    // after connecting): read it now rather than after the reactor's next turn reports the
    // fresh registration readable.
    let mut first = true;
    loop {
        let got = if std::mem::take(&mut first) {
            match wire::unix::recv(conn.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        } else {
            let mut guard = tokio::select! {
                () = &mut stop => break,
                () = &mut handover => {
                    handing_over = true;
                    break;
                }
                g = conn.readable() => match g { Ok(g) => g, Err(_) => break },
            };
            match guard.try_io(|c| wire::unix::recv(c.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT)) {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            }
        };
        if got.len == 0 && got.fd.is_none() {
            break; // EOF: the process is gone (or closed its link)
        }
        let reply = if got.fd.is_some() || got.extra_fds > 0 || got.ctrunc {
            // No request carries an fd: close what arrived at once, before answering.
            drop(got.fd);
            Some(Reply::error(0, ErrorCode::UnexpectedFd, "no request carries a file descriptor".into()))
        } else if got.truncated {
            Some(Reply::error(0, ErrorCode::Malformed, "message too long".into()))
        } else {
            // Decoded once; every path below works on the decoded message.
            match (wire::decode(&buf[..got.len]), &peer) {
                (Err(e), _) => {
                    shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    Some(Reply::error(0, e.code(), e.to_string()))
                }
                (Ok((Msg::Takeover, _)), Ok((p, _))) if p.tenant.uid == 0 || p.tenant.uid == shared.daemon_uid => {
                    crate::handover::give(&shared, &conn, p).await;
                    // Whatever this connection held stays with this (stopping) daemon.
                    return;
                }
                (Ok((Msg::Takeover, seq)), _) => {
                    Some(Reply::error(seq, ErrorCode::Denied, "only the daemon's own uid or root may take over".into()))
                }
                (Ok((Msg::Prefetch, seq)), Ok((p, None))) => {
                    let mut sent = true;
                    for r in prefetch(&shared, &p.tenant, seq, &mut leases) {
                        sent = sent && send_reply(&conn, r).await;
                    }
                    if !sent {
                        break;
                    }
                    None
                }
                (Ok((msg, seq)), Ok((p, None))) => handle(&shared, p, &conn, msg, seq, &mut leases).await,
                (Ok((msg, seq)), Ok((p, Some(why)))) => {
                    if !refusal_logged && !matches!(msg, Msg::Prefetch) {
                        // Once per client connection, at its first request (not at connect
                        // or its load-time `Prefetch`: the shim links every process at load
                        // time, asking or not).
                        refusal_logged = true;
                        info!(pid = p.pid, uid = p.tenant.uid, reason = %why, "client not allowed: its requests are refused");
                    }
                    refuse(&shared, &msg, seq, why)
                }
                (Ok((_, seq)), Err(e)) => Some(Reply::error(seq, ErrorCode::Denied, format!("client not identified: {e}"))),
            }
        };
        if let Some(r) = reply {
            if !send_reply(&conn, r).await {
                break;
            }
        }
    }
    if handing_over {
        if let Ok((p, _)) = peer {
            let conn = conn.into_inner();
            let leases = leases.drain().collect();
            shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(crate::handover::HandedClient { conn, peer: p, leases });
        }
        return;
    }
    // Whatever is still leased, the process never gave back: it ended (or closed its link)
    // without close(). Judge each as a give-back, from what the daemon can verify.
    for (_, l) in leases.drain() {
        orphaned(&shared, l);
    }
}

/// A lease whose process ended without giving it back (keep-alive clients that hold their
/// connections until exit, `_exit`, a fatal signal). Nothing the process said can be
/// trusted, so the socket goes through every check a clean `Release` gets (return check,
/// quarantine, holders walk, proof); peer links are closed (the other function may still use
/// the link) and `warm` pools never reuse.
fn orphaned(shared: &Shared, l: Lease) {
    if l.peer {
        if let Some(p) = shared.lock().get_mut(&l.key) {
            p.lease_ended();
            p.stats.discarded += 1;
        }
        shared.metrics.discard(Discard::LeaseLost);
        return;
    }
    shared.metrics.orphans.fetch_add(1, Ordering::Relaxed);
    if l.offered.is_some() && sock::untouched(l.sock.fd.as_raw_fd(), l.at_handout).is_ok() {
        unoffer(shared, l, Instant::now());
    } else {
        release(shared, l, Disposition::Clean);
    }
}

/// The answer to a request from a client that is not allowed: never a socket.
fn refuse(shared: &Shared, msg: &Msg<'_>, seq: u32, why: &str) -> Option<Reply> {
    if matches!(msg, Msg::Release { .. }) {
        // No lease can exist, and a give-back gets no answer from anyone.
        return None;
    }
    if matches!(msg, Msg::Prefetch) {
        // Every shimmed process asks at load time, wanting a socket or not: no offers, but
        // no refusal to count either (as for the connection itself).
        return Some(Reply::miss(seq, MissReason::Empty, 0));
    }
    shared.metrics.denied.fetch_add(1, Ordering::Relaxed);
    Some(Reply::error(seq, ErrorCode::Denied, why.to_owned()))
}

/// A reply and the fd to attach.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    fd: Option<i32>,
}

impl Reply {
    fn msg(m: &Msg<'_>, seq: u32) -> Self {
        // Fixed-size messages fit in 64 bytes; only text bodies need more (a zeroed 64 KiB
        // buffer per grant was measurable on the hand-out path).
        let cap = match m {
            Msg::StatusReply(t) | Msg::Error { text: t, .. } => (16 + t.len()).min(wire::MAX_MESSAGE),
            _ => 64,
        };
        let mut bytes = vec![0u8; cap];
        let n = wire::encode(m, seq, &mut bytes);
        bytes.truncate(n);
        Self { bytes, fd: None }
    }
    fn error(seq: u32, code: ErrorCode, text: String) -> Self {
        Self::msg(&Msg::Error { code, text: &text }, seq)
    }
    fn miss(seq: u32, reason: MissReason, retry_after_ms: u32) -> Self {
        Self::msg(&Msg::Miss { reason, retry_after_ms }, seq)
    }
}

async fn send_reply(conn: &AsyncFd<OwnedFd>, r: Reply) -> bool {
    send_within(conn, &r.bytes, r.fd, std::time::Duration::from_secs(1)).await
}

/// Send one message (and fd), waiting up to `wait` for room in the socket buffer.
pub(crate) async fn send_within(conn: &AsyncFd<OwnedFd>, bytes: &[u8], fd: Option<i32>, wait: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match wire::unix::send(conn.as_raw_fd(), bytes, fd, libc::MSG_DONTWAIT) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let ready = tokio::time::timeout_at(deadline, conn.writable()).await;
                match ready {
                    Ok(Ok(mut g)) => g.clear_ready(),
                    _ => return false,
                }
            }
            Err(_) => return false,
        }
    }
}

async fn handle(
    shared: &Arc<Shared>,
    peer: &Peer,
    conn: &AsyncFd<OwnedFd>,
    msg: Msg<'_>,
    seq: u32,
    leases: &mut HashMap<u64, Lease>,
) -> Option<Reply> {
    match msg {
        Msg::Acquire(d) if shared.peer.as_ref().is_some_and(|a| is_virtual(a, d.socket_addr())) => {
            let agent = shared.peer.as_ref().expect("checked");
            if let Some(refusal) = peer_refusal(agent, &peer.tenant, conn, seq).await {
                return Some(refusal);
            }
            let dest = d.socket_addr();
            let v4 = match dest.ip() {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().expect("is_virtual checked"),
            };
            let Some(name) = agent.peer_for_addr(v4) else {
                return Some(Reply::error(seq, ErrorCode::Denied, format!("{dest} is a peer address, but of no peer this node knows")));
            };
            Some(acquire_peer(shared, &peer.tenant, conn, name, dest, seq, leases).await)
        }
        Msg::AcquirePeer { port, name } => {
            let Some(agent) = &shared.peer else {
                return Some(Reply::error(seq, ErrorCode::Denied, "this pool manager has no [peer] configuration".into()));
            };
            if let Some(refusal) = peer_refusal(agent, &peer.tenant, conn, seq).await {
                return Some(refusal);
            }
            let name = match crate::peer::PeerName::parse(name) {
                Ok(n) => n,
                Err(e) => return Some(Reply::error(seq, ErrorCode::Malformed, e.to_string())),
            };
            let dest = SocketAddr::new(agent.settings.virtual_range.addr_of(&name).into(), port);
            Some(acquire_peer(shared, &peer.tenant, conn, name, dest, seq, leases).await)
        }
        Msg::Acquire(d) => {
            let started = Instant::now();
            let (reply, lease) = acquire(shared, &peer.tenant, d.socket_addr(), seq, started).await;
            if let Some((id, l)) = lease {
                let mut r = reply;
                r.fd = Some(l.sock.fd.as_raw_fd());
                leases.insert(id, l);
                // The fd stays open in `leases` while it is sent.
                Some(r)
            } else {
                Some(reply)
            }
        }
        Msg::Release { lease, disposition } => {
            match leases.remove(&lease) {
                Some(l) if l.offered.is_some() && disposition == Disposition::Unused => unoffer(shared, l, Instant::now()),
                Some(mut l) => {
                    if let Some(source) = l.offered.take() {
                        // An offer the program connected with: a hand-out after all.
                        shared.metrics.prefetch_taken.fetch_add(1, Ordering::Relaxed);
                        match source {
                            Source::Warm => shared.metrics.handout_warm.fetch_add(1, Ordering::Relaxed),
                            Source::Reuse => shared.metrics.handout_reuse.fetch_add(1, Ordering::Relaxed),
                        };
                        if let Some(p) = shared.lock().get_mut(&l.key) {
                            p.count_handout(source);
                        }
                    }
                    release(shared, l, disposition);
                }
                None => {}
            }
            None
        }
        // Answered in `client_with` (several replies).
        Msg::Prefetch => None,
        Msg::Status => {
            let text = status::render(shared, peer);
            Some(Reply::msg(&Msg::StatusReply(&text), seq))
        }
        Msg::Prewarm(d) => Some(prewarm(shared, &peer.tenant, d.socket_addr(), seq)),
        Msg::Grant { .. }
        | Msg::Offer { .. }
        | Msg::Miss { .. }
        | Msg::StatusReply(_)
        | Msg::Error { .. }
        | Msg::Handover(_)
        | Msg::Takeover => {
            shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            Some(Reply::error(seq, ErrorCode::Malformed, "that is a reply, not a request".into()))
        }
    }
}

/// The refusal for a tenant that `[peer]` does not admit (counted), checked before anything
/// else about the request, so that a refused caller learns nothing of the job's members. It
/// follows a `Miss(Pending)`, as for a link that could not be made: the shim then fails the
/// program's `connect()` with `ECONNREFUSED` rather than letting it go out to a virtual
/// address, which stands for a peer and is nobody's real address.
async fn peer_refusal(agent: &crate::peer::agent::Agent, tenant: &Tenant, conn: &AsyncFd<OwnedFd>, seq: u32) -> Option<Reply> {
    let why = agent.settings.admission.admits(&agent.settings.me.job, tenant.uid, &tenant.cgroup).err()?;
    agent.metrics.denied.fetch_add(1, Ordering::Relaxed);
    debug!(uid = tenant.uid, cgroup = %tenant.cgroup, reason = %why, "peer link refused");
    // (If this send fails, the connection is gone and the reply below goes nowhere either.)
    let _ = send_reply(conn, Reply::miss(seq, MissReason::Pending, 0)).await;
    Some(Reply::error(seq, ErrorCode::Denied, why.to_string()))
}

fn is_virtual(agent: &crate::peer::agent::Agent, dest: SocketAddr) -> bool {
    let v4 = match dest.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => return false,
        },
    };
    agent.settings.virtual_range.contains(v4)
}

/// A peer link for a function: answer `Miss(Pending)` at once (the shim then waits longer
/// than for a pooled socket), then the link or a miss.
async fn acquire_peer(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    conn: &AsyncFd<OwnedFd>,
    name: crate::peer::PeerName,
    dest: SocketAddr,
    seq: u32,
    leases: &mut HashMap<u64, Lease>,
) -> Reply {
    let agent = shared.peer.as_ref().expect("caller checked");
    let started = Instant::now();
    let wait_ms = agent.settings.link_timeout.as_millis().min(u128::from(u32::MAX)) as u32;
    if !send_reply(conn, Reply::miss(seq, MissReason::Pending, wait_ms)).await {
        return Reply::miss(seq, MissReason::Empty, 0);
    }
    match agent.acquire(&name, dest.port()).await {
        Ok(l) => {
            let id = shared.next_lease.fetch_add(1, Ordering::Relaxed);
            let mut r = Reply::msg(&Msg::Grant { lease: id, source: Source::Warm }, seq);
            r.fd = Some(l.fd.as_raw_fd());
            shared.metrics.observe_handout(started.elapsed());
            debug!(peer = %name, link = l.link, path = l.path.name(), "peer link handed out");
            let key = PoolKey { tenant: tenant.clone(), dest };
            let lease = Lease { sock: PooledSock::new(l.fd), key, created: l.since, at_handout: sock::Counters::default(), policy: Policy::Warm, peer: true, offered: None };
            leases.insert(id, lease);
            r
        }
        Err(e) => {
            info!(peer = %name, error = %e, "no peer link");
            Reply::error(seq, ErrorCode::Internal, format!("no link to {name}: {e}"))
        }
    }
}

/// Settings for a destination, creating the caller's pool if needed. `None`: not pooled.
pub(crate) fn pool_for<'a>(
    shared: &Shared,
    pools: &'a mut HashMap<PoolKey, Pool<PooledSock>>,
    key: &PoolKey,
    now: Instant,
) -> Option<&'a mut Pool<PooledSock>> {
    if key.dest.port() == 0 || key.dest.ip().is_unspecified() || key.dest.ip().is_multicast() {
        return None;
    }
    if !pools.contains_key(key) {
        let (settings, auto) = match shared.lookup(&key.dest) {
            Lookup::Configured(s) => (s, false),
            Lookup::Auto(s) => {
                if pools.values().filter(|p| p.auto).count() >= shared.config.auto.max_destinations {
                    return None;
                }
                (s, true)
            }
            Lookup::NotPooled => return None,
        };
        pools.insert(key.clone(), Pool::new(settings, auto, now));
    }
    pools.get_mut(key)
}

async fn acquire(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    dest: SocketAddr,
    seq: u32,
    started: Instant,
) -> (Reply, Option<(u64, Lease)>) {
    let key = PoolKey { tenant: tenant.clone(), dest };
    for _ in 0..defaults::HANDOUT_ATTEMPTS {
        let now = Instant::now();
        let mut discarded = Vec::new();
        let (taken, refill, settings) = {
            let mut pools = shared.lock();
            let Some(pool) = pool_for(shared, &mut pools, &key, now) else {
                shared.metrics.not_pooled.fetch_add(1, Ordering::Relaxed);
                return (Reply::miss(seq, MissReason::NotPooled, defaults::NOT_POOLED_RETRY_MS), None);
            };
            let taken = pool.take(now, &mut |s| sock::idle_check(s.fd.as_raw_fd()), &mut discarded);
            pool.stats.discarded += discarded.len() as u64;
            (taken, pool.start_refill(now), pool.settings.clone())
        };
        shared.discard_all(discarded);
        spawn_refills(shared, &key, refill, settings.connect_timeout, defaults::REFILL_DELAY);
        match taken {
            Take::Ready(idle) => {
                if settings.probe == Probe::RedisPing {
                    let timeout = defaults::PROBE_TIMEOUT;
                    let (sock, ok) = tokio::task::spawn_blocking(move || {
                        let r = sock::redis_ping(&idle.sock.fd, timeout);
                        (idle, r)
                    })
                    .await
                    .map_or_else(|_| (None, Err(Discard::Error)), |(i, r)| (Some(i), r));
                    if let Err(why) = ok {
                        shared.metrics.discard(why);
                        let mut pools = shared.lock();
                        if let Some(p) = pools.get_mut(&key) {
                            p.handout_failed();
                            p.stats.discarded += 1;
                        }
                        drop(sock);
                        continue;
                    }
                    let Some(idle) = sock else { continue };
                    return grant(shared, key, idle, settings.policy, seq, started);
                }
                return grant(shared, key, idle, settings.policy, seq, started);
            }
            Take::Empty => {
                shared.metrics.miss_empty.fetch_add(1, Ordering::Relaxed);
                return (Reply::miss(seq, MissReason::Empty, 0), None);
            }
            Take::AtLimit => {
                shared.metrics.miss_at_limit.fetch_add(1, Ordering::Relaxed);
                return (Reply::miss(seq, MissReason::AtLimit, 0), None);
            }
        }
    }
    shared.metrics.miss_empty.fetch_add(1, Ordering::Relaxed);
    (Reply::miss(seq, MissReason::Empty, 0), None)
}

fn grant(
    shared: &Shared,
    key: PoolKey,
    idle: crate::pool::Idle<PooledSock>,
    policy: Policy,
    seq: u32,
    started: Instant,
) -> (Reply, Option<(u64, Lease)>) {
    let id = shared.next_lease.fetch_add(1, Ordering::Relaxed);
    match idle.source {
        Source::Warm => shared.metrics.handout_warm.fetch_add(1, Ordering::Relaxed),
        Source::Reuse => shared.metrics.handout_reuse.fetch_add(1, Ordering::Relaxed),
    };
    let at_handout = sock::counters(idle.sock.fd.as_raw_fd());
    let reply = Reply::msg(&Msg::Grant { lease: id, source: idle.source }, seq);
    shared.metrics.observe_handout(started.elapsed());
    let lease = Lease { sock: idle.sock, key, created: idle.created, at_handout, policy, peer: false, offered: None };
    (reply, Some((id, lease)))
}

/// The answer to `Prefetch`: one ready socket from each of the tenant's pools that
/// prefetch, as `Offer`s (the last one flagged), or `Miss(Empty)`. Nothing is connected or
/// waited for: a pool with nothing ready offers nothing (and refills as after a hand-out).
fn prefetch(shared: &Arc<Shared>, tenant: &Tenant, seq: u32, leases: &mut HashMap<u64, Lease>) -> Vec<Reply> {
    let now = Instant::now();
    // Configured destinations that prefetch (each IPv4 one is also listed IPv4-mapped: once
    // is enough), and this tenant's auto pools if the auto settings prefetch.
    let mapped = |a: &SocketAddr| matches!(a.ip(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    let mut dests: Vec<SocketAddr> =
        shared.config.pools.iter().filter(|(a, s)| s.prefetch && !mapped(a)).map(|(a, _)| *a).collect();
    {
        let resolved = shared.resolved.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        dests.extend(resolved.iter().filter(|(a, s)| s.prefetch && !mapped(a)).map(|(a, _)| *a));
    }
    if shared.config.auto.enabled && shared.config.auto.settings.prefetch {
        let pools = shared.lock();
        dests.extend(pools.iter().filter(|(k, p)| p.auto && k.tenant == *tenant).map(|(k, _)| k.dest));
    }
    dests.sort_unstable();
    dests.dedup();
    dests.truncate(defaults::MAX_PREFETCH);
    let mut offers = Vec::new();
    for dest in dests {
        let key = PoolKey { tenant: tenant.clone(), dest };
        let mut discarded = Vec::new();
        let (taken, refill, settings) = {
            let mut pools = shared.lock();
            let Some(pool) = pool_for(shared, &mut pools, &key, now) else { continue };
            let taken = pool.take_for_offer(now, &mut |s| sock::idle_check(s.fd.as_raw_fd()), &mut discarded);
            pool.stats.discarded += discarded.len() as u64;
            (taken, pool.start_refill(now), pool.settings.clone())
        };
        shared.discard_all(discarded);
        spawn_refills(shared, &key, refill, settings.connect_timeout, defaults::REFILL_DELAY);
        if let Some(idle) = taken {
            let id = shared.next_lease.fetch_add(1, Ordering::Relaxed);
            let fd = idle.sock.fd.as_raw_fd();
            let at_handout = sock::counters(fd);
            offers.push((id, idle.source, dest, fd));
            let lease = Lease {
                sock: idle.sock,
                key,
                created: idle.created,
                at_handout,
                policy: settings.policy,
                peer: false,
                offered: Some(idle.source),
            };
            leases.insert(id, lease);
            shared.metrics.prefetch_offered.fetch_add(1, Ordering::Relaxed);
        }
    }
    if offers.is_empty() {
        return vec![Reply::miss(seq, MissReason::Empty, 0)];
    }
    let n = offers.len();
    offers
        .into_iter()
        .enumerate()
        .map(|(i, (lease, source, dest, fd))| {
            let dest = wire::Dest::from_socket_addr(dest);
            let mut r = Reply::msg(&Msg::Offer { lease, source, last: i + 1 == n, dest }, seq);
            // The fd stays open in `leases` while it is sent.
            r.fd = Some(fd);
            r
        })
        .collect()
}

/// An offer the process released as never used: back to its pool if it carried no byte in
/// either direction since it was offered, else closed.
fn unoffer(shared: &Shared, l: Lease, now: Instant) {
    let source = l.offered.unwrap_or(Source::Reuse);
    let verdict = sock::untouched(l.sock.fd.as_raw_fd(), l.at_handout);
    settle(shared, l, verdict, &shared.metrics.prefetch_returned, |pool, sock, created| {
        pool.unoffer(now, crate::pool::Idle { sock, created, since: now, source })
    });
}

fn release(shared: &Shared, l: Lease, disposition: Disposition) {
    if l.peer {
        // Closing the daemon's reference ends the link: the other function sees EOF, as it
        // would on any TCP connection its peer closed.
        return;
    }
    let verdict = match disposition {
        Disposition::Shared => Err(Discard::Shared),
        // `Unused` names an offer; for anything else it is a confused client.
        Disposition::Implicit | Disposition::Unused => Err(Discard::Implicit),
        Disposition::Clean if l.policy == Policy::Warm => Err(Discard::WarmPolicy),
        Disposition::Clean => sock::return_check(l.sock.fd.as_raw_fd(), l.at_handout),
    };
    // A socket that carried no byte either way since hand-out is in the state it was handed
    // out in: the holders check still runs, the protocol's proof is not needed.
    let proof = verdict.is_ok() && sock::untouched(l.sock.fd.as_raw_fd(), l.at_handout).is_err();
    let now = Instant::now();
    settle(shared, l, verdict, &shared.metrics.returned, |pool, sock, created| pool.give_back(now, sock, created, proof));
}

/// The end of a lease: with a good `verdict`, `keep` puts the socket back into its pool
/// (which may still refuse it) and `kept` counts it; otherwise, or if refused, it is closed
/// and the reason counted.
fn settle(
    shared: &Shared,
    l: Lease,
    verdict: Result<(), Discard>,
    kept: &std::sync::atomic::AtomicU64,
    keep: impl FnOnce(&mut Pool<PooledSock>, PooledSock, Instant) -> Result<(), (PooledSock, Discard)>,
) {
    let mut pools = shared.lock();
    let Some(pool) = pools.get_mut(&l.key) else {
        shared.metrics.discard(Discard::PoolRemoved);
        return;
    };
    let outcome = match verdict {
        Ok(()) => keep(pool, l.sock, l.created),
        Err(why) => {
            pool.lease_ended();
            Err((l.sock, why))
        }
    };
    match outcome {
        Ok(()) => {
            drop(pools);
            kept.fetch_add(1, Ordering::Relaxed);
            shared.check_wake.notify_one();
        }
        Err((s, why)) => {
            pool.stats.discarded += 1;
            drop(pools);
            shared.metrics.discard(why);
            drop(s);
        }
    }
}

fn prewarm(shared: &Arc<Shared>, tenant: &Tenant, dest: SocketAddr, seq: u32) -> Reply {
    let key = PoolKey { tenant: tenant.clone(), dest };
    let now = Instant::now();
    let (n, timeout) = {
        let mut pools = shared.lock();
        let Some(pool) = pool_for(shared, &mut pools, &key, now) else {
            return Reply::error(seq, ErrorCode::Denied, format!("{dest} is not pooled by this configuration"));
        };
        pool.last_request = now;
        (pool.start_refill(now), pool.settings.connect_timeout)
    };
    spawn_refills(shared, &key, n, timeout, std::time::Duration::ZERO);
    Reply::msg(&Msg::StatusReply(&format!("prewarming {dest}: {n} connect(s) started")), seq)
}

/// Start `n` connects for `key`'s pool, each after `delay`.
fn spawn_refills(shared: &Arc<Shared>, key: &PoolKey, n: usize, timeout: std::time::Duration, delay: std::time::Duration) {
    for _ in 0..n {
        let shared = shared.clone();
        let key = key.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let r = sock::connect(key.dest, timeout).await.map(PooledSock::new);
            let now = Instant::now();
            let mut pools = shared.lock();
            let pool = pools.get_mut(&key);
            match (r, pool) {
                (Ok(sock), Some(pool)) => {
                    shared.metrics.connects_ok.fetch_add(1, Ordering::Relaxed);
                    pool.connected(now, sock);
                }
                (Ok(_fd), None) => {
                    shared.metrics.connects_ok.fetch_add(1, Ordering::Relaxed);
                    shared.metrics.discard(Discard::PoolRemoved);
                }
                (Err(e), pool) => {
                    shared.metrics.connects_failed.fetch_add(1, Ordering::Relaxed);
                    if let Some(pool) = pool {
                        pool.connect_failed(now);
                    }
                    drop(pools);
                    debug!(dest = %key.dest, error = %e, "pool connect failed");
                }
            }
        });
    }
}

/// Periodic sweep of every pool: quarantine, timeouts, dead sockets, refills, and removal of
/// auto pools nobody uses.
/// Resolve the configured host names again every `resolve_interval`: an address a name
/// gains is pooled from then on (one it loses keeps its pool until the pool is idle).
async fn resolver(shared: Arc<Shared>, cancel: CancellationToken) {
    if shared.config.names.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(shared.config.resolve_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: the load just resolved them
    let mut failing: std::collections::HashSet<String> = shared.config.unresolved.iter().map(|(n, _)| n.clone()).collect();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = shared.clone();
        let Ok((map, failed)) = tokio::task::spawn_blocking(move || s.config.resolve_names()).await else { continue };
        let now_failing: std::collections::HashSet<String> = failed.iter().map(|(n, _)| n.clone()).collect();
        for (name, reason) in &failed {
            if !failing.contains(name) {
                warn!(destination = %name, %reason, "destination no longer resolves; its known addresses stay pooled");
            }
        }
        for name in failing.difference(&now_failing) {
            info!(destination = %name, "destination resolves now: pooled");
        }
        failing = now_failing;
        let mut resolved = shared.resolved.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for a in map.keys().filter(|a| !resolved.contains_key(a) && !shared.config.pools.contains_key(a)) {
            debug!(addr = %a, "a configured name resolves to a new address: pooled");
        }
        *resolved = map;
    }
}

async fn maintain(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(defaults::SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut demand = DemandTracker::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if shared.config.kernel.prewarm && shared.assist.is_some() {
            demand.prewarm_hot(&shared);
        }
        let now = Instant::now();
        let mut discarded = Vec::new();
        let mut refills = Vec::new();
        {
            let mut pools = shared.lock();
            let forget_after = shared.config.auto.forget_after;
            pools.retain(|_, p| {
                let unused = p.auto && now.duration_since(p.last_request) >= forget_after && p.counts().2 == 0 && p.checking() == 0;
                if unused {
                    discarded.extend(p.drain().into_iter().map(|s| (s, Discard::PoolRemoved)));
                }
                !unused
            });
            for (key, pool) in pools.iter_mut() {
                let before = discarded.len();
                pool.sweep(now, &mut |s| sock::idle_check(s.fd.as_raw_fd()), &mut discarded);
                pool.stats.discarded += (discarded.len() - before) as u64;
                let n = pool.start_refill(now);
                if n > 0 {
                    refills.push((key.clone(), n, pool.settings.connect_timeout));
                }
            }
        }
        shared.discard_all(discarded);
        for (key, n, timeout) in refills {
            spawn_refills(&shared, &key, n, timeout, std::time::Duration::ZERO);
        }
    }
}

/// Turns the kernel's connect counts into prewarmed pools: a (tenant, destination) whose
/// count rose and reached the threshold gets a pool filled to `min_idle`, under the
/// configured settings if the destination has some, else the auto settings (bounded by
/// `auto.max_destinations`).
#[derive(Debug, Default)]
struct DemandTracker {
    seen: HashMap<(u64, u32, SocketAddr), u64>,
    cgroup_paths: HashMap<u64, Option<Arc<str>>>,
}

impl DemandTracker {
    fn prewarm_hot(&mut self, shared: &Arc<Shared>) {
        let threshold = shared.config.kernel.prewarm_threshold;
        let roots: Vec<std::path::PathBuf> = shared
            .assist
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(std::sync::PoisonError::into_inner).cgroups().to_vec())
            .unwrap_or_default();
        let mut hot = Vec::new();
        for (cg, uid, dest, n) in shared.demand() {
            let before = self.seen.insert((cg, uid, dest), n).unwrap_or(0);
            if n > before && n >= threshold {
                hot.push((cg, uid, dest));
            }
        }
        let now = Instant::now();
        for (cg, uid, dest) in hot {
            let by_uid = shared.config.tenant_by == crate::config::TenantBy::Uid;
            let cgroup: Arc<str> = if by_uid && shared.config.allow_cgroups.is_none() {
                Arc::from("")
            } else {
                let path = self
                    .cgroup_paths
                    .entry(cg)
                    .or_insert_with(|| shim_user::assist::cgroup_path_of_id(cg, &roots).map(Arc::from));
                match path {
                    Some(p) => p.clone(),
                    None => continue,
                }
            };
            // No sockets kept for a tenant that may not have them.
            if shared.config.admits(uid, &cgroup).is_err() {
                continue;
            }
            let cgroup = if by_uid { Arc::from("") } else { cgroup };
            let key = PoolKey { tenant: Tenant { uid, cgroup }, dest };
            let (n, timeout) = {
                let mut pools = shared.lock();
                if pools.contains_key(&key) {
                    continue;
                }
                let settings = match shared.lookup(&dest) {
                    Lookup::Configured(s) => s,
                    Lookup::Auto(_) | Lookup::NotPooled => {
                        if pools.values().filter(|p| p.auto).count() >= shared.config.auto.max_destinations {
                            continue;
                        }
                        shared.config.auto.settings.clone()
                    }
                };
                let configured = matches!(shared.lookup(&dest), Lookup::Configured(_));
                let mut pool = Pool::new(settings, !configured, now);
                let n = pool.start_refill(now);
                let timeout = pool.settings.connect_timeout;
                pools.insert(key.clone(), pool);
                (n, timeout)
            };
            shared.metrics.prewarmed.fetch_add(1, Ordering::Relaxed);
            info!(dest = %dest, uid, cgroup = %key.tenant.cgroup, "demand seen by the kernel: prewarming");
            spawn_refills(shared, &key, n, timeout, std::time::Duration::ZERO);
        }
    }
}
