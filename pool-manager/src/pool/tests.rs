//! Unit tests of one [`Pool`](super::Pool) in virtual time, with fake sockets.

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

/// Hand out one socket of `p` (connected as `id` first if needed) at `t`.
fn lease(p: &mut Pool<Fake>, w: &World, t: Instant) -> Fake {
    let mut d = vec![];
    ready(p.take(t, &mut w.check(), &mut d))
}

#[test]
fn returned_socket_goes_through_quarantine_and_checking_before_reuse() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let w = World::new();
    let mut p = Pool::new(settings(|s| s.min_idle = 1), false, t0);
    p.start_refill(t0);
    p.connected(t0, 7);
    let s = lease(&mut p, &w, t0);
    p.give_back(t0, s, t0, true).unwrap();
    let mut d = vec![];
    // In quarantine: nothing for the checker yet, a miss for a function, and the pool
    // grows instead of making the caller wait.
    assert!(p.start_checks(t0 + ms(1), &mut w.check(), &mut d).is_empty());
    assert_eq!(p.next_due(), Some(t0 + ms(5)));
    assert!(matches!(p.take(t0 + ms(1), &mut w.check(), &mut d), Take::Empty));
    assert_eq!(p.start_refill(t0 + ms(1)), 1);
    p.connected(t0 + ms(1), 8);
    // Out of quarantine: to the checker, still not ready.
    let t1 = t0 + ms(6);
    let mut due = p.start_checks(t1, &mut w.check(), &mut d);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].needs, Needs { holders: true, proof: true });
    assert_eq!((p.checking(), p.total()), (1, 2));
    assert!(matches!(p.take(t1, &mut w.check(), &mut d), Take::Ready(Idle { sock: 8, source: Source::Warm, .. })));
    assert_eq!(p.start_refill(t1), 0, "no miss yet: the socket under check will be back");
    assert!(matches!(p.take(t1, &mut w.check(), &mut d), Take::Empty), "a socket under check is never handed out");
    assert_eq!(p.start_refill(t1), 1, "after a miss, a socket under check counts as not ready");
    p.connect_failed(t1);
    // The verdict: passed, so idle and reused.
    let c = due.pop().unwrap();
    p.checked(t1 + ms(2), c.idle, Ok(())).unwrap();
    assert_eq!(p.checking(), 0);
    let again = p.take(t1 + ms(2), &mut w.check(), &mut d);
    assert!(matches!(again, Take::Ready(Idle { sock: 7, source: Source::Reuse, .. })), "{again:?}");
    assert!(d.is_empty());
    assert_eq!(p.stats.reuse, 1);
}

#[test]
fn failed_checks_and_late_bytes_discard() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let w = World::new();
    let mut p = Pool::new(settings(|_| {}), false, t0);
    p.start_refill(t0);
    p.connected(t0, 7);
    p.connected(t0, 8);
    let a = lease(&mut p, &w, t0);
    let b = lease(&mut p, &w, t0);
    p.give_back(t0, a, t0, true).unwrap();
    p.give_back(t0, b, t0, true).unwrap();
    // A byte that arrives during quarantine discards before any check.
    w.health.borrow_mut().insert(7, Discard::UnreadData);
    let mut d = vec![];
    let due = p.start_checks(t0 + ms(5), &mut w.check(), &mut d);
    assert_eq!(d, vec![(7, Discard::UnreadData)]);
    assert_eq!(due.len(), 1);
    // The proof fails: returned for closing, counted out of the pool.
    let c = due.into_iter().next().unwrap();
    assert_eq!(p.checked(t0 + ms(6), c.idle, Err(Discard::CheckFailed)).unwrap_err(), (8, Discard::CheckFailed));
    assert_eq!(p.counts(), (0, 0, 0, 0));
    assert_eq!(p.checking(), 0);
    assert_eq!(p.stats.reuse, 0);
}

#[test]
fn a_check_outliving_the_lifetime_or_capacity_discards() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let w = World::new();
    let mut p = Pool::new(settings(|s| s.max_lifetime = ms(100)), false, t0);
    p.start_refill(t0);
    p.connected(t0, 1);
    p.connected(t0, 2);
    let a = lease(&mut p, &w, t0);
    p.give_back(t0, a, t0, false).unwrap();
    let mut d = vec![];
    let c = p.start_checks(t0 + ms(5), &mut w.check(), &mut d).pop().unwrap();
    assert_eq!(c.needs, Needs { holders: true, proof: false }, "nothing moved: no proof, still the holders check");
    assert_eq!(p.checked(t0 + ms(100), c.idle, Ok(())).unwrap_err().1, Discard::Lifetime);
    // Capacity: max_idle 1, the other socket idle meanwhile.
    let mut q = Pool::new(settings(|s| s.max_idle = 1), false, t0);
    q.start_refill(t0);
    q.connected(t0, 3);
    let s = lease(&mut q, &w, t0);
    q.give_back(t0, s, t0, true).unwrap();
    let c = q.start_checks(t0 + ms(5), &mut w.check(), &mut d).pop().unwrap();
    q.connected(t0 + ms(5), 4);
    assert_eq!(q.checked(t0 + ms(6), c.idle, Ok(())).unwrap_err(), (3, Discard::OverCapacity));
}

