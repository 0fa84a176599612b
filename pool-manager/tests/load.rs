//! Load: 1,000 concurrently alive, short-lived function processes through one pool manager.
//!
//! Each function is a separate process started under the preload shim: this test binary
//! re-executed to run only [`load_function_process`] (about 1 ms of CPU and a few MB of RSS
//! each; a Python function takes ~45 ms to start on this machine, ~130 ms through pyenv). A
//! function connects to a real nginx through the shim's `connect()`, sends one HTTP/1.1
//! keep-alive GET, checks the 200, reports on a FIFO, and then holds its socket until the
//! test closes a barrier pipe (its stdin) — so all 1,000 functions and their sockets exist at
//! once — and then closes the socket (the shim gives it back) and exits.
//!
//! Two identical rounds after a warm-up. Checked: zero errors; every function asked the
//! daemon; the daemon's fds return to the baseline apart from the sockets it pools (bounded
//! by `max_idle`); no lease outlives its function; RSS growth between the rounds is bounded;
//! in round 2 most requests travel on connections round 1 already used. Reported: wall
//! times, daemon fds and RSS, p50/p99 hand-out latency (daemon histogram) and the functions'
//! own `connect()` times, warm/reuse/miss hand-outs, nginx connections.
//!
//! Run: `cargo build --release --workspace && cargo test --release -p pool-manager --test load
//! -- --test-threads=1 --nocapture` (root).

mod common;

use common::*;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Functions per round, all alive at the same time.
const FUNCTIONS: usize = 1000;
/// Functions in the warm-up round.
const WARMUP: usize = 50;
/// Functions started but not yet reported: start-up in waves, not 1,000 exec()s at once on a
/// 2-CPU machine.
const WINDOW: usize = 64;
/// Pool settings: enough ready sockets for the start-up waves; room for every socket of a
/// round (all leased at once) and for all of them to come back.
const MIN_IDLE: usize = 32;
const MAX_IDLE: usize = 1100;
const MAX_PER_DESTINATION: usize = 1200;
/// nginx must hold every function's connection plus the pool's at once.
const NGINX_WORKER_CONNECTIONS: u32 = 4096;
/// Whole test (about 5 s when it passes here), and the parts of one round.
const TEST_DEADLINE: Duration = Duration::from_secs(150);
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// A function waits at most this long at the barrier (the test normally releases it), so
/// none can outlive a test that was killed without running its guards.
const BARRIER_TIMEOUT_MS: i32 = 120_000;

const ENV_ADDR: &str = "WARMPOOL_LOAD_ADDR";
const ENV_PATH: &str = "WARMPOOL_LOAD_PATH";
const ENV_REPORT: &str = "WARMPOOL_LOAD_REPORT";

// ---------------------------------------------------------------------------------------
// The function (runs in a child process)
// ---------------------------------------------------------------------------------------

/// The body of one function process; does nothing unless started by
/// `thousand_concurrent_functions` (which sets the environment).
#[test]
#[ignore = "the body of one function process, re-executed by thousand_concurrent_functions"]
fn load_function_process() {
    let (Ok(addr), Ok(path), Ok(report)) = (std::env::var(ENV_ADDR), std::env::var(ENV_PATH), std::env::var(ENV_REPORT)) else {
        return;
    };
    let pid = std::process::id();
    let result = addr.parse::<SocketAddr>().map_err(|e| format!("bad {ENV_ADDR}: {e}")).and_then(|a| one_request(a, &path));
    let mut line = match &result {
        Ok((_, port, us)) => format!("OK {pid} {port} {us}\n"),
        Err(e) => format!("ERR {pid} {}\n", e.replace('\n', " ")),
    };
    line.truncate(400); // one write below PIPE_BUF: lines from 1,000 writers never interleave
    if !line.ends_with('\n') {
        line.push('\n');
    }
    // O_NONBLOCK: fail at once (ENXIO) rather than block if the test is gone; then blocking.
    let mut fifo = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&report)
        .unwrap_or_else(|e| panic!("open report FIFO {report}: {e}"));
    // SAFETY: fcntl on our own open fd.
    unsafe { libc::fcntl(fifo.as_raw_fd(), libc::F_SETFL, 0) };
    fifo.write_all(line.as_bytes()).expect("write report");
    drop(fifo);
    let (stream, _, _) = match result {
        Ok(r) => r,
        Err(e) => panic!("function failed: {e}"),
    };
    // Barrier: hold the socket until the test closes the write end of our stdin.
    let mut p = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, BARRIER_TIMEOUT_MS) };
    assert!(r > 0, "barrier not released within {BARRIER_TIMEOUT_MS} ms (poll -> {r})");
    let mut b = [0u8; 1];
    assert_eq!(std::io::stdin().read(&mut b).expect("read barrier"), 0, "barrier carried data");
    // Closing gives the socket back to the pool (clean: the reply was read in full).
    drop(stream);
}

