//! The hand-out bench's namespace rows: a pooled connect() from a client process in a network
//! namespace the bench makes, against the same from a client process in the daemon's own
//! namespace, alternating in rounds so that both see the same machine load.
//!
//! Topology (root only; removed at the end, also on panic): a namespace `wpbench<pid>` with a
//! veth pair, host end `198.19.250.1/30`, namespace end `.2`. The echo server listens on the
//! host end's address, so both clients name the same destination (the daemon keeps one pool
//! per client namespace: they are different tenants). The daemon runs in the host namespace
//! and makes the namespace client's sockets through its maker for that namespace.
//!
//! The two clients are this bench binary started again with `--ns-client [--netns PATH]`:
//! identical code, one of them `setns()`-ed into the namespace before it does anything else.
//! Each reads a count on stdin, does that many pooled connect()+1-byte request+close cycles
//! and answers with the connect() times (ns) on one line.

use super::{hist, load_shim, request, sockaddr, tcp_socket, Row};
use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The host end of the veth pair: where the echo server listens.
pub(crate) const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 1);
const NS_CIDR: &str = "198.19.250.2/30";
const HOST_CIDR: &str = "198.19.250.1/30";

/// The bench's namespace; deleted (with its veth pair) on drop.
pub(crate) struct BenchNs {
    name: String,
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
    /// Make the namespace and its veth pair, or say why not (not root, no `ip`).
    pub(crate) fn make() -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let pid = std::process::id();
        let ns = Self { name: format!("wpbench{pid}") };
        let (host, inside) = (format!("wpbh{}", pid % 1_000_000), format!("wpbi{}", pid % 1_000_000));
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        ip(&["netns", "add", &ns.name])?;
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &inside, "netns", &ns.name])?;
        ip(&["addr", "add", HOST_CIDR, "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        for args in [&["link", "set", "lo", "up"][..], &["addr", "add", NS_CIDR, "dev", &inside], &["link", "set", &inside, "up"]] {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)?;
        }
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair (both ends) with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A client process driven over its stdin/stdout.
struct Client {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Client {
    fn start(netns: Option<&str>, dest: SocketAddr) -> Self {
        let mut c = Command::new(std::env::current_exe().expect("own exe"));
        c.args(["--ns-client", "--dest", &dest.to_string()]);
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

    /// `n` cycles; their connect() times go into `h`.
    fn round(&mut self, n: u64, h: &mut Histogram<u64>) {
        writeln!(self.to, "{n}").expect("to client");
        let mut line = String::new();
        self.from.read_line(&mut line).expect("from client");
        for v in line.split_ascii_whitespace() {
            h.record(v.parse().expect("a number")).expect("in range");
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.to, "0");
        let _ = self.child.wait();
    }
}

/// The namespace rows: `iters` pooled connects per client, in rounds of 100, the order of
/// the two clients swapped every round. Returns the rows and the ratios (namespace client
/// over host client) of their p50 and p99.
pub(crate) fn compare(ns: &BenchNs, dest: SocketAddr, iters: u64) -> (Vec<Row>, [f64; 2]) {
    let mut host = Client::start(None, dest);
    let mut inside = Client::start(Some(&ns.path()), dest);
    let (mut h_host, mut h_ns) = (hist(), hist());
    let rounds = iters.div_ceil(100);
    for r in 0..rounds {
        if r % 2 == 0 {
            host.round(100, &mut h_host);
            inside.round(100, &mut h_ns);
        } else {
            inside.round(100, &mut h_ns);
            host.round(100, &mut h_host);
        }
    }
    let ratio = |q: f64| h_ns.value_at_quantile(q) as f64 / h_host.value_at_quantile(q) as f64;
    let ratios = [ratio(0.5), ratio(0.99)];
    let rows = vec![
        Row { name: "netns: pooled connect(), client in daemon's netns", h: h_host },
        Row { name: "netns: pooled connect(), client in its own netns", h: h_ns },
    ];
    (rows, ratios)
}

/// The client process (`--ns-client --dest ADDR [--netns PATH]`): enters the namespace
/// first (while it has one thread), loads the shim, warms its pool, then serves rounds.
pub(crate) fn client_main() {
    let args: Vec<String> = std::env::args().collect();
    let val = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    if let Some(p) = val("--netns") {
        let f = std::fs::File::open(&p).expect("open the namespace");
        // SAFETY: setns on an fd we hold; the process has one thread, so the whole process
        // (and the pidfd the daemon reads) is in the namespace from now on.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
    }
    let dest: SocketAddr = val("--dest").expect("--dest").parse().expect("an address");
    let shim = load_shim();
    let a = sockaddr(dest);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let cycle = |record: Option<&mut Vec<u64>>| {
        let fd = tcp_socket();
        let t = Instant::now();
        // SAFETY: connect/close through the shim with a valid address.
        unsafe {
            assert_eq!((shim.connect)(fd, (&a as *const libc::sockaddr_in).cast(), len), 0, "connect: {}", std::io::Error::last_os_error());
            if let Some(r) = record {
                r.push(t.elapsed().as_nanos() as u64);
            }
            request(fd);
            (shim.close)(fd);
        }
    };
    // Warm up: the tenant's pool is made at the first connect and fills meanwhile.
    for _ in 0..200 {
        cycle(None);
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").and_then(|()| out.flush()).expect("to parent");
    let mut lines = std::io::stdin().lock().lines();
    while let Some(Ok(l)) = lines.next() {
        let n: usize = l.trim().parse().unwrap_or(0);
        if n == 0 {
            break;
        }
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            cycle(Some(&mut times));
        }
        let line: Vec<String> = times.iter().map(u64::to_string).collect();
        writeln!(out, "{}", line.join(" ")).and_then(|()| out.flush()).expect("to parent");
    }
}
