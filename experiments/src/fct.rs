//! Flow completion time: how long a function takes to fetch N bytes on a new connection
//! versus a warmed one handed out by the pool, without and with congestion.
//!
//! A flow: connect, send an 8-byte size, read that many bytes, close; timed from before
//! `connect()` to the last byte. The server (`serve-bytes`) runs on the server host; each
//! configuration's flows run in one client process (`fct-client`), so `warm` goes through
//! the preload shim and a pool manager with a `reuse` pool whose connections were warmed by
//! a few transfers first. Congestion: bulk downloads competing through the path's
//! rate-limited bottleneck for the whole measurement.

use crate::hosts::Hosts;
use crate::reuse::{artifacts, machine, timestamp, Daemon, Scratch};
use crate::svg::{self, Chart, Scale, Series};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default flow sizes: 1 KB to 16 MB, log-spaced (powers of 4).
pub(crate) const SIZES: [u64; 8] = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24];
/// serve-bytes's port on the server host.
pub(crate) const SERVER_PORT: u16 = 9000;
/// Competing bulk flows in the congested case.
const BULK_FLOWS: usize = 2;

/// `serve-bytes`: answer every 8-byte big-endian size with that many bytes.
pub(crate) fn serve(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let zeros = vec![0u8; 256 * 1024];
            let mut req = [0u8; 8];
            while c.read_exact(&mut req).is_ok() {
                let mut left = u64::from_be_bytes(req);
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    if c.write_all(&zeros[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            }
        });
    }
    Ok(())
}

/// One flow; returns its completion time.
fn flow(server: SocketAddr, size: u64, buf: &mut [u8]) -> Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(server)?;
    s.set_nodelay(true)?;
    s.write_all(&size.to_be_bytes())?;
    let mut left = size as usize;
    while left > 0 {
        let want = left.min(buf.len());
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            bail!("server closed with {left} bytes to go");
        }
        left -= n;
    }
    let d = t.elapsed();
    drop(s);
    Ok(d)
}

