//! Restart without losing the pool: a successor (`pool-manager serve --takeover`) connects to
//! the running daemon's socket and sends `Takeover`; the running daemon stops accepting,
//! collects every client connection with its leases, and sends one `Handover` record each
//! with the fd attached (as PgBouncer's online restart does): the listening socket, the
//! metrics listener, every pooled socket, every client connection followed by its leases,
//! then `Done`. The records are binary and length-prefixed ([`wire::handover`]): a tenant's
//! cgroup name travels with whatever bytes it holds.
//!
//! A take-over that fails at any point leaves a daemon serving. The running daemon stays
//! the owner until the successor says `Commit`, which it does only once it has received and
//! checked every record and done everything that can fail before serving (runtime, kernel
//! assist, metrics endpoint). Until then the running daemon keeps its own references to
//! every socket; if the successor goes away, sends anything else or is silent for
//! [`COMMIT_WAIT`], the daemon answers `Aborted` (if it can), puts the pooled sockets back,
//! serves the client connections again and accepts on its listener as before, and the
//! successor, which never served, exits. After `Commit` the daemon answers `Committed` and
//! stops; the successor then owns everything, and nothing left on its path to serving can
//! fail in practice (its metrics endpoint, the predecessor's listener when the address is
//! the same, was set up before the commit).
//! Chosen over "the successor starts fresh": a fresh start loses every warm socket and every
//! lease, and cannot cover a successor that dies; keeping the old daemon covers both.
//!
//! The successor serves the same listening socket (no moment without a listener), puts the
//! pooled sockets through quarantine and its own configuration (a destination it does not
//! pool is closed), and serves the clients with their leases, so a function that closes a
//! socket after the restart gives it back as before. Only the daemon's own uid or root may
//! take over.

use crate::config::Policy;
use crate::pool::Idle;
use crate::server::{self, Lease, PoolKey, PooledSock, Shared};
use crate::sock;
use crate::tenant::{Peer, Tenant};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};
use wire::handover::{Record, LEGACY_KIND, MAX_CGROUP};
use wire::client::{ClientError, Link};
use wire::{DecodeError, Dest, Msg, Source};

/// A client connection and its leases, on their way to the successor.
#[derive(Debug)]
pub struct HandedClient {
    /// The function's link to the daemon.
    pub conn: OwnedFd,
    /// Who it is.
    pub peer: Peer,
    /// What it holds.
    pub(crate) leases: Vec<(u64, Lease)>,
}

/// Bound on sending one record: a successor that reads nothing for this long has failed.
const SEND_WAIT: Duration = Duration::from_secs(5);
/// Client tasks finish their current request within this (a peer link may take
/// `link_timeout`, 10 s by default); one still busy after it is not handed over.
const QUIESCE: Duration = Duration::from_secs(10);
/// How long the running daemon waits for `Commit` after `Done`: the successor attaches the
/// kernel assist and binds its metrics endpoint in between (milliseconds; seconds when the
/// eBPF programs load slowly). Functions wait meanwhile (the shim's timeout, then their own
/// connect), so this is short.
pub const COMMIT_WAIT: Duration = Duration::from_secs(15);
/// The successor waits this long for the daemon's answer to `Commit`.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

fn record_bytes(r: &Record<'_>) -> Vec<u8> {
    let mut b = vec![0u8; (wire::HEADER_LEN + r.len()).max(32)];
    let n = wire::encode(&Msg::Handover(*r), 0, &mut b);
    b.truncate(n);
    b
}

