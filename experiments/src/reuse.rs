//! The reuse-latency experiment (see the crate docs).

use crate::hosts::Hosts;
use crate::nginx::Nginx;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A configuration of the reuse test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Config {
    /// No shim.
    Baseline,
    /// The shim intercepting but never asking the daemon.
    DummyShim,
    /// Pool manager, embedded default (first-use warm pools).
    Warm,
    /// Pool manager, a reuse pool for the server.
    Reuse,
    /// The reuse pool with prefetch: the socket is offered while the process starts.
    Prefetch,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::DummyShim => "dummy-shim",
            Self::Warm => "warm",
            Self::Reuse => "reuse",
            Self::Prefetch => "prefetch",
        }
    }
    /// Median from the source study (two CloudLab m510 nodes, 10 GbE), µs.
    fn source_median_us(self) -> Option<f64> {
        match self {
            Self::Baseline => Some(446.0),
            Self::DummyShim => Some(459.0),
            Self::Reuse => Some(322.0),
            Self::Warm | Self::Prefetch => None,
        }
    }
}

/// One function invocation: connect, GET, read the whole reply, close; with `peer`, then
/// also exchange one line with a peer at that address; print µs.
pub(crate) fn function(addr: SocketAddr, peer: Option<SocketAddr>) -> Result<()> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let connected = t0.elapsed();
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: warmpool\r\nConnection: keep-alive\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let body_len = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("server closed before the reply");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .context("reply without content-length")?;
            break end + 4 + len;
        }
    };
    while buf.len() < body_len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("short body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    drop(s);
    if let Some(p) = peer {
        let mut s = TcpStream::connect(p).with_context(|| format!("peer {p}"))?;
        s.write_all(b"ping\n")?;
        let mut got = [0u8; 5];
        s.read_exact(&mut got)?;
        if &got != b"ping\n" {
            bail!("peer answered {got:?}");
        }
    }
    let us = t0.elapsed().as_secs_f64() * 1e6;
    println!("{us:.1} {:.1}", connected.as_secs_f64() * 1e6);
    Ok(())
}

pub(crate) struct Daemon {
    child: Child,
    pub(crate) socket: PathBuf,
    bin: PathBuf,
}

