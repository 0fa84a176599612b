//! Prometheus metrics: process-wide counters (atomics, bumped on the hand-out path without
//! locks) plus gauges read from the pool table when `/metrics` is scraped.
//!
//! Which tenant connects where is tenant data: by default the pool gauges are sums over all
//! pools, and series labelled with a destination, uid or cgroup appear only with
//! `metrics_tenant_labels = true` (for an endpoint only the operator can reach).

use crate::proof::{Outcome, Protocol};
use crate::server::Shared;
use crate::sock::{self, Discard};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Hand-out latency buckets, in microseconds (daemon-side: request received → reply sent).
pub const LATENCY_BUCKETS_US: [u64; 12] = [2, 5, 10, 20, 50, 100, 200, 500, 1_000, 5_000, 20_000, 100_000];

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Warm hand-outs.
    pub handout_warm: AtomicU64,
    /// Reuse hand-outs.
    pub handout_reuse: AtomicU64,
    /// Pooled destination, nothing ready: the function connected itself.
    pub miss_empty: AtomicU64,
    /// Destination at its limit.
    pub miss_at_limit: AtomicU64,
    /// Destination not pooled.
    pub not_pooled: AtomicU64,
    /// Requests refused (malformed, unknown tenant).
    pub errors: AtomicU64,
    /// Requests refused because the client is not in `allow_uids` / `allow_cgroups`.
    pub denied: AtomicU64,
    /// Clean give-backs that went to quarantine.
    pub returned: AtomicU64,
    /// Discards by reason (index = position in [`Discard::ALL`]).
    discards: [AtomicU64; Discard::ALL.len()],
    /// Daemon connects that succeeded / failed.
    pub connects_ok: AtomicU64,
    /// Failed connects.
    pub connects_failed: AtomicU64,
    /// Client connections accepted.
    pub clients: AtomicU64,
    /// Client connections whose process ended (or hung up) before it was identified.
    pub clients_gone: AtomicU64,
    /// Pools created because the kernel saw demand.
    pub prewarmed: AtomicU64,
    /// Sockets offered to starting processes (`Prefetch`).
    pub prefetch_offered: AtomicU64,
    /// Offers the program used.
    pub prefetch_taken: AtomicU64,
    /// Offers never used, back in their pools.
    pub prefetch_returned: AtomicU64,
    /// Take-overs that failed before the successor's commit (this daemon served on).
    pub takeovers_failed: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_ns: AtomicU64,
    /// End-of-exchange proofs by protocol and outcome (indices into `Protocol::ALL`,
    /// `Outcome::ALL`).
    checks: [[AtomicU64; Outcome::ALL.len()]; Protocol::ALL.len()],
    /// Sockets that passed every check after a give-back and went idle.
    pub checked_idle: AtomicU64,
    /// Leases whose process ended without giving them back, put through the return checks.
    pub orphans: AtomicU64,
    /// `/proc` walks for the holders check, their total time and the processes and fds
    /// the last one read.
    holders_walks: AtomicU64,
    holders_walk_ns: AtomicU64,
    holders_last_processes: AtomicU64,
    holders_last_fds: AtomicU64,
    holders_kernel: AtomicU64,
}

