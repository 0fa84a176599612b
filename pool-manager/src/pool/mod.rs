//! One pool: the sockets the daemon holds for one (tenant, destination), as a state machine
//! without I/O. Every method takes `now` and a `check` closure that inspects a socket, and
//! returns what to do (hand out, connect more, discard), so the rules are tested with fake
//! sockets and virtual time (see `tests.rs`). The pool keeps its own statistics: every
//! socket it gives up with a [`Discard`] reason is counted once, where it is given up.
//! [`PoolTable`] (in `table.rs`) holds every pool by [`PoolKey`] and is what the daemon's
//! I/O layer drives.
//!
//! States of a socket: *connecting* (counted only) → *idle* → *leased* (held by the
//! connection task, counted here) → back via *quarantine* (a short wait, held here) →
//! *checking* (held by the checker, counted here: holders walk and end-of-exchange proof) →
//! *idle*, or discarded on the way. Sockets in quarantine or under check are not ready: a
//! request that finds only those is a miss, and after such a miss refills count them as missing.

use crate::config::PoolSettings;
use crate::sizing::Sizing;
use crate::sock::Discard;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use wire::Source;

mod table;
pub use table::{Actions, CheckJob, PoolKey, PoolTable, Refill, Return, TakeFor, Taken};

/// A socket waiting in the pool.
#[derive(Debug)]
pub struct Idle<S> {
    /// The socket.
    pub sock: S,
    /// When it was connected (for `max_lifetime`).
    pub created: Instant,
    /// When it became idle (for `idle_timeout`).
    pub since: Instant,
    /// Warm (never used) or reused.
    pub source: Source,
}

/// What a socket coming back must pass before it is idle again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Prove that no other process holds it (it was in a function's process).
    pub holders: bool,
    /// Run the protocol's end-of-exchange proof (bytes moved while it was out).
    pub proof: bool,
}

impl Needs {
    fn any(self) -> bool {
        self.holders || self.proof
    }
}

#[derive(Debug)]
struct Quarantined<S> {
    idle: Idle<S>,
    until: Instant,
    needs: Needs,
}

/// A socket out of quarantine that the checker must judge (see [`Pool::start_checks`]).
#[derive(Debug)]
pub struct ToCheck<S> {
    /// The socket with its history.
    pub idle: Idle<S>,
    /// What it must pass.
    pub needs: Needs,
}

/// What `take` found.
#[derive(Debug)]
pub enum Take<S> {
    /// A checked socket to hand out (now counted as leased).
    Ready(Idle<S>),
    /// Nothing to hand out.
    Empty,
    /// The destination is at `max_per_destination`.
    AtLimit,
}

/// Per-pool counters shown by `pool-manager status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    /// Warm hand-outs.
    pub warm: u64,
    /// Reuse hand-outs.
    pub reuse: u64,
    /// Misses.
    pub miss: u64,
    /// Discarded sockets.
    pub discarded: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Pool<S> {
    /// Settings (shared with the config).
    pub settings: Arc<PoolSettings>,
    /// Pooled on first use rather than configured.
    pub auto: bool,
    idle: Vec<Idle<S>>,
    quarantine: VecDeque<Quarantined<S>>,
    leased: usize,
    connecting: usize,
    checking: usize,
    /// Last time a function asked (auto pools are forgotten when unused).
    last_request: Instant,
    /// Connects are not retried before this (a failing destination is not hammered).
    backoff_until: Option<Instant>,
    /// Counters, kept by the pool's own methods only.
    stats: PoolStats,
    /// A request found nothing idle while returned sockets sat in quarantine or under
    /// check: the next refill adds a socket even where `min_idle` is 0.
    starved: bool,
    /// Demand and refill latency: the pool keeps what a steady stream needs ready.
    pub sizing: Sizing,
}

type Check<'a, S> = &'a mut dyn FnMut(&S) -> Result<(), Discard>;

