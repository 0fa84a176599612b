//! Unit tests of the [`PoolTable`](super::PoolTable) in virtual time (`Instant::now()` plus
//! offsets), with fake sockets (ids whose health the test sets): quarantine then reuse, idle
//! and lifetime expiry, refills and capacity, closing one tenant, the `[auto]` budget, and
//! statistics that count each discard once.

use super::super::{Needs, PoolStats};
use super::*;
use crate::config::Policy;
use std::cell::RefCell;
use std::collections::HashMap;

/// A fake socket.
type Fake = u32;

/// The sockets' health as the idle check would see it, and a clock.
struct World {
    health: RefCell<HashMap<Fake, Discard>>,
    t0: Instant,
}

impl World {
    fn new() -> Self {
        Self { health: RefCell::new(HashMap::new()), t0: Instant::now() }
    }
    fn check(&self) -> impl FnMut(&Fake) -> Result<(), Discard> + '_ {
        |s| self.health.borrow().get(s).map_or(Ok(()), |d| Err(*d))
    }
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }
}

fn auto(max_destinations: usize, max_pools: usize) -> Auto {
    let settings = Arc::new(PoolSettings::with_policy(Policy::Reuse));
    Auto { enabled: true, settings, max_destinations, max_pools, forget_after: Duration::from_secs(60) }
}

fn settings(f: impl FnOnce(&mut PoolSettings)) -> Arc<PoolSettings> {
    let mut s = PoolSettings::with_policy(Policy::Reuse);
    s.min_idle = 1;
    s.max_idle = 3;
    s.max_per_destination = 4;
    s.quarantine = Duration::from_millis(5);
    s.idle_timeout = Duration::from_secs(10);
    s.max_lifetime = Duration::from_secs(30);
    f(&mut s);
    Arc::new(s)
}

fn tenant(uid: u32) -> Tenant {
    Tenant { uid, cgroup: Arc::from(""), cgroup_id: 0, netns: None }
}

fn key(uid: u32, port: u16) -> PoolKey {
    PoolKey { tenant: tenant(uid), dest: ([198, 18, 0, 1], port).into() }
}

/// A table whose every destination is configured with `s`.
struct Fixture {
    table: PoolTable<Fake>,
    settings: Arc<PoolSettings>,
    w: World,
    next_id: Fake,
}

impl Fixture {
    fn new(s: Arc<PoolSettings>) -> Self {
        Self { table: PoolTable::new(&auto(8, 64)), settings: s, w: World::new(), next_id: 0 }
    }

    /// Take for a hand-out at `ms`; the actions it returned.
    fn take(&mut self, k: &PoolKey, ms: u64) -> (Take<Fake>, Actions<Fake>) {
        let mut acts = Actions::default();
        let s = self.settings.clone();
        let taken = self.table.take(k, self.w.at(ms), TakeFor::Handout, &mut self.w.check(), || Lookup::Configured(s), &mut acts);
        (taken.expect("pooled").take, acts)
    }

    /// Complete every connect `acts` asks for at `ms`, with fresh ids; how many.
    fn connect_all(&mut self, acts: &Actions<Fake>, ms: u64) -> usize {
        let mut n = 0;
        for r in &acts.connect {
            for _ in 0..r.n {
                self.next_id += 1;
                self.table.connected(&r.key, self.w.at(ms), self.next_id).unwrap();
                n += 1;
            }
        }
        n
    }

    /// `Prewarm` `k` at `ms` and complete its connects.
    fn prewarm(&mut self, k: &PoolKey, ms: u64) -> usize {
        let s = self.settings.clone();
        let r = self.table.prewarm(k, self.w.at(ms), || Lookup::Configured(s)).expect("pooled");
        let acts = Actions { close: vec![], connect: vec![r], check: vec![] };
        self.connect_all(&acts, ms)
    }

    fn stats(&self, k: &PoolKey) -> PoolStats {
        self.table.get(k).expect("pool").stats()
    }
}

fn ready(t: Take<Fake>) -> Idle<Fake> {
    match t {
        Take::Ready(i) => i,
        other => panic!("expected a socket, got {other:?}"),
    }
}