/// The running daemon's side: hand everything to the successor on `conn`; serve on with it
/// all if the successor does not commit.
pub(crate) async fn give(shared: &Arc<Shared>, conn: &AsyncFd<OwnedFd>, successor: &Peer) {
    if shared.taking_over.swap(true, Ordering::AcqRel) {
        let _ = server::send_within(conn, &record_bytes(&Record::Aborted), None, SEND_WAIT).await;
        warn!(pid = successor.pid, "a second successor while a take-over is in progress: refused");
        return;
    }
    info!(pid = successor.pid, "a successor takes over: handing over the listener, pools and clients");
    shared.handover_token().cancel();
    // Every other client task finishes its current request and parks its connection.
    let deadline = Instant::now() + QUIESCE;
    while shared.active_clients.load(Ordering::Relaxed) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let idle: Vec<(PoolKey, Idle<PooledSock>)> = {
        shared.lock().drain_idle()
    };
    let clients = std::mem::take(&mut *shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    match offer(shared, conn, &idle, &clients).await {
        Ok(summary) => {
            shared.handed_over.store(true, Ordering::Relaxed);
            info!("{summary} handed over; stopping");
            drop((idle, clients));
        }
        Err(why) => {
            warn!("the take-over failed ({why}): serving on with everything this daemon had");
            shared.metrics.takeovers_failed.fetch_add(1, Ordering::Relaxed);
            restore(shared, idle, clients);
        }
    }
    shared.handover_done.notify_one();
}

/// Send every record, then wait for the successor's verdict; `Ok` once it committed.
async fn offer(shared: &Shared, conn: &AsyncFd<OwnedFd>, idle: &[(PoolKey, Idle<PooledSock>)], clients: &[HandedClient]) -> Result<String, String> {
    let send = |rec: Record<'_>, fd: Option<i32>| {
        let bytes = record_bytes(&rec);
        async move { server::send_within(conn, &bytes, fd, SEND_WAIT).await }
    };
    let gone = || "the successor went away".to_owned();
    let now = Instant::now();
    let age = |t: Instant| now.duration_since(t).as_millis() as u64;
    if !send(Record::Listener, Some(shared.listener_fd.load(Ordering::Relaxed))).await {
        return Err(gone());
    }
    let metrics_fd = shared.metrics_fd.load(Ordering::Relaxed);
    if metrics_fd >= 0 && !send(Record::Metrics, Some(metrics_fd)).await {
        return Err(gone());
    }
    let (mut n_idle, mut n_clients, mut n_leases) = (0u32, 0u32, 0u32);
    for (k, i) in idle.iter().filter(|(k, _)| k.tenant.cgroup.len() <= MAX_CGROUP && k.tenant.netns.is_none()) {
        let dest = Dest::from_socket_addr(k.dest);
        let rec = Record::Idle { uid: k.tenant.uid, cgroup: k.tenant.cgroup.as_bytes(), dest, reuse: i.source == Source::Reuse, age_ms: age(i.created) };
        if !send(rec, Some(i.sock.fd.as_raw_fd())).await {
            return Err(gone());
        }
        n_idle += 1;
    }
    // (A cgroup path longer than the kernel's PATH_MAX cannot be read from /proc: none is
    // skipped in practice; one that were would stay with this daemon and close with it.)
    // Tenants of other network namespaces stay too (the records carry no namespace): their
    // sockets close with this daemon and their processes reconnect to the successor.
    for c in clients.iter().filter(|c| c.peer.tenant.cgroup.len() <= MAX_CGROUP && c.peer.tenant.netns.is_none()) {
        let t = &c.peer.tenant;
        if !send(Record::Client { uid: t.uid, cgroup: t.cgroup.as_bytes(), pid: c.peer.pid }, Some(c.conn.as_raw_fd())).await {
            return Err(gone());
        }
        n_clients += 1;
        for (id, l) in &c.leases {
            let rec = Record::Lease {
                id: wire::LeaseId::new(*id).expect("lease map keys are LeaseIds (server::Shared::next_lease_id, or adopted)"),
                dest: Dest::from_socket_addr(l.key.dest),
                age_ms: age(l.created),
                reuse: l.policy == Policy::Reuse,
                peer: l.peer,
                acked: l.at_handout.acked,
                received: l.at_handout.received,
            };
            if !send(rec, Some(l.sock.fd.as_raw_fd())).await {
                return Err(gone());
            }
            n_leases += 1;
        }
    }
    if !send(Record::Done { idle: n_idle, clients: n_clients, leases: n_leases }, None).await {
        return Err(gone());
    }
    let verdict = receive(conn, COMMIT_WAIT).await;
    if verdict == Some(Record::Commit) {
        // Whether the successor reads this or not, it owns everything from here on.
        let _ = send(Record::Committed, None).await;
        return Ok(summary(n_idle, n_clients, n_leases));
    }
    let _ = send(Record::Aborted, None).await;
    Err(match verdict {
        None => format!("no commit from the successor within {COMMIT_WAIT:?}, or it went away"),
        Some(other) => format!("the successor sent {other:?} instead of a commit"),
    })
}