impl<S> Pool<S> {
    /// An empty pool.
    pub fn new(settings: Arc<PoolSettings>, auto: bool, now: Instant) -> Self {
        Self {
            settings,
            auto,
            idle: Vec::new(),
            quarantine: VecDeque::new(),
            leased: 0,
            connecting: 0,
            checking: 0,
            last_request: now,
            backoff_until: None,
            stats: PoolStats::default(),
            starved: false,
            sizing: Sizing::default(),
        }
    }

    /// Sockets in every state.
    pub fn total(&self) -> usize {
        self.idle.len() + self.quarantine.len() + self.checking + self.leased + self.connecting
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Whether an auto pool has gone unused for `forget_after` with nothing leased or under
    /// check (then the table removes it).
    pub fn forgettable(&self, now: Instant, forget_after: std::time::Duration) -> bool {
        self.auto && now.duration_since(self.last_request) >= forget_after && self.leased == 0 && self.checking == 0
    }

    /// Sockets under check (held by the checker).
    pub fn checking(&self) -> usize {
        self.checking
    }

    /// (idle, quarantined, leased, connecting).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (self.idle.len(), self.quarantine.len(), self.leased, self.connecting)
    }

    /// The idle sockets (for metrics).
    pub fn idle_sockets(&self) -> impl Iterator<Item = &S> {
        self.idle.iter().map(|i| &i.sock)
    }

    fn expired(&self, i: &Idle<S>, now: Instant) -> Option<Discard> {
        if now.duration_since(i.created) >= self.settings.max_lifetime {
            Some(Discard::Lifetime)
        } else if now.duration_since(i.since) >= self.settings.idle_timeout {
            Some(Discard::IdleTimeout)
        } else {
            None
        }
    }

    /// Quarantined sockets whose time is up, checked again with `check`: those that need
    /// nothing more go to idle; the others are returned for the checker and count as
    /// *checking* until [`Pool::checked`].
    pub fn start_checks(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) -> Vec<ToCheck<S>> {
        let mut out = Vec::new();
        while self.quarantine.front().is_some_and(|q| q.until <= now) {
            let Some(q) = self.quarantine.pop_front() else {
                break;
            };
            match check(&q.idle.sock).err().or_else(|| self.expired(&q.idle, now)) {
                Some(why) => self.discard(discarded, q.idle.sock, why),
                None if q.needs.any() => {
                    self.checking += 1;
                    out.push(ToCheck { idle: q.idle, needs: q.needs });
                }
                None => self.idle.push(Idle { since: now, ..q.idle }),
            }
        }
        out
    }

    /// When the next quarantined socket is due for [`Pool::start_checks`].
    pub fn next_due(&self) -> Option<Instant> {
        self.quarantine.front().map(|q| q.until)
    }

    /// The checker's verdict on a socket from [`Pool::start_checks`]: idle if it passed and
    /// the pool can keep it, else returned to be closed with the reason.
    pub fn checked(&mut self, now: Instant, idle: Idle<S>, verdict: Result<(), Discard>) -> Result<(), (S, Discard)> {
        self.checking = self.checking.saturating_sub(1);
        if let Some(why) = verdict.err().or_else(|| self.expired(&idle, now)) {
            return self.refuse(idle.sock, why);
        }
        if self.idle.len() >= self.settings.max_idle {
            return self.refuse(idle.sock, Discard::OverCapacity);
        }
        self.idle.push(Idle { since: now, ..idle });
        Ok(())
    }

    /// Give up `sock` for `why` into `discarded`, counted.
    fn discard(&mut self, discarded: &mut Vec<(S, Discard)>, sock: S, why: Discard) {
        self.stats.discarded += 1;
        discarded.push((sock, why));
    }

    /// Refuse `sock` for `why` (the caller closes it), counted.
    fn refuse(&mut self, sock: S, why: Discard) -> Result<(), (S, Discard)> {
        self.stats.discarded += 1;
        Err((sock, why))
    }

