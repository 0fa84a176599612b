//! Sockets made in the client's network namespace.
//!
//! A client in the daemon's own namespace is told apart once, when it connects (its tenant
//! has `netns: None`), and is served as before. For every other namespace [`Namespaces`]
//! keeps one maker: a thread that entered the namespace once with `setns()` and creates
//! sockets on request (`socket()` takes the namespace of the calling thread; `connect()`
//! then routes by the socket's namespace, from any thread). [`connect`] is the one place a
//! pool socket is made. The namespace's entry counts its live clients ([`Member`]); once it
//! has had none for `netns_linger`, [`close_expired`] closes its pools and ends its maker,
//! so that the daemon holds nothing that keeps a removed namespace alive.

use crate::server::{PoolKey, PooledSock, Shared};
use crate::sock::Discard;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tenancy::{NetNs, NetNsId};
use tracing::{debug, info, warn};

type Request = (libc::c_int, tokio::sync::oneshot::Sender<std::io::Result<OwnedFd>>);

/// The namespaces the daemon serves clients of, besides its own.
#[derive(Debug)]
pub struct Namespaces {
    /// The daemon's own namespace (`None` if it could not be read: then every client counts
    /// as foreign, and its sockets are made by a maker).
    own: Option<NetNsId>,
    linger: Duration,
    entries: Mutex<HashMap<NetNsId, Entry>>,
}

#[derive(Debug)]
struct Entry {
    maker: mpsc::Sender<Request>,
    clients: usize,
    idle_since: Option<Instant>,
}

/// A live client of a namespace: while one exists, the namespace keeps its pools.
#[derive(Debug)]
pub struct Member {
    all: Arc<Namespaces>,
    id: NetNsId,
}

impl Member {
    /// The namespace.
    #[must_use]
    pub fn id(&self) -> NetNsId {
        self.id
    }

    /// One more client of the same namespace (a registered container holds one until it
    /// stops, so that its namespace stays served between the OCI hook and its first client).
    #[must_use]
    pub fn another(&self) -> Member {
        if let Some(e) = self.all.lock().get_mut(&self.id) {
            e.clients += 1;
        }
        Member { all: self.all.clone(), id: self.id }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut entries = self.all.lock();
        if let Some(e) = entries.get_mut(&self.id) {
            e.clients = e.clients.saturating_sub(1);
            if e.clients == 0 {
                e.idle_since = Some(Instant::now());
            }
        }
    }
}

