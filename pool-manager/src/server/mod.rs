//! The daemon: a Unix `SOCK_SEQPACKET` listener, one task per client process, a maintenance
//! task, and the pool table they share.
//!
//! Data flow: a client task decodes a request, takes a socket from its tenant's pool in the
//! [`PoolTable`] under the table lock (no I/O under the lock beyond non-blocking checks; the
//! table returns the sockets to close and the connects to start, done by
//! `Shared::perform` once it is unlocked), and sends it with
//! `SCM_RIGHTS`. The socket itself stays in the task's lease map: the daemon's own reference,
//! so a process that dies without `close()` cannot leak or smuggle it back. A `Release`
//! moves it through the return check into quarantine or closes it; quarantine ends in the
//! checker (`checker`: holders walk, end-of-exchange proof) before the socket is
//! idle again. The end of the client connection puts every lease it still holds through the
//! same path (the process ended without close(): keep-alive clients, `_exit`, a signal);
//! peer links and `warm` pools close them. Refills run as connect tasks that put their socket
//! into the pool when done, owned by [`Shared::background`] and cancelled when `run` ends. The maintenance task sweeps every
//! [`crate::defaults::SWEEP_INTERVAL`].
//!
//! Modules: `listener` (bind, the accept loop, the run loop with its background tasks),
//! `session` (one client connection: identify, read, dispatch, answer, and the leases it
//! leaves behind), `grant` (acquire from a pool or a peer link, grant, prefetch offers,
//! release and settle, prewarm), `tasks` (refills, resolver, maintenance, demand tracker),
//! `delegate` (connections that act for another process: `Delegate`, the OCI hook's `Container`),
//! `tenants` (closing every pool of a tenant that is gone), `background` (the set that owns
//! refills and other side tasks until shutdown).
//! The pool table itself, sans-IO, is [`crate::pool::PoolTable`]: these modules perform what
//! it returns. This module holds what they share: [`Shared`], [`PooledSock`] (and re-exports
//! [`PoolKey`]).


mod background;
mod delegate;
mod grant;
mod listener;
mod session;
mod tasks;
pub mod tenants;

pub use background::Background;
pub use delegate::Containers;
pub use listener::{bind, run, run_with};
pub(crate) use grant::pool_for;
pub(crate) use session::{send_within, Lease};
pub use tenants::{close_tenant, close_tenants, CloseReason, Closed};

use crate::config::{Config, Lookup};
use crate::metrics::Metrics;
pub use crate::pool::PoolKey;
use crate::pool::{Actions, PoolTable};
use crate::sock::Discard;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

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
        let base = Arc::new(crate::sockstate::Snapshot::take(&fd));
        Self { fd, base }
    }
}

/// State shared by every task.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: Config,
    /// Network namespaces served besides the daemon's own (their socket makers).
    pub netns: Arc<crate::netns::Namespaces>,
    /// The pool table.
    pub pools: Mutex<PoolTable<PooledSock>>,
    /// Counters.
    pub metrics: Metrics,
    next_lease: AtomicU64,
    daemon_uid: u32,
    /// The eBPF kernel assist, when attached (detached when dropped).
    pub assist: Option<Mutex<shim::assist::KernelAssist>>,
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
    /// Containers registered by the OCI hook (`Msg::Container`).
    pub containers: Containers,
    /// Tenants closed (counters, and those whose pools are not made again).
    pub lifecycle: tenants::Lifecycle,
    /// Refills and other tasks started beside a request; shut down when `run` ends.
    pub background: Background,
}

impl Shared {
    /// Fresh state for a configuration.
    #[must_use]
    pub fn new(config: Config) -> Self {
        Self {
            netns: crate::netns::Namespaces::new(config.netns_linger),
            pools: Mutex::new(PoolTable::new(&config.auto)),
            config,
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
            containers: Containers::default(),
            lifecycle: tenants::Lifecycle::default(),
            background: Background::default(),
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

    /// What the pool table's [`PoolTable::pool_for`] asks before it makes `key`'s pool: not
    /// pooled for a tenant closed for good, else [`Shared::lookup`].
    pub(crate) fn pool_lookup(&self, key: &PoolKey) -> Lookup {
        if self.lifecycle.is_closed(&key.tenant) {
            return Lookup::NotPooled;
        }
        self.lookup(&key.dest)
    }

    /// Connect counts the kernel saw, per (cgroup, network namespace cookie, uid, destination).
    pub fn demand(&self) -> Vec<shim::assist::Demand> {
        let Some(a) = &self.assist else { return vec![] };
        a.lock().unwrap_or_else(std::sync::PoisonError::into_inner).demand()
    }

    /// What the kernel assist learned: (destination, namespace label (see
    /// [`crate::netns::Namespaces::label`]), cwnd segments, srtt µs, samples).
    pub fn learned(&self) -> Vec<(SocketAddr, String, u32, u32, u32)> {
        let Some(a) = &self.assist else { return vec![] };
        let learned = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner).learned();
        let mut v: Vec<_> = learned
            .into_iter()
            .map(|l| (l.dest, self.netns.label_of_cookie(l.netns), l.window.cwnd, l.window.srtt_us, l.window.samples))
            .collect();
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

    /// A fresh lease id, from 1 upward within the wire's range ([`wire::LeaseId`]): the
    /// daemon's lease maps key on its [`wire::LeaseId::get`].
    pub(crate) fn next_lease_id(&self) -> wire::LeaseId {
        let n = self.next_lease.fetch_add(1, Ordering::Relaxed).max(1);
        // 2^48 − 1 ids last nine years at a million hand-outs a second; then numbering wraps to 1.
        wire::LeaseId::new((n - 1) % wire::LeaseId::MAX.get() + 1).expect("in 1..=LeaseId::MAX by construction")
    }

    /// The daemon's effective uid.
    #[must_use]
    pub fn daemon_uid(&self) -> u32 {
        self.daemon_uid
    }

    /// Lock the pool table (a panic elsewhere must not wedge the daemon).
    pub fn lock(&self) -> MutexGuard<'_, PoolTable<PooledSock>> {
        self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Close sockets the pool table gave up, counting each by reason in the metrics.
    pub(crate) fn discard_all(&self, discarded: Vec<(PooledSock, Discard)>) {
        for (s, why) in discarded {
            self.metrics.discard(why);
            drop(s);
        }
    }

    /// Carry out what the pool table returned, with the table unlocked: close sockets
    /// ([`Shared::discard_all`]) and start connects, each after `delay`. Sockets for the
    /// checker are the checker's (`crate::checker`), never passed here.
    pub(crate) fn perform(self: &Arc<Self>, acts: Actions<PooledSock>, delay: std::time::Duration) {
        debug_assert!(acts.check.is_empty(), "checks are the checker's");
        self.discard_all(acts.close);
        for r in acts.connect {
            tasks::spawn_refills(self, &r.key, r.n, r.timeout, delay);
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