    /// Take the most recently idled socket that passes `check` (LIFO keeps the rest of the
    /// pool cold so that idle timeouts shrink it when demand drops).
    pub fn take(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) -> Take<S> {
        self.last_request = now;
        self.sizing.request(now);
        let t = self.take_idle(now, check, discarded);
        match &t {
            Take::Ready(i) => self.count_handout(i.source),
            Take::Empty | Take::AtLimit => {
                self.starved = !self.quarantine.is_empty() || self.checking > 0;
                self.stats.miss += 1;
            }
        }
        t
    }

    /// Take a ready socket to offer ahead of demand (`Prefetch`): as [`Pool::take`], but an
    /// offer is no hand-out (counted by [`Pool::count_handout`] when used) and an empty pool
    /// no miss.
    pub fn take_for_offer(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) -> Option<Idle<S>> {
        self.last_request = now;
        self.sizing.request(now);
        match self.take_idle(now, check, discarded) {
            Take::Ready(i) => Some(i),
            Take::Empty | Take::AtLimit => None,
        }
    }

    /// Count a hand-out in the pool's statistics.
    pub fn count_handout(&mut self, source: Source) {
        match source {
            Source::Warm => self.stats.warm += 1,
            Source::Reuse => self.stats.reuse += 1,
        }
    }

    fn take_idle(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) -> Take<S> {
        while let Some(i) = self.idle.pop() {
            match self.expired(&i, now).map_or_else(|| check(&i.sock), Err) {
                Ok(()) => {
                    self.leased += 1;
                    return Take::Ready(i);
                }
                Err(why) => self.discard(discarded, i.sock, why),
            }
        }
        if self.total() >= self.settings.max_per_destination {
            Take::AtLimit
        } else {
            Take::Empty
        }
    }

    /// A hand-out did not happen after all (the probe failed) and its socket is discarded:
    /// un-count the lease, count the discard.
    pub fn handout_failed(&mut self) {
        self.lease_ended();
    }

    /// A lease ended and its socket is discarded (closed by the caller): counted.
    pub fn lease_ended(&mut self) {
        self.leased = self.leased.saturating_sub(1);
        self.stats.discarded += 1;
    }

    /// A lease ended with a clean give-back that passed the return check: to quarantine,
    /// then the holders check and, if `proof` (bytes moved while it was out), the protocol's
    /// proof. Returns the socket back if the pool cannot keep it.
    pub fn give_back(&mut self, now: Instant, sock: S, created: Instant, proof: bool) -> Result<(), (S, Discard)> {
        self.leased = self.leased.saturating_sub(1);
        let idle = Idle { sock, created, since: now, source: Source::Reuse };
        self.enqueue(now, idle, Needs { holders: true, proof })
    }

    fn enqueue(&mut self, now: Instant, idle: Idle<S>, needs: Needs) -> Result<(), (S, Discard)> {
        if self.idle.len() + self.quarantine.len() + self.checking >= self.settings.max_idle {
            return self.refuse(idle.sock, Discard::OverCapacity);
        }
        if now.duration_since(idle.created) >= self.settings.max_lifetime {
            return self.refuse(idle.sock, Discard::Lifetime);
        }
        let until = now + self.settings.quarantine;
        self.quarantine.push_back(Quarantined { idle: Idle { since: now, ..idle }, until, needs });
        Ok(())
    }

    /// `Prewarm`: a request in all but the hand-out (the pool is not forgotten), and the
    /// connects to start now (see [`Pool::start_refill`]).
    pub fn prewarm(&mut self, now: Instant) -> usize {
        self.last_request = now;
        self.start_refill(now)
    }