#[test]
fn a_given_back_socket_is_reused_only_after_quarantine_and_its_check() {
    let mut f = Fixture::new(settings(|_| {}));
    let k = key(1000, 80);
    let (t, acts) = f.take(&k, 0);
    assert!(matches!(t, Take::Empty), "a new pool has nothing yet");
    assert_eq!(acts.connect, vec![Refill { key: k.clone(), n: 1, timeout: f.settings.connect_timeout }], "refilled to min_idle");
    f.connect_all(&acts, 1);
    let (t, acts) = f.take(&k, 2);
    let out = ready(t);
    assert_eq!((out.sock, out.source), (1, Source::Warm));
    f.connect_all(&acts, 2);
    f.table.end_lease(&k, f.w.at(3), out.sock, out.created, Ok(Return::GiveBack { proof: true })).unwrap();
    // In quarantine: not handed out; the other socket is.
    let (t, acts) = f.take(&k, 4);
    assert_eq!(ready(t).sock, 2);
    assert!(acts.connect.is_empty(), "the socket in quarantine will be back: no refill");
    // Nothing idle: a miss, and the pool grows instead of making the function wait.
    let (t, acts) = f.take(&k, 5);
    assert!(matches!(t, Take::Empty));
    assert_eq!(acts.connect.iter().map(|r| r.n).sum::<usize>(), 1, "starved: one more socket");
    let mut checks = Actions::default();
    assert_eq!(f.table.start_checks(f.w.at(5), &mut f.w.check(), &mut checks), Some(f.w.at(8)));
    assert!(checks.check.is_empty() && checks.close.is_empty());
    // Due: to the checker with both checks, still not ready.
    assert_eq!(f.table.start_checks(f.w.at(8), &mut f.w.check(), &mut checks), None);
    let job = checks.check.pop().expect("one check");
    assert_eq!((job.key.clone(), job.check.needs), (k.clone(), Needs { holders: true, proof: true }));
    assert!(matches!(f.take(&k, 9).0, Take::Empty), "a socket under check is never handed out");
    // Passed: idle, and handed out as reused.
    f.table.checked(&k, f.w.at(10), job.check.idle, Ok(())).unwrap();
    let again = ready(f.take(&k, 11).0);
    assert_eq!((again.sock, again.source), (1, Source::Reuse));
    let s = f.stats(&k);
    assert_eq!((s.warm, s.reuse, s.miss, s.discarded), (2, 1, 3, 0));
}

#[test]
fn idle_sockets_expire_at_idle_timeout_and_the_sweep_refills() {
    let mut f = Fixture::new(settings(|s| s.min_idle = 2));
    let k = key(1000, 80);
    assert_eq!(f.prewarm(&k, 0), 2);
    let mut acts = Actions::default();
    f.table.sweep(f.w.at(9_999), &mut f.w.check(), &mut acts);
    assert!(acts.close.is_empty() && acts.connect.is_empty(), "{acts:?}");
    f.table.sweep(f.w.at(10_000), &mut f.w.check(), &mut acts);
    let mut closed: Vec<_> = acts.close.clone();
    closed.sort_unstable_by_key(|c| c.0);
    assert_eq!(closed, vec![(1, Discard::IdleTimeout), (2, Discard::IdleTimeout)]);
    assert_eq!(acts.connect.iter().map(|r| r.n).sum::<usize>(), 2, "back to min_idle");
    assert_eq!(f.stats(&k).discarded, 2);
    // A socket the idle check finds dead goes at the sweep too, whatever its age.
    f.connect_all(&acts, 10_000);
    f.w.health.borrow_mut().insert(3, Discard::PeerClosed);
    let mut acts = Actions::default();
    f.table.sweep(f.w.at(10_001), &mut f.w.check(), &mut acts);
    assert_eq!(acts.close, vec![(3, Discard::PeerClosed)]);
    assert_eq!(f.stats(&k).discarded, 3);
}

#[test]
fn sockets_expire_at_max_lifetime_wherever_they_are() {
    let mut f = Fixture::new(settings(|s| {
        s.min_idle = 2;
        s.idle_timeout = Duration::from_secs(3_600);
    }));
    let k = key(1000, 80);
    f.prewarm(&k, 0);
    // Leased, then given back just before its end of life: into quarantine, and out of it
    // as too old.
    let a = ready(f.take(&k, 1_000).0);
    f.table.end_lease(&k, f.w.at(29_998), a.sock, a.created, Ok(Return::GiveBack { proof: false })).unwrap();
    let mut acts = Actions::default();
    f.table.start_checks(f.w.at(30_003), &mut f.w.check(), &mut acts);
    assert_eq!(acts.close, vec![(a.sock, Discard::Lifetime)]);
    assert!(acts.check.is_empty());
    // Idle: never handed out past its lifetime.
    let (t, acts) = f.take(&k, 30_004);
    assert!(matches!(t, Take::Empty));
    assert_eq!(acts.close.len(), 1);
    assert_eq!(acts.close[0].1, Discard::Lifetime);
    // Given back past it: refused.
    let b = f.table.end_lease(&k, f.w.at(30_005), 99, f.w.at(0), Ok(Return::GiveBack { proof: true }));
    assert_eq!(b, Err((99, Discard::Lifetime)));
    assert_eq!(f.stats(&k).discarded, 3);
}

