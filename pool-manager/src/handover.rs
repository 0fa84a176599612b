//! Restart without losing the pool: a successor (`pool-manager serve --takeover`) connects to
//! the running daemon's socket and sends `Takeover`; the running daemon stops accepting,
//! collects every client connection with its leases, and sends, one `Handover` message each
//! with the fd attached (as PgBouncer's online restart does):
//!
//! | item | fd | metadata (tab-separated) |
//! |---|---|---|
//! | `Listener` | the listening socket | - |
//! | `Idle` | a pooled socket | uid, cgroup, destination, warm/reuse, age in ms |
//! | `Client` | a function's link to the daemon | uid, cgroup, pid |
//! | `Lease` | a socket that client holds | lease id, destination, age ms, policy, peer link 0/1, bytes acked and received at hand-out |
//! | `Done` | - | a summary |
//!
//! The successor serves the same listening socket (no moment without a listener), puts the
//! pooled sockets through quarantine and its own configuration (a destination it does not
//! pool is closed), and serves the clients with their leases, so a function that closes a
//! socket after the restart gives it back as before. Then the predecessor exits without
//! removing the socket file. Only the daemon's own uid or root may take over.

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
use wire::{HandoverItem, Msg, Source};

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

const SEND_WAIT: Duration = Duration::from_secs(5);
const QUIESCE: Duration = Duration::from_secs(10);

fn encode(item: HandoverItem, text: &str) -> Vec<u8> {
    let mut b = vec![0u8; wire::MAX_MESSAGE];
    let n = wire::encode(&Msg::Handover { item, text }, 0, &mut b);
    b.truncate(n);
    b
}

/// The running daemon's side: hand everything to the successor on `conn`.
pub(crate) async fn give(shared: &Arc<Shared>, conn: &AsyncFd<OwnedFd>, successor: &Peer) {
    info!(pid = successor.pid, "a successor takes over: handing over the listener, pools and clients");
    shared.handover.cancel();
    // Every other client task finishes its current request and parks its connection.
    let deadline = Instant::now() + QUIESCE;
    while shared.active_clients.load(Ordering::Relaxed) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let send = |item, text: String, fd: Option<i32>| {
        let bytes = encode(item, &text);
        async move { server::send_within(conn, &bytes, fd, SEND_WAIT).await }
    };
    let mut ok = send(HandoverItem::Listener, String::new(), Some(shared.listener_fd.load(Ordering::Relaxed))).await;
    let now = Instant::now();
    let idle: Vec<(PoolKey, Idle<PooledSock>)> = {
        let mut pools = shared.lock();
        pools.iter_mut().flat_map(|(k, p)| p.drain_idle().into_iter().map(move |i| (k.clone(), i))).collect()
    };
    let n_idle = idle.len();
    for (k, i) in idle {
        let src = if i.source == Source::Reuse { "reuse" } else { "warm" };
        let text = format!("{}\t{}\t{}\t{src}\t{}", k.tenant.uid, k.tenant.cgroup, k.dest, now.duration_since(i.created).as_millis());
        ok = ok && send(HandoverItem::Idle, text, Some(i.sock.fd.as_raw_fd())).await;
    }
    let clients = std::mem::take(&mut *shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    let (n_clients, mut n_leases) = (clients.len(), 0);
    for c in &clients {
        let t = &c.peer.tenant;
        ok = ok && send(HandoverItem::Client, format!("{}\t{}\t{}", t.uid, t.cgroup, c.peer.pid), Some(c.conn.as_raw_fd())).await;
        for (id, l) in &c.leases {
            n_leases += 1;
            let text = format!(
                "{id}\t{}\t{}\t{}\t{}\t{}\t{}",
                l.key.dest,
                now.duration_since(l.created).as_millis(),
                l.policy.name(),
                u8::from(l.peer),
                l.at_handout.acked,
                l.at_handout.received
            );
            ok = ok && send(HandoverItem::Lease, text, Some(l.sock.fd.as_raw_fd())).await;
        }
    }
    let summary = format!("listener, {n_idle} pooled sockets, {n_clients} clients, {n_leases} leases");
    ok = ok && send(HandoverItem::Done, summary.clone(), None).await;
    if ok {
        shared.handed_over.store(true, Ordering::Relaxed);
        info!("{summary} handed over; stopping");
    } else {
        warn!("the successor went away during the hand-over; stopping (functions fall back to their own connects)");
    }
    drop(clients);
    shared.handover_done.notify_one();
}

/// What the successor received.
#[derive(Debug)]
pub struct Received {
    /// The listening socket.
    pub listener: OwnedFd,
    idle: Vec<(Tenant, SocketAddr, Source, Duration, OwnedFd)>,
    clients: Vec<(Peer, OwnedFd, Vec<LeaseMeta>)>,
    /// The predecessor's summary.
    pub summary: String,
}

/// A lease as received (see [`adopt`]).
#[derive(Debug)]
pub struct LeaseMeta {
    id: u64,
    dest: SocketAddr,
    age: Duration,
    policy: Policy,
    peer: bool,
    at_handout: sock::Counters,
    fd: OwnedFd,
}

/// Errors taking over.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// No daemon answers on the socket.
    #[error("no running pool manager at {0}: {1}")]
    NotRunning(std::path::PathBuf, std::io::Error),
    /// The running daemon refused or the exchange broke.
    #[error("take-over failed: {0}")]
    Failed(String),
}

