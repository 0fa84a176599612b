//! The hand-out bench's namespace rows: a pooled connect() from a client process in a network
//! namespace the bench makes, against the same from a client process in the daemon's own
//! namespace, alternating in rounds so that both see the same machine load.
//!
//! Topology (root only; removed at the end, also on panic): two namespaces, `wpbsrv<pid>`
//! for the echo servers and `wpbench<pid>` for the namespace client, and two veth pairs:
//! host `198.19.250.1/30` to server `.2`, client namespace `198.19.250.6/30` to server `.5`.
//! The servers listen on `198.19.250.9` (the server namespace's loopback), routed through
//! each side's veth: both clients name the same destination over the same kind of path (the
//! daemon keeps one pool per client namespace: they are different tenants). The daemon runs
//! in the host namespace and makes the namespace client's sockets through its maker there.
//!
//! The two clients are this bench binary started again with `--ns-client [--netns PATH]`:
//! identical code, one of them `setns()`-ed into the namespace before it does anything else.
//! Each reads `COUNT PORT PACE_US` on stdin, does that many pooled connect()+1-byte
//! request+close cycles to `198.19.250.9:PORT`, `PACE_US` apart, and answers with the
//! connect() times (ns) on one line.
//!
//! Two pairs of rows: a `reuse` pool back to back (the hand-out alone: sockets come back and
//! go out again, nothing is made), and a `warm` pool at one connect per 3 ms (every
//! hand-out is a fresh connection, so the pool refills all the time: for the namespace
//! client through the daemon's socket maker in that namespace).

use super::{hist, load_shim, request, sockaddr, tcp_socket, Row};
use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the echo servers listen (the server namespace's loopback).
pub(crate) const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 9);

/// The bench's namespaces; deleted (with their veth pairs) on drop.
pub(crate) struct BenchNs {
    client: String,
    server: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr).trim()))
    }
}

impl BenchNs {
    /// Make the namespaces and veth pairs, or say why not (not root, no `ip`).
    pub(crate) fn make() -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let pid = std::process::id();
        let ns = Self { client: format!("wpbench{pid}"), server: format!("wpbsrv{pid}") };
        let (c, v) = (ns.client.as_str(), ns.server.as_str());
        let host = format!("wpbh{}", pid % 1_000_000);
        let dest = format!("{SERVER_IP}/32");
        for n in [c, v] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        ip(&["link", "add", &host, "type", "veth", "peer", "name", "wpbs0", "netns", v])?;
        ip(&["-n", c, "link", "add", "wpbc", "type", "veth", "peer", "name", "wpbs1", "netns", v])?;
        ip(&["-n", v, "addr", "add", &dest, "dev", "lo"])?;
        for (n, dev, cidr) in [(None, host.as_str(), "198.19.250.1/30"), (Some(v), "wpbs0", "198.19.250.2/30"), (Some(v), "wpbs1", "198.19.250.5/30"), (Some(c), "wpbc", "198.19.250.6/30")] {
            let pre: Vec<&str> = n.map(|n| vec!["-n", n]).unwrap_or_default();
            ip(&[&pre[..], &["addr", "add", cidr, "dev", dev]].concat())?;
            ip(&[&pre[..], &["link", "set", dev, "up"]].concat())?;
        }
        ip(&["route", "add", &dest, "via", "198.19.250.2"])?;
        ip(&["-n", c, "route", "add", &dest, "via", "198.19.250.5"])?;
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.client)
    }

    /// A listener on `SERVER_IP` in the server namespace (bound by a thread that entered it).
    pub(crate) fn listener(&self) -> std::net::TcpListener {
        let path = format!("/run/netns/{}", self.server);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the server namespace");
            // SAFETY: setns on an fd we hold; only this short-lived thread moves.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind((SERVER_IP, 0)).expect("bind in the server namespace")
        })
        .join()
        .expect("bind thread")
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and so both pairs, and the host
        // route through them.
        for n in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A client process driven over its stdin/stdout.
struct Client {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Client {
    fn start(netns: Option<&str>) -> Self {
        let mut c = Command::new(std::env::current_exe().expect("own exe"));
        c.arg("--ns-client");
        if let Some(p) = netns {
            c.args(["--netns", p]);
        }
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start a bench client");
        let to = child.stdin.take().expect("piped stdin");
        let mut from = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut ready = String::new();
        from.read_line(&mut ready).expect("client ready line");
        assert_eq!(ready.trim(), "ready", "bench client did not start");
        Self { child, to, from }
    }

