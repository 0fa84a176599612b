//! The checker: the return path's I/O shell. Every socket given back (a `Release`, a lease
//! whose process ended, an unused offer, a predecessor's socket) waits out its pool's
//! quarantine, then passes here before it is idle again:
//!
//! 1. **holders**: one walk of `/proc` per batch ([`crate::holders`], on a blocking thread)
//!    proves no other process holds it; one still found after
//!    [`defaults::HOLDERS_ATTEMPTS`] walks is discarded (`held_elsewhere`);
//! 2. **socket state** ([`crate::sockstate`]): its peer is still the pool's destination and
//!    the options and file status flags the function set are put back (after the holders
//!    walk: a process still holding the socket would share the restored file description);
//! 3. **proof**: if bytes moved while it was out, the pool's protocol proves the exchange is
//!    over and resets the session ([`crate::proof`]), as a task in this task's `JoinSet`.
//!
//! Data flow: `settle` (client tasks) puts a socket into its pool's quarantine and wakes
//! this task (`Shared::check_wake`); the task takes what is due from every pool under the
//! table lock (no I/O under it), works off the lock, and hands each verdict back with
//! [`Pool::checked`](crate::pool::Pool::checked). Cancelled with the daemon: the proofs
//! still running are aborted and their sockets closed. Nothing here is on a function's path.

use crate::config::PoolSettings;
use crate::pool::{Actions, CheckJob, Idle, Needs};
use crate::proof::{self, Protocol};
use crate::server::{PoolKey, PooledSock, Shared};
use crate::sock::{self, Discard};
use crate::{defaults, holders};
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A socket between quarantine and its verdict.
#[derive(Debug)]
struct Job {
    key: PoolKey,
    idle: Idle<PooledSock>,
    needs: Needs,
    settings: Arc<PoolSettings>,
    /// `/proc` walks that found it held so far.
    held: u32,
}

/// Run the checker on a thread of its own, with a single-threaded runtime, until `cancel`
/// fires: its wake-ups (holders passes, proof I/O, the proofs' quiet timers) never queue on
/// the workers that hand sockets out. (On the shared runtime, a pool with the http proof
/// handed out about 10 µs slower at p50 than one without, at one function per ms on 2 vCPUs.)
/// Falls back to the caller's runtime if the thread cannot be started.
pub(crate) async fn run_on_own_thread(shared: Arc<Shared>, cancel: CancellationToken) {
    // The thread says whether it ran the checker (false: no runtime could be built).
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<bool>();
    let (s, c) = (shared.clone(), cancel.clone());
    let started = std::thread::Builder::new().name("warmpool-checker".into()).spawn(move || {
        let ran = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => {
                rt.block_on(run(s, c));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "checker runtime: running the checker on the daemon's runtime");
                false
            }
        };
        let _ = done_tx.send(ran);
    });
    let ran = match started {
        Ok(_) => done_rx.await.unwrap_or(true),
        Err(e) => {
            tracing::warn!(error = %e, "checker thread: running the checker on the daemon's runtime");
            false
        }
    };
    if !ran {
        run(shared, cancel).await;
    }
}

/// Run the checker until `cancel` fires.
pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut proofs: JoinSet<()> = JoinSet::new();
    let mut retry: Vec<Job> = Vec::new();
    let mut retry_at: Option<Instant> = None;
    // A first pass at once: sockets adopted from a predecessor wait in quarantine already.
    let mut next_due: Option<Instant> = Some(Instant::now());
    loop {
        let wake_at = [next_due, retry_at].into_iter().flatten().min();
        let sleep = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = shared.check_wake.notified() => {}
            () = sleep => {}
            Some(_) = proofs.join_next(), if !proofs.is_empty() => {
                while proofs.try_join_next().is_some() {}
                continue;
            }
        }
        let now = Instant::now();
        let (mut jobs, due) = collect(&shared, now);
        next_due = due;
        if retry_at.is_some_and(|t| t <= now) {
            jobs.append(&mut retry);
            retry_at = None;
        }
        if jobs.is_empty() {
            continue;
        }
        for job in walk(&shared, jobs).await {
            if job.held > 0 {
                if job.held < defaults::HOLDERS_ATTEMPTS {
                    retry_at.get_or_insert(Instant::now() + defaults::HOLDERS_RETRY_DELAY);
                    retry.push(job);
                } else {
                    finish(&shared, job.key, job.idle, Err(Discard::HeldElsewhere));
                }
                continue;
            }
            if let Err(why) = crate::sockstate::reset(&job.idle.sock.fd, job.key.dest, &job.idle.sock.base) {
                finish(&shared, job.key, job.idle, Err(why));
                continue;
            }
            match job.settings.protocol {
                Some(p @ (Protocol::Http | Protocol::Redis)) if job.needs.proof => {
                    proofs.spawn(prove(shared.clone(), job, p));
                }
                _ => finish(&shared, job.key, job.idle, Ok(())),
            }
        }
    }
    proofs.shutdown().await;
}

