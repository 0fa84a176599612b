//! `shuffle`: a reduce-by-key among M mappers (client host) and R reducers (server host),
//! exchanging their partitions over peer links, through a real Redis, and through a real
//! S3-compatible object store running locally (moto's server: an in-memory implementation of
//! the S3 HTTP API). The rendezvous server, `shuf/b`'s pool manager, Redis and the object
//! store run on the server host, so every byte crosses the emulated path once whichever way
//! it goes.
//!
//! Data: mapper i generates `bytes` of 64-byte records (an 8-byte key, a 56-byte value whose
//! first 8 bytes count), deterministic in i; record with key k goes to reducer k mod R. A
//! reducer counts records and sums the counts per key and prints a digest of its result; the
//! driver checks that every transport produced the same digests as a local computation.

use crate::hosts::Hosts;
use crate::peers::{ready_links, vaddr, wait_ready_links, KillOnDrop};
use crate::reuse::{artifacts, machine, timestamp, Daemon, Scratch};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const RECORD: usize = 64;
const RDV_PORT: u16 = 7710;
const REDIS_PORT: u16 = 6390;
const S3_PORT: u16 = 9560;
const CHANNEL_BASE: u16 = 9000;
const KEYS: u64 = 4096;

/// How partitions travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Via {
    /// Peer links made when the job asks for them.
    Peer,
    /// Peer links made ahead of the job (`[peer] prewarm`).
    PeerPrewarmed,
    /// SET/GET through redis-server.
    Redis,
    /// PUT/GET through the local S3-compatible store.
    S3,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::PeerPrewarmed => "peer-prewarmed",
            Self::Redis => "redis",
            Self::S3 => "s3",
        }
    }
}

/// Mapper `id`'s partitions: R byte vectors of whole records.
fn partitions(id: usize, reducers: usize, bytes: u64) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new(); reducers];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (id as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for _ in 0..bytes / RECORD as u64 {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let key = z % KEYS;
        let count = (z >> 20) % 100;
        let p = &mut parts[(key % reducers as u64) as usize];
        p.extend_from_slice(&key.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(&[0x5a; RECORD - 16]);
    }
    parts
}

/// Fold records into (key → (records, sum of counts)).
fn reduce_into(acc: &mut BTreeMap<u64, (u64, u64)>, data: &[u8]) -> Result<()> {
    if !data.len().is_multiple_of(RECORD) {
        bail!("partial record: {} bytes", data.len());
    }
    for r in data.chunks_exact(RECORD) {
        let key = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
        let e = acc.entry(key).or_default();
        e.0 += 1;
        e.1 += count;
    }
    Ok(())
}

fn digest(acc: &BTreeMap<u64, (u64, u64)>) -> String {
    // FNV-1a over the sorted result.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (mut n, mut sum) = (0, 0);
    for (k, (c, s)) in acc {
        n += c;
        sum += s;
        for b in k.to_le_bytes().iter().chain(&c.to_le_bytes()).chain(&s.to_le_bytes()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{n}:{sum}:{h:016x}")
}

// --- minimal clients: RESP for Redis, HTTP/1.1 for the object store -------------------------

fn resp(s: &mut TcpStream, r: &mut BufReader<TcpStream>, args: &[&[u8]]) -> Result<Option<Vec<u8>>> {
    let mut m = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        m.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        m.extend_from_slice(a);
        m.extend_from_slice(b"\r\n");
    }
    s.write_all(&m)?;
    read_resp(r)
}

fn read_resp(r: &mut BufReader<TcpStream>) -> Result<Option<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let (t, rest) = line.trim_end().split_at(1);
    match t {
        "+" | ":" => Ok(Some(rest.as_bytes().to_vec())),
        "-" => bail!("redis: {rest}"),
        "$" => {
            let n: i64 = rest.parse()?;
            if n < 0 {
                return Ok(None);
            }
            let mut b = vec![0u8; n as usize + 2];
            r.read_exact(&mut b)?;
            b.truncate(n as usize);
            Ok(Some(b))
        }
        "*" => {
            let n: i64 = rest.parse()?;
            let mut last = None;
            for _ in 0..n.max(0) {
                last = read_resp(r)?;
            }
            Ok(if n < 0 { None } else { last })
        }
        _ => bail!("redis: unexpected reply {line:?}"),
    }
}

/// One HTTP/1.1 request on its own connection (the store's server closes after every
/// response); returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let (mut s, mut r) = connect(addr)?;
    let (s, r) = (&mut s, &mut r);
    // The store checks no signature, but treats a request without one as anonymous.
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: s3\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=warmpool/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code: u16 = status.split_whitespace().nth(1).context("HTTP status")?.parse()?;
    let mut len = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse()?;
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        bail!("chunked responses are not expected from the store");
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok((code, b))
}