#[test]
fn steady_demand_finds_a_ready_socket_while_others_are_checked() {
    // One function every 10 ms holding its socket 2 ms; quarantine 5 ms plus a 12 ms
    // check: after the first misses, every request finds an idle socket.
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let w = World::new();
    let mut p = Pool::new(
        settings(|s| {
            s.min_idle = 1;
            s.max_idle = 8;
            s.max_per_destination = 16;
        }),
        false,
        t0,
    );
    let mut checks: Vec<(Instant, ToCheck<Fake>)> = vec![];
    let mut returns: Vec<(Instant, Fake)> = vec![];
    let (mut next_id, mut misses) = (0u32, 0);
    let mut d = vec![];
    for step in 0..200u32 {
        let now = t0 + ms(u64::from(step));
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut checks).into_iter().partition(|(at, _)| *at <= now);
        checks = rest;
        for (_, c) in done {
            let _ = p.checked(now, c.idle, Ok(()));
        }
        let (back, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut returns).into_iter().partition(|(at, _)| *at <= now);
        returns = rest;
        for (_, s) in back {
            p.give_back(now, s, t0, true).unwrap();
        }
        checks.extend(p.start_checks(now, &mut w.check(), &mut d).into_iter().map(|c| (now + ms(12), c)));
        if step % 10 == 0 {
            match p.take(now, &mut w.check(), &mut d) {
                Take::Ready(i) => returns.push((now + ms(2), i.sock)),
                _ => misses += 1,
            }
        }
        for _ in 0..p.start_refill(now) {
            next_id += 1;
            p.connected(now, next_id);
        }
    }
    assert!(misses <= 2, "{misses} misses");
    assert!(p.total() <= 4, "the pool stays small: {}", p.total());
    assert!(p.stats.reuse >= 15, "{:?}", p.stats);
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
    assert_eq!(p.give_back(t0 + Duration::from_secs(31), 5, t0, true).unwrap_err().1, Discard::Lifetime);
}

#[test]
fn give_back_beyond_max_idle_is_refused_and_failed_connects_back_off() {
    let t0 = Instant::now();
    let mut p: Pool<Fake> = Pool::new(settings(|s| s.max_idle = 1), false, t0);
    p.give_back(t0, 1, t0, true).unwrap();
    assert_eq!(p.give_back(t0, 2, t0, true).unwrap_err().1, Discard::OverCapacity);
    let mut q: Pool<Fake> = Pool::new(settings(|_| {}), false, t0);
    assert_eq!(q.start_refill(t0), 2);
    q.connect_failed(t0);
    q.connect_failed(t0);
    assert_eq!(q.start_refill(t0 + Duration::from_millis(10)), 0);
    assert_eq!(q.start_refill(t0 + crate::defaults::CONNECT_BACKOFF), 2);
}

/// Back-to-back invocations on a `warm` pool (sockets never come back) at a steady rate,
/// one every 1.5 ms, with refills that take 2 ms (refill delay, connect, scheduling on a
/// busy node): with `min_idle = 1` alone the refill
/// races the next request; sized to demand, fewer than 5 % miss once the rate is known.
#[test]
fn warm_pool_sized_to_demand_serves_back_to_back_invocations() {
    fn run(sized: bool) -> (u32, u32) {
        let t0 = Instant::now();
        let w = World::new();
        let mut p = Pool::new(
            settings(|s| {
                s.policy = crate::config::Policy::Warm;
                s.min_idle = 1;
            }),
            false,
            t0,
        );
        let mut connects: Vec<Instant> = vec![];
        let (mut id, mut misses, mut requests, mut d) = (0u32, 0u32, 0u32, vec![]);
        for step in 0..3_000u64 {
            let now = t0 + Duration::from_micros(100 * step);
            let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut connects).into_iter().partition(|at| *at <= now);
            connects = rest;
            for _ in done {
                id += 1;
                p.connected(now, id);
            }
            if step % 15 == 0 {
                requests += 1;
                match p.take(now, &mut w.check(), &mut d) {
                    Take::Ready(_) => p.lease_ended(),
                    _ => misses += u32::from(step > 150),
                }
            }
            if !sized {
                p.sizing = Sizing::default();
            }
            for _ in 0..p.start_refill(now) {
                connects.push(now + Duration::from_micros(2_000));
            }
        }
        (misses, requests)
    }
    let (unsized_misses, n) = run(false);
    let (sized_misses, _) = run(true);
    assert!(unsized_misses * 4 > n, "min_idle = 1 alone should miss often here: {unsized_misses}/{n}");
    assert!(sized_misses * 20 < n, "sized to demand: {sized_misses}/{n} misses");
}
