//! The pool table: every [`Pool`] of the daemon by [`PoolKey`] (tenant, destination), without
//! I/O, as quinn-proto is driven by its I/O layer. The table makes pools (configured ones,
//! and `[auto]` ones within their budget), hands sockets out and takes them back, sweeps,
//! and closes a tenant's pools; each operation takes `now` and returns what the I/O layer
//! must do: a socket to hand out ([`Taken`]), and [`Actions`] (sockets to close with their
//! reason, connects to start, sockets for the checker). Every discard is counted once, by
//! the pool that gives the socket up; the caller counts it in the daemon's metrics when it
//! closes the socket. The daemon keeps the table behind one mutex (`Shared::lock`); nothing
//! here blocks or reads a clock, so its rules are tested in virtual time (`table_tests.rs`).

use super::{Check, Idle, Pool, Take, ToCheck};
use crate::config::{Auto, Lookup, PoolSettings};
use crate::sock::Discard;
use crate::tenant::Tenant;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::Source;

/// Pools are keyed by tenant and destination: they never cross tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Who.
    pub tenant: Tenant,
    /// Where (as the application asked: IPv4, IPv6 or IPv4-mapped IPv6).
    pub dest: SocketAddr,
}

/// Connects to start for one pool (already counted as connecting): report each result with
/// [`PoolTable::connected`] or [`PoolTable::connect_failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refill {
    /// The pool.
    pub key: PoolKey,
    /// How many connects.
    pub n: usize,
    /// Each connect's timeout.
    pub timeout: Duration,
}

/// A socket out of quarantine for the checker: report its verdict with [`PoolTable::checked`].
#[derive(Debug)]
pub struct CheckJob<S> {
    /// Its pool.
    pub key: PoolKey,
    /// The socket and what it must pass.
    pub check: ToCheck<S>,
    /// Its pool's settings (protocol, check timeouts).
    pub settings: Arc<PoolSettings>,
}

/// What the I/O layer must do after table operations (collect several, then perform them
/// once the table is unlocked).
#[derive(Debug)]
#[must_use]
pub struct Actions<S> {
    /// Sockets to close, with the reason (already in their pool's statistics).
    pub close: Vec<(S, Discard)>,
    /// Connects to start.
    pub connect: Vec<Refill>,
    /// Sockets for the checker.
    pub check: Vec<CheckJob<S>>,
}

impl<S> Default for Actions<S> {
    fn default() -> Self {
        Self { close: Vec::new(), connect: Vec::new(), check: Vec::new() }
    }
}

impl<S> Actions<S> {
    fn refill(&mut self, key: &PoolKey, pool: &mut Pool<S>, now: Instant) {
        let n = pool.start_refill(now);
        if n > 0 {
            self.connect.push(Refill { key: key.clone(), n, timeout: pool.settings.connect_timeout });
        }
    }
}

/// Why a socket is taken (see [`PoolTable::take`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeFor {
    /// A function asked (`Acquire`): a hand-out, or a miss.
    Handout,
    /// Offered ahead of demand (`Prefetch`): neither a hand-out nor a miss until used.
    Offer,
}

/// What [`PoolTable::take`] found, with the pool's settings.
#[derive(Debug)]
pub struct Taken<S> {
    /// A socket (now leased), or why none.
    pub take: Take<S>,
    /// The pool's settings (probe, policy).
    pub settings: Arc<PoolSettings>,
}

/// How a lease ends that passed its return check (see [`PoolTable::end_lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    /// Given back after use: quarantine, the holders check, and the proof if `proof`.
    GiveBack {
        /// Bytes moved while it was out.
        proof: bool,
    },
    /// An offer never used: back with its history (a warm socket stays warm).
    Unoffer {
        /// Its source when offered.
        source: Source,
    },
}

/// See the module docs.
#[derive(Debug)]
pub struct PoolTable<S> {
    pools: HashMap<PoolKey, Pool<S>>,
    max_destinations: usize,
    max_pools: usize,
    forget_after: Duration,
}

impl<S> PoolTable<S> {
    /// An empty table with the `[auto]` budget and forgetting of `auto`.
    #[must_use]
    pub fn new(auto: &Auto) -> Self {
        Self { pools: HashMap::new(), max_destinations: auto.max_destinations, max_pools: auto.max_pools, forget_after: auto.forget_after }
    }

    /// Number of pools.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether there is no pool.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// One pool.
    #[must_use]
    pub fn get(&self, key: &PoolKey) -> Option<&Pool<S>> {
        self.pools.get(key)
    }

    /// Whether `key` has a pool.
    #[must_use]
    pub fn contains_key(&self, key: &PoolKey) -> bool {
        self.pools.contains_key(key)
    }

    /// Every pool with its key (in no order).
    pub fn iter(&self) -> impl Iterator<Item = (&PoolKey, &Pool<S>)> {
        self.pools.iter()
    }

