//! Sockets out and back: acquire (pool or peer link), grant, prefetch offers, release and
//! settle (the return check into quarantine), prewarm.

use crate::config::{Policy, Probe};
use crate::pool::{Actions, Pool, PoolTable, Return, Take, TakeFor, Taken};
use crate::sock::{self, Discard};
use crate::tenant::Tenant;
use crate::defaults;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tracing::{debug, info};
use wire::{Disposition, ErrorCode, Msg, MissReason, Source};
use super::{PoolKey, PooledSock, Shared};
use super::session::*;
use super::tasks::*;

/// A peer link for a function: answer `Miss(Pending)` at once (the shim then waits longer
/// than for a pooled socket), then the link or a miss.
pub(super) async fn acquire_peer(
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
            let id = shared.next_lease_id();
            let mut r = Reply::msg(&Msg::Grant { lease: id, source: Source::Warm }, seq);
            r.fd = Some(l.fd.as_raw_fd());
            shared.metrics.observe_handout(started.elapsed());
            debug!(peer = %name, link = l.link, path = l.path.name(), "peer link handed out");
            let key = PoolKey { tenant: tenant.clone(), dest };
            let lease = Lease { sock: PooledSock::new(l.fd), key, created: l.since, at_handout: sock::Counters::default(), policy: Policy::Warm, peer: true, offered: None };
            leases.insert(id.get(), lease);
            r
        }
        Err(e) => {
            info!(peer = %name, error = %e, "no peer link");
            Reply::error(seq, ErrorCode::Internal, format!("no link to {name}: {e}"))
        }
    }
}

/// The caller's pool for a destination, made if needed under the daemon's configuration
/// ([`PoolTable::pool_for`] with [`Shared::pool_lookup`]). `None`: not pooled.
pub(crate) fn pool_for<'a>(shared: &Shared, table: &'a mut PoolTable<PooledSock>, key: &PoolKey, now: Instant) -> Option<&'a mut Pool<PooledSock>> {
    table.pool_for(key, now, || shared.pool_lookup(key))
}

/// Take a socket for `why` from `key`'s pool with the idle check, and perform what the table
/// returns (closes, refills after [`defaults::REFILL_DELAY`]). `None`: not pooled.
fn take(shared: &Arc<Shared>, key: &PoolKey, now: Instant, why: TakeFor) -> Option<Taken<PooledSock>> {
    let mut acts = Actions::default();
    let taken = shared.lock().take(key, now, why, &mut |s| sock::idle_check(&s.fd), || shared.pool_lookup(key), &mut acts);
    shared.perform(acts, defaults::REFILL_DELAY);
    taken
}

