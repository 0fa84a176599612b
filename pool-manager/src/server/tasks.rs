//! Background tasks: refills (connects into a pool), the resolver (host names again every
//! `resolve_interval`), maintenance sweeps and the kernel-demand tracker.

use crate::config::Lookup;
use crate::pool::Pool;
use crate::sock::{self, Discard};
use crate::tenant::Tenant;
use crate::defaults;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use super::{PoolKey, Shared};

/// Start `n` connects for `key`'s pool, each after `delay`.
pub(super) fn spawn_refills(shared: &Arc<Shared>, key: &PoolKey, n: usize, timeout: std::time::Duration, delay: std::time::Duration) {
    for _ in 0..n {
        let shared = shared.clone();
        let key = key.clone();
        let bg = shared.clone();
        bg.background.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let r = crate::netns::connect(&shared, &key, timeout).await;
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
pub(super) async fn resolver(shared: Arc<Shared>, cancel: CancellationToken) {
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

pub(super) async fn maintain(shared: Arc<Shared>, cancel: CancellationToken) {
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
            crate::netns::close_expired(&shared, &mut pools, now, &mut discarded);
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
/// count rose and reached the threshold gets a pool filled to `min_idle`, in the network
/// namespace the connects were made in (never another: see `netns::of_demand`), under the
/// configured settings if the destination has some, else the auto settings (bounded per
/// tenant by `auto.max_destinations` and on the daemon by `auto.max_pools`).
#[derive(Debug, Default)]
pub(super) struct DemandTracker {
    seen: HashMap<(u64, u64, u32, SocketAddr), u64>,
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
        for d in shared.demand() {
            let before = self.seen.insert((d.cgroup_id, d.netns, d.uid, d.dest), d.connects).unwrap_or(0);
            if d.connects > before && d.connects >= threshold {
                hot.push((d.cgroup_id, d.netns, d.uid, d.dest));
            }
        }
        let now = Instant::now();
        for (cg, cookie, uid, dest) in hot {
            let by_uid = shared.config.tenant_by == crate::config::TenantBy::Uid;
            let mut path = || self.cgroup_paths.entry(cg).or_insert_with(|| shim::assist::cgroup_path_of_id(cg, &roots).map(Arc::from)).clone();
            let cgroup: Arc<str> = if by_uid && shared.config.allow_cgroups.is_none() {
                Arc::from("")
            } else {
                match path() {
                    Some(p) => p,
                    None => continue,
                }
            };
            // No sockets kept for a tenant that may not have them.
            if shared.config.admits(uid, &cgroup).is_err() {
                continue;
            }
            // The namespace the connects were made in (found, and entered, only for a tenant
            // that may have sockets).
            let Some(netns) = crate::netns::of_demand(shared, cookie, &mut path) else { continue };
            let (cgroup, cgroup_id) = if by_uid { (Arc::from(""), 0) } else { (cgroup, cg) };
            let key = PoolKey { tenant: Tenant { uid, cgroup, cgroup_id, netns }, dest };
            let (n, timeout) = {
                let mut pools = shared.lock();
                if pools.contains_key(&key) || shared.lifecycle.is_closed(&key.tenant) {
                    continue;
                }
                let settings = match shared.lookup(&dest) {
                    Lookup::Configured(s) => s,
                    Lookup::Auto(_) | Lookup::NotPooled => {
                        if !super::tenants::auto_budget_allows(shared, &pools, &key.tenant) {
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
