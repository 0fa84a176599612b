//! Burst start: N functions start at once, each connects to the server, sends a request,
//! reads the reply and exits; the time until all are done, with and without the pool.
//!
//! One launcher process (`burst-client`) runs on the client host and starts the N function
//! processes back to back, so the measurement is not dominated by entering the namespace
//! N times. With the pool, a `warm` pool kept at `min_idle = N` serves them. (The source's
//! burst also connects every function to a peer; peer links are not built yet.)

use crate::hosts::Hosts;
use crate::nginx::Nginx;
use crate::peers::{vaddr, wait_ready_links, KillOnDrop};
use crate::reuse::{artifacts, machine, timestamp, Daemon, Scratch};
use crate::svg::{self, Chart, Scale, Series};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default burst sizes.
pub(crate) const SIZES: [usize; 5] = [1, 4, 16, 64, 256];

/// `burst-client`: start `n` functions at once, wait for all; print the total in µs.
pub(crate) fn client(addr: SocketAddr, n: usize, peer: Option<SocketAddr>) -> Result<()> {
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            let mut c = Command::new(&exe);
            c.arg("function").arg(addr.to_string());
            if let Some(p) = peer {
                c.arg("--peer").arg(p.to_string());
            }
            c.stdout(Stdio::null()).spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut failed = 0;
    for mut c in children {
        if !c.wait()?.success() {
            failed += 1;
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6;
    if failed > 0 {
        bail!("{failed} of {n} functions failed");
    }
    println!("{us:.0}");
    Ok(())
}

/// `peer-echo-server`: the peers of a burst without the pool: answer one line per connection.
pub(crate) fn echo_server(listen: SocketAddr) -> Result<()> {
    let l = std::net::TcpListener::bind(listen)?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || {
            let mut b = [0u8; 5];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
        });
    }
    Ok(())
}

/// `peer-echo`: the peers of a burst with the pool: take `n` link ends (through the shim)
/// and answer one line on each.
pub(crate) fn echo_links(target: SocketAddr, n: usize) -> Result<()> {
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                sc.spawn(move || -> Result<()> {
                    let mut c = std::net::TcpStream::connect(target).with_context(|| format!("peer link {target}"))?;
                    let mut b = [0u8; 5];
                    c.read_exact(&mut b)?;
                    c.write_all(&b)?;
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        }
        Ok(())
    })
}

const PEER_CHANNEL: u16 = 7300;
const ECHO_PORT: u16 = 7301;
const BURST_RDV_PORT: u16 = 7302;

/// The `burst` driver.
pub(crate) fn run(hosts: &Hosts, sizes: &[usize], reps: usize, out: Option<PathBuf>, peer: bool) -> Result<()> {
    let (pool_manager, preload) = artifacts()?;
    let out = out.unwrap_or_else(|| PathBuf::from("results/burst").join(timestamp()));
    std::fs::create_dir_all(&out)?;
    let work = Scratch::new("burst")?;
    let nginx = Nginx::start(&work.0.join("nginx"), hosts)?;
    let max = sizes.iter().copied().max().unwrap_or(1);
    let toml = work.0.join("pool.toml");
    // With peers: every function also exchanges a line with a peer on the server host. Without
    // the pool that peer is a plain echo server (as if the hosts could reach each other);
    // with the pool it is a function behind `burst/b`'s pool manager, reached over a link
    // from a pool kept at N prewarmed links.
    let (_peer_procs, peer_cfg, echo_addr, b_socket) = if peer { start_peers(hosts, &work, &pool_manager, max)? } else { (vec![], String::new(), None, PathBuf::new()) };
    std::fs::write(
        &toml,
        format!(
            "[[pool]]\ndestination = \"{}\"\npolicy = \"warm\"\nmin_idle = {max}\nmax_idle = {max}\nmax_per_destination = {}\n{peer_cfg}",
            nginx.addr,
            2 * max
        ),
    )?;
    let daemon = Daemon::start(hosts, &pool_manager, work.0.join("pool.sock"), &["--config".into(), toml.display().to_string()], &work.0.join("pool.log"))?;
    daemon.prewarm(hosts, &nginx.addr.to_string())?;
    let exe = std::env::current_exe()?;
    let mut csv = String::from("config,n,rep,total_us\n");
    let mut medians: Vec<(&str, usize, f64)> = vec![];
    for &n in sizes {
        for config in ["baseline", "pool"] {
            let mut totals = vec![];
            for rep in 0..reps {
                if config == "pool" {
                    wait_for_idle(&daemon, n)?;
                    if peer {
                        wait_ready_links(&daemon, "burst/b", Some(PEER_CHANNEL), n)?;
                    }
                }
                let peer_target = match (peer, config) {
                    (false, _) => None,
                    (true, "pool") => Some(SocketAddr::new(vaddr(&pool_manager, "burst/b")?, PEER_CHANNEL)),
                    (true, _) => echo_addr,
                };
                // The peers' side takes its n link ends (they are ready in its pool too).
                let echo = if peer && config == "pool" {
                    let to_a = SocketAddr::new(vaddr(&pool_manager, "burst/a")?, PEER_CHANNEL);
                    Some(
                        hosts
                            .server(&exe)
                            .args(["peer-echo", "--target", &to_a.to_string(), "--n", &n.to_string()])
                            .env("LD_PRELOAD", &preload)
                            .env("WARMPOOL_SOCKET", &b_socket)
                            .stdout(Stdio::null())
                            .spawn()?,
                    )
                } else {
                    None
                };
                let env: Vec<(&str, &std::ffi::OsStr)> = if config == "pool" {
                    vec![("LD_PRELOAD", preload.as_os_str()), ("WARMPOOL_SOCKET", daemon.socket.as_os_str())]
                } else {
                    vec![]
                };
                let mut cmd = hosts.client(&exe, &env);
                cmd.args(["burst-client", "--addr", &nginx.addr.to_string(), "--n", &n.to_string()]);
                if let Some(p) = peer_target {
                    cmd.args(["--peer", &p.to_string()]);
                }
                let o = cmd.output()?;
                if let Some(mut e) = echo {
                    if !e.wait()?.success() {
                        bail!("the peers' side of a burst of {n} failed");
                    }
                }
                if !o.status.success() {
                    bail!("burst of {n} ({config}) failed: {}", String::from_utf8_lossy(&o.stderr));
                }
                let us: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().context("burst-client output")?;
                let _ = writeln!(csv, "{config},{n},{rep},{us:.0}");
                totals.push(us);
            }
            totals.sort_by(f64::total_cmp);
            medians.push((config, n, totals[totals.len() / 2]));
            eprintln!("burst: n = {n}, {config}: {:.1} ms", totals[totals.len() / 2] / 1e3);
        }
    }
    std::fs::write(out.join("burst.csv"), &csv)?;
    let status = daemon.cli(&["status"])?;
    report(hosts, sizes, reps, peer, &out, &medians, &status)
}