fn connect(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let r = BufReader::with_capacity(1 << 20, s.try_clone()?);
    Ok((s, r))
}

/// `shuffle-map`: mapper `id` sends its partitions.
pub(crate) fn map(id: usize, reducers: usize, bytes: u64, via: Via, target: SocketAddr) -> Result<()> {
    let parts = partitions(id, reducers, bytes);
    match via {
        Via::Peer | Via::PeerPrewarmed => {
            // One link per reducer, all at once (a reducer reads its M links concurrently).
            std::thread::scope(|sc| -> Result<()> {
                let hs: Vec<_> = parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        sc.spawn(move || -> Result<()> {
                            let addr = SocketAddr::new(target.ip(), CHANNEL_BASE + j as u16);
                            let mut s = TcpStream::connect(addr).with_context(|| format!("peer link {addr}"))?;
                            s.write_all(&(id as u64).to_le_bytes())?;
                            s.write_all(&(p.len() as u64).to_le_bytes())?;
                            s.write_all(p)?;
                            s.shutdown(std::net::Shutdown::Write)?;
                            // Wait for the reducer's acknowledgement: the data arrived.
                            let mut ack = [0u8; 1];
                            s.read_exact(&mut ack)?;
                            Ok(())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().map_err(|_| anyhow::anyhow!("mapper thread panicked"))??;
                }
                Ok(())
            })
        }
        Via::Redis => {
            let (mut s, mut r) = connect(target)?;
            for (j, p) in parts.iter().enumerate() {
                resp(&mut s, &mut r, &[b"SET", format!("shuf:{id}:{j}").as_bytes(), p])?;
                resp(&mut s, &mut r, &[b"RPUSH", format!("shuf:done:{j}").as_bytes(), id.to_string().as_bytes()])?;
            }
            Ok(())
        }
        Via::S3 => {
            for (j, p) in parts.iter().enumerate() {
                let (code, _) = http(target, "PUT", &format!("/shuffle/{id}-{j}"), p)?;
                if code != 200 {
                    bail!("PUT {id}-{j}: HTTP {code}");
                }
            }
            Ok(())
        }
    }
}

/// `shuffle-reduce`: reducer `id` collects its partition from every mapper; prints the digest.
pub(crate) fn reduce(id: usize, mappers: usize, via: Via, target: SocketAddr) -> Result<()> {
    let mut acc = BTreeMap::new();
    match via {
        Via::Peer | Via::PeerPrewarmed => {
            let addr = SocketAddr::new(target.ip(), CHANNEL_BASE + id as u16);
            let datas = std::thread::scope(|sc| -> Result<Vec<Vec<u8>>> {
                let hs: Vec<_> = (0..mappers)
                    .map(|_| {
                        sc.spawn(move || -> Result<Vec<u8>> {
                            let mut s = TcpStream::connect(addr).with_context(|| format!("peer link {addr}"))?;
                            let mut head = [0u8; 16];
                            s.read_exact(&mut head)?;
                            let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes")) as usize;
                            let mut d = vec![0u8; len];
                            s.read_exact(&mut d)?;
                            s.write_all(b"k")?;
                            Ok(d)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("reducer thread panicked"))?).collect()
            })?;
            for d in datas {
                reduce_into(&mut acc, &d)?;
            }
        }
        Via::Redis => {
            let (mut s, mut r) = connect(target)?;
            for _ in 0..mappers {
                let Some(m) = resp(&mut s, &mut r, &[b"BLPOP", format!("shuf:done:{id}").as_bytes(), b"60"])? else {
                    bail!("no mapper finished within 60 s");
                };
                let m = String::from_utf8_lossy(&m).into_owned();
                let d = resp(&mut s, &mut r, &[b"GET", format!("shuf:{m}:{id}").as_bytes()])?.context("partition missing")?;
                reduce_into(&mut acc, &d)?;
            }
        }
        Via::S3 => {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut pending: Vec<usize> = (0..mappers).collect();
            while !pending.is_empty() {
                let mut still = vec![];
                for m in pending {
                    let (code, body) = http(target, "GET", &format!("/shuffle/{m}-{id}"), &[])?;
                    match code {
                        200 => reduce_into(&mut acc, &body)?,
                        404 => still.push(m),
                        c => bail!("GET {m}-{id}: HTTP {c}"),
                    }
                }
                pending = still;
                if !pending.is_empty() {
                    if Instant::now() > deadline {
                        bail!("partitions {pending:?} never appeared");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    println!("{}", digest(&acc));
    Ok(())
}

fn expected(mappers: usize, reducers: usize, bytes: u64) -> Result<Vec<String>> {
    let mut accs = vec![BTreeMap::new(); reducers];
    for i in 0..mappers {
        for (j, p) in partitions(i, reducers, bytes).iter().enumerate() {
            reduce_into(&mut accs[j], p)?;
        }
    }
    Ok(accs.iter().map(digest).collect())
}

fn wait_port(hosts: &Hosts, addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !hosts.reachable(addr) {
        if Instant::now() > deadline {
            bail!("{what} did not start on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Where the S3-compatible server is: `$WARMPOOL_S3_SERVER` or the venv `scripts/setup.sh`
/// makes.
fn s3_server() -> PathBuf {
    std::env::var_os("WARMPOOL_S3_SERVER").map_or_else(|| PathBuf::from("/opt/warmpool/s3venv/bin/moto_server"), PathBuf::from)
}

/// The `shuffle` driver.
pub(crate) fn run(hosts: &Hosts, mappers: usize, reducers: usize, bytes: u64, vias: &[Via], reps: usize, out: Option<PathBuf>) -> Result<()> {
    if mappers == 0 || reducers == 0 || reducers > 1000 {
        bail!("need 1..=1000 reducers and at least one mapper");
    }
    let (pool_manager, preload) = artifacts()?;
    let out = out.unwrap_or_else(|| PathBuf::from("results/shuffle").join(timestamp()));
    std::fs::create_dir_all(&out)?;
    let work = Scratch::new("shuffle")?;
    let w = &work.0;
    let exe = std::env::current_exe()?;
    let want = expected(mappers, reducers, bytes)?;
    let (_servers, redis_addr, s3_addr) = start_servers(hosts, vias, w)?;
    let mut csv = String::from("via,rep,mappers,reducers,bytes_per_mapper,job_ms,bytes_moved\n");
    let mut rows: Vec<(&str, f64, u64)> = vec![];
    for &via in vias {
        let peers = matches!(via, Via::Peer | Via::PeerPrewarmed);
        // Peer links: a rendezvous server and shuf/b's manager on the server host, shuf/a's
        // manager on the client host (fresh for every transport, so nothing is left over).
        let (_peer_procs, a, b_socket) = if peers { start_peer_side(hosts, via, w, &pool_manager, mappers, reducers)? } else { (vec![], None, PathBuf::new()) };
        for rep in 0..reps {
            if via == Via::PeerPrewarmed && rep > 0 {
                // Wait for the pool to make the next job's links.
                wait_ready_links(a.as_ref().expect("peer daemon"), "shuf/b", None, mappers * reducers)?;
            }
            let (map_target, reduce_target) = match via {
                Via::Peer | Via::PeerPrewarmed => {
                    let vb = vaddr(&pool_manager, "shuf/b")?;
                    let va = vaddr(&pool_manager, "shuf/a")?;
                    (SocketAddr::new(vb, 0), SocketAddr::new(va, 0))
                }
                Via::Redis => (redis_addr, redis_addr),
                Via::S3 => (s3_addr, s3_addr),
            };
            if via == Via::Redis {
                let (mut s, mut r) = connect_on(hosts, redis_addr)?;
                resp(&mut s, &mut r, &[b"FLUSHALL"])?;
            }
            let started = Instant::now();
            let mut reducers_p = vec![];
            for j in 0..reducers {
                let mut c = hosts.server(&exe);
                c.args(["shuffle-reduce", "--id", &j.to_string(), "--mappers", &mappers.to_string(), "--via", via.name(), "--target", &reduce_target.to_string()]);
                if peers {
                    c.env("LD_PRELOAD", &preload).env("WARMPOOL_SOCKET", &b_socket);
                }
                reducers_p.push(c.stdout(Stdio::piped()).spawn()?);
            }
            let mut mappers_p = vec![];
            for i in 0..mappers {
                let env: Vec<(&str, &std::ffi::OsStr)> = match &a {
                    Some(d) => vec![("LD_PRELOAD", preload.as_os_str()), ("WARMPOOL_SOCKET", d.socket.as_os_str())],
                    None => vec![],
                };
                let mut c = hosts.client(&exe, &env);
                c.args(["shuffle-map", "--id", &i.to_string(), "--reducers", &reducers.to_string(), "--bytes", &bytes.to_string(), "--via", via.name(), "--target", &map_target.to_string()]);
                mappers_p.push(c.stdout(Stdio::null()).spawn()?);
            }
            for (i, m) in mappers_p.iter_mut().enumerate() {
                if !m.wait()?.success() {
                    bail!("mapper {i} ({}) failed", via.name());
                }
            }
            for (j, r) in reducers_p.into_iter().enumerate() {
                let o = r.wait_with_output()?;
                if !o.status.success() {
                    bail!("reducer {j} ({}) failed", via.name());
                }
                let got = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                if got != want[j] {
                    bail!("reducer {j} ({}) computed {got}, expected {}", via.name(), want[j]);
                }
            }
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let payload = bytes / RECORD as u64 * RECORD as u64 * mappers as u64;
            let moved = if peers { payload } else { 2 * payload };
            let _ = writeln!(csv, "{},{rep},{mappers},{reducers},{bytes},{ms:.1},{moved}", via.name());
            eprintln!("shuffle: {} rep {rep}: {ms:.1} ms", via.name());
            rows.push((via.name(), ms, moved));
        }
        if let Some(d) = &a {
            std::fs::write(out.join(format!("status-{}.txt", via.name())), d.cli(&["status"])?)?;
        }
    }
    std::fs::write(out.join("shuffle.csv"), &csv)?;
    report(hosts, mappers, reducers, bytes, vias, reps, &out, &rows)
}


/// The exchange servers on the server host (Redis, the S3 server and its bucket), as `vias`
/// need them; with their addresses.
fn start_servers(hosts: &Hosts, vias: &[Via], w: &Path) -> Result<(Vec<KillOnDrop>, SocketAddr, SocketAddr)> {
    let server_ip = hosts.server_ip();
    let mut servers: Vec<KillOnDrop> = vec![];
    let redis_addr = SocketAddr::new(server_ip, hosts.server_port(REDIS_PORT)?);
    let s3_addr = SocketAddr::new(server_ip, hosts.server_port(S3_PORT)?);
    if vias.contains(&Via::Redis) {
        servers.push(KillOnDrop(
            hosts
                .server("redis-server")
                .args(["--bind", &server_ip.to_string(), "--port", &redis_addr.port().to_string(), "--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--proto-max-bulk-len", "2gb", "--client-output-buffer-limit", "normal 0 0 0"])
                .stdout(Stdio::null())
                .spawn()
                .context("starting redis-server")?,
        ));
        wait_port(hosts, redis_addr, "redis-server")?;
    }
    if vias.contains(&Via::S3) {
        let bin = s3_server();
        if !bin.exists() {
            bail!("{} missing: run scripts/setup.sh (it installs moto's S3 server in a venv) or set WARMPOOL_S3_SERVER", bin.display());
        }
        servers.push(KillOnDrop(
            hosts
                .server(&bin)
                .args(["-H", &server_ip.to_string(), "-p", &s3_addr.port().to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(w.join("s3.log"))?)
                .spawn()
                .context("starting the S3 server")?,
        ));
        wait_port(hosts, s3_addr, "the S3 server")?;
        let code = match hosts {
            Hosts::Local(t) => t.client.enter(move || Ok(http(s3_addr, "PUT", "/shuffle", &[])?.0))?,
            _ => http(s3_addr, "PUT", "/shuffle", &[])?.0,
        };
        if code != 200 {
            bail!("creating the bucket: HTTP {code}");
        }
    }
    Ok((servers, redis_addr, s3_addr))
}

/// Peer links: a rendezvous server and shuf/b's manager on the server host, shuf/a's manager
/// on the client host (fresh for every transport, so nothing is left over); waits until the
/// links are up (and, prewarmed, ready).
fn start_peer_side(hosts: &Hosts, via: Via, w: &Path, pool_manager: &Path, mappers: usize, reducers: usize) -> Result<(Vec<KillOnDrop>, Option<Daemon>, PathBuf)> {
    let server_ip = hosts.server_ip();
    let mut peer_procs: Vec<KillOnDrop> = vec![];
    let rdv = SocketAddr::new(server_ip, hosts.server_port(RDV_PORT)?);
    let secret = w.join("shuf.secret");
    std::fs::write(&secret, "shuffle-experiment-secret-000")?;
    peer_procs.push(KillOnDrop(
        hosts
            .server(pool_manager)
            .args(["rendezvous", "--listen", &rdv.to_string(), "--job", &format!("shuf={}", secret.display())])
            .env_remove("LD_PRELOAD")
            .stderr(std::fs::File::create(w.join(format!("rdv-{}.log", via.name())))?)
            .spawn()?,
    ));
    wait_port(hosts, rdv, "the rendezvous server")?;
    let channels: Vec<String> = (0..reducers).map(|j| format!("\"shuf/b:{}\"", CHANNEL_BASE + j as u16)).collect();
    let prewarm = if via == Via::PeerPrewarmed { format!("prewarm = [{}]\nprewarm_links = {mappers}\n", channels.join(", ")) } else { String::new() };
    let cfg = |name: &str, other: &str, extra: &str| {
        format!("[peer]\nname = \"shuf/{name}\"\nrendezvous = \"{rdv}\"\nsecret_file = \"{}\"\npeers = [\"shuf/{other}\"]\n{extra}", secret.display())
    };
    let b_socket = w.join(format!("b-{}.sock", via.name()));
    let b_toml = w.join(format!("b-{}.toml", via.name()));
    std::fs::write(&b_toml, format!("socket = \"{}\"\n{}", b_socket.display(), cfg("b", "a", "")))?;
    peer_procs.push(KillOnDrop(
        hosts
            .server(pool_manager)
            .args(["serve", "--config"])
            .arg(&b_toml)
            .env_remove("LD_PRELOAD")
            .stderr(std::fs::File::create(w.join(format!("b-{}.log", via.name())))?)
            .spawn()?,
    ));
    let a_toml = w.join(format!("a-{}.toml", via.name()));
    std::fs::write(&a_toml, cfg("a", "b", &prewarm))?;
    let d = Daemon::start(hosts, pool_manager, w.join(format!("a-{}.sock", via.name())), &["--config".into(), a_toml.display().to_string()], &w.join(format!("a-{}.log", via.name())))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = d.cli(&["status"])?;
        let ready = ready_links(&st, "shuf/b", None);
        if st.contains(", connected)") && b_socket.exists() && (via != Via::PeerPrewarmed || ready >= mappers * reducers) {
            break;
        }
        if Instant::now() > deadline {
            bail!("peer set-up did not finish:\n{st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok((peer_procs, Some(d), b_socket))
}

/// summary.md from the job times of a run.
#[allow(clippy::too_many_arguments)]
fn report(hosts: &Hosts, mappers: usize, reducers: usize, bytes: u64, vias: &[Via], reps: usize, out: &Path, rows: &[(&str, f64, u64)]) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(md, "# Shuffle: reduce-by-key, {mappers} mappers x {reducers} reducers, {} MB per mapper\n", bytes / 1_000_000);
    let _ = writeln!(md, "Path: {}; {reps} repetition(s); machine: `{}`. Every reducer's result checked against a local computation.\n", hosts.describe(), machine());
    let _ = writeln!(md, "| exchange | median job ms | bytes moved | vs s3 |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let med = |name: &str| -> Option<f64> {
        let mut v: Vec<f64> = rows.iter().filter(|r| r.0 == name).map(|r| r.1).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let s3 = med("s3");
    for via in vias {
        if let Some(m) = med(via.name()) {
            let moved = rows.iter().find(|r| r.0 == via.name()).map_or(0, |r| r.2);
            let vs = s3.map_or("-".to_owned(), |s| format!("{:.2}x", s / m));
            let _ = writeln!(md, "| {} | {m:.1} | {moved} | {vs} |", via.name());
        }
    }
    let _ = writeln!(
        md,
        "\nSource: direct function links ran a 100+ function reduce-by-key 4.7x faster than exchanging through object storage. \
         Here the object store is moto's in-memory S3 server and Redis runs on the server host: bytes through a store cross \
         the emulated path once (mapper → store) and are read locally by the reducer."
    );
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    println!("\nwrote {}/{{shuffle.csv,summary.md}}", out.display());
    Ok(())
}

fn connect_on(hosts: &Hosts, addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>)> {
    match hosts {
        Hosts::Local(t) => t.client.enter(move || connect(addr)),
        _ => connect(addr),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_every_record_once_and_reduce_deterministically() {
        let parts = partitions(3, 4, 64 * 1000);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 64 * 1000);
        for (j, p) in parts.iter().enumerate() {
            for r in p.chunks_exact(RECORD) {
                assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()) % 4, j as u64);
            }
        }
        let a = expected(2, 3, 64 * 500).unwrap();
        assert_eq!(a, expected(2, 3, 64 * 500).unwrap());
        assert_ne!(a[0], a[1]);
        let mut acc = BTreeMap::new();
        assert!(reduce_into(&mut acc, &[0u8; 65]).is_err());
    }
}