    /// Every key (in no order).
    pub fn keys(&self) -> impl Iterator<Item = &PoolKey> {
        self.pools.keys()
    }

    /// Every pool (in no order).
    pub fn values(&self) -> impl Iterator<Item = &Pool<S>> {
        self.pools.values()
    }

    /// The pool of `key`, made if there is none and `lookup` (asked only then; it answers
    /// `NotPooled` for a tenant that may have no pool any more) pools the destination: an
    /// `[auto]` one only within the budget (see [`PoolTable::auto_budget_allows`]). `None`: not
    /// pooled (never a destination no one can connect to: port 0, unspecified, multicast).
    pub fn pool_for(&mut self, key: &PoolKey, now: Instant, lookup: impl FnOnce() -> Lookup) -> Option<&mut Pool<S>> {
        if key.dest.port() == 0 || key.dest.ip().is_unspecified() || key.dest.ip().is_multicast() {
            return None;
        }
        if !self.pools.contains_key(key) {
            let (settings, auto) = match lookup() {
                Lookup::Configured(s) => (s, false),
                Lookup::Auto(s) if self.auto_budget_allows(&key.tenant) => (s, true),
                Lookup::Auto(_) | Lookup::NotPooled => return None,
            };
            self.pools.insert(key.clone(), Pool::new(settings, auto, now));
        }
        self.pools.get_mut(key)
    }

    /// Whether `tenant` may have one more `[auto]` pool: fewer than `auto.max_destinations`
    /// of its own and fewer than `auto.max_pools` on the daemon.
    #[must_use]
    pub fn auto_budget_allows(&self, tenant: &Tenant) -> bool {
        let (mut mine, mut all) = (0usize, 0usize);
        for k in self.pools.iter().filter(|(_, p)| p.auto).map(|(k, _)| k) {
            all += 1;
            mine += usize::from(k.tenant == *tenant);
        }
        mine < self.max_destinations && all < self.max_pools
    }

    /// Make a pool for demand seen elsewhere (the kernel's connect counts), only if `key` has
    /// none: under `settings`, an `auto` one only within the budget. Returns its first connects.
    pub fn create(&mut self, key: &PoolKey, now: Instant, settings: Arc<PoolSettings>, auto: bool) -> Option<Refill> {
        if self.pools.contains_key(key) || (auto && !self.auto_budget_allows(&key.tenant)) {
            return None;
        }
        let mut pool = Pool::new(settings, auto, now);
        let n = pool.start_refill(now);
        let timeout = pool.settings.connect_timeout;
        self.pools.insert(key.clone(), pool);
        Some(Refill { key: key.clone(), n, timeout })
    }

    /// Take a socket from `key`'s pool (made if `lookup` pools it) that passes `check`; the
    /// sockets found dead or expired on the way, and the refill after the take, go to `acts`.
    /// `None`: the destination is not pooled.
    pub fn take(&mut self, key: &PoolKey, now: Instant, why: TakeFor, check: Check<'_, S>, lookup: impl FnOnce() -> Lookup, acts: &mut Actions<S>) -> Option<Taken<S>> {
        let pool = self.pool_for(key, now, lookup)?;
        let take = match why {
            TakeFor::Handout => pool.take(now, check, &mut acts.close),
            TakeFor::Offer => pool.take_for_offer(now, check, &mut acts.close).map_or(Take::Empty, Take::Ready),
        };
        acts.refill(key, pool, now);
        Some(Taken { take, settings: pool.settings.clone() })
    }

    /// A hand-out from [`PoolTable::take`] did not happen (its probe failed): its socket is
    /// closed by the caller, counted here.
    pub fn handout_failed(&mut self, key: &PoolKey) {
        if let Some(p) = self.pools.get_mut(key) {
            p.handout_failed();
        }
    }

    /// An offer was used after all: count the hand-out.
    pub fn count_handout(&mut self, key: &PoolKey, source: Source) {
        if let Some(p) = self.pools.get_mut(key) {
            p.count_handout(source);
        }
    }

    /// The end of a lease of `sock` (connected at `created`): with a passed return check
    /// (`verdict` Ok) back into its pool as `Return` says, unless the pool refuses it; else,
    /// or if its pool is gone, returned to be closed with the reason.
    pub fn end_lease(&mut self, key: &PoolKey, now: Instant, sock: S, created: Instant, verdict: Result<Return, Discard>) -> Result<(), (S, Discard)> {
        let Some(pool) = self.pools.get_mut(key) else {
            return Err((sock, Discard::PoolRemoved));
        };
        match verdict {
            Ok(Return::GiveBack { proof }) => pool.give_back(now, sock, created, proof),
            Ok(Return::Unoffer { source }) => pool.unoffer(now, Idle { sock, created, since: now, source }),
            Err(why) => {
                pool.lease_ended();
                Err((sock, why))
            }
        }
    }

    /// A lease ended whose socket was never the pool's to keep (a peer link): un-count it.
    pub fn lease_ended(&mut self, key: &PoolKey) {
        if let Some(p) = self.pools.get_mut(key) {
            p.lease_ended();
        }
    }

