//! One pool: the sockets the daemon holds for one (tenant, destination), as a state machine
//! without I/O. Every method takes `now` and a `check` closure that inspects a socket, and
//! returns what to do (hand out, connect more, discard), so the rules are tested with fake
//! sockets and virtual time (see the tests below).
//!
//! States of a socket: *connecting* (counted only) → *idle* → *leased* (held by the
//! connection task, counted here) → back via *quarantine* → *idle*, or discarded on the way.

use crate::config::PoolSettings;
use crate::sock::Discard;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use wire::Source;

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

#[derive(Debug)]
struct Quarantined<S> {
    idle: Idle<S>,
    until: Instant,
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
    /// Last time a function asked (auto pools are forgotten when unused).
    pub last_request: Instant,
    /// Connects are not retried before this (a failing destination is not hammered).
    pub backoff_until: Option<Instant>,
    /// Counters.
    pub stats: PoolStats,
    /// A request found nothing idle while returned sockets sat in quarantine: demand
    /// outruns the quarantine, so the next refill does not count them as ready.
    starved: bool,
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
            last_request: now,
            backoff_until: None,
            stats: PoolStats::default(),
            starved: false,
        }
    }

    /// Sockets in every state.
    pub fn total(&self) -> usize {
        self.idle.len() + self.quarantine.len() + self.leased + self.connecting
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

    /// Move quarantined sockets whose time is up to idle, checking each again.
    pub fn promote(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) {
        while self.quarantine.front().is_some_and(|q| q.until <= now) {
            let Some(q) = self.quarantine.pop_front() else { break };
            match check(&q.idle.sock).err().or_else(|| self.expired(&q.idle, now)) {
                Some(why) => discarded.push((q.idle.sock, why)),
                None => self.idle.push(Idle { since: now, ..q.idle }),
            }
        }
    }

    /// Take the most recently idled socket that passes `check` (LIFO keeps the rest of the
    /// pool cold so that idle timeouts shrink it when demand drops).
    pub fn take(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) -> Take<S> {
        self.last_request = now;
        let t = self.take_idle(now, check, discarded);
        match &t {
            Take::Ready(i) => self.count_handout(i.source),
            Take::Empty | Take::AtLimit => {
                self.starved = !self.quarantine.is_empty();
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
        self.promote(now, check, discarded);
        while let Some(i) = self.idle.pop() {
            match self.expired(&i, now).map_or_else(|| check(&i.sock), Err) {
                Ok(()) => {
                    self.leased += 1;
                    return Take::Ready(i);
                }
                Err(why) => discarded.push((i.sock, why)),
            }
        }
        if self.total() >= self.settings.max_per_destination {
            Take::AtLimit
        } else {
            Take::Empty
        }
    }

    /// A hand-out did not happen after all (probe failed, send failed): un-count the lease.
    pub fn handout_failed(&mut self) {
        self.leased = self.leased.saturating_sub(1);
    }

    /// A lease ended and its socket is discarded.
    pub fn lease_ended(&mut self) {
        self.leased = self.leased.saturating_sub(1);
    }

    /// A lease ended with a clean give-back that passed the return check.
    /// Returns the socket back if the pool cannot keep it.
    pub fn give_back(&mut self, now: Instant, sock: S, created: Instant) -> Result<(), (S, Discard)> {
        self.leased = self.leased.saturating_sub(1);
        if self.idle.len() + self.quarantine.len() >= self.settings.max_idle {
            return Err((sock, Discard::OverCapacity));
        }
        if now.duration_since(created) >= self.settings.max_lifetime {
            return Err((sock, Discard::Lifetime));
        }
        let idle = Idle { sock, created, since: now, source: Source::Reuse };
        self.quarantine.push_back(Quarantined { idle, until: now + self.settings.quarantine });
        Ok(())
    }

    /// How many new connects to start now (and counts them as connecting).
    pub fn start_refill(&mut self, now: Instant) -> usize {
        if self.backoff_until.is_some_and(|t| now < t) {
            return 0;
        }
        let (floor, ready) = if std::mem::take(&mut self.starved) {
            // Demand outran the quarantine: add a socket even where min_idle is 0.
            (self.settings.min_idle.max(1), self.idle.len() + self.connecting)
        } else {
            (self.settings.min_idle, self.idle.len() + self.quarantine.len() + self.connecting)
        };
        let want = floor.saturating_sub(ready);
        let room = self.settings.max_per_destination.saturating_sub(self.total());
        let n = want.min(room);
        self.connecting += n;
        n
    }

    /// A connect started by `start_refill` finished.
    pub fn connected(&mut self, now: Instant, sock: S) {
        self.connecting = self.connecting.saturating_sub(1);
        self.backoff_until = None;
        self.idle.insert(0, Idle { sock, created: now, since: now, source: Source::Warm });
    }

    /// A connect started by `start_refill` failed.
    pub fn connect_failed(&mut self, now: Instant) {
        self.connecting = self.connecting.saturating_sub(1);
        self.backoff_until = Some(now + crate::defaults::CONNECT_BACKOFF);
    }

    /// Periodic sweep: quarantine, timeouts, health, and sockets beyond `max_idle`.
    pub fn sweep(&mut self, now: Instant, check: Check<'_, S>, discarded: &mut Vec<(S, Discard)>) {
        self.promote(now, check, discarded);
        let mut keep = Vec::with_capacity(self.idle.len());
        for i in std::mem::take(&mut self.idle) {
            match self.expired(&i, now).map_or_else(|| check(&i.sock), Err) {
                Ok(()) => keep.push(i),
                Err(why) => discarded.push((i.sock, why)),
            }
        }
        let excess = keep.len().saturating_sub(self.settings.max_idle);
        discarded.extend(keep.drain(..excess).map(|i| (i.sock, Discard::OverCapacity)));
        self.idle = keep;
    }

    /// The idle and quarantined sockets with their history, for a hand-over.
    pub fn drain_idle(&mut self) -> Vec<Idle<S>> {
        let mut out: Vec<Idle<S>> = self.idle.drain(..).collect();
        out.extend(self.quarantine.drain(..).map(|q| q.idle));
        out
    }

    /// An offered socket the process never used: no longer leased, and back through
    /// quarantine with its history (a warm socket stays warm).
    pub fn unoffer(&mut self, now: Instant, idle: Idle<S>) -> Result<(), (S, Discard)> {
        self.leased = self.leased.saturating_sub(1);
        self.adopt(now, idle)
    }

    /// A socket handed over by a predecessor: back through quarantine (it is checked again
    /// before anyone gets it), unless the pool is full or it is too old.
    pub fn adopt(&mut self, now: Instant, idle: Idle<S>) -> Result<(), (S, Discard)> {
        if self.idle.len() + self.quarantine.len() >= self.settings.max_idle {
            return Err((idle.sock, Discard::OverCapacity));
        }
        if now.duration_since(idle.created) >= self.settings.max_lifetime {
            return Err((idle.sock, Discard::Lifetime));
        }
        let until = now + self.settings.quarantine;
        self.quarantine.push_back(Quarantined { idle: Idle { since: now, ..idle }, until });
        Ok(())
    }

    /// A lease handed over by a predecessor now counts against this pool.
    pub fn adopt_lease(&mut self) {
        self.leased += 1;
    }

    /// Everything the pool holds, for removal (leased sockets stay with their leases).
    pub fn drain(&mut self) -> Vec<S> {
        let mut out: Vec<S> = self.idle.drain(..).map(|i| i.sock).collect();
        out.extend(self.quarantine.drain(..).map(|q| q.idle.sock));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Policy, PoolSettings};
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::time::Duration;

    /// A fake socket: an id whose health the test sets.
    type Fake = u32;

    struct World {
        health: RefCell<HashMap<Fake, Discard>>,
    }

    impl World {
        fn new() -> Self {
            Self { health: RefCell::new(HashMap::new()) }
        }
        fn check(&self) -> impl FnMut(&Fake) -> Result<(), Discard> + '_ {
            |s| self.health.borrow().get(s).map_or(Ok(()), |d| Err(*d))
        }
    }

    fn settings(f: impl FnOnce(&mut PoolSettings)) -> Arc<PoolSettings> {
        let mut s = PoolSettings::with_policy(Policy::Reuse);
        s.min_idle = 2;
        s.max_idle = 3;
        s.max_per_destination = 4;
        s.quarantine = Duration::from_millis(5);
        f(&mut s);
        Arc::new(s)
    }

    fn ready(t: Take<Fake>) -> Fake {
        match t {
            Take::Ready(i) => i.sock,
            other => panic!("expected a socket, got {other:?}"),
        }
    }

    #[test]
    fn refill_keeps_min_idle_and_respects_the_limit() {
        let t0 = Instant::now();
        let w = World::new();
        let mut p = Pool::new(settings(|_| {}), false, t0);
        assert_eq!(p.start_refill(t0), 2);
        assert_eq!(p.start_refill(t0), 0, "connects in flight count as ready");
        p.connected(t0, 1);
        p.connected(t0, 2);
        let mut d = vec![];
        let a = ready(p.take(t0, &mut w.check(), &mut d));
        let b = ready(p.take(t0, &mut w.check(), &mut d));
        assert_ne!(a, b);
        assert_eq!(p.start_refill(t0), 2, "two leased, two more allowed");
        assert_eq!(p.start_refill(t0), 0);
        assert!(matches!(p.take(t0, &mut w.check(), &mut d), Take::AtLimit));
    }

    #[test]
    fn returned_socket_waits_out_quarantine_and_is_rechecked() {
        let t0 = Instant::now();
        let w = World::new();
        let mut p = Pool::new(settings(|s| s.min_idle = 1), false, t0);
        p.start_refill(t0);
        p.connected(t0, 7);
        let mut d = vec![];
        let s = ready(p.take(t0, &mut w.check(), &mut d));
        p.give_back(t0, s, t0).unwrap();
        // Still in quarantine: a miss, and the pool grows instead of making the caller wait.
        assert!(matches!(p.take(t0 + Duration::from_millis(1), &mut w.check(), &mut d), Take::Empty));
        assert_eq!(p.start_refill(t0 + Duration::from_millis(1)), 1);
        assert_eq!(p.start_refill(t0 + Duration::from_millis(1)), 0);
        p.connected(t0, 8);
        let t1 = t0 + Duration::from_millis(6);
        let again = p.take(t1, &mut w.check(), &mut d);
        assert!(matches!(again, Take::Ready(Idle { sock: 7, source: Source::Reuse, .. })), "{again:?}");
        assert!(matches!(p.take(t1, &mut w.check(), &mut d), Take::Ready(Idle { sock: 8, .. })));
        // A byte that arrives during quarantine discards it.
        p.give_back(t1, 7, t0).unwrap();
        w.health.borrow_mut().insert(7, Discard::UnreadData);
        p.give_back(t1, 8, t0).unwrap();
        w.health.borrow_mut().insert(8, Discard::UnreadData);
        assert!(matches!(p.take(t1 + Duration::from_millis(6), &mut w.check(), &mut d), Take::Empty));
        assert_eq!(d, vec![(7, Discard::UnreadData), (8, Discard::UnreadData)]);
        assert_eq!(p.stats.reuse, 1);
    }

    #[test]
    fn dead_and_old_sockets_are_never_handed_out() {
        let t0 = Instant::now();
        let w = World::new();
        let mut p = Pool::new(
            settings(|s| {
                s.idle_timeout = Duration::from_secs(10);
                s.max_lifetime = Duration::from_secs(30);
            }),
            false,
            t0,
        );
        p.start_refill(t0);
        p.connected(t0, 1);
        p.connected(t0, 2);
        w.health.borrow_mut().insert(1, Discard::PeerClosed);
        w.health.borrow_mut().insert(2, Discard::PeerClosed);
        let mut d = vec![];
        assert!(matches!(p.take(t0, &mut w.check(), &mut d), Take::Empty));
        assert_eq!(d.len(), 2);
        d.clear();
        p.start_refill(t0);
        p.connected(t0, 3);
        p.connected(t0, 4);
        p.sweep(t0 + Duration::from_secs(11), &mut w.check(), &mut d);
        let mut gone: Vec<Fake> = d.iter().map(|x| x.0).collect();
        gone.sort_unstable();
        assert_eq!(gone, vec![3, 4]);
        assert!(d.iter().all(|x| x.1 == Discard::IdleTimeout));
        assert_eq!(p.counts(), (0, 0, 0, 0));
        // Lifetime applies to reused sockets too.
        assert_eq!(p.give_back(t0 + Duration::from_secs(31), 5, t0).unwrap_err().1, Discard::Lifetime);
    }

    #[test]
    fn give_back_beyond_max_idle_is_refused_and_failed_connects_back_off() {
        let t0 = Instant::now();
        let mut p: Pool<Fake> = Pool::new(settings(|s| s.max_idle = 1), false, t0);
        p.give_back(t0, 1, t0).unwrap();
        assert_eq!(p.give_back(t0, 2, t0).unwrap_err().1, Discard::OverCapacity);
        let mut q: Pool<Fake> = Pool::new(settings(|_| {}), false, t0);
        assert_eq!(q.start_refill(t0), 2);
        q.connect_failed(t0);
        q.connect_failed(t0);
        assert_eq!(q.start_refill(t0 + Duration::from_millis(10)), 0);
        assert_eq!(q.start_refill(t0 + crate::defaults::CONNECT_BACKOFF), 2);
    }
}