#[test]
fn refills_keep_min_idle_and_never_pass_max_per_destination() {
    let mut f = Fixture::new(settings(|s| s.min_idle = 2));
    let k = key(1000, 80);
    let r = f.table.prewarm(&k, f.w.at(0), || Lookup::Configured(settings(|s| s.min_idle = 2))).unwrap();
    assert_eq!(r.n, 2);
    assert_eq!(f.table.prewarm(&k, f.w.at(0), || unreachable!("the pool exists")).unwrap().n, 0, "connects in flight count");
    f.connect_all(&Actions { close: vec![], connect: vec![r], check: vec![] }, 1);
    // Lease everything the pool may have: each take refills to min_idle, up to the limit.
    let mut leased = vec![];
    for ms in 2..20 {
        let (t, acts) = f.take(&k, ms);
        if let Take::Ready(i) = t {
            leased.push(i.sock);
        }
        f.connect_all(&acts, ms);
        let p = f.table.get(&k).unwrap();
        assert!(p.total() <= 4, "{} sockets at {ms} ms", p.total());
    }
    assert_eq!(leased.len(), 4);
    assert!(matches!(f.take(&k, 21).0, Take::AtLimit));
    // A `warm` pool sized to a fast stream of requests stays within max_idle.
    let mut w = Fixture::new(settings(|s| {
        s.policy = Policy::Warm;
        s.max_idle = 2;
        s.max_per_destination = 100;
    }));
    let wk = key(1000, 81);
    for ms in 0..500 {
        let (t, acts) = w.take(&wk, ms);
        if matches!(t, Take::Ready(_)) {
            w.table.lease_ended(&wk);
        }
        w.connect_all(&acts, ms);
        let (idle, _, _, connecting) = w.table.get(&wk).unwrap().counts();
        assert!(idle + connecting <= 2, "{idle} idle + {connecting} connecting at {ms} ms");
    }
}

#[test]
fn closing_one_tenant_leaves_the_others() {
    let mut f = Fixture::new(settings(|s| s.min_idle = 2));
    let (a80, a81, b80) = (key(1, 80), key(1, 81), key(2, 80));
    for k in [&a80, &a81, &b80] {
        f.prewarm(k, 0);
    }
    let out = ready(f.take(&a80, 1).0);
    let mut acts = Actions::default();
    let closed = f.table.close_tenants(|t| *t == tenant(1), &mut acts);
    assert_eq!(closed, HashMap::from([(tenant(1), 2)]));
    assert_eq!(acts.close.len(), 3, "a's idle sockets (one of a80's is out)");
    assert!(acts.close.iter().all(|(s, why)| *s <= 4 && *why == Discard::PoolRemoved), "{acts:?}");
    assert_eq!(f.table.keys().cloned().collect::<Vec<_>>(), vec![b80.clone()]);
    assert_eq!(f.table.get(&b80).unwrap().counts(), (2, 0, 0, 0));
    // What comes back to a closed pool is closed: a lease, a connect, a checked socket.
    assert_eq!(f.table.end_lease(&a80, f.w.at(2), out.sock, out.created, Ok(Return::GiveBack { proof: true })), Err((out.sock, Discard::PoolRemoved)));
    assert_eq!(f.table.connected(&a81, f.w.at(2), 77), Err(77));
    let idle = Idle { sock: 78, created: f.w.at(0), since: f.w.at(0), source: Source::Reuse };
    assert_eq!(f.table.checked(&a81, f.w.at(2), idle, Ok(())).unwrap_err(), (78, Discard::PoolRemoved));
    assert!(ready(f.take(&b80, 3).0).sock > 4, "b's pool still serves b");
}