fn field<'a>(it: &mut impl Iterator<Item = &'a str>, what: &str) -> Result<&'a str, TakeoverError> {
    it.next().ok_or_else(|| TakeoverError::Failed(format!("hand-over item without {what}")))
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, TakeoverError> {
    s.parse().map_err(|_| TakeoverError::Failed(format!("bad {what} {s:?}")))
}

/// The successor's side (blocking, before its runtime starts): ask the daemon on `path` to
/// hand everything over and collect it.
///
/// # Errors
/// See [`TakeoverError`].
pub fn take(path: &std::path::Path) -> Result<Received, TakeoverError> {
    let conn = server::connect_client(path).map_err(|e| TakeoverError::NotRunning(path.into(), e))?;
    let tv = libc::timeval { tv_sec: 30, tv_usec: 0 };
    // SAFETY: SO_RCVTIMEO with a timeval of the right size, on our socket.
    unsafe {
        libc::setsockopt(conn.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as libc::socklen_t)
    };
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    let n = wire::encode(&Msg::Takeover, 1, &mut buf);
    wire::unix::send(conn.as_raw_fd(), &buf[..n], None, 0).map_err(|e| TakeoverError::Failed(e.to_string()))?;
    let mut listener = None;
    let (mut idle, mut clients) = (Vec::new(), Vec::<(Peer, OwnedFd, Vec<LeaseMeta>)>::new());
    loop {
        let got = wire::unix::recv(conn.as_raw_fd(), &mut buf, 0).map_err(|e| TakeoverError::Failed(format!("waiting for the hand-over: {e}")))?;
        if got.len == 0 {
            return Err(TakeoverError::Failed("the running daemon closed the connection mid-hand-over".into()));
        }
        let (msg, _) = wire::decode(&buf[..got.len]).map_err(|e| TakeoverError::Failed(e.to_string()))?;
        let (item, text) = match msg {
            Msg::Handover { item, text } => (item, text.to_owned()),
            Msg::Error { text, .. } => return Err(TakeoverError::Failed(format!("refused: {text}"))),
            other => return Err(TakeoverError::Failed(format!("unexpected {other:?}"))),
        };
        if item == HandoverItem::Done {
            let listener = listener.ok_or_else(|| TakeoverError::Failed("no listener in the hand-over".into()))?;
            return Ok(Received { listener, idle, clients, summary: text });
        }
        let fd = got.fd.ok_or_else(|| TakeoverError::Failed(format!("{item:?} without its fd")))?;
        let mut f = text.split('\t');
        match item {
            HandoverItem::Listener => listener = Some(fd),
            HandoverItem::Idle => {
                let uid = num(field(&mut f, "uid")?, "uid")?;
                let cgroup = field(&mut f, "cgroup")?.into();
                let dest = num(field(&mut f, "destination")?, "destination")?;
                let source = if field(&mut f, "source")? == "reuse" { Source::Reuse } else { Source::Warm };
                let age = Duration::from_millis(num(field(&mut f, "age")?, "age")?);
                idle.push((Tenant { uid, cgroup }, dest, source, age, fd));
            }
            HandoverItem::Client => {
                let uid = num(field(&mut f, "uid")?, "uid")?;
                let cgroup = field(&mut f, "cgroup")?.into();
                let pid = num(field(&mut f, "pid")?, "pid")?;
                clients.push((Peer { tenant: Tenant { uid, cgroup }, pid }, fd, Vec::new()));
            }
            HandoverItem::Lease => {
                let meta = LeaseMeta {
                    id: num(field(&mut f, "lease")?, "lease")?,
                    dest: num(field(&mut f, "destination")?, "destination")?,
                    age: Duration::from_millis(num(field(&mut f, "age")?, "age")?),
                    policy: if field(&mut f, "policy")? == "reuse" { Policy::Reuse } else { Policy::Warm },
                    peer: field(&mut f, "peer")? == "1",
                    at_handout: sock::Counters { acked: num(field(&mut f, "acked")?, "acked")?, received: num(field(&mut f, "received")?, "received")? },
                    fd,
                };
                clients.last_mut().ok_or_else(|| TakeoverError::Failed("a lease before any client".into()))?.2.push(meta);
            }
            HandoverItem::Done => unreachable!("handled above"),
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
                max_lease = max_lease.max(m.id);
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
                leases.push((m.id, lease));
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