/// Take the sockets due from every pool; and when the next one is due.
fn collect(shared: &Shared, now: Instant) -> (Vec<Job>, Option<Instant>) {
    let mut acts = Actions::default();
    let next = shared.lock().start_checks(now, &mut |s| sock::idle_check(&s.fd), &mut acts);
    let jobs = std::mem::take(&mut acts.check)
        .into_iter()
        .map(|CheckJob { key, check, settings }| Job { key, idle: check.idle, needs: check.needs, settings, held: 0 })
        .collect();
    shared.discard_all(acts.close);
    (jobs, next)
}

/// One `/proc` walk for the jobs that need it; marks the ones found held.
async fn walk(shared: &Shared, mut jobs: Vec<Job>) -> Vec<Job> {
    let inodes: Vec<Option<u64>> =
        jobs.iter().map(|j| if j.needs.holders { holders::socket_inode(&j.idle.sock.fd) } else { None }).collect();
    let socks: Vec<(std::os::fd::RawFd, u64)> =
        jobs.iter().zip(&inodes).filter_map(|(j, ino)| ino.map(|i| (j.idle.sock.fd.as_raw_fd(), i))).collect();
    if socks.is_empty() {
        return jobs;
    }
    let me = std::process::id();
    let asked = socks.clone();
    let (held, stats) = tokio::task::spawn_blocking(move || holders::find_held(&asked, me)).await.unwrap_or_else(|_| {
        // The check panicked: nothing is proved, so every socket counts as held.
        (vec![true; socks.len()], holders::WalkStats::default())
    });
    let found: HashSet<u64> = socks.iter().zip(&held).filter(|(_, h)| **h).map(|((_, ino), _)| *ino).collect();
    shared.metrics.observe_holders_walk(&stats);
    for (job, ino) in jobs.iter_mut().zip(&inodes) {
        if ino.is_some_and(|i| found.contains(&i)) {
            job.held += 1;
        } else if job.needs.holders && ino.is_none() {
            // fstat failed: a socket we cannot name cannot be proved unshared.
            job.held = defaults::HOLDERS_ATTEMPTS;
        } else {
            job.held = 0;
        }
    }
    jobs
}

/// The proof, as one task: its socket is closed if the task is aborted.
async fn prove(shared: Arc<Shared>, job: Job, protocol: Protocol) {
    let Job { key, idle, settings, .. } = job;
    let Idle { sock: PooledSock { fd, base }, created, since, source } = idle;
    let dest = match key.dest {
        std::net::SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(key.dest, |v4| (v4, v6.port()).into()),
        v4 @ std::net::SocketAddr::V4(_) => v4,
    };
    let (fd, outcome) = proof::prove(fd, protocol, &settings.check, &dest.to_string()).await;
    shared.metrics.observe_check(protocol, outcome);
    let idle = Idle { sock: PooledSock { fd, base }, created, since, source };
    finish(&shared, key, idle, outcome.discard().map_or(Ok(()), Err));
}

/// Hand the verdict to the socket's pool; close it if refused.
fn finish(shared: &Shared, key: PoolKey, idle: Idle<PooledSock>, verdict: Result<(), Discard>) {
    let now = Instant::now();
    let verdict = shared.lock().checked(&key, now, idle, verdict);
    match verdict {
        Err(d) => shared.discard_all(vec![d]),
        Ok(()) => {
            shared.metrics.checked_idle.fetch_add(1, Ordering::Relaxed);
        }
    }
}