    /// `n` cycles to `dest`, `pace` apart; their connect() times go into `h`.
    fn round(&mut self, n: u64, dest: SocketAddr, pace: Duration, h: &mut Histogram<u64>) {
        writeln!(self.to, "{n} {} {}", dest.port(), pace.as_micros()).expect("to client");
        let mut line = String::new();
        self.from.read_line(&mut line).expect("from client");
        for v in line.split_ascii_whitespace() {
            h.record(v.parse().expect("a number")).expect("in range");
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.to, "0 0 0");
        let _ = self.child.wait();
    }
}

/// The namespace rows: `iters` pooled connects per client to the `reuse` pool `tight`, back
/// to back, and `iters / 8` to the `warm` pool `paced` at one per 3 ms (not 1 ms: each
/// hand-out's refill, `REFILL_DELAY` = 1 ms later, would then land on the next hand-out and
/// measure that collision instead); in rounds of
/// 100, the order of the two clients swapped every round. Returns the rows and, per pair,
/// the ratios (namespace client over host client) of their p50 and p99.
pub(crate) fn compare(ns: &BenchNs, tight: SocketAddr, paced: SocketAddr, iters: u64) -> (Vec<Row>, Vec<(&'static str, [f64; 2])>) {
    let mut host = Client::start(None);
    let mut inside = Client::start(Some(&ns.path()));
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    let pairs = [
        // (Row names go into the CSV's first column: no commas.)
        ("reuse back to back", tight, Duration::ZERO, iters, ["netns: reuse pool back to back; client in daemon's netns", "netns: reuse pool back to back; client in own netns"]),
        ("warm 1/3ms", paced, Duration::from_millis(3), iters / 8, ["netns: warm pool 1/3ms; client in daemon's netns", "netns: warm pool 1/3ms; client in own netns"]),
    ];
    for (what, dest, pace, n, names) in pairs {
        let (mut h_host, mut h_ns) = (hist(), hist());
        for r in 0..n.div_ceil(100) {
            if r % 2 == 0 {
                host.round(100, dest, pace, &mut h_host);
                inside.round(100, dest, pace, &mut h_ns);
            } else {
                inside.round(100, dest, pace, &mut h_ns);
                host.round(100, dest, pace, &mut h_host);
            }
        }
        let ratio = |q: f64| h_ns.value_at_quantile(q) as f64 / h_host.value_at_quantile(q) as f64;
        ratios.push((what, [ratio(0.5), ratio(0.99)]));
        rows.push(Row { name: names[0], h: h_host });
        rows.push(Row { name: names[1], h: h_ns });
    }
    (rows, ratios)
}

/// The client process (`--ns-client [--netns PATH]`): enters the namespace first (while it
/// has one thread), loads the shim, then serves rounds.
pub(crate) fn client_main() {
    let args: Vec<String> = std::env::args().collect();
    let val = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    if let Some(p) = val("--netns") {
        let f = std::fs::File::open(&p).expect("open the namespace");
        // SAFETY: setns on an fd we hold; the process has one thread, so the whole process
        // (and the pidfd the daemon reads) is in the namespace from now on.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
    }
    let shim = load_shim();
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let cycle = |a: &libc::sockaddr_in, record: Option<&mut Vec<u64>>| {
        let fd = tcp_socket();
        let t = Instant::now();
        // SAFETY: connect/close through the shim with a valid address.
        unsafe {
            assert_eq!((shim.connect)(fd, (a as *const libc::sockaddr_in).cast(), len), 0, "connect: {}", std::io::Error::last_os_error());
            if let Some(r) = record {
                r.push(t.elapsed().as_nanos() as u64);
            }
            request(fd);
            (shim.close)(fd);
        }
    };
    let mut warmed = std::collections::HashSet::new();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").and_then(|()| out.flush()).expect("to parent");
    let mut lines = std::io::stdin().lock().lines();
    while let Some(Ok(l)) = lines.next() {
        let v: Vec<u64> = l.split_ascii_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [n, port, pace_us] = v[..] else { break };
        if n == 0 {
            break;
        }
        let a = sockaddr(SocketAddr::new(SERVER_IP.into(), u16::try_from(port).expect("a port")));
        let pace = Duration::from_micros(pace_us);
        // Warm up at the first round to a destination: the tenant's pool is made at the
        // first connect and fills meanwhile.
        if warmed.insert(port) {
            for _ in 0..200 {
                cycle(&a, None);
                std::thread::sleep(Duration::from_micros(200).max(pace));
            }
        }
        let mut times = Vec::with_capacity(n as usize);
        for _ in 0..n {
            cycle(&a, Some(&mut times));
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
        let line: Vec<String> = times.iter().map(u64::to_string).collect();
        writeln!(out, "{}", line.join(" ")).and_then(|()| out.flush()).expect("to parent");
    }
}