/// connect() through the shim, one keep-alive GET, the whole reply read.
/// Returns (stream, local port, connect() time in µs).
fn one_request(addr: SocketAddr, path: &str) -> Result<(TcpStream, u16, u128), String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let connect_us = t0.elapsed().as_micros();
    let port = s.local_addr().map_err(|e| format!("local_addr: {e}"))?.port();
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..h]).into_owned();
            let len = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().to_owned()))
                .ok_or_else(|| format!("no Content-Length: {head:?}"))?
                .parse::<usize>()
                .map_err(|e| format!("Content-Length: {e}"))?;
            if buf.len() >= h + 4 + len {
                let status = head.split_whitespace().nth(1).unwrap_or("");
                let body = &buf[h + 4..h + 4 + len];
                if status != "200" || body != b"hello\n" || buf.len() != h + 4 + len {
                    return Err(format!("unexpected reply: {:?}", String::from_utf8_lossy(&buf)));
                }
                if head.to_ascii_lowercase().contains("connection: close") {
                    return Err(format!("server closes the connection: {head:?}"));
                }
                return Ok((s, port, connect_us));
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&buf))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

/// The children of one round: on drop (a failure anywhere), every one not yet reaped is
/// SIGKILLed by PID and reaped. A PID is only signalled while its child is unreaped.
struct Functions(Vec<Child>);