pub(super) async fn acquire(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    dest: SocketAddr,
    seq: u32,
    started: Instant,
) -> (Reply, Option<(u64, Lease)>) {
    let key = PoolKey { tenant: tenant.clone(), dest };
    for _ in 0..defaults::HANDOUT_ATTEMPTS {
        let Some(Taken { take: taken, settings }) = take(shared, &key, Instant::now(), TakeFor::Handout) else {
            shared.metrics.not_pooled.fetch_add(1, Ordering::Relaxed);
            return (Reply::miss(seq, MissReason::NotPooled, defaults::NOT_POOLED_RETRY_MS), None);
        };
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
                        shared.lock().handout_failed(&key);
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

pub(super) fn grant(
    shared: &Shared,
    key: PoolKey,
    idle: crate::pool::Idle<PooledSock>,
    policy: Policy,
    seq: u32,
    started: Instant,
) -> (Reply, Option<(u64, Lease)>) {
    let id = shared.next_lease_id();
    match idle.source {
        Source::Warm => shared.metrics.handout_warm.fetch_add(1, Ordering::Relaxed),
        Source::Reuse => shared.metrics.handout_reuse.fetch_add(1, Ordering::Relaxed),
    };
    let at_handout = sock::counters(&idle.sock.fd);
    let reply = Reply::msg(&Msg::Grant { lease: id, source: idle.source }, seq);
    shared.metrics.observe_handout(started.elapsed());
    let lease = Lease { sock: idle.sock, key, created: idle.created, at_handout, policy, peer: false, offered: None };
    (reply, Some((id.get(), lease)))
}

/// The answer to `Prefetch`: one ready socket from each of the tenant's pools that
/// prefetch, as `Offer`s (the last one flagged), or `Miss(Empty)`. Nothing is connected or
/// waited for: a pool with nothing ready offers nothing (and refills as after a hand-out).
pub(super) fn prefetch(shared: &Arc<Shared>, tenant: &Tenant, seq: u32, leases: &mut HashMap<u64, Lease>) -> Vec<Reply> {
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
        let table = shared.lock();
        dests.extend(table.iter().filter(|(k, p)| p.auto && k.tenant == *tenant).map(|(k, _)| k.dest));
    }
    dests.sort_unstable();
    dests.dedup();
    dests.truncate(defaults::MAX_PREFETCH);
    let mut offers = Vec::new();
    for dest in dests {
        let key = PoolKey { tenant: tenant.clone(), dest };
        let Some(Taken { take, settings }) = take(shared, &key, now, TakeFor::Offer) else { continue };
        if let Take::Ready(idle) = take {
            let id = shared.next_lease_id();
            let at_handout = sock::counters(&idle.sock.fd);
            let fd = idle.sock.fd.as_raw_fd();
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
            leases.insert(id.get(), lease);
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
pub(super) fn unoffer(shared: &Shared, l: Lease, now: Instant) {
    let source = l.offered.unwrap_or(Source::Reuse);
    let verdict = sock::untouched(&l.sock.fd, l.at_handout);
    settle(shared, l, now, verdict.map(|()| Return::Unoffer { source }), &shared.metrics.prefetch_returned);
}

pub(super) fn release(shared: &Shared, l: Lease, disposition: Disposition) {
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
        Disposition::Clean => sock::return_check(&l.sock.fd, l.at_handout),
    };
    // A socket that carried no byte either way since hand-out is in the state it was handed
    // out in: the holders check still runs, the protocol's proof is not needed.
    let proof = verdict.is_ok() && sock::untouched(&l.sock.fd, l.at_handout).is_err();
    settle(shared, l, Instant::now(), verdict.map(|()| Return::GiveBack { proof }), &shared.metrics.returned);
}

/// The end of a lease: with a good `verdict`, the socket goes back into its pool as the
/// [`Return`] says (the pool may still refuse it) and `kept` counts it; otherwise, or if
/// refused, it is closed and the reason counted.
pub(super) fn settle(shared: &Shared, l: Lease, now: Instant, verdict: Result<Return, Discard>, kept: &std::sync::atomic::AtomicU64) {
    let outcome = shared.lock().end_lease(&l.key, now, l.sock, l.created, verdict);
    match outcome {
        Ok(()) => {
            kept.fetch_add(1, Ordering::Relaxed);
            shared.check_wake.notify_one();
        }
        Err(d) => shared.discard_all(vec![d]),
    }
}

pub(super) fn prewarm(shared: &Arc<Shared>, tenant: &Tenant, dest: SocketAddr, seq: u32) -> Reply {
    let key = PoolKey { tenant: tenant.clone(), dest };
    let now = Instant::now();
    let Some(refill) = shared.lock().prewarm(&key, now, || shared.pool_lookup(&key)) else {
        return Reply::error(seq, ErrorCode::Denied, format!("{dest} is not pooled by this configuration"));
    };
    let n = refill.n;
    spawn_refills(shared, &key, n, refill.timeout, std::time::Duration::ZERO);
    Reply::msg(&Msg::StatusReply(&format!("prewarming {dest}: {n} connect(s) started")), seq)
}
