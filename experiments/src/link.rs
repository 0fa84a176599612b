//! `link`: peer links between two functions' hosts. Measures, from inside a function's
//! `connect()` to the peer's virtual address (through the preload library):
//!
//! - `on-demand`: no link exists; the pool managers make one (request → rendezvous → punch →
//!   end-to-end proof). Target (issue): at most 3 RTTs of the emulated path plus 5 ms.
//! - `prewarmed`: the link was made ahead of demand (`[peer] prewarm`), handed out like a
//!   warm socket.
//! - `relayed`: hole punching off (`punch = false`), the rendezvous server relays.
//!
//! and the throughput of one link, direct and relayed. The client host runs `exp/a`'s pool
//! manager and functions; the server host runs the rendezvous server and `exp/b`'s manager
//! (so the path a ⇄ b and a ⇄ rendezvous each cross the emulated RTT once).

use crate::hosts::Hosts;
use crate::peers::{vaddr, wait_ready_links, KillOnDrop};
use crate::reuse::{artifacts, machine, timestamp, Daemon, Scratch};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const RDV_PORT: u16 = 7700;
const ON_DEMAND: u16 = 7000;
const PREWARMED: u16 = 7001;
const BULK: u16 = 7002;

/// `peer-client`: `rounds` sequential connects to `target`; prints each connect() in µs.
pub(crate) fn client(target: SocketAddr, rounds: usize) -> Result<()> {
    let mut out = String::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let s = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        drop(s);
        let _ = writeln!(out, "{us:.1}");
    }
    print!("{out}");
    Ok(())
}

/// `peer-send`: write `bytes` to `target`, wait for the receiver's count; prints seconds.
pub(crate) fn send(target: SocketAddr, bytes: u64) -> Result<()> {
    let mut s = TcpStream::connect(target)?;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = String::new();
    s.read_to_string(&mut ack)?;
    let secs = t.elapsed().as_secs_f64();
    if ack.trim() != bytes.to_string() {
        bail!("receiver counted {ack:?} bytes, sent {bytes}");
    }
    println!("{secs:.6}");
    Ok(())
}

/// `peer-recv`: read `target` to EOF, answer with the byte count.
pub(crate) fn recv(target: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(target)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = s.read(&mut buf)?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    s.write_all(n.to_string().as_bytes())?;
    Ok(())
}

struct Side {
    // Field order: exp/a's manager stops first, then exp/b's, then the rendezvous server.
    a: Daemon,
    _b: KillOnDrop,
    _rdv: KillOnDrop,
    b_socket: PathBuf,
}


