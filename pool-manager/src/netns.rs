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
//!
//! The kernel assist names namespaces by cookie (`SO_NETNS_COOKIE`): each maker reads its
//! namespace's cookie when it starts, so that learned windows and demand counters can be
//! told apart per namespace ([`Namespaces::owner_of_cookie`]), and demand from a namespace
//! no client has joined yet can be traced to it through the demanding cgroup's processes
//! ([`Namespaces::discover`], checked by cookie: never another namespace).

use crate::pool::{Actions, PoolTable};
use crate::server::{PoolKey, PooledSock, Shared};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The daemon's own namespace's cookie (`None`: unknown, kernel before 5.14).
    own_cookie: Option<u64>,
    linger: Duration,
    entries: Mutex<HashMap<NetNsId, Entry>>,
}

#[derive(Debug)]
struct Entry {
    maker: mpsc::Sender<Request>,
    /// The namespace's cookie, set by its maker once it entered (0 until then, or if the
    /// kernel has no `SO_NETNS_COOKIE`).
    cookie: Arc<AtomicU64>,
    clients: usize,
    idle_since: Option<Instant>,
    /// Its container stopped while a client was still connected (a link whose end the
    /// daemon has not read yet): close it at the first sweep without clients, no linger.
    closing: bool,
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
        let own_cookie = new_socket(libc::AF_INET).and_then(|s| shim::assist::netns_cookie(s.as_fd())).ok();
        Arc::new(Self { own, own_cookie, linger, entries: Mutex::new(HashMap::new()) })
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
        let e = entries.entry(id).or_insert_with(|| {
            let cookie = Arc::new(AtomicU64::new(0));
            Entry { maker: spawn_maker(ns, cookie.clone()), cookie, clients: 0, idle_since: None, closing: false }
        });
        e.clients += 1;
        e.idle_since = None;
        e.closing = false;
        Some(Member { all: self.clone(), id })
    }

    /// Remove the entries that have had no client for the linger time; their makers end.
    fn take_expired(&self, now: Instant) -> Vec<NetNsId> {
        let mut gone = Vec::new();
        self.lock().retain(|id, e| {
            let linger = if e.closing { Duration::ZERO } else { self.linger };
            let expired = e.clients == 0 && e.idle_since.is_some_and(|t| now.duration_since(t) >= linger);
            if expired {
                gone.push(*id);
            }
            !expired
        });
        gone
    }

    /// The namespace with this cookie: `Some(None)` for the daemon's own, `Some(Some(id))`
    /// for one with an entry, `None` if unknown.
    #[must_use]
    pub fn owner_of_cookie(&self, cookie: u64) -> Option<Option<NetNsId>> {
        if cookie == 0 {
            return None;
        }
        if self.own_cookie == Some(cookie) {
            return Some(None);
        }
        self.lock().iter().find(|(_, e)| e.cookie.load(Ordering::Relaxed) == cookie).map(|(id, _)| Some(*id))
    }

    /// How a namespace is shown in metrics and status: `host` for the daemon's own, else
    /// `net:[INODE]`.
    #[must_use]
    pub fn label(id: Option<NetNsId>) -> String {
        id.map_or_else(|| "host".to_owned(), |id| id.to_string())
    }

    /// The label of the namespace with this cookie ([`Self::label`], or `cookie:N` for one
    /// the daemon has no entry for).
    #[must_use]
    pub fn label_of_cookie(&self, cookie: u64) -> String {
        self.owner_of_cookie(cookie).map_or_else(|| format!("cookie:{cookie}"), Self::label)
    }

    /// Find the namespace with `cookie` among those of `pids` (the processes of the cgroup
    /// that made the connects), and give it an entry (with no client: it lingers, and its
    /// pools close after `netns_linger` unless a client joins). Only a namespace whose own
    /// cookie is `cookie` qualifies; `None` if no process is in it (or none could be read).
    pub fn discover(self: &Arc<Self>, cookie: u64, pids: impl IntoIterator<Item = i32>) -> Option<NetNsId> {
        if cookie == 0 {
            return None;
        }
        for pid in pids.into_iter().take(crate::defaults::DISCOVER_PIDS) {
            let Ok(ns) = NetNs::open(std::path::Path::new(&format!("/proc/{pid}/ns/net"))) else { continue };
            let id = ns.id();
            if self.own == Some(id) || self.lock().contains_key(&id) {
                // The daemon's own or a known one: `owner_of_cookie` answered for those.
                continue;
            }
            match cookie_in(ns) {
                Ok((c, ns)) if c == cookie => {
                    info!(netns = %id, pid, "demand from a network namespace without a client: prewarming in it");
                    return self.join(ns).map(|m| m.id());
                }
                Ok(_) => {}
                Err(e) => debug!(netns = %id, error = %e, "cannot read a network namespace's cookie"),
            }
        }
        None
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

/// The cookie of `ns`, read on a short-lived thread that enters it (never a runtime thread);
/// `ns` comes back for the caller to keep or drop.
fn cookie_in(ns: NetNs) -> std::io::Result<(u64, NetNs)> {
    std::thread::Builder::new()
        .name("netns-cookie".into())
        .spawn(move || {
            ns.enter().map_err(|e| std::io::Error::other(e.to_string()))?;
            let c = new_socket(libc::AF_INET).and_then(|s| shim::assist::netns_cookie(s.as_fd()))?;
            Ok((c, ns))
        })?
        .join()
        .map_err(|_| std::io::Error::other("the cookie thread panicked"))?
}

/// Start the thread that makes sockets inside `ns`; it sets `cookie` once it entered. It
/// ends when its sender is dropped (the entry removed); until then it and its fd keep the
/// namespace alive.
fn spawn_maker(ns: NetNs, cookie: Arc<AtomicU64>) -> mpsc::Sender<Request> {
    let (tx, rx) = mpsc::channel::<Request>();
    let id = ns.id();
    let spawned = std::thread::Builder::new().name(format!("netns-{}", id.ino)).spawn(move || {
        let entered = ns.enter();
        if let Err(e) = &entered {
            // Once per namespace entry: every request below gets the error (a miss).
            warn!(error = %e, "cannot enter a client's network namespace: its clients get misses");
        } else {
            match new_socket(libc::AF_INET).and_then(|s| shim::assist::netns_cookie(s.as_fd())) {
                Ok(c) => cookie.store(c, Ordering::Relaxed),
                Err(e) => debug!(netns = %id, error = %e, "no cookie for a network namespace (SO_NETNS_COOKIE)"),
            }
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
    use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
    let family = AddressFamily::from_raw(u16::try_from(domain).map_err(|_| std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?);
    Ok(socket_with(family, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?)
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

/// The namespace kernel-seen demand with namespace `cookie` came from, by a process of
/// `cgroup` (its path, asked for only when the namespace is not known yet): `Some(None)` for
/// the daemon's own, `Some(Some(id))` for another (given an entry if it had none: see
/// [`Namespaces::discover`]), `None` if it cannot be found (then nothing is prewarmed for
/// it, in no namespace).
pub fn of_demand(shared: &Shared, cookie: u64, cgroup: &mut dyn FnMut() -> Option<Arc<str>>) -> Option<Option<NetNsId>> {
    if let Some(known) = shared.netns.owner_of_cookie(cookie) {
        return Some(known);
    }
    let procs = tenancy::cgroup::cgroup2_mount().ok()?.join(cgroup()?.trim_start_matches('/')).join("cgroup.procs");
    let text = std::fs::read_to_string(procs).ok()?;
    shared.netns.discover(cookie, text.lines().filter_map(|l| l.trim().parse().ok())).map(Some)
}

/// Close the pools of namespaces that have had no client for `netns_linger`, and end their
/// makers; the pools' sockets go to `discarded`. Called by the periodic sweep with the pool
/// table locked.
pub fn close_expired(shared: &Shared, table: &mut PoolTable<PooledSock>, now: Instant, acts: &mut Actions<PooledSock>) {
    let gone = shared.netns.take_expired(now);
    if gone.is_empty() {
        return;
    }
    // Every pool of those namespaces, configured ones included.
    let which = |t: &crate::tenant::Tenant| t.netns.is_some_and(|n| gone.contains(&n));
    crate::server::tenants::close_locked(shared, table, which, crate::server::CloseReason::NetnsGone, acts);
    for id in gone {
        info!(netns = %id, "network namespace has no client left: its pools are closed");
    }
}

/// Close namespace `id` now, without waiting for `netns_linger`, if it has no client left
/// (its container stopped): its pools and its maker go, and with them everything of the
/// daemon's that kept it alive. Returns whether it was closed; if a client is still
/// connected, the namespace closes at the first sweep after its last client, with no linger.
pub fn close_now(shared: &Shared, id: NetNsId) -> bool {
    let removed = {
        let mut entries = shared.netns.lock();
        match entries.get_mut(&id) {
            Some(e) if e.clients == 0 => entries.remove(&id).is_some(),
            Some(e) => {
                e.closing = true;
                false
            }
            None => false,
        }
    };
    if removed {
        let mut acts = Actions::default();
        let which = |t: &crate::tenant::Tenant| t.netns == Some(id);
        crate::server::tenants::close_locked(shared, &mut shared.lock(), which, crate::server::CloseReason::Stopped, &mut acts);
        shared.discard_all(acts.close);
        info!(netns = %id, "container stopped: its network namespace's pools are closed");
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_name_the_daemons_own_namespace_and_no_unknown_one() {
        let all = Namespaces::new(Duration::from_secs(5));
        let own = new_socket(libc::AF_INET).and_then(|s| shim::assist::netns_cookie(s.as_fd())).expect("SO_NETNS_COOKIE");
        assert_eq!(all.owner_of_cookie(own), Some(None), "the daemon's own namespace");
        assert_eq!(all.label_of_cookie(own), "host");
        assert_eq!(all.owner_of_cookie(0), None, "0 is no cookie");
        assert_eq!(all.owner_of_cookie(own.wrapping_add(1_000_000)), None, "an unknown namespace is nobody's");
        assert_eq!(all.label_of_cookie(7), "cookie:7");
        // Nothing to discover among processes of the daemon's own namespace.
        assert_eq!(all.discover(own.wrapping_add(1_000_000), [std::process::id() as i32]), None);
        assert_eq!(all.count(), 0);
    }
}
