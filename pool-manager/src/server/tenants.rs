//! The end of a tenant: every pool of a tenant that is gone is closed, configured pools
//! included.
//!
//! [`close_tenant`] (and [`close_tenants`] for a predicate) takes the tenant's pools out of
//! the table: idle and quarantined sockets are closed at once; refills still connecting find
//! no pool and close their socket; sockets out on lease or under check find no pool when
//! they come back and are closed instead of pooled (`settle` and the checker's `finish`).
//! A tenant whose identity cannot recur (it carries a cgroup id: ids are never reused) is
//! remembered as closed, so that a late request of it (a process moved out of the removed
//! cgroup still holds its old link) cannot make its pools again. Tenants closed because
//! their network namespace lost its last client are not remembered: namespace inode
//! numbers are reused, and a namespace that gains a client again is served again.
//!
//! Callers: the cgroup sweep (reason `cgroup_gone`), the network-namespace linger
//! (`netns_gone`, [`crate::netns::close_expired`]), and a container's poststop hook
//! (`stopped`). Each closed tenant is counted in `warmpool_tenants_closed_total{reason}`.

use super::{PooledSock, Shared};
use crate::pool::{Actions, PoolTable};
use crate::tenant::Tenant;
use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tracing::info;

/// Why a tenant's pools were closed (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// Its cgroup was removed (or replaced by a new cgroup under the same path).
    CgroupGone,
    /// Its network namespace has had no client for `netns_linger`.
    NetnsGone,
    /// Its container stopped (the OCI runtime's poststop hook said so).
    Stopped,
}

impl CloseReason {
    /// Every reason, for exporting zero counters.
    pub const ALL: [Self; 3] = [Self::CgroupGone, Self::NetnsGone, Self::Stopped];

    /// The metrics label.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::CgroupGone => "cgroup_gone",
            Self::NetnsGone => "netns_gone",
            Self::Stopped => "stopped",
        }
    }
}

/// What a close found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// Distinct tenants that had at least one pool.
    pub tenants: usize,
    /// Pools removed.
    pub pools: usize,
    /// Idle and quarantined sockets closed at once (leased ones close when they come back).
    pub sockets: usize,
}

/// The daemon's record of closed tenants: counters by reason, and the tenants whose pools
/// must not be made again.
#[derive(Debug, Default)]
pub struct Lifecycle {
    closed_by_reason: [AtomicU64; CloseReason::ALL.len()],
    tombstones: Mutex<Tombstones>,
}

#[derive(Debug, Default)]
struct Tombstones {
    set: HashSet<Tenant>,
    order: VecDeque<Tenant>,
}

impl Lifecycle {
    /// Whether `tenant` was closed for good: no pool of it is made again. Called with the
    /// pool table locked (lock order: table, then this).
    #[must_use]
    pub fn is_closed(&self, tenant: &Tenant) -> bool {
        let t = self.tombstones.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        !t.set.is_empty() && t.set.contains(tenant)
    }

    /// Tenants closed so far for `reason`.
    #[must_use]
    pub fn closed(&self, reason: CloseReason) -> u64 {
        CloseReason::ALL.iter().position(|r| *r == reason).map_or(0, |i| self.closed_by_reason[i].load(Ordering::Relaxed))
    }