/// `fct-client`: warm-up flows (not printed), then `reps` rounds over `sizes`; prints
/// `size,rep,fct_us` lines. Pauses between flows like separate invocations would.
pub(crate) fn client(server: SocketAddr, sizes: &[u64], reps: usize, warmup: usize) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..warmup {
        flow(server, 1 << 20, &mut buf)?;
        std::thread::sleep(Duration::from_millis(3));
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    for rep in 0..reps {
        for &size in sizes {
            let d = flow(server, size, &mut buf)?;
            writeln!(out, "{size},{rep},{:.1}", d.as_secs_f64() * 1e6)?;
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    Ok(())
}

/// Background downloads that keep the bottleneck busy until dropped.
struct Bulk {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Bulk {
    fn start(hosts: &Hosts, server: SocketAddr, n: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![];
        for _ in 0..n {
            let stop = stop.clone();
            let sock = match hosts {
                Hosts::Local(t) => t.client.enter(move || Ok(TcpStream::connect(server)?))?,
                Hosts::Loopback | Hosts::Remote(_) => TcpStream::connect(server)?,
            };
            threads.push(std::thread::spawn(move || {
                let mut s = sock;
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.write_all(&(1u64 << 40).to_be_bytes());
                let mut buf = vec![0u8; 1 << 16];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        // Let them reach steady state before measuring.
        std::thread::sleep(Duration::from_secs(1));
        Ok(Self { stop, threads })
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Which connection a flow gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// A new connection, kernel defaults (IW10).
    New,
    /// A new connection with the kernel assist: windows learned from earlier transfers (on
    /// the server: initial congestion window; on the client: initial receive window).
    Learned,
    /// A warmed connection handed out by a `reuse` pool.
    Warm,
}

impl Conn {
    fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Learned => "learned",
            Self::Warm => "warm",
        }
    }
}

/// A cgroup for one side of the experiment, removed on drop.
struct Cg(PathBuf);

impl Cg {
    fn new(name: &str) -> Result<Self> {
        let dir = tenancy::cgroup::own_cgroup_dir()?.join(format!("warmpool-fct-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// Start `cmd` inside this cgroup: the child moves itself there between fork and exec
    /// (after any other `pre_exec` step, e.g. entering a network namespace).
    fn enter<'a>(&self, cmd: &'a mut std::process::Command) -> Result<&'a mut std::process::Command> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(self.0.join("cgroup.procs").as_os_str().as_bytes())?;
        // SAFETY: open/write/close are async-signal-safe; `procs` was allocated before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n == 1 {
                    Ok(())
                } else {
                    Err(err)
                }
            });
        }
        Ok(cmd)
    }
}

impl Drop for Cg {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `fct` driver.
pub(crate) fn run(hosts: &Hosts, sizes: &[u64], reps: usize, congestion: &[bool], out: Option<PathBuf>, rate: &str) -> Result<()> {
    let (pool_manager, preload) = artifacts()?;
    let out = out.unwrap_or_else(|| PathBuf::from("results/fct").join(timestamp()));
    std::fs::create_dir_all(&out)?;
    let work = Scratch::new("fct")?;
    let exe = std::env::current_exe()?;
    let port = hosts.server_port(SERVER_PORT)?;
    let server = SocketAddr::new(hosts.server_ip(), port);
    // Each side in a cgroup of its own, where the `learned` configuration attaches the kernel
    // assist (and nothing else does).
    let (client_cg, server_cg) = (Cg::new("client")?, Cg::new("server")?);
    let _srv_guard = if hosts.remote() {
        if !hosts.reachable(server) {
            bail!("nothing answers at {server}: run `experiments server` on the other node");
        }
        None
    } else {
        let mut srv = server_cg
            .enter(hosts.server(&exe).args(["serve-bytes", "--listen", &server.to_string()]))?
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting serve-bytes")?;
        let guard = KillOnDrop(srv.id());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(srv.stdout.take().context("server stdout")?), &mut line)?;
        if line.trim() != "ready" {
            bail!("serve-bytes did not start: {line:?}");
        }
        Some(guard)
    };
    let pool = format!("[[pool]]\ndestination = \"{server}\"\npolicy = \"reuse\"\nprotocol = \"unchecked\"\nmin_idle = 1\nmax_idle = 4\n");
    std::fs::write(work.0.join("pool.toml"), pool)?;
    let daemon = Daemon::start(
        hosts,
        &pool_manager,
        work.0.join("pool.sock"),
        &["--config".into(), work.0.join("pool.toml").display().to_string()],
        &work.0.join("pool.log"),
    )?;
    let size_list = sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut csv = String::from("config,congestion,size_bytes,rep,fct_us\n");
    let mut medians: Vec<(Conn, bool, u64, f64)> = vec![];
    let bar = crate::progress((congestion.len() * 3) as u64, "fct configurations");
    for &congested in congestion {
        let bulk = if congested { Some(Bulk::start(hosts, server, BULK_FLOWS)?) } else { None };
        for conn in [Conn::New, Conn::Learned, Conn::Warm] {
            bar.set_message(format!("fct: {} connections, congestion {}", conn.name(), if congested { "on" } else { "off" }));
            let env: Vec<(&str, &std::ffi::OsStr)> = match conn {
                Conn::New | Conn::Learned => vec![],
                Conn::Warm => vec![("LD_PRELOAD", preload.as_os_str()), ("WARMPOOL_SOCKET", daemon.socket.as_os_str())],
            };
            let warmup = if conn == Conn::New { 1 } else { 4 };
            let assist = if conn == Conn::Learned {
                let toml = work.0.join("assist.toml");
                std::fs::write(
                    &toml,
                    format!(
                        "[kernel]\nassist = \"on\"\ncgroups = [\"{}\", \"{}\"]\nprewarm = \"off\"\n",
                        client_cg.0.display(),
                        server_cg.0.display()
                    ),
                )?;
                let args = ["--config".to_owned(), toml.display().to_string()];
                // Outside the namespaces: cgroup attachments do not depend on the network
                // namespace.
                let (sock, log) = (work.0.join("assist.sock"), work.0.join("assist.log"));
                Some(Daemon::start(&Hosts::Loopback, &pool_manager, sock, &args, &log)?)
            } else {
                None
            };
            let mut cmd = hosts.client(&exe, &env);
            cmd.args(["fct-client", "--server", &server.to_string(), "--sizes", &size_list])
                .args(["--reps", &reps.to_string(), "--warmup", &warmup.to_string()]);
            let o = if conn == Conn::Learned { client_cg.enter(&mut cmd)?.output()? } else { cmd.output()? };
            drop(assist);
            if !o.status.success() {
                bail!("fct-client ({}) failed: {}", conn.name(), String::from_utf8_lossy(&o.stderr));
            }
            let mut per_size: std::collections::BTreeMap<u64, Histogram<u64>> = Default::default();
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let f: Vec<&str> = line.split(',').collect();
                let (Some(size), Some(rep), Some(us)) = (f.first(), f.get(1), f.get(2)) else { continue };
                let _ = writeln!(csv, "{},{},{size},{rep},{us}", conn.name(), if congested { "on" } else { "off" });
                let h = per_size.entry(size.parse()?).or_insert_with(|| Histogram::new(3).expect("histogram"));
                h.record(us.parse::<f64>()? as u64)?;
            }
            for (size, h) in per_size {
                medians.push((conn, congested, size, h.value_at_quantile(0.5) as f64));
            }
            bar.inc(1);
        }
        drop(bulk);
    }
    bar.finish_and_clear();
    std::fs::write(out.join("fct.csv"), &csv)?;
    let status = daemon.cli(&["status"])?;
    drop(daemon);

    report(hosts, sizes, reps, congestion, rate, &out, &medians, &status)
}


/// summary.md and fct.svg from the medians of a run.
#[allow(clippy::too_many_arguments)]
fn report(hosts: &Hosts, sizes: &[u64], reps: usize, congestion: &[bool], rate: &str, out: &Path, medians: &[(Conn, bool, u64, f64)], status: &str) -> Result<()> {
    let med = |c: Conn, g: bool, s: u64| medians.iter().find(|m| m.0 == c && m.1 == g && m.2 == s).map(|m| m.3);
    let mut md = String::new();
    let _ = writeln!(md, "# Flow completion time: new vs warmed connections\n");
    let _ = writeln!(md, "Path: {}; bottleneck {rate} (server → client); {reps} repetitions per point; machine: `{}`.", hosts.describe(), machine());
    let _ = writeln!(md, "Congestion: {BULK_FLOWS} bulk downloads share the bottleneck. Times are medians in ms. `learned IW`: new");
    let _ = writeln!(md, "connections with the eBPF kernel assist attached to both hosts' cgroups after 4 warm-up transfers.\n");
    let _ = writeln!(md, "| size | congestion | new | learned IW | warm | new / learned | new − warm | new / warm |");
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut series = vec![];
    for &g in congestion {
        for &s in sizes {
            if let (Some(n), Some(l), Some(w)) = (med(Conn::New, g, s), med(Conn::Learned, g, s), med(Conn::Warm, g, s)) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2} | {:.2}x |",
                    human(s),
                    if g { "on" } else { "off" },
                    n / 1e3,
                    l / 1e3,
                    w / 1e3,
                    n / l,
                    (n - w) / 1e3,
                    n / w
                );
            }
        }
        for c in [Conn::New, Conn::Learned, Conn::Warm] {
            let points = sizes.iter().filter_map(|&s| med(c, g, s).map(|v| (s as f64, v / 1e3))).collect();
            series.push(Series { name: format!("{}{}", c.name(), if g { ", congested" } else { "" }), points });
        }
    }
    if let Hosts::Local(t) = hosts {
        let _ = writeln!(
            md,
            "\nDelay line: {} packets forwarded, {} dropped at the bottleneck queue.",
            t.delay.stats.forwarded.load(std::sync::atomic::Ordering::Relaxed),
            t.delay.stats.dropped.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let _ = writeln!(md, "\nSource study (CloudLab, 10 GbE): warmed connections finished flows ≤ 1 MB 0.7-1.2 ms faster without");
    let _ = writeln!(md, "congestion and 2-24 ms faster with it.\n\n![FCT](fct.svg)\n\n## Pool\n\n```\n{status}```");
    let chart = Chart {
        title: "Flow completion time",
        x_label: "flow size (bytes)",
        y_label: "FCT (ms), median",
        x_scale: Scale::Log,
        y_scale: Scale::Log,
        series: &series,
    };
    svg::write(&out.join("fct.svg"), &svg::render(&chart))?;
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    println!("\nwrote {}/{{fct.csv,fct.svg,fct.png,summary.md}}", out.display());
    Ok(())
}

fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{} MB", b >> 20)
    } else {
        format!("{} KB", b >> 10)
    }
}

/// Kills a child we started, by PID, when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        crate::launch::signal(self.0, rustix::process::Signal::KILL);
    }
}