impl Functions {
    fn kill_all(&mut self) {
        for c in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on the PID of our own child, not yet reaped (checked above).
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
            }
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

impl Drop for Functions {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn raise_nofile(want: u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into r.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    if r.rlim_cur >= want {
        return;
    }
    let new = libc::rlimit { rlim_cur: want, rlim_max: r.rlim_max.max(want) };
    // SAFETY: setrlimit reads r; raising the hard limit needs root, which the test has.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) };
    assert_eq!(rc, 0, "setrlimit(RLIMIT_NOFILE, {want}): {}", std::io::Error::last_os_error());
}

fn daemon_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

fn rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Counters and the hand-out latency histogram, from one scrape.
#[derive(Debug, Clone, Default)]
struct Snap {
    warm: f64,
    reuse: f64,
    miss: f64,
    fallbacks: BTreeMap<String, f64>,
    discarded: BTreeMap<String, f64>,
    returned: f64,
    clients: f64,
    connects_ok: f64,
    /// (upper bound in seconds, cumulative count); the last is +Inf.
    latency: Vec<(f64, f64)>,
    /// Pool sockets for the destination: (idle, quarantine, leased, connecting).
    pool: (f64, f64, f64, f64),
}

impl Snap {
    fn take(d: &Daemon, dest: &str) -> Snap {
        let body = d.metrics();
        let sum = |p: &str| metric_samples(&body, p).iter().map(|s| s.1).sum::<f64>();
        let by_label = |p: &str, label: &str| -> BTreeMap<String, f64> {
            metric_samples(&body, p)
                .into_iter()
                .filter_map(|(l, v)| {
                    let key = l.split(&format!("{label}=\"")).nth(1)?.split('"').next()?.to_owned();
                    Some((key, v))
                })
                .collect()
        };
        let latency = metric_samples(&body, "warmpool_handout_latency_seconds_bucket")
            .into_iter()
            .map(|(l, v)| {
                let le = l.split("le=\"").nth(1).and_then(|x| x.split('"').next()).expect("le label");
                (if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le value") }, v)
            })
            .collect();
        let pool_prefix = format!("warmpool_pool_sockets{{dest=\"{dest}\"");
        let state = |st: &str| {
            metric_samples(&body, &pool_prefix).iter().filter(|(l, _)| l.contains(&format!("state=\"{st}\""))).map(|s| s.1).sum::<f64>()
        };
        Snap {
            warm: sum("warmpool_handouts_total{kind=\"warm\""),
            reuse: sum("warmpool_handouts_total{kind=\"reuse\""),
            miss: sum("warmpool_handouts_total{kind=\"miss\""),
            fallbacks: by_label("warmpool_fallbacks_total", "reason"),
            discarded: by_label("warmpool_discarded_total", "reason"),
            returned: sum("warmpool_returned_total"),
            clients: sum("warmpool_clients_total"),
            connects_ok: sum("warmpool_connects_total{result=\"ok\""),
            latency,
            pool: (state("idle"), state("quarantine"), state("leased"), state("connecting")),
        }
    }

    fn pooled(&self) -> usize {
        (self.pool.0 + self.pool.1 + self.pool.2 + self.pool.3) as usize
    }

    /// What happened between `before` and `self`.
    fn since(&self, before: &Snap) -> Snap {
        let diff = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
            a.iter().map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0))).filter(|(_, v)| *v != 0.0).collect()
        };
        Snap {
            warm: self.warm - before.warm,
            reuse: self.reuse - before.reuse,
            miss: self.miss - before.miss,
            fallbacks: diff(&self.fallbacks, &before.fallbacks),
            discarded: diff(&self.discarded, &before.discarded),
            returned: self.returned - before.returned,
            clients: self.clients - before.clients,
            connects_ok: self.connects_ok - before.connects_ok,
            latency: self.latency.iter().zip(&before.latency).map(|((le, a), (_, b))| (*le, a - b)).collect(),
            pool: self.pool,
        }
    }

    /// Quantile `q` of the latency histogram, in µs: linear within the bucket, and the bucket's
    /// upper bound. `None` without observations.
    fn latency_quantile_us(&self, q: f64) -> Option<(f64, f64)> {
        let total = self.latency.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let target = q * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.latency {
            if cum >= target {
                if le.is_infinite() {
                    return Some((lo * 1e6, f64::INFINITY));
                }
                let frac = if cum > below { (target - below) / (cum - below) } else { 1.0 };
                return Some(((lo + frac * (le - lo)) * 1e6, le * 1e6));
            }
            lo = le;
            below = cum;
        }
        None
    }
}

/// Daemon state at rest: fds, RSS and pool sockets. The fds are counted before the scrape
/// (the daemon closes a metrics connection a moment after the reply).
#[derive(Debug, Clone)]
struct Rest {
    fds: usize,
    rss_kib: u64,
    snap: Snap,
}

impl Rest {
    /// fds that are not pooled sockets (listeners, runtime, clients...).
    fn other_fds(&self) -> i64 {
        self.fds as i64 - self.snap.pooled() as i64
    }
}

/// Waits (≤ 20 s) until no lease, connect or quarantined socket is left and the fd count is
/// steady (four samples 100 ms apart), then samples.
fn at_rest(d: &Daemon, dest: &str) -> Rest {
    let pid = d.pid();
    let mut last: Option<Rest> = None;
    let mut steady = 0;
    let ok = wait_until(Duration::from_secs(20), || {
        thread_sleep_ms(100);
        let before = daemon_fds(pid);
        let snap = Snap::take(d, dest);
        let quiet = snap.pool.1 == 0.0 && snap.pool.2 == 0.0 && snap.pool.3 == 0.0;
        let r = Rest { fds: before, rss_kib: rss_kib(pid), snap };
        steady = match &last {
            Some(l) if quiet && l.fds == r.fds && l.snap.pooled() == r.snap.pooled() => steady + 1,
            _ => 0,
        };
        last = Some(r);
        steady >= 3
    });
    let r = last.expect("sampled at least once");
    assert!(ok, "daemon did not come to rest within 20 s: fds {} pool (idle, quarantine, leased, connecting) {:?}\n--- daemon log ---\n{}", r.fds, r.snap.pool, tail(&d.log(), 40));
    r
}

fn thread_sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// One function's report.
#[derive(Debug, Clone)]
struct Report {
    pid: u32,
    local_port: u16,
    connect_us: u64,
}