fn start(hosts: &Hosts, work: &Path, pool_manager: &Path, punch: bool, prewarm: usize) -> Result<Side> {
    let server_ip = hosts.server_ip();
    let rdv_port = hosts.server_port(RDV_PORT)?;
    let rdv_addr = SocketAddr::new(server_ip, rdv_port);
    let secret = work.join("job.secret");
    std::fs::write(&secret, "experiments-link-secret-0123456789")?;
    let tag = if punch { "direct" } else { "relay" };
    let rdv = KillOnDrop(hosts
        .server(pool_manager)
        .args(["rendezvous", "--listen", &rdv_addr.to_string(), "--job", &format!("exp={}", secret.display())])
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join(format!("rdv-{tag}.log")))?)
        .spawn()
        .context("starting the rendezvous server")?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hosts.reachable(rdv_addr) {
        if Instant::now() > deadline {
            bail!("rendezvous server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg = |name: &str, peer: &str, extra: &str| {
        format!(
            "[peer]\nname = \"exp/{name}\"\nrendezvous = \"{rdv_addr}\"\nsecret_file = \"{}\"\npeers = [\"exp/{peer}\"]\npunch = {punch}\n{extra}\n",
            secret.display()
        )
    };
    let b_toml = work.join(format!("b-{tag}.toml"));
    let b_socket = work.join(format!("b-{tag}.sock"));
    std::fs::write(&b_toml, format!("socket = \"{}\"\n{}", b_socket.display(), cfg("b", "a", "")))?;
    let b = KillOnDrop(
        hosts
            .server(pool_manager)
            .args(["serve", "--config"])
            .arg(&b_toml)
            .env_remove("LD_PRELOAD")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join(format!("b-{tag}.log")))?)
            .spawn()?,
    );
    let a_toml = work.join(format!("a-{tag}.toml"));
    let extra = if prewarm > 0 { format!("prewarm = [\"exp/b:{PREWARMED}\"]\nprewarm_links = {prewarm}") } else { String::new() };
    std::fs::write(&a_toml, cfg("a", "b", &extra))?;
    let a = Daemon::start(hosts, pool_manager, work.join(format!("a-{tag}.sock")), &["--config".into(), a_toml.display().to_string()], &work.join(format!("a-{tag}.log")))?;
    while !b_socket.exists() {
        if Instant::now() > deadline {
            bail!("exp/b's pool manager did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both registered and their spare link connections made.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.cli(&["status"])?.contains(", connected)") {
        if Instant::now() > deadline {
            bail!("exp/a did not register with the rendezvous server");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(Side { a, _b: b, _rdv: rdv, b_socket })
}


fn connects(hosts: &Hosts, a: &Daemon, preload: &Path, target: SocketAddr, rounds: usize) -> Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let env = [("LD_PRELOAD", preload.as_os_str()), ("WARMPOOL_SOCKET", a.socket.as_os_str())];
    let o = hosts.client(&exe, &env).args(["peer-client", "--target", &target.to_string(), "--rounds", &rounds.to_string()]).output()?;
    if !o.status.success() {
        bail!("peer-client failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    String::from_utf8_lossy(&o.stdout).lines().map(|l| Ok(l.trim().parse()?)).collect()
}

fn bulk(hosts: &Hosts, side: &Side, preload: &Path, pool_manager: &Path, bytes: u64) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let to_a = SocketAddr::new(vaddr(pool_manager, "exp/a")?, BULK);
    let to_b = SocketAddr::new(vaddr(pool_manager, "exp/b")?, BULK);
    let mut recv = hosts
        .server(&exe)
        .args(["peer-recv", "--target", &to_a.to_string()])
        .env("LD_PRELOAD", preload)
        .env("WARMPOOL_SOCKET", &side.b_socket)
        .stdout(Stdio::null())
        .spawn()?;
    let env = [("LD_PRELOAD", preload.as_os_str()), ("WARMPOOL_SOCKET", side.a.socket.as_os_str())];
    let o = hosts.client(&exe, &env).args(["peer-send", "--target", &to_b.to_string(), "--bytes", &bytes.to_string()]).output()?;
    let _ = recv.wait();
    if !o.status.success() {
        bail!("peer-send failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().parse()?)
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// The `link` driver.
pub(crate) fn run(hosts: &Hosts, reps: usize, bytes: u64, out: Option<PathBuf>) -> Result<()> {
    let (pool_manager, preload) = artifacts()?;
    let out = out.unwrap_or_else(|| PathBuf::from("results/link").join(timestamp()));
    std::fs::create_dir_all(&out)?;
    let work = Scratch::new("link")?;
    let rtt = match hosts {
        Hosts::Local(t) => Some(t.rtt),
        _ => None,
    };
    let to_b = |port| -> Result<SocketAddr> { Ok(SocketAddr::new(vaddr(&pool_manager, "exp/b")?, port)) };
    let prewarm = reps.clamp(1, 64);
    let mut csv = String::from("config,rep,connect_us\n");
    let mut rows: Vec<(&str, Vec<f64>)> = vec![];
    let mut tput = String::from("path,bytes,seconds,gbit_per_s\n");
    let mut tputs = vec![];
    for punch in [true, false] {
        let side = start(hosts, &work.0, &pool_manager, punch, if punch { prewarm } else { 0 })?;
        let mut cases = vec![(if punch { "on-demand" } else { "relayed" }, ON_DEMAND, reps)];
        if punch {
            wait_ready_links(&side.a, "exp/b", Some(PREWARMED), prewarm)?;
            cases.push(("prewarmed", PREWARMED, prewarm));
        }
        for (name, port, n) in cases {
            let v = connects(hosts, &side.a, &preload, to_b(port)?, n)?;
            for (i, us) in v.iter().enumerate() {
                let _ = writeln!(csv, "{name},{i},{us:.1}");
            }
            eprintln!("link: {name}: median {:.0} us over {n}", quantile(&v, 0.5));
            rows.push((name, v));
        }
        let path = if punch { "direct" } else { "relayed" };
        let secs = bulk(hosts, &side, &preload, &pool_manager, bytes)?;
        let gbit = bytes as f64 * 8.0 / secs / 1e9;
        let _ = writeln!(tput, "{path},{bytes},{secs:.6},{gbit:.3}");
        eprintln!("link: {path} throughput {gbit:.2} Gbit/s");
        tputs.push((path, gbit));
        std::fs::write(out.join(format!("status-{path}.txt")), side.a.cli(&["status"])?)?;
    }
    std::fs::write(out.join("link.csv"), &csv)?;
    std::fs::write(out.join("throughput.csv"), &tput)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Peer links: time from connect() to a usable link, and throughput\n");
    let _ = writeln!(md, "Path: {}; machine: `{}`.\n", hosts.describe(), machine());
    let _ = writeln!(md, "| case | n | median ms | p99 ms | median in RTTs |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (name, v) in &rows {
        let med = quantile(v, 0.5);
        let in_rtt = rtt.map_or("-".to_owned(), |r| format!("{:.2}", med / (r.as_secs_f64() * 1e6)));
        let _ = writeln!(md, "| {name} | {} | {:.3} | {:.3} | {in_rtt} |", v.len(), med / 1e3, quantile(v, 0.99) / 1e3);
    }
    if let (Some(r), Some((_, v))) = (rtt, rows.iter().find(|r| r.0 == "on-demand")) {
        let target = 3.0 * r.as_secs_f64() * 1e3 + 5.0;
        let med = quantile(v, 0.5) / 1e3;
        let _ = writeln!(md, "\nTarget for an on-demand direct link: <= 3 RTTs + 5 ms = {target:.1} ms; measured median {med:.2} ms: {}.", if med <= target { "met" } else { "NOT met" });
    }
    let _ = writeln!(md, "\n| link | throughput, {} MB |\n|---|---:|", bytes / 1_000_000);
    for (p, g) in &tputs {
        let _ = writeln!(md, "| {p} | {g:.2} Gbit/s |");
    }
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    println!("\nwrote {}/{{link.csv,throughput.csv,summary.md}}", out.display());
    Ok(())
}
