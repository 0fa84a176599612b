//! A user-space delay line between two TUN devices (this kernel has no netem): every IP
//! packet read from one side is written to the other after a one-way delay, optionally
//! through a rate-limited bottleneck with a tail-drop queue, in the spirit of Mahimahi.
//!
//! One thread serves both directions. While traffic flows (a packet within the last
//! [`ACTIVE`]) it polls both devices without sleeping, so a packet is timestamped when it
//! arrives rather than when a sleeping thread gets a CPU back (tens of microseconds, and
//! variable, on a virtual machine: too much for a 200 µs path). When the path is quiet it
//! blocks in `ppoll` (nanosecond timeout, timer slack 1 ns) and spins only for the last
//! [`SPIN`] before a delivery. The delay applied is the configured one minus a calibrated
//! `offset` that absorbs the fixed cost of the user-space hop (see `Topology::calibrate`).
//! The price is one busy CPU while an experiment's traffic flows.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spin instead of sleeping when the next delivery is this close.
const SPIN: Duration = Duration::from_micros(60);
/// Keep polling without sleeping this long after the last packet.
const ACTIVE: Duration = Duration::from_millis(50);
/// Largest packet (TUN MTU is 1500; leave room for GSO-less jumbo mistakes).
const MAX_PACKET: usize = 65_536;

/// One direction's link properties.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    /// Propagation delay one way.
    pub(crate) one_way: Duration,
    /// Bottleneck rate in bits/s (None: unlimited).
    pub(crate) rate_bps: Option<u64>,
    /// Queue limit as queueing delay at the bottleneck rate (tail drop beyond it).
    pub(crate) queue: Duration,
}

/// Counters, readable while running.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Packets forwarded.
    pub(crate) forwarded: AtomicU64,
    /// Packets dropped at a full bottleneck queue.
    pub(crate) dropped: AtomicU64,
}

/// The running delay line; stops on drop.
#[derive(Debug)]
pub(crate) struct DelayLine {
    stop: Arc<AtomicBool>,
    /// Subtracted from every one-way delay, in ns (calibration).
    pub(crate) offset_ns: Arc<AtomicI64>,
    pub(crate) stats: Arc<Stats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Dir {
    /// Index of the device read from; the packets go to the other one.
    from: usize,
    to: usize,
    link: Link,
    queue: VecDeque<(Instant, Vec<u8>)>,
    link_free: Instant,
}

impl DelayLine {
    /// Start forwarding between `a` and `b`: `a_to_b` applies to packets read from `a`.
    pub(crate) fn start(a: OwnedFd, b: OwnedFd, a_to_b: Link, b_to_a: Link) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let offset_ns = Arc::new(AtomicI64::new(0));
        let stats = Arc::new(Stats::default());
        let (s, o, st) = (stop.clone(), offset_ns.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("delay-line".into())
            .spawn(move || run(a, b, a_to_b, b_to_a, &s, &o, &st))
            .expect("spawn delay line");
        Self { stop, offset_ns, stats, thread: Some(thread) }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(a: OwnedFd, b: OwnedFd, ab: Link, ba: Link, stop: &AtomicBool, offset: &AtomicI64, stats: &Stats) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // 1 ns slack makes sleeps end on time (best effort: the default slack is only later).
    let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
    let devs = [a, b];
    let now = Instant::now();
    let mut dirs = [
        Dir { from: 0, to: 1, link: ab, queue: VecDeque::new(), link_free: now },
        Dir { from: 1, to: 0, link: ba, queue: VecDeque::new(), link_free: now },
    ];
    let mut buf = vec![0u8; MAX_PACKET];
    let mut last_packet = Instant::now() - ACTIVE;
    while !stop.load(Ordering::Relaxed) {
        // Deliver what is due.
        let now = Instant::now();
        for d in &mut dirs {
            while d.queue.front().is_some_and(|(t, _)| *t <= now) {
                let (_, pkt) = d.queue.pop_front().expect("front exists");
                let _ = rustix::io::write(&devs[d.to], &pkt);
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        let next = dirs.iter().filter_map(|d| d.queue.front().map(|(t, _)| *t)).min();
        let wait = next.map_or(Duration::from_millis(20), |t| t.saturating_duration_since(Instant::now()));
        if wait > SPIN && last_packet.elapsed() >= ACTIVE {
            let sleep = wait - SPIN;
            // rustix's poll is ppoll(2) on Linux: the nanosecond timeout is kept.
            let ts = Timespec { tv_sec: sleep.as_secs() as i64, tv_nsec: i64::from(sleep.subsec_nanos()) };
            let _ = poll(&mut [PollFd::new(&devs[0], PollFlags::IN), PollFd::new(&devs[1], PollFlags::IN)], Some(&ts));
        }
        // Take in everything that has arrived (non-blocking reads).
        for d in &mut dirs {
            loop {
                let size = match rustix::io::read(&devs[d.from], &mut buf[..]) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                let arrival = Instant::now();
                last_packet = arrival;
                let one_way = d.link.one_way.saturating_sub(Duration::from_nanos(offset.load(Ordering::Relaxed).max(0) as u64));
                let deliver = match d.link.rate_bps {
                    None => arrival + one_way,
                    Some(rate) => {
                        let start = d.link_free.max(arrival);
                        if start.saturating_duration_since(arrival) > d.link.queue {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        d.link_free = start + Duration::from_nanos(size as u64 * 8 * 1_000_000_000 / rate.max(1));
                        d.link_free + one_way
                    }
                };
                d.queue.push_back((deliver, buf[..size].to_vec()));
            }
        }
    }
}

/// Open a TUN device named `name` in the calling thread's network namespace (no packet
/// information header, non-blocking).
pub(crate) fn open_tun(name: &str) -> anyhow::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let tun = rustix::fs::open("/dev/net/tun", OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| anyhow::anyhow!("opening /dev/net/tun: {}", std::io::Error::from(e)))?;
    // struct ifreq: 16-byte name, then flags (short) in the union.
    let mut ifr = [0u8; 40];
    let n = name.len().min(15);
    ifr[..n].copy_from_slice(&name.as_bytes()[..n]);
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq. libc: rustix has no TUN ioctls.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) } != 0 {
        anyhow::bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(tun)
}