impl Namespaces {
    /// The registry for a daemon running in the calling thread's namespace.
    #[must_use]
    pub fn new(linger: Duration) -> Arc<Self> {
        let own = match NetNs::current() {
            Ok(ns) => Some(ns.id()),
            Err(e) => {
                warn!(error = %e, "cannot read the daemon's own network namespace: every client's sockets go through a namespace maker");
                None
            }
        };
        Arc::new(Self { own, linger, entries: Mutex::new(HashMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NetNsId, Entry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Classify a client's namespace: `None` for the daemon's own (nothing to hold), else a
    /// [`Member`] of that namespace's entry (its maker started at the first client).
    #[must_use]
    pub fn join(self: &Arc<Self>, ns: NetNs) -> Option<Member> {
        let id = ns.id();
        if self.own == Some(id) {
            return None;
        }
        let mut entries = self.lock();
        let e = entries.entry(id).or_insert_with(|| Entry { maker: spawn_maker(ns), clients: 0, idle_since: None });
        e.clients += 1;
        e.idle_since = None;
        Some(Member { all: self.clone(), id })
    }

    /// Remove the entries that have had no client for the linger time; their makers end.
    fn take_expired(&self, now: Instant) -> Vec<NetNsId> {
        let mut gone = Vec::new();
        self.lock().retain(|id, e| {
            let expired = e.clients == 0 && e.idle_since.is_some_and(|t| now.duration_since(t) >= self.linger);
            if expired {
                gone.push(*id);
            }
            !expired
        });
        gone
    }

    /// Namespaces with an entry (for status and tests).
    #[must_use]
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// A new non-blocking TCP socket of `domain` made inside namespace `id`.
    async fn socket(&self, id: NetNsId, domain: libc::c_int) -> std::io::Result<OwnedFd> {
        let maker = self.lock().get(&id).map(|e| e.maker.clone());
        let Some(maker) = maker else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("network namespace {id} is no longer served")));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ended = || std::io::Error::other(format!("the socket maker of {id} has ended"));
        maker.send((domain, tx)).map_err(|_| ended())?;
        rx.await.map_err(|_| ended())?
    }
}

/// Start the thread that makes sockets inside `ns`. It ends when its sender is dropped (the
/// entry removed); until then it and its fd keep the namespace alive.
fn spawn_maker(ns: NetNs) -> mpsc::Sender<Request> {
    let (tx, rx) = mpsc::channel::<Request>();
    let id = ns.id();
    let spawned = std::thread::Builder::new().name(format!("netns-{}", id.ino)).spawn(move || {
        let entered = ns.enter();
        if let Err(e) = &entered {
            // Once per namespace entry: every request below gets the error (a miss).
            warn!(error = %e, "cannot enter a client's network namespace: its clients get misses");
        } else {
            debug!(netns = %id, "socket maker started");
        }
        while let Ok((domain, reply)) = rx.recv() {
            let r = match &entered {
                Ok(()) => new_socket(domain),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let _ = reply.send(r);
        }
        debug!(netns = %id, "socket maker ended");
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start a socket maker thread: that namespace's clients get misses");
    }
    tx
}

fn new_socket(domain: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd goes straight into an OwnedFd.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Make and connect a socket for `key`'s pool, in the namespace of `key`'s tenant: the one
/// place pool sockets are made (refills, acquire and prewarm all come here).
///
/// # Errors
/// The socket, connect or timeout error; for another namespace also a maker that is gone
/// or could not enter it.
pub async fn connect(shared: &Shared, key: &PoolKey, timeout: Duration) -> std::io::Result<PooledSock> {
    let fd = match key.tenant.netns {
        None => crate::sock::connect(key.dest, timeout).await?,
        Some(id) => {
            let domain = if key.dest.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
            let fd = shared.netns.socket(id, domain).await?;
            crate::sock::connect_with(tokio::net::TcpSocket::from_std_stream(fd.into()), key.dest, timeout).await?
        }
    };
    Ok(PooledSock::new(fd))
}

/// Close the pools of namespaces that have had no client for `netns_linger`, and end their
/// makers; the pools' sockets go to `discarded`. Called by the periodic sweep with the pool
/// table locked.
pub fn close_expired(shared: &Shared, pools: &mut HashMap<PoolKey, crate::pool::Pool<PooledSock>>, now: Instant, discarded: &mut Vec<(PooledSock, Discard)>) {
    let gone = shared.netns.take_expired(now);
    if gone.is_empty() {
        return;
    }
    close_pools(pools, &gone, discarded);
    for id in gone {
        info!(netns = %id, "network namespace has no client left: its pools are closed");
    }
}

fn close_pools(pools: &mut HashMap<PoolKey, crate::pool::Pool<PooledSock>>, gone: &[NetNsId], discarded: &mut Vec<(PooledSock, Discard)>) {
    pools.retain(|k, p| {
        let closing = k.tenant.netns.is_some_and(|n| gone.contains(&n));
        if closing {
            discarded.extend(p.drain().into_iter().map(|s| (s, Discard::PoolRemoved)));
        }
        !closing
    });
}

/// Close namespace `id` now, without waiting for `netns_linger`, if it has no client left
/// (its container stopped): its pools and its maker go, and with them everything of the
/// daemon's that kept it alive. Returns whether it was closed.
pub fn close_now(shared: &Shared, id: NetNsId) -> bool {
    let removed = {
        let mut entries = shared.netns.lock();
        let idle = entries.get(&id).is_some_and(|e| e.clients == 0);
        idle && entries.remove(&id).is_some()
    };
    if removed {
        let mut discarded = Vec::new();
        close_pools(&mut shared.lock(), &[id], &mut discarded);
        shared.discard_all(discarded);
        info!(netns = %id, "container stopped: its network namespace's pools are closed");
    }
    removed
}