    fn count(&self, reason: CloseReason, n: usize) {
        if let Some(i) = CloseReason::ALL.iter().position(|r| *r == reason) {
            self.closed_by_reason[i].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn remember(&self, tenant: &Tenant) {
        let mut t = self.tombstones.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !t.set.insert(tenant.clone()) {
            return;
        }
        t.order.push_back(tenant.clone());
        while t.order.len() > crate::defaults::CLOSED_TENANTS_REMEMBERED {
            if let Some(old) = t.order.pop_front() {
                t.set.remove(&old);
            }
        }
    }

    /// The Prometheus lines of `warmpool_tenants_closed_total`.
    pub fn metric_lines(&self, o: &mut String) {
        let _ = writeln!(o, "# HELP warmpool_tenants_closed_total Tenants whose pools were all closed, by reason (cgroup removed, network namespace without clients, container stopped).");
        let _ = writeln!(o, "# TYPE warmpool_tenants_closed_total counter");
        for r in CloseReason::ALL {
            let _ = writeln!(o, "warmpool_tenants_closed_total{{reason=\"{}\"}} {}", r.name(), self.closed(r));
        }
    }
}

/// Close every pool of one tenant (configured and `[auto]`): see the module docs. Safe to
/// call for a tenant with no pool (counts nothing) and from any thread; takes the pool table
/// lock, so never call it with the table locked.
pub fn close_tenant(shared: &Shared, tenant: &Tenant, reason: CloseReason) -> Closed {
    close_tenants(shared, |t| t == tenant, reason)
}

/// Close every pool whose tenant `which` selects (for example every uid of one cgroup, or
/// every tenant of one network namespace); each tenant that had a pool counts once.
pub fn close_tenants(shared: &Shared, which: impl Fn(&Tenant) -> bool, reason: CloseReason) -> Closed {
    let mut acts = Actions::default();
    let closed = close_locked(shared, &mut shared.lock(), which, reason, &mut acts);
    shared.discard_all(acts.close);
    closed
}

/// [`close_tenants`] with the pool table already locked; the sockets to close go to
/// `acts` (close them after unlocking, with [`Shared::discard_all`]).
pub(crate) fn close_locked(
    shared: &Shared,
    table: &mut PoolTable<PooledSock>,
    which: impl Fn(&Tenant) -> bool,
    reason: CloseReason,
    acts: &mut Actions<PooledSock>,
) -> Closed {
    let before = acts.close.len();
    let tenants = table.close_tenants(which, acts);
    let closed = Closed { tenants: tenants.len(), pools: tenants.values().sum(), sockets: acts.close.len() - before };
    shared.lifecycle.count(reason, closed.tenants);
    for (t, n) in &tenants {
        if reason != CloseReason::NetnsGone && remembered(t) {
            shared.lifecycle.remember(t);
        }
        info!(uid = t.uid, cgroup = %t.cgroup, pools = n, reason = reason.name(), "tenant gone: its pools are closed");
    }
    closed
}

/// Whether a closed tenant can be remembered as closed for good: only one whose identity
/// cannot come back (a cgroup id; a path, a uid or a namespace inode can).
fn remembered(t: &Tenant) -> bool {
    t.cgroup_id != 0
}

/// A cgroup's id when the tenant was identified was this, but its path no longer names a
/// cgroup: a tenant that is gone already (closed by the next sweep).
pub const CGROUP_GONE: u64 = u64::MAX;

/// What the kernel says about a cgroup path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CgroupNow {
    /// A cgroup is there, with this id (the inode of its directory).
    Id(u64),
    /// No cgroup under that path.
    Gone,
    /// Cannot tell (no cgroup2 mount the daemon can map paths to, a path outside the
    /// daemon's cgroup namespace, an unexpected error): nothing is closed on this.
    Unknown,
}

/// The cgroup2 mount, once, and only if the daemon's own cgroup path maps to a directory
/// under it (so that `/proc/PID/cgroup` paths can be looked up there at all).
fn cgroup2_root() -> Option<&'static std::path::Path> {
    static ROOT: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root = tenancy::cgroup::cgroup2_mount().ok()?;
        let own = tenancy::cgroup::cgroup_of(std::process::id() as i32).ok()?;
        if !root.join(own.trim_start_matches('/')).is_dir() {
            tracing::warn!(mount = %root.display(), own = %own, "cgroup paths do not map to the cgroup2 mount: tenants of removed cgroups are not detected");
            return None;
        }
        Some(root)
    })
    .as_deref()
}