#[derive(Debug)]
struct Round {
    reports: Vec<Report>,
    errors: Vec<String>,
    /// First spawn → all reported; first spawn → all exited.
    ready: Duration,
    wall: Duration,
    /// Daemon while all functions were alive and holding their sockets.
    peak_fds: usize,
    peak_rss_kib: u64,
    peak_leased: f64,
}

fn pipe_cloexec() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds, which we own from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds from pipe2.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Reads whatever complete lines the FIFO holds (waiting up to `wait`).
fn read_lines(fifo: &mut fs::File, pending: &mut Vec<u8>, wait: Duration) -> Vec<String> {
    let mut p = libc::pollfd { fd: fifo.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
    let mut chunk = [0u8; 65536];
    loop {
        match fifo.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read report FIFO: {e}"),
        }
    }
    let mut out = Vec::new();
    while let Some(i) = pending.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = pending.drain(..=i).collect();
        out.push(String::from_utf8_lossy(&line[..i]).into_owned());
    }
    out
}

/// Starts `n` functions (at most `WINDOW` not yet reported at any time), waits until every one
/// has reported, checks they are all alive at once, releases the barrier, waits for the exits.
fn run_round(d: &Daemon, nginx: &Nginx, dir: &Path, label: &str, n: usize, deadline: Instant) -> Round {
    let fifo_path = dir.join(format!("report-{label}.fifo"));
    let c = std::ffi::CString::new(fifo_path.to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo: {}", std::io::Error::last_os_error());
    // Read and write: the open never blocks and the FIFO never reports EOF between writers.
    let mut fifo = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&fifo_path).expect("open FIFO");
    let (barrier_r, barrier_w) = pipe_cloexec();
    let log = fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("functions-{label}.log"))).expect("functions log");
    let exe = std::env::current_exe().expect("current_exe");
    let addr = nginx.addr().to_string();

    let mut fns = Functions(Vec::with_capacity(n));
    let mut reported: HashSet<u32> = HashSet::new();
    let mut reports = Vec::with_capacity(n);
    let mut errors = Vec::new();
    let mut pending = Vec::new();
    let t0 = Instant::now();
    let report_deadline = deadline.min(t0 + REPORT_TIMEOUT);
    let mut last_exit_check = Instant::now();
    while reports.len() + errors.len() < n {
        while fns.0.len() < n && fns.0.len() - (reports.len() + errors.len()) < window() {
            let i = fns.0.len();
            let mut cmd = Command::new(&exe);
            cmd.args(["load_function_process", "--exact", "--ignored", "--test-threads=1", "--quiet"])
                .env(ENV_ADDR, &addr)
                .env(ENV_PATH, format!("/load/{label}/{i}"))
                .env(ENV_REPORT, &fifo_path)
                .env_remove("RUST_TEST_THREADS")
                .stdin(Stdio::from(barrier_r.try_clone().expect("dup barrier")))
                .stdout(Stdio::from(log.try_clone().expect("dup log")))
                .stderr(Stdio::from(log.try_clone().expect("dup log")));
            shim_env(&mut cmd, d);
            fns.0.push(cmd.spawn().unwrap_or_else(|e| panic!("{label}: spawning function #{i}: {e}")));
        }
        let lines = read_lines(&mut fifo, &mut pending, Duration::from_millis(50));
        absorb(lines, &mut reported, &mut reports, &mut errors);
        // A function that exited without a report failed before it could write one. Exits are
        // collected before the FIFO is drained: a report is written before its writer exits.
        if last_exit_check.elapsed() >= Duration::from_millis(500) {
            last_exit_check = Instant::now();
            let exited: Vec<(u32, std::process::ExitStatus)> =
                fns.0.iter_mut().filter_map(|c| c.try_wait().ok().flatten().map(|st| (c.id(), st))).collect();
            let lines = read_lines(&mut fifo, &mut pending, Duration::ZERO);
            absorb(lines, &mut reported, &mut reports, &mut errors);
            for (pid, st) in exited {
                if reported.insert(pid) {
                    errors.push(format!("pid {pid}: exited ({st}) without a report"));
                }
            }
        }
        assert!(
            Instant::now() < report_deadline,
            "{label}: only {} of {n} functions reported within {:?} ({} started, {} errors: {:?})\n--- functions log ---\n{}\n--- daemon log ---\n{}",
            reports.len() + errors.len(),
            report_deadline - t0,
            fns.0.len(),
            errors.len(),
            &errors[..errors.len().min(5)],
            tail(&fs::read_to_string(dir.join(format!("functions-{label}.log"))).unwrap_or_default(), 30),
            tail(&d.log(), 30)
        );
    }
    let ready = t0.elapsed();
    // Every function is alive and holds its socket now.
    let alive = fns.0.iter_mut().filter_map(|c| c.try_wait().ok()).filter(Option::is_none).count();
    let peak_fds = daemon_fds(d.pid());
    let peak_rss_kib = rss_kib(d.pid());
    let peak_leased = Snap::take(d, &addr).pool.2;
    if errors.is_empty() {
        assert_eq!(alive, n, "{label}: only {alive} of {n} functions alive at the barrier");
    }
    drop(barrier_w);
    let exit_deadline = deadline.min(Instant::now() + EXIT_TIMEOUT);
    for c in &mut fns.0 {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() && reports.iter().any(|r| r.pid == c.id()) {
                        errors.push(format!("pid {}: exit {st}", c.id()));
                    }
                    break;
                }
                Ok(None) => {
                    assert!(Instant::now() < exit_deadline, "{label}: functions did not exit within {EXIT_TIMEOUT:?} of the barrier");
                    thread_sleep_ms(5);
                }
                Err(e) => panic!("wait: {e}"),
            }
        }
    }
    let wall = t0.elapsed();
    fns.0.clear(); // all reaped
    drop(fifo);
    let _ = fs::remove_file(&fifo_path);
    Round { reports, errors, ready, wall, peak_fds, peak_rss_kib, peak_leased }
}