impl Daemon {
    /// Start a pool manager on the client host.
    pub(crate) fn start(hosts: &Hosts, bin: &Path, socket: PathBuf, args: &[String], log: &Path) -> Result<Self> {
        let child = hosts
            .client(bin, &[])
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting pool-manager")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("pool-manager did not start:\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self { child, socket, bin: bin.into() })
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let o = Command::new(&self.bin).args(args).arg("--socket").arg(&self.socket).env_remove("LD_PRELOAD").output()?;
        if !o.status.success() {
            bail!("pool-manager {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started, by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub(crate) fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// The project's binaries next to this one: (pool-manager, libwarmpool_preload.so).
pub(crate) fn artifacts() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let bindir = exe.parent().context("binary directory")?;
    let pool_manager = bindir.join("pool-manager");
    let preload = bindir.join("libwarmpool_preload.so");
    for p in [&pool_manager, &preload] {
        if !p.exists() {
            bail!("{} missing: build the workspace first (cargo build --release)", p.display());
        }
    }
    Ok((pool_manager, preload))
}

/// A scratch directory for one run, removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(what: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("warmpool-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // WARMPOOL_KEEP=1 keeps the run's logs and configurations for inspection.
        if std::env::var_os("WARMPOOL_KEEP").is_some_and(|v| v == "1") {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn run(runs: usize, configs: &[Config], out: Option<PathBuf>, hosts: &Hosts) -> Result<()> {
    let (pool_manager, preload) = artifacts()?;
    let out = out.unwrap_or_else(|| PathBuf::from("results/reuse").join(timestamp()));
    std::fs::create_dir_all(&out)?;
    let work = Scratch::new("reuse")?;
    run_in(runs, configs, &out, &work.0, &pool_manager, &preload, hosts)
}

fn run_in(runs: usize, configs: &[Config], out: &Path, work: &Path, pool_manager: &Path, preload: &Path, hosts: &Hosts) -> Result<()> {
    let nginx = Nginx::start(&work.join("nginx"), hosts)?;
    let dest = nginx.addr.to_string();
    // `warm` runs on the embedded default; `reuse` names the server as a reuse pool.
    let warm = Daemon::start(hosts, pool_manager, work.join("warm.sock"), &[], &work.join("warm.log"))?;
    let reuse =
        Daemon::start(hosts, pool_manager, work.join("reuse.sock"), &["--pool".into(), format!("{dest}=reuse:http")], &work.join("reuse.log"))?;
    let prefetch = Daemon::start(
        hosts,
        pool_manager,
        work.join("prefetch.sock"),
        &["--pool".into(), format!("{dest}=reuse:http+prefetch")],
        &work.join("prefetch.log"),
    )?;
    for d in [&warm, &reuse, &prefetch] {
        d.cli(&["prewarm", &dest]).ok();
    }
    std::thread::sleep(Duration::from_millis(200));
    let exe = std::env::current_exe()?;
    let invoke = |c: Config| -> Result<(f64, f64)> {
        let pre = preload.as_os_str();
        let env: Vec<(&str, &std::ffi::OsStr)> = match c {
            Config::Baseline => vec![],
            Config::DummyShim => {
                vec![("LD_PRELOAD", pre), ("WARMPOOL_PASSTHROUGH", "1".as_ref()), ("WARMPOOL_SOCKET", warm.socket.as_os_str())]
            }
            Config::Warm => vec![("LD_PRELOAD", pre), ("WARMPOOL_SOCKET", warm.socket.as_os_str())],
            Config::Reuse => vec![("LD_PRELOAD", pre), ("WARMPOOL_SOCKET", reuse.socket.as_os_str())],
            Config::Prefetch => vec![("LD_PRELOAD", pre), ("WARMPOOL_SOCKET", prefetch.socket.as_os_str())],
        };
        let mut cmd = hosts.client(&exe, &env);
        cmd.arg("function").arg(&dest).env_remove("LD_PRELOAD").env_remove("WARMPOOL_PASSTHROUGH");
        let o = cmd.output()?;
        if !o.status.success() {
            bail!("{} function failed: {}", c.name(), String::from_utf8_lossy(&o.stderr));
        }
        let text = String::from_utf8_lossy(&o.stdout);
        let mut f = text.split_whitespace().map(str::parse::<f64>);
        match (f.next(), f.next()) {
            (Some(Ok(total)), Some(Ok(connect))) => Ok((total, connect)),
            _ => bail!("{} function printed {text:?}", c.name()),
        }
    };
    // Warm-up, not recorded: page cache, nginx, both pools.
    for _ in 0..10 {
        for &c in configs {
            invoke(c)?;
        }
    }
    let mut csv = String::from("config,run,latency_us,connect_us\n");
    let mut hists: Vec<Histogram<u64>> = configs.iter().map(|_| Histogram::new(3).expect("histogram")).collect();
    let mut connects = hists.clone();
    let mut samples: Vec<Vec<f64>> = configs.iter().map(|_| Vec::with_capacity(runs)).collect();
    let bar = crate::progress(runs as u64, "reuse runs per configuration");
    for run in 0..runs {
        for (i, &c) in configs.iter().enumerate() {
            let (us, connect_us) = invoke(c)?;
            let _ = writeln!(csv, "{},{run},{us:.1},{connect_us:.1}", c.name());
            hists[i].record((us * 10.0) as u64)?;
            connects[i].record((connect_us * 10.0) as u64)?;
            samples[i].push(us);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    std::fs::write(out.join("reuse.csv"), &csv)?;

    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 10.0;
    let base = configs.iter().position(|c| *c == Config::Baseline).map(|i| q(&hists[i], 0.5));
    let mut md = String::new();
    let _ = writeln!(md, "# Reuse test: connect → request → reply in a fresh process\n");
    let _ = writeln!(md, "{runs} runs per configuration, real nginx; path: {}; machine: `{}`.\n", hosts.describe(), machine());
    let _ = writeln!(md, "| config | median µs | p90 µs | p99 µs | median vs baseline | source study median µs | connect() median µs |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (i, c) in configs.iter().enumerate() {
        let h = &hists[i];
        let ratio = base.map_or("-".into(), |b| format!("{:.2}x", q(h, 0.5) / b));
        let src = c.source_median_us().map_or("-".into(), |v| format!("{v:.0}"));
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {ratio} | {src} | {:.1} |",
            c.name(),
            q(h, 0.5),
            q(h, 0.9),
            q(h, 0.99),
            q(&connects[i], 0.5)
        );
    }
    let _ = writeln!(md, "\nSource study: two CloudLab m510 nodes over 10 GbE (baseline 446 µs, dummy shim 459 µs, reuse 322 µs = 0.72x).");
    let _ = writeln!(md, "`warm` is the pool manager on its embedded default (first-use warm pools); `reuse` has a reuse pool for the server;");
    let _ = writeln!(md, "`prefetch` is that reuse pool with `prefetch`: the daemon offers the socket while the process starts, and connect()");
    let _ = writeln!(md, "takes it without a round trip to the daemon.");
    let _ = writeln!(md, "On loopback a handshake costs microseconds, so asking the daemon costs more than it saves; the emulated path gives");
    let _ = writeln!(md, "the handshake its RTT, as on a real network.\n");
    let series: Vec<crate::svg::Series> =
        configs.iter().zip(&samples).map(|(c, v)| crate::svg::Series { name: c.name().into(), points: crate::svg::cdf(v) }).collect();
    let chart = crate::svg::Chart {
        title: "Reuse test: connect to completion, fresh process per run",
        x_label: "latency (µs)",
        y_label: "CDF",
        x_scale: crate::svg::Scale::Linear,
        y_scale: crate::svg::Scale::Linear,
        series: &series,
    };
    crate::svg::write(&out.join("reuse_cdf.svg"), &crate::svg::render(&chart))?;
    let _ = writeln!(md, "![CDF](reuse_cdf.svg)\n");
    let _ = writeln!(
        md,
        "## What the pools did\n\n```\n# embedded default (warm)\n{}\n# reuse pool\n{}\n# reuse pool with prefetch\n{}```",
        warm.cli(&["status"])?,
        reuse.cli(&["status"])?,
        prefetch.cli(&["status"])?
    );
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    println!("\nwrote {}/{{reuse.csv,reuse_cdf.svg,reuse_cdf.png,summary.md}}", out.display());
    Ok(())
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let halt = halt_poll_ns().map_or(String::new(), |ns| format!(", guest halt polling {ns} ns"));
    format!("{cpu}, {cores} cores, Linux {}{halt}", kernel.trim())
}

const HALT_POLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// The haltpoll cpuidle driver's polling window, on a guest that has it. At 0 an idle vCPU
/// halts at once, and waking it costs tens of microseconds: every process that slept waiting
/// for a packet pays that, which is a large part of a 200 µs path.
pub(crate) fn halt_poll_ns() -> Option<u64> {
    std::fs::read_to_string(HALT_POLL).ok()?.trim().parse().ok()
}

/// `--halt-poll-ns`: set the guest's halt polling window for the run; restored on drop.
pub(crate) struct HaltPoll(Option<u64>);

impl HaltPoll {
    pub(crate) fn set(ns: Option<u64>) -> Result<Self> {
        let Some(ns) = ns else { return Ok(Self(None)) };
        let old = halt_poll_ns().context("--halt-poll-ns: this machine has no haltpoll cpuidle driver")?;
        std::fs::write(HALT_POLL, ns.to_string()).with_context(|| format!("writing {HALT_POLL} (root)"))?;
        eprintln!("guest halt polling {old} ns -> {ns} ns for this run");
        Ok(Self(Some(old)))
    }
}

impl Drop for HaltPoll {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            let _ = std::fs::write(HALT_POLL, old.to_string());
        }
    }
}
