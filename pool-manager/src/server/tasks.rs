//! Background tasks: refills (connects into a pool), the resolver (host names again every
//! `resolve_interval`), maintenance sweeps and the kernel-demand tracker.

use crate::config::Lookup;
use crate::pool::Actions;
use crate::sock::{self, Discard};
use crate::tenant::Tenant;
use crate::defaults;
use std::collections::HashMap;
use std::net::SocketAddr;
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
            match r {
                Ok(sock) => {
                    shared.metrics.connects_ok.fetch_add(1, Ordering::Relaxed);
                    let refused = shared.lock().connected(&key, now, sock);
                    if let Err(sock) = refused {
                        shared.discard_all(vec![(sock, Discard::PoolRemoved)]);
                    }
                }
                Err(e) => {
                    shared.metrics.connects_failed.fetch_add(1, Ordering::Relaxed);
                    shared.lock().connect_failed(&key, now);
                    debug!(dest = %key.dest, error = %e, "pool connect failed");
                }
            }
        });
    }
}

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

/// Periodic sweep of every pool every [`defaults::SWEEP_INTERVAL`]: removal of auto pools
/// nobody uses and of namespaces without clients, timeouts, dead sockets, refills.
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
        let mut acts = Actions::default();
        {
            let mut table = shared.lock();
            table.forget_unused(now, &mut acts);
            crate::netns::close_expired(&shared, &mut table, now, &mut acts);
            table.sweep(now, &mut |s| sock::idle_check(&s.fd), &mut acts);
        }
        shared.perform(acts, std::time::Duration::ZERO);
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
            if shared.lifecycle.is_closed(&key.tenant) {
                continue;
            }
            let (settings, auto) = match shared.lookup(&dest) {
                Lookup::Configured(s) => (s, false),
                Lookup::Auto(_) | Lookup::NotPooled => (shared.config.auto.settings.clone(), true),
            };
            let Some(refill) = shared.lock().create(&key, now, settings, auto) else { continue };
            shared.metrics.prewarmed.fetch_add(1, Ordering::Relaxed);
            info!(dest = %dest, uid, cgroup = %key.tenant.cgroup, "demand seen by the kernel: prewarming");
            spawn_refills(shared, &key, refill.n, refill.timeout, std::time::Duration::ZERO);
        }
    }
}