    /// `Prewarm`: `key`'s pool (made if `lookup` pools it) counts a request and starts what
    /// it lacks. `None`: not pooled; the refill may be of 0 connects.
    pub fn prewarm(&mut self, key: &PoolKey, now: Instant, lookup: impl FnOnce() -> Lookup) -> Option<Refill> {
        let pool = self.pool_for(key, now, lookup)?;
        let n = pool.prewarm(now);
        Some(Refill { key: key.clone(), n, timeout: pool.settings.connect_timeout })
    }

    /// A connect from a [`Refill`] finished: the socket back if its pool is gone (to close,
    /// as `PoolRemoved`).
    pub fn connected(&mut self, key: &PoolKey, now: Instant, sock: S) -> Result<(), S> {
        match self.pools.get_mut(key) {
            Some(p) => {
                p.connected(now, sock);
                Ok(())
            }
            None => Err(sock),
        }
    }

    /// A connect from a [`Refill`] failed (its pool backs off).
    pub fn connect_failed(&mut self, key: &PoolKey, now: Instant) {
        if let Some(p) = self.pools.get_mut(key) {
            p.connect_failed(now);
        }
    }

    /// Quarantined sockets whose time is up, from every pool, checked with `check`: to the
    /// checker (`acts.check`), to idle, or to close. Returns when the next one is due.
    pub fn start_checks(&mut self, now: Instant, check: Check<'_, S>, acts: &mut Actions<S>) -> Option<Instant> {
        let mut next = None;
        for (key, pool) in &mut self.pools {
            for c in pool.start_checks(now, check, &mut acts.close) {
                acts.check.push(CheckJob { key: key.clone(), check: c, settings: pool.settings.clone() });
            }
            next = [next, pool.next_due()].into_iter().flatten().min();
        }
        next
    }

    /// The checker's verdict on a [`CheckJob`]'s socket: idle, or returned to be closed.
    pub fn checked(&mut self, key: &PoolKey, now: Instant, idle: Idle<S>, verdict: Result<(), Discard>) -> Result<(), (S, Discard)> {
        match self.pools.get_mut(key) {
            Some(pool) => pool.checked(now, idle, verdict),
            None => Err((idle.sock, Discard::PoolRemoved)),
        }
    }

    /// Remove the `[auto]` pools unused for `auto.forget_after` (with nothing leased or under
    /// check); their sockets to close.
    pub fn forget_unused(&mut self, now: Instant, acts: &mut Actions<S>) {
        let forget_after = self.forget_after;
        self.pools.retain(|_, p| {
            let unused = p.forgettable(now, forget_after);
            if unused {
                p.drain(Discard::PoolRemoved, &mut acts.close);
            }
            !unused
        });
    }

    /// The periodic sweep of every pool: timeouts, health (`check`), sockets beyond
    /// `max_idle`, and the refills each pool needs then.
    pub fn sweep(&mut self, now: Instant, check: Check<'_, S>, acts: &mut Actions<S>) {
        for (key, pool) in &mut self.pools {
            pool.sweep(now, check, &mut acts.close);
            acts.refill(key, pool, now);
        }
    }

    /// Remove every pool whose tenant `which` selects (configured and `[auto]`); their idle
    /// and quarantined sockets to close (leased ones stay with their leases, and are closed
    /// as `PoolRemoved` when they end). Returns the tenants closed with their pool counts.
    pub fn close_tenants(&mut self, which: impl Fn(&Tenant) -> bool, acts: &mut Actions<S>) -> HashMap<Tenant, usize> {
        let mut tenants: HashMap<Tenant, usize> = HashMap::new();
        self.pools.retain(|k, p| {
            if !which(&k.tenant) {
                return true;
            }
            p.drain(Discard::PoolRemoved, &mut acts.close);
            *tenants.entry(k.tenant.clone()).or_default() += 1;
            false
        });
        tenants
    }

    /// Every pool removed (shutdown): its sockets to close.
    pub fn close_all(&mut self, acts: &mut Actions<S>) {
        self.close_tenants(|_| true, acts);
    }

    /// The idle and quarantined sockets of every pool with their history, for a hand-over.
    pub fn drain_idle(&mut self) -> Vec<(PoolKey, Idle<S>)> {
        self.pools.iter_mut().flat_map(|(k, p)| p.drain_idle().into_iter().map(move |i| (k.clone(), i))).collect()
    }

    /// A socket from [`PoolTable::drain_idle`] back into its pool after a failed hand-over
    /// (through quarantine, as an adopted one); returned to close if its pool is gone or full.
    pub fn readopt(&mut self, key: &PoolKey, now: Instant, idle: Idle<S>) -> Result<(), (S, Discard)> {
        match self.pools.get_mut(key) {
            Some(pool) => pool.adopt(now, idle),
            None => Err((idle.sock, Discard::PoolRemoved)),
        }
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