fn summary(idle: u32, clients: u32, leases: u32) -> String {
    format!("listener, {idle} pooled sockets, {clients} clients, {leases} leases")
}

/// One record from the successor within `wait` (`None`: none, closed, or not a record).
async fn receive(conn: &AsyncFd<OwnedFd>, wait: Duration) -> Option<Record<'static>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 64];
    loop {
        let mut guard = tokio::time::timeout_at(deadline, conn.readable()).await.ok()?.ok()?;
        match guard.try_io(|c| wire::unix::recv(c.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT)) {
            Ok(Ok(got)) if got.len > 0 && got.fd.is_none() => {
                return match wire::decode(&buf[..got.len]) {
                    // Only the fieldless records can come this way: none borrows from `buf`.
                    Ok((Msg::Handover(r @ (Record::Commit | Record::Committed | Record::Aborted)), _)) => Some(owned(r)),
                    _ => None,
                };
            }
            Ok(_) => return None,
            Err(_would_block) => {}
        }
    }
}

fn owned(r: Record<'_>) -> Record<'static> {
    match r {
        Record::Commit => Record::Commit,
        Record::Committed => Record::Committed,
        _ => Record::Aborted,
    }
}

/// The take-over failed: pooled sockets back into their pools (through quarantine, as
/// adopted ones), client connections back to `run_with`, which serves them again.
fn restore(shared: &Shared, idle: Vec<(PoolKey, Idle<PooledSock>)>, clients: Vec<HandedClient>) {
    let now = Instant::now();
    let mut closed = 0;
    {
        let mut table = shared.lock();
        for (k, i) in idle {
            if table.readopt(&k, now, i).is_err() {
                closed += 1;
            }
        }
    }
    if closed > 0 {
        info!(closed, "pooled sockets that no longer fit their pools were closed");
    }
    *shared.handover.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tokio_util::sync::CancellationToken::new();
    shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(clients);
    shared.taking_over.store(false, Ordering::Release);
}

/// What the successor received.
#[derive(Debug)]
pub struct Received {
    /// The listening socket.
    pub listener: OwnedFd,
    /// The predecessor's metrics listener, if it had one.
    pub metrics: Option<OwnedFd>,
    idle: Vec<(Tenant, SocketAddr, Source, Duration, OwnedFd)>,
    clients: Vec<(Peer, OwnedFd, Vec<LeaseMeta>)>,
    /// The predecessor's summary.
    pub summary: String,
}

/// A lease as received (see [`adopt`]).
#[derive(Debug)]
pub struct LeaseMeta {
    id: wire::LeaseId,
    dest: SocketAddr,
    age: Duration,
    policy: Policy,
    peer: bool,
    at_handout: sock::Counters,
    fd: OwnedFd,
}

/// Errors taking over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TakeoverError {
    /// No daemon answers on the socket.
    #[error("no running pool manager at {0}: {1}")]
    NotRunning(std::path::PathBuf, #[source] ClientError),
    /// The running daemon is of a version that hands over text records without waiting for
    /// a commit: it stops whatever happens, so the successor starts fresh once it is gone.
    #[error("the running pool manager speaks the retired text hand-over; it stops now, and this one starts fresh")]
    Legacy,
    /// The running daemon refused, or the exchange broke; the running daemon serves on.
    #[error("take-over failed (the running pool manager serves on): {0}")]
    Failed(String),
}

/// Everything received, not committed yet: dropping it (closing the connection) leaves the
/// running daemon serving.
#[derive(Debug)]
pub struct Pending {
    conn: Link,
    /// What the running daemon handed over.
    pub received: Received,
}

impl Pending {
    /// Tell the running daemon to stop: from here on everything is this process's.
    ///
    /// # Errors
    /// [`TakeoverError::Failed`] when the daemon answers that it serves on (it gave up
    /// waiting) or does not answer at all.
    pub fn commit(self) -> Result<Received, TakeoverError> {
        let mut buf = [0u8; 64];
        self.conn.send(&Msg::Handover(Record::Commit), 0, None, 0).map_err(failed)?;
        self.conn.set_timeout(Some(VERDICT_WAIT)).map_err(failed)?;
        match self.conn.recv(&mut buf) {
            Ok(r) if r.msg == Msg::Handover(Record::Committed) => Ok(self.received),
            Ok(r) if r.msg == Msg::Handover(Record::Aborted) => Err(failed("it gave up waiting for the commit")),
            // Closed without a word: the daemon is gone (it serves on only after `Aborted`).
            Err(ClientError::Closed) => Ok(self.received),
            Err(ClientError::Recv(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(self.received),
            Ok(r) => Err(failed(format!("unexpected answer to the commit: {:?}", r.msg))),
            Err(e) => Err(failed(format!("no answer to the commit: {e}"))),
        }
    }
}

fn failed(what: impl std::fmt::Display) -> TakeoverError {
    TakeoverError::Failed(what.to_string())
}

fn tenant(uid: u32, cgroup: &[u8]) -> Result<Tenant, TakeoverError> {
    let cgroup = std::str::from_utf8(cgroup).map_err(|_| failed("a cgroup that is not UTF-8"))?;
    // The cgroup there now: a predecessor's tenant of a cgroup removed since is closed by
    // the first sweep.
    Ok(Tenant { uid, cgroup: cgroup.into(), cgroup_id: server::tenants::cgroup_id_of_path(cgroup), netns: None })
}

fn dest(d: &Dest) -> SocketAddr {
    d.socket_addr()
}

/// The successor's side (blocking, before its runtime starts): ask the daemon on `path` to
/// hand everything over and collect it, without committing yet (see [`Pending::commit`]).
///
/// # Errors
/// See [`TakeoverError`]; after any of them but `Legacy` the running daemon serves on.
pub fn take(path: &std::path::Path) -> Result<Pending, TakeoverError> {
    // The running daemon may wait QUIESCE for busy clients before its first record.
    let mut conn = Link::connect(path, Some(QUIESCE + SEND_WAIT)).map_err(|e| TakeoverError::NotRunning(path.into(), e))?;
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    let seq = conn.next_seq();
    conn.send(&Msg::Takeover, seq, None, 0).map_err(failed)?;
    let (mut listener, mut metrics) = (None, None);
    let (mut idle, mut clients) = (Vec::new(), Vec::<(Peer, OwnedFd, Vec<LeaseMeta>)>::new());
    loop {
        let (rec, fd) = match conn.recv(&mut buf) {
            Ok(wire::client::Reply { msg: Msg::Handover(rec), fd, .. }) => (rec, fd),
            Ok(wire::client::Reply { msg: Msg::Error { text, .. }, .. }) => return Err(failed(format!("refused: {text}"))),
            Ok(other) => return Err(failed(format!("unexpected {:?}", other.msg))),
            Err(ClientError::Closed) => return Err(failed("the running daemon closed the connection mid-hand-over")),
            Err(ClientError::Truncated | ClientError::ExtraFds) => return Err(failed("a malformed hand-over message")),
            Err(ClientError::Decode(DecodeError::UnknownKind(LEGACY_KIND))) => return Err(TakeoverError::Legacy),
            Err(ClientError::Decode(e)) => return Err(failed(e)),
            Err(e) => return Err(failed(format!("waiting for the hand-over: {e}"))),
        };
        let need_fd = || fd.ok_or_else(|| failed(format!("{rec:?} without its fd")));
        match rec {
            Record::Done { idle: n_idle, clients: n_clients, leases: n_leases } => {
                let listener = listener.ok_or_else(|| failed("no listener in the hand-over"))?;
                let leases: usize = clients.iter().map(|c| c.2.len()).sum();
                if (idle.len(), clients.len(), leases) != (n_idle as usize, n_clients as usize, n_leases as usize) {
                    return Err(failed("the hand-over lost records on the way"));
                }
                let summary = summary(n_idle, n_clients, n_leases);
                return Ok(Pending { conn, received: Received { listener, metrics, idle, clients, summary } });
            }
            Record::Listener => listener = Some(need_fd()?),
            Record::Metrics => metrics = Some(need_fd()?),
            Record::Idle { uid, cgroup, dest: d, reuse, age_ms } => {
                let source = if reuse { Source::Reuse } else { Source::Warm };
                idle.push((tenant(uid, cgroup)?, dest(&d), source, Duration::from_millis(age_ms), need_fd()?));
            }
            Record::Client { uid, cgroup, pid } => clients.push((Peer { tenant: tenant(uid, cgroup)?, pid, netns: None }, need_fd()?, Vec::new())),
            Record::Lease { id, dest: d, age_ms, reuse, peer, acked, received } => {
                let meta = LeaseMeta {
                    id,
                    dest: dest(&d),
                    age: Duration::from_millis(age_ms),
                    policy: if reuse { Policy::Reuse } else { Policy::Warm },
                    peer,
                    at_handout: sock::Counters { acked, received },
                    fd: need_fd()?,
                };
                clients.last_mut().ok_or_else(|| failed("a lease before any client"))?.2.push(meta);
            }
            Record::Commit | Record::Committed | Record::Aborted => return Err(failed(format!("unexpected {rec:?}"))),
        }
    }
}

/// Put what was received into `shared`'s pools; returns the clients to serve.
pub fn adopt(shared: &Shared, r: Vec<(Tenant, SocketAddr, Source, Duration, OwnedFd)>, clients: Vec<(Peer, OwnedFd, Vec<LeaseMeta>)>) -> Vec<HandedClient> {
    let now = Instant::now();
    let ago = |age: Duration| now.checked_sub(age).unwrap_or(now);
    let (mut kept, mut closed) = (0, 0);
    let mut max_lease = 0;
    let mut out = Vec::new();
    {
        let mut pools = shared.lock();
        for (tenant, dest, source, age, fd) in r {
            let key = PoolKey { tenant, dest };
            match server::pool_for(shared, &mut pools, &key, now) {
                Some(pool) => match pool.adopt(now, Idle { sock: PooledSock::new(fd), created: ago(age), since: now, source }) {
                    Ok(()) => kept += 1,
                    Err(_) => closed += 1,
                },
                None => closed += 1,
            }
        }
        for (peer, conn, metas) in clients {
            let mut leases = Vec::new();
            for m in metas {
                max_lease = max_lease.max(m.id.get());
                let key = PoolKey { tenant: peer.tenant.clone(), dest: m.dest };
                if !m.peer {
                    if let Some(pool) = server::pool_for(shared, &mut pools, &key, now) {
                        pool.adopt_lease();
                    }
                }
                // An offer arrives as an ordinary lease: if its process later releases it as
                // unused, it is closed rather than pooled again.
                // Its snapshot stayed with the predecessor: a fresh socket's options are
                // the pool's (the lease itself may carry the function's).
                let sock = match crate::sockstate::Snapshot::fresh(m.dest) {
                    Ok(base) => PooledSock { fd: m.fd, base: std::sync::Arc::new(base) },
                    // No socket can be made (out of fds): the lease's own options then.
                    Err(_) => PooledSock::new(m.fd),
                };
                let lease = Lease { sock, key, created: ago(m.age), at_handout: m.at_handout, policy: m.policy, peer: m.peer, offered: None };
                leases.push((m.id.get(), lease));
            }
            out.push(HandedClient { conn, peer, leases });
        }
    }
    shared.raise_next_lease(max_lease + 1);
    if kept + closed > 0 || !out.is_empty() {
        info!(pooled = kept, closed, clients = out.len(), "adopted the predecessor's pools and clients");
    }
    out
}

impl Received {
    /// Split into the listener and what [`adopt`] takes.
    #[must_use]
    #[allow(clippy::type_complexity)]
    pub fn into_parts(self) -> (OwnedFd, Vec<(Tenant, SocketAddr, Source, Duration, OwnedFd)>, Vec<(Peer, OwnedFd, Vec<LeaseMeta>)>) {
        (self.listener, self.idle, self.clients)
    }
}