/// The peers' side of a burst with peers: an echo server, a rendezvous server and
/// `burst/b`'s pool manager on the server host; the `[peer]` lines for `burst/a`'s pool.
fn start_peers(hosts: &Hosts, work: &Scratch, pool_manager: &Path, max: usize) -> Result<(Vec<KillOnDrop>, String, Option<SocketAddr>, PathBuf)> {
    let mut peer_procs = vec![];
    let ip = hosts.server_ip();
    let echo = SocketAddr::new(ip, hosts.server_port(ECHO_PORT)?);
    peer_procs.push(KillOnDrop(hosts.server(std::env::current_exe()?).args(["peer-echo-server", "--listen", &echo.to_string()]).stdout(Stdio::null()).spawn()?));
    let rdv = SocketAddr::new(ip, hosts.server_port(BURST_RDV_PORT)?);
    let secret = work.0.join("burst.secret");
    std::fs::write(&secret, "burst-experiment-secret-0123")?;
    peer_procs.push(KillOnDrop(
        hosts
            .server(pool_manager)
            .args(["rendezvous", "--listen", &rdv.to_string(), "--job", &format!("burst={}", secret.display())])
            .env_remove("LD_PRELOAD")
            .stderr(std::fs::File::create(work.0.join("rdv.log"))?)
            .spawn()?,
    ));
    let common = |name: &str, other: &str| {
        format!("[peer]\nname = \"burst/{name}\"\nrendezvous = \"{rdv}\"\nsecret_file = \"{}\"\npeers = [\"burst/{other}\"]\n", secret.display())
    };
    let b_socket = work.0.join("b.sock");
    let b_toml = work.0.join("b.toml");
    std::fs::write(&b_toml, format!("socket = \"{}\"\n{}", b_socket.display(), common("b", "a")))?;
    peer_procs.push(KillOnDrop(
        hosts.server(pool_manager).args(["serve", "--config"]).arg(&b_toml).env_remove("LD_PRELOAD").stderr(std::fs::File::create(work.0.join("b.log"))?).spawn()?,
    ));
    let peer_cfg = format!("{}prewarm = [\"burst/b:{PEER_CHANNEL}\"]\nprewarm_links = {max}\n", common("a", "b"));
    Ok((peer_procs, peer_cfg, Some(echo), b_socket))
}

/// summary.md and burst.svg from the medians of a run.
fn report(hosts: &Hosts, sizes: &[usize], reps: usize, peer: bool, out: &Path, medians: &[(&str, usize, f64)], status: &str) -> Result<()> {
    let mut md = String::new();
    let what = if peer { "connect → request → reply, then one exchange with a peer function" } else { "connect → request → reply" };
    let _ = writeln!(md, "# Burst start: N functions at once, each {what}\n");
    let _ = writeln!(md, "Path: {}; {reps} repetitions; machine: `{}`. Median time until all N are done.\n", hosts.describe(), machine());
    let _ = writeln!(md, "| N | baseline ms | pool ms | baseline / pool |");
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    let med = |c: &str, n: usize| medians.iter().find(|m| m.0 == c && m.1 == n).map(|m| m.2);
    for &n in sizes {
        if let (Some(b), Some(p)) = (med("baseline", n), med("pool", n)) {
            let _ = writeln!(md, "| {n} | {:.2} | {:.2} | {:.2}x |", b / 1e3, p / 1e3, b / p);
        }
    }
    let _ = writeln!(md, "\nSource (Particle): network set-up is up to 84 % of burst-parallel start-up.\n\n![burst](burst.svg)\n\n```\n{status}```");
    let series: Vec<Series> = ["baseline", "pool"]
        .iter()
        .map(|c| Series { name: (*c).into(), points: sizes.iter().filter_map(|&n| med(c, n).map(|v| (n as f64, v / 1e3))).collect() })
        .collect();
    let chart = Chart { title: "Burst start", x_label: "functions started at once", y_label: "time until all done (ms)", x_scale: Scale::Log, y_scale: Scale::Log, series: &series };
    svg::write(&out.join("burst.svg"), &svg::render(&chart))?;
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    println!("\nwrote {}/{{burst.csv,burst.svg,burst.png,summary.md}}", out.display());
    Ok(())
}

fn wait_for_idle(daemon: &Daemon, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = daemon.cli(&["status"])?;
        let idle: usize = status.lines().nth(1).and_then(|l| l.split_whitespace().nth(3)).and_then(|v| v.parse().ok()).unwrap_or(0);
        if idle >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pool did not refill to {n} idle sockets:\n{status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