impl Metrics {
    /// Count a discarded socket.
    pub fn discard(&self, why: Discard) {
        if let Some(i) = Discard::ALL.iter().position(|d| *d == why) {
            self.discards[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Discards so far for one reason.
    pub fn discarded(&self, why: Discard) -> u64 {
        Discard::ALL.iter().position(|d| *d == why).map_or(0, |i| self.discards[i].load(Ordering::Relaxed))
    }

    /// Count one end-of-exchange proof.
    pub fn observe_check(&self, protocol: Protocol, outcome: Outcome) {
        let p = Protocol::ALL.iter().position(|x| *x == protocol).unwrap_or(0);
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        self.checks[p][o].fetch_add(1, Ordering::Relaxed);
    }

    /// Proofs so far with this protocol and outcome.
    pub fn checks(&self, protocol: Protocol, outcome: Outcome) -> u64 {
        let p = Protocol::ALL.iter().position(|x| *x == protocol).unwrap_or(0);
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        self.checks[p][o].load(Ordering::Relaxed)
    }

    /// Record one `/proc` walk of the holders check.
    pub fn observe_holders_walk(&self, w: &crate::holders::WalkStats) {
        self.holders_walks.fetch_add(1, Ordering::Relaxed);
        self.holders_walk_ns.fetch_add(w.elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.holders_last_processes.store(w.processes as u64, Ordering::Relaxed);
        self.holders_last_fds.store(w.fds as u64, Ordering::Relaxed);
        self.holders_kernel.store(u64::from(w.kernel), Ordering::Relaxed);
    }

    /// Record one hand-out's daemon-side latency.
    pub fn observe_handout(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Render the Prometheus text exposition.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let mut o = String::with_capacity(4096);
    let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let _ = writeln!(o, "# HELP warmpool_handouts_total Connect requests answered, by outcome (miss: the function connected itself).");
    let _ = writeln!(o, "# TYPE warmpool_handouts_total counter");
    let _ = writeln!(o, "warmpool_handouts_total{{kind=\"warm\"}} {}", c(&m.handout_warm));
    let _ = writeln!(o, "warmpool_handouts_total{{kind=\"reuse\"}} {}", c(&m.handout_reuse));
    let _ = writeln!(o, "warmpool_handouts_total{{kind=\"miss\"}} {}", c(&m.miss_empty) + c(&m.miss_at_limit));
    let _ = writeln!(o, "# HELP warmpool_fallbacks_total Requests answered with \"connect yourself\", by reason.");
    let _ = writeln!(o, "# TYPE warmpool_fallbacks_total counter");
    let _ = writeln!(o, "warmpool_fallbacks_total{{reason=\"empty\"}} {}", c(&m.miss_empty));
    let _ = writeln!(o, "warmpool_fallbacks_total{{reason=\"at_limit\"}} {}", c(&m.miss_at_limit));
    let _ = writeln!(o, "warmpool_fallbacks_total{{reason=\"not_pooled\"}} {}", c(&m.not_pooled));
    let _ = writeln!(o, "warmpool_fallbacks_total{{reason=\"error\"}} {}", c(&m.errors));
    let _ = writeln!(o, "# HELP warmpool_denied_total Requests refused because the client's uid or cgroup is not in allow_uids / allow_cgroups.");
    let _ = writeln!(o, "# TYPE warmpool_denied_total counter");
    let _ = writeln!(o, "warmpool_denied_total {}", c(&m.denied));
    let _ = writeln!(o, "# HELP warmpool_prefetch_total Sockets offered to processes at load time, and what became of them.");
    let _ = writeln!(o, "# TYPE warmpool_prefetch_total counter");
    let _ = writeln!(o, "warmpool_prefetch_total{{outcome=\"offered\"}} {}", c(&m.prefetch_offered));
    let _ = writeln!(o, "warmpool_prefetch_total{{outcome=\"taken\"}} {}", c(&m.prefetch_taken));
    let _ = writeln!(o, "warmpool_prefetch_total{{outcome=\"returned\"}} {}", c(&m.prefetch_returned));
    let _ = writeln!(o, "# HELP warmpool_returned_total Sockets given back clean and quarantined for reuse.");
    let _ = writeln!(o, "# TYPE warmpool_returned_total counter");
    let _ = writeln!(o, "warmpool_returned_total {}", c(&m.returned));
    let _ = writeln!(o, "# HELP warmpool_discarded_total Sockets closed instead of pooled or handed out, by reason.");
    let _ = writeln!(o, "# TYPE warmpool_discarded_total counter");
    for (i, d) in Discard::ALL.iter().enumerate() {
        let _ = writeln!(o, "warmpool_discarded_total{{reason=\"{}\"}} {}", d.name(), c(&m.discards[i]));
    }
    let _ = writeln!(o, "# HELP warmpool_checks_total End-of-exchange proofs run on given-back sockets, by protocol and outcome.");
    let _ = writeln!(o, "# TYPE warmpool_checks_total counter");
    for p in [Protocol::Http, Protocol::Redis] {
        for out in Outcome::ALL {
            let _ = writeln!(o, "warmpool_checks_total{{protocol=\"{}\",outcome=\"{}\"}} {}", p.name(), out.name(), m.checks(p, out));
        }
    }
    let _ = writeln!(o, "# HELP warmpool_checked_idle_total Given-back sockets that passed every check and went idle.");
    let _ = writeln!(o, "# TYPE warmpool_checked_idle_total counter");
    let _ = writeln!(o, "warmpool_checked_idle_total {}", c(&m.checked_idle));
    let _ = writeln!(
        o,
        "# HELP warmpool_orphaned_leases_total Leases whose process ended without giving them back, put through the return checks."
    );
    let _ = writeln!(o, "# TYPE warmpool_orphaned_leases_total counter");
    let _ = writeln!(o, "warmpool_orphaned_leases_total {}", c(&m.orphans));
    let _ = writeln!(o, "# HELP warmpool_holders_walks_total Holders checks (one per batch) proving no other process holds a given-back socket.");
    let _ = writeln!(o, "# TYPE warmpool_holders_walks_total counter");
    let _ = writeln!(o, "warmpool_holders_walks_total {}", c(&m.holders_walks));
    let _ = writeln!(o, "# TYPE warmpool_holders_walk_seconds_total counter");
    let _ = writeln!(o, "warmpool_holders_walk_seconds_total {}", c(&m.holders_walk_ns) as f64 / 1e9);
    let _ = writeln!(o, "# HELP warmpool_holders_walk_last Processes and fds the last /proc walk read.");
    let _ = writeln!(o, "# TYPE warmpool_holders_walk_last gauge");
    let _ = writeln!(o, "warmpool_holders_walk_last{{what=\"processes\"}} {}", c(&m.holders_last_processes));
    let _ = writeln!(o, "warmpool_holders_walk_last{{what=\"fds\"}} {}", c(&m.holders_last_fds));
    let _ = writeln!(o, "# HELP warmpool_holders_by_kernel 1 if the last holders check read the kernel's file reference counts (BPF iterator), 0 if it walked /proc.");
    let _ = writeln!(o, "# TYPE warmpool_holders_by_kernel gauge");
    let _ = writeln!(o, "warmpool_holders_by_kernel {}", c(&m.holders_kernel));
    let _ = writeln!(o, "# TYPE warmpool_connects_total counter");
    let _ = writeln!(o, "warmpool_connects_total{{result=\"ok\"}} {}", c(&m.connects_ok));
    let _ = writeln!(o, "warmpool_connects_total{{result=\"failed\"}} {}", c(&m.connects_failed));
    if let Some(agent) = &shared.peer {
        peer_lines(&mut o, agent);
    }
    let _ = writeln!(o, "# HELP warmpool_prewarmed_pools_total Pools created because the kernel's connect hooks showed demand.");
    let _ = writeln!(o, "# TYPE warmpool_prewarmed_pools_total counter");
    let _ = writeln!(o, "warmpool_prewarmed_pools_total {}", c(&m.prewarmed));
    let _ = writeln!(o, "# HELP warmpool_takeovers_failed_total Take-overs that failed before the successor's commit; this daemon served on.");
    let _ = writeln!(o, "# TYPE warmpool_takeovers_failed_total counter");
    let _ = writeln!(o, "warmpool_takeovers_failed_total {}", c(&m.takeovers_failed));
    shared.lifecycle.metric_lines(&mut o);
    let _ = writeln!(o, "# TYPE warmpool_clients_total counter");
    let _ = writeln!(o, "warmpool_clients_total {}", c(&m.clients));
    let _ = writeln!(o, "# HELP warmpool_clients_gone_before_identified_total Client connections whose process had exited or hung up before the daemon identified it (normal for programs that end at once); they get nothing.");
    let _ = writeln!(o, "# TYPE warmpool_clients_gone_before_identified_total counter");
    let _ = writeln!(o, "warmpool_clients_gone_before_identified_total {}", c(&m.clients_gone));
    let _ = writeln!(o, "# HELP warmpool_handout_latency_seconds Daemon-side time from request to reply with a socket.");
    let _ = writeln!(o, "# TYPE warmpool_handout_latency_seconds histogram");
    let mut cum = 0;
    for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
        cum += c(&m.latency_buckets[i]);
        let _ = writeln!(o, "warmpool_handout_latency_seconds_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1e6);
    }
    cum += c(&m.latency_buckets[LATENCY_BUCKETS_US.len()]);
    let _ = writeln!(o, "warmpool_handout_latency_seconds_bucket{{le=\"+Inf\"}} {cum}");
    let _ = writeln!(o, "warmpool_handout_latency_seconds_sum {}", c(&m.latency_sum_ns) as f64 / 1e9);
    let _ = writeln!(o, "warmpool_handout_latency_seconds_count {cum}");

    if shared.config.metrics_tenant_labels {
        tenant_lines(&mut o, shared);
    } else {
        aggregate_lines(&mut o, shared);
    }
    o
}

/// The peer agent's counters.
fn peer_lines(o: &mut String, agent: &crate::peer::agent::Agent) {
    let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let p = &agent.metrics;
    let _ = writeln!(o, "# HELP warmpool_peer_links_total Peer links made, by path; failed: could not be made.");
    let _ = writeln!(o, "# TYPE warmpool_peer_links_total counter");
    let _ = writeln!(o, "warmpool_peer_links_total{{path=\"direct\"}} {}", c(&p.direct));
    let _ = writeln!(o, "warmpool_peer_links_total{{path=\"relayed\"}} {}", c(&p.relayed));
    let _ = writeln!(o, "warmpool_peer_links_total{{path=\"failed\"}} {}", c(&p.failed));
    let _ = writeln!(o, "# TYPE warmpool_peer_punch_attempts_total counter");
    let _ = writeln!(o, "warmpool_peer_punch_attempts_total {}", c(&p.punch_attempts));
    let _ = writeln!(o, "# TYPE warmpool_peer_punch_connected_total counter");
    let _ = writeln!(o, "warmpool_peer_punch_connected_total {}", c(&p.punch_ok));
    let _ = writeln!(o, "# HELP warmpool_peer_link_setup_seconds Time from the rendezvous server's start order to a proven link.");
    let _ = writeln!(o, "# TYPE warmpool_peer_link_setup_seconds summary");
    let _ = writeln!(o, "warmpool_peer_link_setup_seconds_sum {}", c(&p.setup_us_sum) as f64 / 1e6);
    let _ = writeln!(o, "warmpool_peer_link_setup_seconds_count {}", c(&p.direct) + c(&p.relayed));
    let _ = writeln!(o, "# TYPE warmpool_peer_handouts_total counter");
    let _ = writeln!(o, "warmpool_peer_handouts_total {}", c(&p.handouts));
    let _ = writeln!(o, "# HELP warmpool_peer_denied_total Link requests refused: the caller is not admitted by [peer] allow_uids / allow_cgroups.");
    let _ = writeln!(o, "# TYPE warmpool_peer_denied_total counter");
    let _ = writeln!(o, "warmpool_peer_denied_total {}", c(&p.denied));
    let _ = writeln!(o, "# TYPE warmpool_peer_rendezvous_connected gauge");
    let _ = writeln!(o, "warmpool_peer_rendezvous_connected {}", u8::from(agent.connected()));
}

/// Pools and kernel-assist data with per-tenant labels (destination, uid, cgroup, netns): only with
/// `metrics_tenant_labels = true`, for an endpoint only the operator can reach.
fn tenant_lines(o: &mut String, shared: &Shared) {
    let _ = writeln!(o, "# HELP warmpool_pool_sockets Sockets per pool and state.");
    let _ = writeln!(o, "# TYPE warmpool_pool_sockets gauge");
    let mut cwnd_lines = String::new();
    {
        let pools = shared.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, pool) in pools.iter() {
            let labels = format!(
                "dest=\"{}\",uid=\"{}\",cgroup=\"{}\",policy=\"{}\",netns=\"{}\"",
                key.dest,
                key.tenant.uid,
                escape(&key.tenant.cgroup),
                pool.settings.policy.name(),
                crate::netns::Namespaces::label(key.tenant.netns)
            );
            let (idle, quar, leased, connecting) = pool.counts();
            let checking = pool.checking();
            for (state, n) in [("idle", idle), ("quarantine", quar), ("checking", checking), ("leased", leased), ("connecting", connecting)]
            {
                let _ = writeln!(o, "warmpool_pool_sockets{{{labels},state=\"{state}\"}} {n}");
            }
            for s in pool.idle_sockets() {
                let _ = writeln!(cwnd_lines, "warmpool_pooled_socket_cwnd{{{labels},local_port=\"{}\"}} {}", sock::local_port(&s.fd), sock::cwnd(&s.fd));
            }
        }
    }
    kernel_assist_line(o, shared);
    let _ = writeln!(o, "# HELP warmpool_learned_cwnd Congestion window (segments) connections to a destination converged to (kernel assist).");
    let _ = writeln!(o, "# TYPE warmpool_learned_cwnd gauge");
    let learned = shared.learned();
    for (d, ns, cwnd, _, _) in &learned {
        let _ = writeln!(o, "warmpool_learned_cwnd{{dest=\"{d}\",netns=\"{ns}\"}} {cwnd}");
    }
    let _ = writeln!(o, "# HELP warmpool_demand_connects TCP connects seen by the kernel's connect hooks, per destination, uid and network namespace.");
    let _ = writeln!(o, "# TYPE warmpool_demand_connects gauge");
    let mut demand: std::collections::BTreeMap<(String, u32, String), u64> = std::collections::BTreeMap::new();
    for d in shared.demand() {
        *demand.entry((d.dest.to_string(), d.uid, shared.netns.label_of_cookie(d.netns))).or_default() += d.connects;
    }
    for ((d, uid, ns), n) in demand {
        let _ = writeln!(o, "warmpool_demand_connects{{dest=\"{d}\",uid=\"{uid}\",netns=\"{ns}\"}} {n}");
    }
    let _ = writeln!(o, "# TYPE warmpool_learned_srtt_seconds gauge");
    for (d, ns, _, srtt, _) in &learned {
        let _ = writeln!(o, "warmpool_learned_srtt_seconds{{dest=\"{d}\",netns=\"{ns}\"}} {}", f64::from(*srtt) / 1e6);
    }
    let _ = writeln!(o, "# HELP warmpool_pooled_socket_cwnd Congestion window (segments) of each idle pooled socket, from TCP_INFO.");
    let _ = writeln!(o, "# TYPE warmpool_pooled_socket_cwnd gauge");
    o.push_str(&cwnd_lines);
}

/// The default: the same data summed over tenants and destinations, so that whoever can
/// reach the endpoint learns nothing about which tenant connects where (`status` shows a
/// caller its own pools only; `/metrics` has no caller to ask).
fn aggregate_lines(o: &mut String, shared: &Shared) {
    let (mut pools_by_policy, mut states) = ([0usize; 2], [0usize; 4]);
    {
        let pools = shared.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for pool in pools.values() {
            pools_by_policy[usize::from(pool.settings.policy == crate::config::Policy::Reuse)] += 1;
            let (idle, quar, leased, connecting) = pool.counts();
            for (t, n) in states.iter_mut().zip([idle, quar, leased, connecting]) {
                *t += n;
            }
        }
    }
    let _ = writeln!(o, "# HELP warmpool_pools Pools (one per tenant and destination), by policy; per-pool series need metrics_tenant_labels = true.");
    let _ = writeln!(o, "# TYPE warmpool_pools gauge");
    for (policy, n) in ["warm", "reuse"].iter().zip(pools_by_policy) {
        let _ = writeln!(o, "warmpool_pools{{policy=\"{policy}\"}} {n}");
    }
    let _ = writeln!(o, "# HELP warmpool_pool_sockets Sockets of all pools, by state.");
    let _ = writeln!(o, "# TYPE warmpool_pool_sockets gauge");
    for (state, n) in ["idle", "quarantine", "leased", "connecting"].iter().zip(states) {
        let _ = writeln!(o, "warmpool_pool_sockets{{state=\"{state}\"}} {n}");
    }
    kernel_assist_line(o, shared);
    let _ = writeln!(o, "# HELP warmpool_learned_destinations Destinations the kernel assist learned a window for.");
    let _ = writeln!(o, "# TYPE warmpool_learned_destinations gauge");
    let _ = writeln!(o, "warmpool_learned_destinations {}", shared.learned().len());
    let _ = writeln!(o, "# HELP warmpool_demand_connects TCP connects seen by the kernel's connect hooks, all tenants and destinations.");
    let _ = writeln!(o, "# TYPE warmpool_demand_connects gauge");
    let _ = writeln!(o, "warmpool_demand_connects {}", shared.demand().iter().map(|d| d.connects).sum::<u64>());
}

fn kernel_assist_line(o: &mut String, shared: &Shared) {
    let _ = writeln!(o, "# HELP warmpool_kernel_assist 1 when the eBPF kernel assist is attached.");
    let _ = writeln!(o, "# TYPE warmpool_kernel_assist gauge");
    let _ = writeln!(o, "warmpool_kernel_assist {}", u8::from(shared.assist.is_some()));
}

/// Serve `/metrics` (and `/ready`) on `listener` until cancelled. A deliberately tiny
/// HTTP/1.0 responder: one request per connection, bounded reads.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    serve_with(listener, Arc::new(move || render(&shared)), cancel).await;
}

/// [`serve`] with any renderer (the rendezvous server has its own counters). Each request
/// is answered by a task of its own, in a set that is aborted and awaited when `cancel` fires:
/// none outlives this function.
pub async fn serve_with(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>, cancel: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Reap answered requests so the set does not grow with every scrape ever served.
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let mut conn = match accepted {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of fds (EMFILE/ENFILE): the pending connection keeps the listener
                // readable, so retrying at once would spin. Back off like the main listener.
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let render = render.clone();
        conns.spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while n < buf.len() {
                    let r = conn.read(&mut buf[n..]).await?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].windows(2).any(|w| w == b"\n\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render()),
                "/ready" | "/healthz" => ("200 OK", "ready\n".to_owned()),
                _ => ("404 Not Found", "try /metrics\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
    conns.shutdown().await;
}
