//! Pools sized to demand: how many sockets a pool keeps ready so that functions arriving at a
//! steady rate find one, whatever `min_idle` says.
//!
//! A hand-out starts a refill, and the refilled socket is ready one *refill latency* later
//! (the refill delay, the connect's round trip, the daemon's own scheduling). Functions that
//! arrive every `interval` take `latency / interval` sockets while one refill is under way, so
//! a pool that keeps `ceil(latency / interval) + 1` ready never runs dry at that rate (the
//! `+ 1` absorbs jitter in both). `min_idle = 1`, the embedded default, is enough only while
//! functions arrive less often than a refill takes; back-to-back invocations on a 200 µs path
//! missed about half the time with it.
//!
//! Both quantities are measured by the pool itself (no I/O here, every method takes `now`):
//! the interval between requests and the refill latency (from `start_refill` to `connected`,
//! first in first out), each as an exponentially weighted moving average. Demand that stops
//! stops counting: after `IDLE_AFTER` (8) intervals without a request the target is 0 and the
//! idle timeout shrinks the pool as before.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Weight of a new sample in the moving averages (1/8, as TCP's smoothed RTT).
const ALPHA: f64 = 0.125;
/// Demand older than this many (average) intervals no longer counts.
const IDLE_AFTER: u32 = 8;
/// A pool never sizes itself beyond this many ready sockets from demand alone
/// (`max_idle` and `max_per_destination` still bound it).
pub const MAX_TARGET: usize = 64;

/// Observed demand and refill latency of one pool.
#[derive(Debug, Default)]
pub struct Sizing {
    last_request: Option<Instant>,
    /// Smoothed interval between requests, seconds.
    interval: Option<f64>,
    /// Smoothed refill latency, seconds.
    latency: Option<f64>,
    /// Start times of refills in flight (oldest first).
    started: VecDeque<Instant>,
}

fn smooth(avg: &mut Option<f64>, sample: f64) {
    *avg = Some(avg.map_or(sample, |a| a + ALPHA * (sample - a)));
}

impl Sizing {
    /// A function asked for a socket (hit or miss).
    pub fn request(&mut self, now: Instant) {
        if let Some(last) = self.last_request {
            smooth(&mut self.interval, now.saturating_duration_since(last).as_secs_f64());
        }
        self.last_request = Some(now);
    }

    /// `n` refills started now.
    pub fn refills_started(&mut self, now: Instant, n: usize) {
        self.started.extend(std::iter::repeat_n(now, n));
    }

    /// A refill finished (connected or failed): its latency counts only if it connected.
    pub fn refill_done(&mut self, now: Instant, connected: bool) {
        if let Some(t) = self.started.pop_front() {
            if connected {
                smooth(&mut self.latency, now.saturating_duration_since(t).as_secs_f64());
            }
        }
    }

    /// Ready sockets that demand calls for now: `ceil(latency / interval) + 1`, or 0 without
    /// recent, measured demand.
    #[must_use]
    pub fn target(&self, now: Instant) -> usize {
        let (Some(last), Some(interval), Some(latency)) = (self.last_request, self.interval, self.latency) else {
            return 0;
        };
        let interval = interval.max(1e-6);
        let quiet = now.saturating_duration_since(last);
        if quiet > Duration::from_secs_f64(interval * f64::from(IDLE_AFTER)) {
            return 0;
        }
        let n = (latency / interval).ceil() as usize + 1;
        n.min(MAX_TARGET)
    }

    /// Smoothed interval between requests and refill latency (for `status`).
    #[must_use]
    pub fn observed(&self) -> (Option<Duration>, Option<Duration>) {
        (self.interval.map(Duration::from_secs_f64), self.latency.map(Duration::from_secs_f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn no_demand_no_target() {
        let t0 = Instant::now();
        let mut s = Sizing::default();
        assert_eq!(s.target(t0), 0);
        s.request(t0);
        assert_eq!(s.target(t0), 0, "one request is no rate");
        s.refills_started(t0, 1);
        s.refill_done(t0 + us(1500), true);
        s.request(t0 + us(1500));
        assert_eq!(s.target(t0 + us(1500)), 2, "1.5 ms latency / 1.5 ms interval + 1");
        assert_eq!(s.target(t0 + Duration::from_secs(1)), 0, "demand that stopped no longer counts");
    }

    #[test]
    fn faster_demand_or_slower_refills_want_more() {
        let t0 = Instant::now();
        let mut s = Sizing::default();
        for i in 0..50u64 {
            let now = t0 + us(500 * i);
            s.request(now);
            s.refills_started(now, 1);
            s.refill_done(now + us(2000), true);
        }
        // 2 ms latency, 0.5 ms interval: 4 + 1.
        assert_eq!(s.target(t0 + us(500 * 49)), 5);
        let mut failed = Sizing::default();
        failed.refills_started(t0, 1);
        failed.refill_done(t0 + Duration::from_secs(2), false);
        assert_eq!(failed.observed().1, None, "a failed connect measures no latency");
    }
}
