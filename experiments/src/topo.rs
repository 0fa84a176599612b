//! `--topology local`: a client host and a server host in two network namespaces created for
//! the run, joined by the user-space [`DelayLine`] through a TUN device in each. Addresses
//! come from the benchmarking range 198.18.0.0/15: client 198.18.0.1, server 198.18.0.2.
//!
//! ```text
//!  ns <tag>c: 198.18.0.1 ── tun wp0 ─┐           ┌─ tun wp0 ── 198.18.0.2 :ns <tag>s
//!                                    └ delay line┘   (downlink optionally rate-limited)
//! ```
//! The topology checks itself: [`Topology::calibrate`] measures the TCP handshake time (one
//! RTT) and trims the delay line's fixed overhead until it matches the configured RTT.

use crate::delay::{open_tun, DelayLine, Link};
use crate::netns::Netns;
use anyhow::{bail, Result};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Client address.
pub(crate) const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Server address.
pub(crate) const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// See the module docs. Field order matters: the delay line stops before the namespaces go.
#[derive(Debug)]
pub(crate) struct Topology {
    pub(crate) delay: DelayLine,
    pub(crate) client: Netns,
    pub(crate) server: Netns,
    pub(crate) rtt: Duration,
}

impl Topology {
    /// Build it. `rate_bps` limits the server → client direction.
    pub(crate) fn local(tag: &str, rtt: Duration, rate_bps: Option<u64>) -> Result<Self> {
        let client = Netns::create(&format!("{tag}c"))?;
        let server = Netns::create(&format!("{tag}s"))?;
        let tun_c = client.enter(|| open_tun("wp0"))?;
        let tun_s = server.enter(|| open_tun("wp0"))?;
        for (ns, me, peer) in [(&client, CLIENT_IP, SERVER_IP), (&server, SERVER_IP, CLIENT_IP)] {
            ns.ip(&["addr", "add", &me.to_string(), "peer", &peer.to_string(), "dev", "wp0"])?;
            ns.ip(&["link", "set", "wp0", "up"])?;
            // Our own hosts: idle connections keep their window (DESIGN.md).
            ns.sysctl("net.ipv4.tcp_slow_start_after_idle", "0")?;
        }
        let one_way = rtt / 2;
        let up = Link { one_way, rate_bps: None, queue: Duration::ZERO };
        // A bottleneck queue of one RTT of data at the bottleneck rate (at least 5 ms).
        let down = Link { one_way, rate_bps, queue: rtt.max(Duration::from_millis(5)) };
        let delay = DelayLine::start(tun_c, tun_s, up, down);
        Ok(Self { delay, client, server, rtt })
    }

    /// Median TCP handshake time client → server over `n` connects.
    pub(crate) fn measure_rtt(&self, n: usize) -> Result<Duration> {
        let listener = self.server.enter(|| Ok(TcpListener::bind(SocketAddr::from((SERVER_IP, 0)))?))?;
        let addr = listener.local_addr()?;
        let acceptor = std::thread::spawn(move || {
            for _ in 0..n {
                if listener.accept().is_err() {
                    break;
                }
            }
        });
        let mut samples = self.client.enter(move || {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(handshake_time(addr)?);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(v)
        })?;
        let _ = acceptor.join();
        samples.sort();
        Ok(samples[samples.len() / 2])
    }

    /// Trim the delay line's fixed overhead so the measured RTT matches the configured one;
    /// returns the final measurement.
    pub(crate) fn calibrate(&self) -> Result<Duration> {
        let mut measured = self.measure_rtt(50)?;
        for _ in 0..4 {
            let excess = measured.as_nanos() as i64 - self.rtt.as_nanos() as i64;
            if excess.unsigned_abs() * 50 <= self.rtt.as_nanos() as u64 {
                break;
            }
            // The excess is spread over both directions. The line's own overhead is tens of
            // microseconds: a larger excess means a busy machine (the line's thread was not
            // scheduled), and trimming all of it away would leave no delay at all once the
            // machine is idle again. Trim at most an eighth of the path, at most 1 ms.
            let cap = (self.rtt.as_nanos() as i64 / 8).min(1_000_000);
            let off = (self.delay.offset_ns.load(Ordering::Relaxed) + excess / 2).clamp(0, cap);
            self.delay.offset_ns.store(off, Ordering::Relaxed);
            measured = self.measure_rtt(50)?;
        }
        Ok(measured)
    }
}

/// One TCP handshake to `addr`, timed by a prober that polls instead of sleeping: a sleeping
/// thread's wake-up (tens of microseconds on a virtual machine, and variable) would be
/// measured as path delay.
fn handshake_time(addr: SocketAddr) -> Result<Duration> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let SocketAddr::V4(v4) = addr else { bail!("IPv4 only") };
    let sock = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)
        .map_err(|e| anyhow::anyhow!("socket: {e}"))?;
    let t = Instant::now();
    match rustix::net::connect(&sock, &v4) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => bail!("connect {addr}: {e}"),
    }
    let now = Timespec { tv_sec: 0, tv_nsec: 0 };
    loop {
        if poll(&mut [PollFd::new(&sock, PollFlags::OUT)], Some(&now)).is_ok_and(|n| n > 0) {
            break;
        }
        if t.elapsed() > Duration::from_secs(2) {
            bail!("connect {addr}: timed out");
        }
        std::hint::spin_loop();
    }
    Ok(t.elapsed())
}

/// Parse `"200us"`, `"10ms"`, `"1s"`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|_| anyhow::anyhow!("{s:?} is not a duration like 200us or 10ms"))?;
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        _ => bail!("{s:?}: unit must be us, ms or s"),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parse `"100mbit"`, `"1gbit"`, `"500kbit"` into bits/s.
pub(crate) fn parse_rate(s: &str) -> Result<u64> {
    let lower = s.to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(lower.len());
    let (n, unit) = lower.split_at(split);
    let n: f64 = n.parse().map_err(|_| anyhow::anyhow!("{s:?} is not a rate like 100mbit"))?;
    let mult = match unit {
        "bit" | "" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => bail!("{s:?}: unit must be bit, kbit, mbit or gbit"),
    };
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert!(parse_duration("10 parsecs").is_err());
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert!(parse_rate("fast").is_err());
    }

    /// The delay line meets its configured RTT within 5% (root: namespaces and TUN).
    #[test]
    fn delay_line_rtt_matches_configuration() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "must run as root in CI");
            eprintln!("SKIP delay_line_rtt_matches_configuration: needs root (network namespaces, TUN)");
            return;
        }
        for rtt in [Duration::from_micros(200), Duration::from_millis(2), Duration::from_millis(10)] {
            // A user-space delay line is only as punctual as the CPU it gets: on a 2-vCPU
            // machine a burst of other work can stretch one measurement, so up to 3 tries.
            let mut errs = vec![];
            for _ in 0..3 {
                let t = Topology::local(&format!("wpt{}", std::process::id()), rtt, None).unwrap();
                let measured = t.calibrate().unwrap();
                let again = t.measure_rtt(30).unwrap();
                let err = (again.as_secs_f64() - rtt.as_secs_f64()).abs() / rtt.as_secs_f64();
                eprintln!("configured {rtt:?}: calibrated {measured:?}, measured {again:?} ({:.1}% off)", err * 100.0);
                errs.push(err);
                if err <= 0.05 {
                    break;
                }
            }
            assert!(errs.iter().any(|e| *e <= 0.05), "configured {rtt:?}: off by {errs:?} in 3 tries");
        }
    }
}