#[test]
fn the_auto_budget_and_unused_auto_pools() {
    let mut table: PoolTable<Fake> = PoolTable::new(&auto(2, 3));
    let w = World::new();
    let s = settings(|s| s.min_idle = 0);
    let get = |t: &mut PoolTable<Fake>, uid, port, ms| t.pool_for(&key(uid, port), w.at(ms), || Lookup::Auto(s.clone())).is_some();
    assert!(get(&mut table, 1, 1, 0) && get(&mut table, 1, 2, 0));
    assert!(!get(&mut table, 1, 3, 0), "a tenant at its own budget gets no more");
    assert!(get(&mut table, 1, 1, 0), "its existing pools still serve it");
    assert!(get(&mut table, 2, 1, 0));
    assert!(!get(&mut table, 3, 1, 0), "the daemon-wide ceiling holds");
    assert!(table.pool_for(&key(3, 1), w.at(0), || Lookup::Configured(s.clone())).is_some(), "configured pools are outside it");
    let nowhere = PoolKey { tenant: tenant(1), dest: ([0, 0, 0, 0], 80).into() };
    assert!(table.pool_for(&nowhere, w.at(0), || unreachable!("never looked up")).is_none());
    // Forgotten after `forget_after` unused, unless something is out on lease.
    let mut acts = Actions::default();
    let out = ready({
        let p = table.pool_for(&key(1, 1), w.at(0), || unreachable!()).unwrap();
        p.connected(w.at(0), 5);
        p.take(w.at(0), &mut w.check(), &mut acts.close)
    });
    table.forget_unused(w.at(59_999), &mut acts);
    assert_eq!(table.len(), 4);
    table.forget_unused(w.at(60_000), &mut acts);
    let mut left: Vec<_> = table.keys().cloned().collect();
    left.sort();
    assert_eq!(left, vec![key(1, 1), key(3, 1)], "the leased auto pool and the configured one stay");
    assert!(acts.close.is_empty());
    table.end_lease(&key(1, 1), w.at(60_001), out.sock, out.created, Err(Discard::Shared)).unwrap_err();
    table.forget_unused(w.at(60_001), &mut acts);
    assert_eq!(table.len(), 1);
}

/// Every path that gives a socket up counts it once in its pool's `discarded`, and every
/// socket given up reaches the caller (in `acts.close` or an `Err`) exactly once.
#[test]
fn every_discard_is_counted_once() {
    let mut f = Fixture::new(settings(|s| {
        s.min_idle = 3;
        s.max_idle = 4;
        s.max_per_destination = 8;
    }));
    let k = key(1000, 80);
    f.prewarm(&k, 0);
    let mut closed: Vec<(Fake, Discard)> = vec![];
    let mut failed_handouts = 0;
    let idle_now = |f: &Fixture| f.table.get(&k).unwrap().idle_sockets().copied().collect::<Vec<_>>();
    // take: the idle socket it finds first (the most recent) is dead.
    let dead = *idle_now(&f).last().unwrap();
    f.w.health.borrow_mut().insert(dead, Discard::PeerClosed);
    let (t, acts) = f.take(&k, 1);
    let a = ready(t);
    closed.extend(acts.close.iter().copied());
    f.connect_all(&acts, 1);
    // A hand-out whose probe failed (the caller closes the socket).
    let _probe_failed = ready(f.take(&k, 2).0);
    f.table.handout_failed(&k);
    failed_handouts += 1;
    // end_lease: a bad return check, and a good one (into quarantine).
    let c = ready(f.take(&k, 3).0);
    closed.push(f.table.end_lease(&k, f.w.at(4), c.sock, c.created, Err(Discard::Shared)).unwrap_err());
    f.table.end_lease(&k, f.w.at(4), a.sock, a.created, Ok(Return::GiveBack { proof: true })).unwrap();
    // start_checks and checked: the proof fails.
    let mut acts = Actions::default();
    f.table.start_checks(f.w.at(10), &mut f.w.check(), &mut acts);
    let job = acts.check.pop().expect("a check");
    closed.push(f.table.checked(&k, f.w.at(11), job.check.idle, Err(Discard::CheckFailed)).unwrap_err());
    // sweep, and the pool's removal.
    let unread = idle_now(&f)[0];
    f.w.health.borrow_mut().insert(unread, Discard::UnreadData);
    let mut acts = Actions::default();
    f.table.sweep(f.w.at(12), &mut f.w.check(), &mut acts);
    assert!(f.connect_all(&acts, 12) > 0, "the sweep refills");
    let before = f.stats(&k).discarded;
    f.table.close_tenants(|_| true, &mut acts);
    closed.extend(acts.close.iter().copied());
    let mut ids: Vec<Fake> = closed.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), closed.len(), "no socket given up twice: {closed:?}");
    assert!(closed.contains(&(dead, Discard::PeerClosed)) && closed.contains(&(unread, Discard::UnreadData)), "{closed:?}");
    let removed = closed.iter().filter(|c| c.1 == Discard::PoolRemoved).count() as u64;
    assert!(removed > 0, "{closed:?}");
    assert_eq!(before, closed.len() as u64 - removed + failed_handouts, "{closed:?}");
}
