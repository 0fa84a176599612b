//! The reuse-latency experiment (see the crate docs): the server nginx, the three pool
//! managers, the local proxies and the empty preload library are set up here, the launcher
//! ([`launch`]) runs the configurations round-robin from the client host, and
//! [`reuse_report`](crate::reuse_report) writes the summary and charts.

use crate::hosts::Hosts;
use crate::launch::{self, Invocation};
use crate::nginx::Nginx;
use crate::proxy::{self, Haproxy};
use crate::reuse_report as report;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
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
    /// The reuse pool, the shim linking at its first `connect()` (`WARMPOOL_LAZY=1`) instead
    /// of at load time: the daemon identifies the process inside that `connect()`.
    ReuseLazy,
    /// An LD_PRELOAD library that does nothing (a C object without constructors): the floor
    /// of any preload approach.
    EmptyPreload,
    /// The function connects to a local nginx that proxies with `upstream { keepalive }`.
    NginxKeepalive,
    /// The function connects to a local HAProxy with `http-reuse always`.
    Haproxy,
    /// `/bin/true`, a process that connects nowhere, without a preload library.
    TrueBaseline,
    /// `/bin/true` under the empty preload library.
    TrueEmptyPreload,
    /// `/bin/true` under the shim, with the reuse pool's daemon: it links at load time and
    /// asks for nothing.
    TrueShim,
    /// `/bin/true` under the shim, with the prefetch pool's daemon: it links at load time and
    /// takes its offers (and gives them back at exit).
    TrueShimPrefetch,
    /// `/bin/true` under the shim with `WARMPOOL_LAZY=1`: no link, the library alone.
    TrueShimLazy,
}