    /// How many new connects to start now (and counts them as connecting).
    pub fn start_refill(&mut self, now: Instant) -> usize {
        if self.backoff_until.is_some_and(|t| now < t) {
            return 0;
        }
        let (floor, ready) = if std::mem::take(&mut self.starved) {
            // A request found nothing idle while sockets were in quarantine or under check:
            // demand outruns the return path, so those count as not ready (and a socket is
            // added even where min_idle is 0). A steady stream of functions thus grows the
            // pool until one is always idle, and a trickle does not.
            (self.settings.min_idle.max(1), self.idle.len() + self.connecting)
        } else {
            (self.settings.min_idle, self.idle.len() + self.quarantine.len() + self.checking + self.connecting)
        };
        // A `warm` pool's sockets never come back: it keeps what a steady stream of requests
        // needs ready (see `sizing`), within max_idle. A reuse pool is served by its returns
        // (and grows through `starved` when they are too slow), so that servers do not see
        // more connections than the functions need.
        let sized = if self.settings.policy == crate::config::Policy::Warm { self.sizing.target(now) } else { 0 };
        let floor = floor.max(sized.min(self.settings.max_idle));
        let want = floor.saturating_sub(ready);
        let room = self.settings.max_per_destination.saturating_sub(self.total());
        let n = want.min(room);
        self.connecting += n;
        self.sizing.refills_started(now, n);
        n
    }

    /// A connect started by `start_refill` finished.
    pub fn connected(&mut self, now: Instant, sock: S) {
        self.connecting = self.connecting.saturating_sub(1);
        self.sizing.refill_done(now, true);
        self.backoff_until = None;
        self.idle.insert(0, Idle { sock, created: now, since: now, source: Source::Warm });
    }

    /// A connect started by `start_refill` failed.
    pub fn connect_failed(&mut self, now: Instant) {
        self.connecting = self.connecting.saturating_sub(1);
        self.sizing.refill_done(now, false);
        self.backoff_until = Some(now + crate::defaults::CONNECT_BACKOFF);
    }

    /// Periodic sweep: timeouts, health, and sockets beyond `max_idle` (quarantine is the
    /// checker's: [`Pool::start_checks`]).
    pub fn sweep(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) {
        let mut keep = Vec::with_capacity(self.idle.len());
        for i in std::mem::take(&mut self.idle) {
            match self.expired(&i, now).map_or_else(|| check(&i.sock), Err) {
                Ok(()) => keep.push(i),
                Err(why) => self.discard(discarded, i.sock, why),
            }
        }
        let excess = keep.len().saturating_sub(self.settings.max_idle);
        for i in keep.drain(..excess) {
            self.discard(discarded, i.sock, Discard::OverCapacity);
        }
        self.idle = keep;
    }

    /// The idle and quarantined sockets with their history, for a hand-over (not discards:
    /// they go on to the successor, or come back through [`Pool::adopt`]).
    pub fn drain_idle(&mut self) -> Vec<Idle<S>> {
        let mut out: Vec<Idle<S>> = self.idle.drain(..).collect();
        out.extend(self.quarantine.drain(..).map(|q| q.idle));
        out
    }

    /// An offered socket the process never used (no byte moved): no longer leased, and back
    /// through quarantine and the holders check with its history (a warm socket stays warm).
    pub fn unoffer(&mut self, now: Instant, idle: Idle<S>) -> Result<(), (S, Discard)> {
        self.leased = self.leased.saturating_sub(1);
        self.enqueue(now, idle, Needs { holders: true, proof: false })
    }

    /// A socket handed over by a predecessor (the only other holder, which closes it
    /// unused): back through quarantine, and the proof if it was reused before, unless the
    /// pool is full or it is too old.
    pub fn adopt(&mut self, now: Instant, idle: Idle<S>) -> Result<(), (S, Discard)> {
        let proof = idle.source == Source::Reuse;
        self.enqueue(now, idle, Needs { holders: false, proof })
    }

    /// A lease handed over by a predecessor now counts against this pool.
    pub fn adopt_lease(&mut self) {
        self.leased += 1;
    }

    /// Everything the pool holds, for removal (leased sockets stay with their leases), into
    /// `discarded` with `why`, counted.
    pub fn drain(&mut self, why: Discard, discarded: &mut Vec<(S, Discard)>) {
        let socks: Vec<S> = self.idle.drain(..).map(|i| i.sock).chain(self.quarantine.drain(..).map(|q| q.idle.sock)).collect();
        for s in socks {
            self.discard(discarded, s, why);
        }
    }
}

#[cfg(test)]
mod tests;