/// Look `path` (as in `/proc/PID/cgroup`) up in the cgroup2 hierarchy.
pub(crate) fn cgroup_now(path: &str) -> CgroupNow {
    use std::os::unix::fs::MetadataExt;
    if path.is_empty() || path.split('/').any(|c| c == "..") {
        return CgroupNow::Unknown;
    }
    let Some(root) = cgroup2_root() else { return CgroupNow::Unknown };
    match std::fs::metadata(root.join(path.trim_start_matches('/'))) {
        Ok(m) if m.is_dir() => CgroupNow::Id(m.ino()),
        Ok(_) => CgroupNow::Gone,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => CgroupNow::Gone,
        Err(_) => CgroupNow::Unknown,
    }
}

/// The cgroup id to record for a live client in the cgroup at `path` (0: not known, and
/// then its pools are never closed for a removed cgroup). A cgroup that still has a member
/// cannot be removed, so the directory found is the client's own cgroup unless the client
/// was moved meanwhile (then the pidfd check that follows in `identify` is no help either,
/// and the tenant is the one at that path, as before cgroup ids).
#[must_use]
pub fn cgroup_id_of_member(path: &str) -> u64 {
    match cgroup_now(path) {
        CgroupNow::Id(id) => id,
        CgroupNow::Gone | CgroupNow::Unknown => 0,
    }
}

/// The cgroup id for a tenant known only by its path (handed over by a predecessor): the
/// cgroup there now, or [`CGROUP_GONE`] if there is none, so that its pools are closed.
#[must_use]
pub fn cgroup_id_of_path(path: &str) -> u64 {
    match cgroup_now(path) {
        CgroupNow::Id(id) => id,
        CgroupNow::Gone => CGROUP_GONE,
        CgroupNow::Unknown => 0,
    }
}

/// Every `tenant_sweep`: close the pools of tenants whose cgroup is gone (its path names no
/// cgroup, or a new one). One `stat()` per distinct cgroup with pools, on a blocking thread;
/// the root cgroup and the daemon's own are never closed.
pub(super) async fn sweep(shared: std::sync::Arc<Shared>, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.tenant_sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cgroups: HashSet<(std::sync::Arc<str>, u64)> =
            shared.lock().keys().filter(|k| k.tenant.cgroup_id != 0).map(|k| (k.tenant.cgroup.clone(), k.tenant.cgroup_id)).collect();
        if cgroups.is_empty() {
            continue;
        }
        let Ok(gone) = tokio::task::spawn_blocking(move || gone_cgroups(cgroups)).await else { continue };
        if !gone.is_empty() {
            close_tenants(&shared, |t| t.cgroup_id != 0 && gone.contains(&t.cgroup_id), CloseReason::CgroupGone);
        }
    }
}