impl Config {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::DummyShim => "dummy-shim",
            Self::Warm => "warm",
            Self::Reuse => "reuse",
            Self::Prefetch => "prefetch",
            Self::ReuseLazy => "reuse-lazy",
            Self::EmptyPreload => "empty-preload",
            Self::NginxKeepalive => "nginx-keepalive",
            Self::Haproxy => "haproxy",
            Self::TrueBaseline => "true-baseline",
            Self::TrueEmptyPreload => "true-empty-preload",
            Self::TrueShim => "true-shim",
            Self::TrueShimPrefetch => "true-shim-prefetch",
            Self::TrueShimLazy => "true-shim-lazy",
        }
    }
    /// Whether the function connects (and reports connect → close); the `true-*` ones do not.
    pub(crate) fn connects(self) -> bool {
        !matches!(self, Self::TrueBaseline | Self::TrueEmptyPreload | Self::TrueShim | Self::TrueShimPrefetch | Self::TrueShimLazy)
    }
    /// Median from the source study (two CloudLab m510 nodes, 10 GbE), µs.
    pub(crate) fn source_median_us(self) -> Option<f64> {
        match self {
            Self::Baseline => Some(446.0),
            Self::DummyShim => Some(459.0),
            Self::Reuse => Some(322.0),
            _ => None,
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
        self.cli_with(Command::new(&self.bin), args)
    }

    /// `pool-manager prewarm DEST` on the client host, in its network namespace: the daemon
    /// prewarms for the tenant that asks (uid, cgroup and network namespace), so the pool must
    /// be asked for from where the functions run.
    pub(crate) fn prewarm(&self, hosts: &Hosts, dest: &str) -> Result<String> {
        self.cli_with(hosts.client(&self.bin, &[]), &["prewarm", dest])
    }

    fn cli_with(&self, mut cmd: Command, args: &[&str]) -> Result<String> {
        let o = cmd.args(args).arg("--socket").arg(&self.socket).env_remove("LD_PRELOAD").output()?;
        if !o.status.success() {
            bail!("pool-manager {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        crate::launch::signal(self.child.id(), rustix::process::Signal::TERM);
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

/// What the configurations' invocations need: programs, addresses, libraries, daemons.
struct Setup<'a> {
    exe: PathBuf,
    dest: SocketAddr,
    preload: &'a Path,
    empty: Option<PathBuf>,
    nginx_proxy: Option<SocketAddr>,
    haproxy: Option<SocketAddr>,
    warm: &'a Path,
    reuse: &'a Path,
    prefetch: &'a Path,
}

impl Setup<'_> {
    fn invocation(&self, c: Config) -> Result<Invocation> {
        let preload = || ("LD_PRELOAD", self.preload.into());
        let shim = |socket: &Path| vec![preload(), ("WARMPOOL_SOCKET", socket.into())];
        let lazy = |socket: &Path| vec![preload(), ("WARMPOOL_SOCKET", socket.into()), ("WARMPOOL_LAZY", "1".into())];
        let empty = || -> Result<Vec<(&'static str, OsString)>> {
            Ok(vec![("LD_PRELOAD", self.empty.clone().context("empty preload library not built")?.into())])
        };
        let (target, env) = match c {
            Config::Baseline => (Some(self.dest), vec![]),
            Config::DummyShim => {
                (Some(self.dest), vec![preload(), ("WARMPOOL_PASSTHROUGH", "1".into()), ("WARMPOOL_SOCKET", self.warm.into())])
            }
            Config::Warm => (Some(self.dest), shim(self.warm)),
            Config::Reuse => (Some(self.dest), shim(self.reuse)),
            Config::Prefetch => (Some(self.dest), shim(self.prefetch)),
            Config::ReuseLazy => (Some(self.dest), lazy(self.reuse)),
            Config::EmptyPreload => (Some(self.dest), empty()?),
            Config::NginxKeepalive => (Some(self.nginx_proxy.context("nginx proxy not started")?), vec![]),
            Config::Haproxy => (Some(self.haproxy.context("haproxy not started")?), vec![]),
            Config::TrueBaseline => (None, vec![]),
            Config::TrueEmptyPreload => (None, empty()?),
            Config::TrueShim => (None, shim(self.reuse)),
            Config::TrueShimPrefetch => (None, shim(self.prefetch)),
            Config::TrueShimLazy => (None, lazy(self.reuse)),
        };
        let (program, args) = match target {
            Some(t) => (self.exe.clone(), vec!["function".into(), t.to_string().into()]),
            None => (PathBuf::from("/bin/true"), vec![]),
        };
        Ok(Invocation { name: c.name(), program, args, env, reports: target.is_some() })
    }
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
        d.prewarm(hosts, &dest).ok();
    }
    let wants = |c: &[Config]| configs.iter().any(|x| c.contains(x));
    let nginx_proxy = if wants(&[Config::NginxKeepalive]) { Some(proxy::start_nginx(work, hosts, nginx.addr)?) } else { None };
    let haproxy = if wants(&[Config::Haproxy]) { Some(Haproxy::start(&work.join("haproxy"), hosts, nginx.addr)?) } else { None };
    let empty = if wants(&[Config::EmptyPreload, Config::TrueEmptyPreload]) { Some(launch::build_empty_preload(work)?) } else { None };
    std::thread::sleep(Duration::from_millis(200));
    let setup = Setup {
        exe: std::env::current_exe()?,
        dest: nginx.addr,
        preload,
        empty,
        nginx_proxy: nginx_proxy.as_ref().map(|n| n.addr),
        haproxy: haproxy.as_ref().map(|h| h.addr),
        warm: &warm.socket,
        reuse: &reuse.socket,
        prefetch: &prefetch.socket,
    };
    let plan = configs.iter().map(|&c| setup.invocation(c)).collect::<Result<Vec<_>>>()?;
    let bar = crate::progress(runs as u64, "reuse runs per configuration");
    let on_client = bar.clone();
    // Warm-up rounds, not recorded: page cache, nginx, the pools, the proxies' upstreams.
    let samples = hosts.on_client(move || launch::rounds(&plan, 10, runs, &on_client))?;
    bar.finish_and_clear();
    let mut csv = String::from("config,run,latency_us,connect_us,function_us\n");
    for (c, s) in configs.iter().zip(&samples) {
        for (run, s) in s.iter().enumerate() {
            let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1}"));
            let _ = writeln!(csv, "{},{run},{},{},{:.1}", c.name(), opt(s.latency_us), opt(s.connect_us), s.function_us);
        }
    }
    std::fs::write(out.join("reuse.csv"), &csv)?;
    let status = [
        ("embedded default (warm)", warm.cli(&["status"])?),
        ("reuse pool", reuse.cli(&["status"])?),
        ("reuse pool with prefetch", prefetch.cli(&["status"])?),
    ];
    let upstream = nginx.via_log().map(|log| proxy::upstream_use(&log));
    let md = report::summary(&report::Run { runs, configs, samples: &samples, hosts, status: &status, upstream: upstream.as_ref(), out })?;
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    println!("\nwrote {}/{{reuse.csv,reuse_cdf.svg,reuse_function_cdf.svg,summary.md}} (and PNGs with rsvg-convert)", out.display());
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