/// Takes reports (`OK pid port µs` / `ERR pid text`) into the round's tallies.
fn absorb(lines: Vec<String>, reported: &mut HashSet<u32>, reports: &mut Vec<Report>, errors: &mut Vec<String>) {
    for line in lines {
        let f: Vec<&str> = line.splitn(4, ' ').collect();
        match f.as_slice() {
            ["OK", pid, port, us] => {
                let pid: u32 = pid.parse().expect("pid");
                reported.insert(pid);
                reports.push(Report { pid, local_port: port.parse().expect("port"), connect_us: us.parse().expect("µs") });
            }
            ["ERR", pid, rest @ ..] => {
                reported.insert(pid.parse().expect("pid"));
                errors.push(format!("pid {pid}: {}", rest.join(" ")));
            }
            _ => errors.push(format!("unparsable report {line:?}")),
        }
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// `WINDOW`, or `WARMPOOL_LOAD_WINDOW` (1: one function starting at a time; the connect()
/// times then show the path without CPU contention).
fn window() -> usize {
    std::env::var("WARMPOOL_LOAD_WINDOW").ok().and_then(|v| v.parse().ok()).filter(|w| *w > 0).unwrap_or(WINDOW)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[test]
fn thousand_concurrent_functions() {
    if !require_root("thousand_concurrent_functions") || !require_tool("nginx") {
        return;
    }
    let started = Instant::now();
    let deadline = started + TEST_DEADLINE;
    let _ = preload_path();
    // The daemon holds every function's link and socket at once, nginx every connection:
    // both inherit this limit.
    raise_nofile(16_384);

    let nginx = Nginx::start_with_connections("75s", NGINX_WORKER_CONNECTIONS);
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&format!(
        "[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = {MIN_IDLE}\nmax_idle = {MAX_IDLE}\n\
         max_per_destination = {MAX_PER_DESTINATION}\n"
    ));
    let dir = TempDir::new();

    // Warm-up: fill the pool (as the function's tenant: same uid and cgroup), then a small
    // round through the same machinery, so that the baseline includes runtime threads and
    // allocator arenas.
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).arg(&dest).env_remove("LD_PRELOAD").output().expect("prewarm");
    assert!(o.status.success(), "prewarm: {}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_until(Duration::from_secs(10), || Snap::take(&d, &dest).pool.0 >= MIN_IDLE as f64), "pool never reached {MIN_IDLE} idle");
    let w = run_round(&d, &nginx, dir.path(), "warmup", WARMUP, deadline);
    assert!(w.errors.is_empty(), "warm-up errors: {:?}", w.errors);
    let base = at_rest(&d, &dest);

    let s0 = base.snap.clone();
    let r1 = run_round(&d, &nginx, dir.path(), "r1", FUNCTIONS, deadline);
    let rest1 = at_rest(&d, &dest);
    let r2 = run_round(&d, &nginx, dir.path(), "r2", FUNCTIONS, deadline);
    let rest2 = at_rest(&d, &dest);
    let m1 = rest1.snap.since(&s0);
    let m2 = rest2.snap.since(&rest1.snap);
    let both = rest2.snap.since(&s0);

    // nginx's view: which connection carried which request.
    let log = nginx.log_entries();
    let conns = |p: &str| -> HashSet<u64> { log.iter().filter(|e| e.2.starts_with(p)).map(|e| e.0).collect() };
    let before_r2: HashSet<u64> = conns("/load/warmup/").union(&conns("/load/r1/")).copied().collect();
    let r2_requests: Vec<u64> = log.iter().filter(|e| e.2.starts_with("/load/r2/")).map(|e| e.0).collect();
    let r2_on_old = r2_requests.iter().filter(|c| before_r2.contains(c)).count();
    let r1_conns = conns("/load/r1/").len();
    let r2_conns = conns("/load/r2/").len();
    let rounds_conns = conns("/load/r1/").union(&conns("/load/r2/")).count();
    let requests = log.iter().filter(|e| e.2.starts_with("/load/r")).count();
    // The functions' view: local ports (a port is one connection at a time).
    let ports = |r: &Round| -> HashSet<u16> { r.reports.iter().map(|x| x.local_port).collect() };
    let r2_ports_from_r1 = ports(&r2).intersection(&ports(&r1)).count();

    let connect_q = |r: &Round| {
        let mut v: Vec<u64> = r.reports.iter().map(|x| x.connect_us).collect();
        v.sort_unstable();
        (percentile(&v, 0.5), percentile(&v, 0.99), v.last().copied().unwrap_or(0))
    };
    let (c1_50, c1_99, c1_max) = connect_q(&r1);
    let (c2_50, c2_99, c2_max) = connect_q(&r2);
    let errors = r1.errors.len() + r2.errors.len();

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let q = |m: &Snap, x: f64| match m.latency_quantile_us(x) {
        Some((_, le)) if le.is_infinite() => "> 100 ms".to_owned(),
        Some((v, le)) => format!("{v:.1} µs (≤ {le:.0})"),
        None => "n/a".to_owned(),
    };
    println!("\n=== load: {FUNCTIONS} concurrently alive functions x 2 rounds through one pool manager ({cpus} CPUs) ===");
    println!("function: a process under the shim: connect() + one keep-alive GET to nginx, socket held until all {FUNCTIONS} are alive, then close + exit");
    println!("pool: reuse, min_idle {MIN_IDLE}, max_idle {MAX_IDLE}, max_per_destination {MAX_PER_DESTINATION}; start-up window {}", window());
    println!();
    println!("| round | wall | all alive after | errors | warm | reuse | miss | hand-out p50 (daemon) | hand-out p99 (daemon) | connect() p50 / p99 (function) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, r, m, (c50, c99)) in [("1", &r1, &m1, (c1_50, c1_99)), ("2", &r2, &m2, (c2_50, c2_99))] {
        println!(
            "| {name} | {:.2} s | {:.2} s | {} | {} | {} | {} | {} | {} | {c50} / {c99} µs |",
            r.wall.as_secs_f64(),
            r.ready.as_secs_f64(),
            r.errors.len(),
            m.warm,
            m.reuse,
            m.miss,
            q(m, 0.5),
            q(m, 0.99)
        );
    }
    println!();
    println!(
        "daemon at rest (baseline / after round 1 / after round 2): fds {} / {} / {} (pooled sockets {} / {} / {}, other fds {} / {} / {}); RSS {:.1} / {:.1} / {:.1} MiB",
        base.fds,
        rest1.fds,
        rest2.fds,
        base.snap.pooled(),
        rest1.snap.pooled(),
        rest2.snap.pooled(),
        base.other_fds(),
        rest1.other_fds(),
        rest2.other_fds(),
        mib(base.rss_kib),
        mib(rest1.rss_kib),
        mib(rest2.rss_kib)
    );
    println!(
        "daemon with all {FUNCTIONS} alive: {} / {} fds, RSS {:.1} / {:.1} MiB, leased {} / {} (round 1 / 2); max connect() {c1_max} / {c2_max} µs",
        r1.peak_fds,
        r2.peak_fds,
        mib(r1.peak_rss_kib),
        mib(r2.peak_rss_kib),
        r1.peak_leased,
        r2.peak_leased
    );
    println!("daemon: fallbacks {:?}, discarded {:?}, returned {}, own connects {}", both.fallbacks, both.discarded, both.returned, both.connects_ok);
    println!(
        "nginx: {requests} requests on {rounds_conns} connections (round 1: {r1_conns}, round 2: {r2_conns}); round 2: {r2_on_old} of {} requests on \
         connections of earlier rounds ({r2_ports_from_r1} local ports seen in round 1); total test time {:.1} s",
        r2_requests.len(),
        started.elapsed().as_secs_f64()
    );
    println!("=== end ===\n");

    // Zero errors: every function got its 200, reported, and exited 0.
    assert_eq!(errors, 0, "errors: round 1 {:?} round 2 {:?}", &r1.errors[..r1.errors.len().min(10)], &r2.errors[..r2.errors.len().min(10)]);
    assert_eq!(r1.reports.len(), FUNCTIONS);
    assert_eq!(r2.reports.len(), FUNCTIONS);
    assert_eq!(requests, 2 * FUNCTIONS, "nginx logged {requests} round requests");
    // Every function went through the shim and asked the daemon exactly once.
    for (name, m) in [("round 1", &m1), ("round 2", &m2)] {
        assert_eq!(m.clients, FUNCTIONS as f64, "{name}: {} daemon clients", m.clients);
        assert_eq!(m.warm + m.reuse + m.miss, FUNCTIONS as f64, "{name}: hand-outs {m:?}");
    }
    // No lease outlives its function, nothing is left connecting or quarantined (at_rest
    // waited for that), and the daemon's own fds (all but the pooled sockets) are back at the
    // baseline: no fd leak per client or per hand-out.
    for (name, r) in [("round 1", &rest1), ("round 2", &rest2)] {
        assert!(
            r.other_fds() <= base.other_fds() + 4,
            "{name}: daemon holds {} fds besides its {} pooled sockets, baseline {}: fd leak",
            r.other_fds(),
            r.snap.pooled(),
            base.other_fds()
        );
        assert!(r.fds <= base.fds + MAX_IDLE + 4, "{name}: {} fds, baseline {} + max_idle {MAX_IDLE}", r.fds, base.fds);
    }
    // Round 2 is round 1 again on the same pool: no further fds or sockets at rest.
    assert!(rest2.fds <= rest1.fds + MIN_IDLE, "daemon fds grew from {} to {} between identical rounds", rest1.fds, rest2.fds);
    // Memory: generous, catches a leak per function (1,000 functions x 64 KiB), not noise.
    let growth = rest2.rss_kib as i64 - rest1.rss_kib as i64;
    assert!(growth < 64 * 1024, "daemon RSS grew by {growth} KiB between two identical rounds");
    // Pooling works under this load: the 1,000 sockets round 1 held come back and carry
    // round 2; without the pool both rounds would need 2,000 connections.
    let handed_out_r1 = (m1.warm + m1.reuse) as usize;
    assert!(
        m2.reuse >= 0.9 * handed_out_r1.min(FUNCTIONS) as f64,
        "round 2 reused {} sockets, round 1 handed out {handed_out_r1}",
        m2.reuse
    );
    assert!(
        r2_on_old >= FUNCTIONS * 8 / 10,
        "round 2: only {r2_on_old} of {FUNCTIONS} requests on connections of earlier rounds"
    );
    assert!(rounds_conns < 2 * FUNCTIONS * 6 / 10, "{requests} requests used {rounds_conns} connections");
}