/// The ids among `cgroups` (path, id when identified) whose cgroup is gone.
fn gone_cgroups(cgroups: HashSet<(std::sync::Arc<str>, u64)>) -> HashSet<u64> {
    let own = tenancy::cgroup::cgroup_of(std::process::id() as i32).ok().map(|p| cgroup_now(&p));
    cgroups
        .into_iter()
        .filter(|(path, id)| {
            let exempt = &**path == "/" || own == Some(CgroupNow::Id(*id));
            !exempt
                && match cgroup_now(path) {
                    CgroupNow::Id(now) => now != *id,
                    CgroupNow::Gone => true,
                    CgroupNow::Unknown => false,
                }
        })
        .map(|(_, id)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Policy, PoolSettings};
    use crate::server::PoolKey;
    use std::sync::Arc;
    use std::time::Instant;

    fn tenant(uid: u32, cgroup: &str, cgroup_id: u64) -> Tenant {
        Tenant { uid, cgroup: Arc::from(cgroup), cgroup_id, netns: None }
    }

    fn key(t: &Tenant, port: u16) -> PoolKey {
        PoolKey { tenant: t.clone(), dest: ([127, 0, 0, 1], port).into() }
    }

    #[test]
    fn closing_a_tenant_removes_its_pools_only_and_counts_it_once() {
        let mut config = Config::default();
        config.add_pool("127.0.0.1:7000", PoolSettings::with_policy(Policy::Warm)).unwrap();
        let shared = Shared::new(config);
        let (a, b) = (tenant(1000, "/fn/a", 41), tenant(1000, "/fn/b", 42));
        let now = Instant::now();
        {
            let mut pools = shared.lock();
            for (t, port) in [(&a, 7000), (&a, 7001), (&b, 7000)] {
                assert!(super::super::pool_for(&shared, &mut pools, &key(t, port), now).is_some());
            }
        }
        let closed = close_tenant(&shared, &a, CloseReason::CgroupGone);
        assert_eq!(closed, Closed { tenants: 1, pools: 2, sockets: 0 });
        assert_eq!(shared.lock().keys().cloned().collect::<Vec<_>>(), vec![key(&b, 7000)]);
        assert_eq!(shared.lifecycle.closed(CloseReason::CgroupGone), 1);
        assert_eq!(close_tenant(&shared, &a, CloseReason::CgroupGone), Closed::default(), "nothing left to close");
        assert_eq!(shared.lifecycle.closed(CloseReason::CgroupGone), 1);
        // A tenant with a cgroup id cannot come back: no pool of it is made again.
        let mut pools = shared.lock();
        assert!(super::super::pool_for(&shared, &mut pools, &key(&a, 7000), now).is_none());
        assert!(super::super::pool_for(&shared, &mut pools, &key(&b, 7001), now).is_some());
    }

    #[test]
    fn tenants_whose_identity_can_recur_are_not_remembered() {
        let shared = Shared::new(Config::default());
        let by_uid = tenant(1000, "", 0);
        let now = Instant::now();
        assert!(super::super::pool_for(&shared, &mut shared.lock(), &key(&by_uid, 7000), now).is_some());
        let closed = close_tenants(&shared, |t| t.uid == 1000, CloseReason::Stopped);
        assert_eq!((closed.tenants, closed.pools), (1, 1));
        assert!(super::super::pool_for(&shared, &mut shared.lock(), &key(&by_uid, 7000), now).is_some());
        let mut metrics = String::new();
        shared.lifecycle.metric_lines(&mut metrics);
        assert!(metrics.contains("warmpool_tenants_closed_total{reason=\"stopped\"} 1\n"), "{metrics}");
        assert!(metrics.contains("warmpool_tenants_closed_total{reason=\"cgroup_gone\"} 0\n"), "{metrics}");
    }

    #[test]
    fn the_auto_budget_is_per_tenant_under_a_daemon_wide_ceiling() {
        let mut config = Config::default();
        config.auto.max_destinations = 2;
        config.auto.max_pools = 5;
        let shared = Shared::new(config);
        let now = Instant::now();
        let mut pools = shared.lock();
        let mut get = |t: &Tenant, port| super::super::pool_for(&shared, &mut pools, &key(t, port), now).is_some();
        let (a, b, c) = (tenant(0, "", 0), tenant(65534, "", 0), tenant(1000, "", 0));
        assert!(get(&a, 1) && get(&a, 2));
        assert!(!get(&a, 3), "a tenant at its own budget gets no more");
        assert!(get(&a, 1), "its existing pools still serve it");
        assert!(get(&b, 1) && get(&b, 2), "another tenant has its own budget");
        assert!(get(&c, 1));
        assert!(!get(&c, 2), "the daemon-wide ceiling holds");
    }

    #[test]
    fn cgroup_paths_outside_the_hierarchy_are_never_judged() {
        assert_eq!(cgroup_now(""), CgroupNow::Unknown);
        assert_eq!(cgroup_now("/../x"), CgroupNow::Unknown);
        if cgroup2_root().is_some() {
            assert!(matches!(cgroup_now("/"), CgroupNow::Id(_)));
            assert_eq!(cgroup_now("/warmpool-no-such-cgroup-here"), CgroupNow::Gone);
            assert_eq!(cgroup_id_of_path("/warmpool-no-such-cgroup-here"), CGROUP_GONE);
            assert_eq!(cgroup_id_of_member("/warmpool-no-such-cgroup-here"), 0);
        }
    }
}
