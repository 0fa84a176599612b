//! Hand-out path benchmark (a bench binary, not a timed test):
//!
//! `cargo bench -p pool-manager --bench handout [-- --iters N --seconds S]`
//!
//! In one process: a pool manager (the library's `server::run`) on a private socket, a
//! loopback TCP server answering 1-byte requests, and the preload library loaded with
//! `dlopen` so its interposed `connect`/`close` are called directly. Measures, with
//! hdrhistogram:
//! - `baseline`: libc connect + 1-byte request/response + close (no shim);
//! - `pooled connect`: the shim's connect() to a pooled destination (hand-out + dup3);
//! - `pooled total`: the same full function cycle as the baseline, through the pool;
//! - `passthrough`: the shim's connect() to an unpooled destination against libc's;
//! - `round trip`: one protocol Acquire → Grant(fd) → Release, no shim;
//! - `throughput`: hand-outs/s with 64 concurrent clients;
//! - `netns` (root only): a pooled connect() from a client process in a network namespace
//!   the bench makes against one in the daemon's namespace, alternating (see `handout/netns.rs`).
//!
//! Writes `target/bench/handout.csv` (one row per metric) and prints a table.

use hdrhistogram::Histogram;
use pool_manager::config::{Config, Policy, PoolSettings};
use pool_manager::server::{self, Shared};
use pool_manager::wire::{self, Dest, Disposition, Msg};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "handout/netns.rs"]
mod netns;

type ConnectFn = unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;
type CloseFn = unsafe extern "C" fn(libc::c_int) -> libc::c_int;

/// A loopback server: one thread per connection, answers every byte with one byte, and a
/// `HEAD` request (the daemon's end-of-exchange proof, `protocol = "http"`) with an HTTP/1.1
/// response without body.
fn echo_server() -> SocketAddr {
    echo_server_on(TcpListener::bind("127.0.0.1:0").expect("bind"))
}

fn echo_server_on(l: TcpListener) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                while matches!(c.read(&mut b), Ok(1)) {
                    let reply: &[u8] = if b[0] == b'H' {
                        let mut head = vec![b'H'];
                        while !head.ends_with(b"\r\n\r\n") && matches!(c.read(&mut b), Ok(1)) {
                            head.push(b[0]);
                        }
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        &b
                    };
                    if c.write_all(reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn sockaddr(a: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = a else { panic!("IPv4 only") };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    }
}

fn tcp_socket() -> i32 {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    let one: libc::c_int = 1;
    // SAFETY: an int option.
    unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&one as *const libc::c_int).cast(), 4) };
    fd
}

/// One function cycle on `fd`: 1-byte request, 1-byte response.
fn request(fd: i32) {
    let b = [7u8];
    let mut r = [0u8];
    // SAFETY: plain I/O on our own socket.
    unsafe {
        assert_eq!(libc::write(fd, b.as_ptr().cast(), 1), 1);
        assert_eq!(libc::read(fd, r.as_mut_ptr().cast(), 1), 1);
    }
}

struct Shim {
    connect: ConnectFn,
    close: CloseFn,
}

fn load_shim() -> Shim {
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/handout-* → target/release/libwarmpool_preload.so
    let so: PathBuf = exe.parent().and_then(|p| p.parent()).unwrap().join("libwarmpool_preload.so");
    assert!(so.exists(), "{} missing: run `cargo build --release` first", so.display());
    let c = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: loading our own library; its constructor reads the environment set in main.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {}", so.display());
    // SAFETY: the exported symbols have exactly these signatures.
    unsafe {
        Shim {
            connect: std::mem::transmute::<*mut libc::c_void, ConnectFn>(libc::dlsym(h, c"connect".as_ptr())),
            close: std::mem::transmute::<*mut libc::c_void, CloseFn>(libc::dlsym(h, c"close".as_ptr())),
        }
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

struct Row {
    name: &'static str,
    h: Histogram<u64>,
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--ns-client") {
        netns::client_main();
        return;
    }
    // Every baseline and passthrough iteration leaves a loopback connection in TIME_WAIT for
    // 60 s; the defaults stay well inside the ~28,000 ephemeral ports.
    let iters = arg("--iters", 10_000);
    let seconds = arg("--seconds", 3);
    let pooled = echo_server();
    let unpooled = echo_server();
    // The same pool without the end-of-exchange proof: the steady-rate rows compare the two.
    let unchecked = echo_server();
    let dir = std::env::temp_dir().join(format!("warmpool-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("pool.sock");
    // The namespace rows' topology, made before the daemon starts (its pool is configured).
    let bench_ns = netns::BenchNs::make().map_err(|why| println!("netns rows skipped: {why}")).ok();
    let ns_dests = bench_ns.as_ref().map(|ns| (echo_server_on(ns.listener()), echo_server_on(ns.listener())));
    // Before any thread exists: the shim's constructor reads these at dlopen.
    std::env::set_var("WARMPOOL_SOCKET", &sock);

    let mut cfg = Config::default();
    cfg.auto.enabled = false;
    cfg.keep_window_when_idle = false;
    let mut s = PoolSettings::with_policy(Policy::Reuse);
    s.min_idle = 4;
    // Reused sockets are out of use while their return checks run (quarantine, the holders
    // walk): a pool serves at most size / that time hand-outs per second (README, sizing).
    let size = usize::try_from(arg("--pool-size", 128)).expect("a pool size that fits usize");
    s.max_idle = size;
    s.max_per_destination = 2 * size;
    s.quarantine = Duration::ZERO;
    s.protocol = Some(pool_manager::proof::Protocol::Http);
    let mut u = s.clone();
    u.protocol = Some(pool_manager::proof::Protocol::Unchecked);
    if let Some((tight, paced)) = ns_dests {
        cfg.add_pool(&tight.to_string(), s.clone()).unwrap();
        let mut w = PoolSettings::with_policy(Policy::Warm);
        w.min_idle = 4;
        cfg.add_pool(&paced.to_string(), w).unwrap();
    }
    cfg.add_pool(&pooled.to_string(), s).unwrap();
    cfg.add_pool(&unchecked.to_string(), u).unwrap();
    let listener = server::bind(&sock, 0o600).expect("bind pool socket");
    let shared = Arc::new(Shared::new(cfg));
    let cancel = tokio_util::sync::CancellationToken::new();
    let daemon = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        std::thread::spawn(move || {
            // The same runtime flavour as the daemon binary.
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
            rt.block_on(server::run(listener, shared, cancel)).unwrap();
        })
    };
    let shim = load_shim();

    // Warm up: create the tenant's pool and let it fill.
    let pa = sockaddr(pooled);
    let ua = sockaddr(unpooled);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    for _ in 0..200 {
        let fd = tcp_socket();
        // SAFETY: connect/close through the shim with a valid address.
        unsafe {
            assert_eq!((shim.connect)(fd, (&pa as *const libc::sockaddr_in).cast(), len), 0);
            request(fd);
            (shim.close)(fd);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut rows = Vec::new();

    // Baseline cycles, then pooled cycles (separately: the server's per-connection work for
    // baseline connects would otherwise land inside the pooled measurements).
    let (mut base, mut pconn, mut ptotal) = (hist(), hist(), hist());
    for _ in 0..iters {
        let t = Instant::now();
        let fd = tcp_socket();
        // SAFETY: libc connect/close with a valid address.
        unsafe {
            assert_eq!(libc::connect(fd, (&pa as *const libc::sockaddr_in).cast(), len), 0);
            request(fd);
            libc::close(fd);
        }
        base.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..iters {
        let t = Instant::now();
        let fd = tcp_socket();
        let c = Instant::now();
        // SAFETY: as above, through the shim.
        unsafe {
            assert_eq!((shim.connect)(fd, (&pa as *const libc::sockaddr_in).cast(), len), 0);
            pconn.record(c.elapsed().as_nanos() as u64).unwrap();
            request(fd);
            (shim.close)(fd);
        }
        ptotal.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    rows.push(Row { name: "baseline: connect+1B req/resp+close (libc)", h: base });
    rows.push(Row { name: "pooled: connect() through the pool", h: pconn });
    rows.push(Row { name: "pooled: connect+1B req/resp+close", h: ptotal });

    // At a steady rate (one function per millisecond, alternating between the two pools): the
    // proof runs in quarantine, between functions, so it should add nothing to connect().
    let ca = sockaddr(unchecked);
    let (mut with_proof, mut without) = (hist(), hist());
    for i in 0..2 * arg("--steady", 2_000) {
        let (addr, h) = if i % 2 == 0 { (&pa, &mut with_proof) } else { (&ca, &mut without) };
        let fd = tcp_socket();
        let c = Instant::now();
        // SAFETY: as above, through the shim.
        unsafe {
            assert_eq!((shim.connect)(fd, (addr as *const libc::sockaddr_in).cast(), len), 0);
            h.record(c.elapsed().as_nanos() as u64).unwrap();
            request(fd);
            (shim.close)(fd);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    rows.push(Row { name: "steady 1/ms: pooled connect(), http proof", h: with_proof });
    rows.push(Row { name: "steady 1/ms: pooled connect(), no proof", h: without });

    let ns_ratios = bench_ns.as_ref().zip(ns_dests).map(|(ns, (tight, paced))| {
        let (r, ratios) = netns::compare(ns, tight, paced, iters);
        rows.extend(r);
        ratios
    });

    // Passthrough: unpooled destination, shim vs libc connect() alone.
    let (mut lib, mut shm) = (hist(), hist());
    for _ in 0..iters / 2 {
        for through_shim in [false, true] {
            let fd = tcp_socket();
            let t = Instant::now();
            // SAFETY: connect with a valid address, then close.
            unsafe {
                let r = if through_shim {
                    (shim.connect)(fd, (&ua as *const libc::sockaddr_in).cast(), len)
                } else {
                    libc::connect(fd, (&ua as *const libc::sockaddr_in).cast(), len)
                };
                assert_eq!(r, 0);
                let e = t.elapsed().as_nanos() as u64;
                if through_shim { &mut shm } else { &mut lib }.record(e).unwrap();
                (shim.close)(fd);
            }
        }
    }
    let overhead = shm.value_at_quantile(0.5) as i64 - lib.value_at_quantile(0.5) as i64;
    rows.push(Row { name: "unpooled: connect() (libc)", h: lib });
    rows.push(Row { name: "unpooled: connect() through the shim (passthrough)", h: shm });

    // Protocol round trip: Acquire -> Grant(fd) -> Release, one client.
    let client = wire::client::Link::connect(&sock, None).unwrap().into_fd();
    let mut rt = hist();
    let dest = Dest::from_socket_addr(pooled);
    let mut buf = [0u8; 64];
    for i in 0..iters as u32 {
        let t = Instant::now();
        let lease = acquire(&client, dest, i, &mut buf);
        rt.record(t.elapsed().as_nanos() as u64).unwrap();
        if let Some(lease) = lease {
            release(&client, lease, &mut buf);
        }
    }
    rows.push(Row { name: "round trip: Acquire -> Grant(fd) (SCM_RIGHTS)", h: rt });

    // Throughput: 64 clients, each its own connection, acquire/release for `seconds`.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (stop, count, sock) = (stop.clone(), count.clone(), sock.clone());
            std::thread::spawn(move || {
                let c = wire::client::Link::connect(&sock, None).unwrap().into_fd();
                let mut buf = [0u8; 64];
                let mut seq = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    seq = seq.wrapping_add(1);
                    let lease = acquire(&c, dest, seq, &mut buf);
                    if let Some(lease) = lease {
                        count.fetch_add(1, Ordering::Relaxed);
                        release(&c, lease, &mut buf);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    for th in threads {
        th.join().unwrap();
    }
    let rate = n as f64 / secs;

    println!("\nwarmpool hand-out benchmark ({iters} iterations per row; times in µs)");
    println!("{:<52} {:>9} {:>9} {:>9} {:>9} {:>9}", "", "p50", "p90", "p95", "p99", "max");
    let mut csv = String::from("metric,p50_us,p90_us,p99_us,max_us,count\n");
    for r in &rows {
        let q = |x: f64| r.h.value_at_quantile(x) as f64 / 1000.0;
        println!("{:<52} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}", r.name, q(0.5), q(0.9), q(0.95), q(0.99), r.h.max() as f64 / 1000.0);
        csv.push_str(&format!("{},{:.2},{:.2},{:.2},{:.2},{}\n", r.name, q(0.5), q(0.9), q(0.99), r.h.max() as f64 / 1000.0, r.h.len()));
    }
    println!("passthrough overhead (median shim - median libc): {:.2} µs", overhead as f64 / 1000.0);
    println!("throughput, 64 concurrent clients: {rate:.0} hand-outs/s ({n} in {secs:.1} s)");
    for (what, [p50, p99]) in ns_ratios.unwrap_or_default() {
        println!("pooled connect() ({what}), client in its own netns / in the daemon's: p50 x{p50:.3}, p99 x{p99:.3}");
        let tag = what.split(' ').next().unwrap_or(what);
        csv.push_str(&format!("netns_over_host_{tag}_p50_ratio,{p50:.3},,,,\nnetns_over_host_{tag}_p99_ratio,{p99:.3},,,,\n"));
    }
    csv.push_str(&format!("passthrough_overhead_median,{:.3},,,,\n", overhead as f64 / 1000.0));
    csv.push_str(&format!("throughput_64_clients_per_s,{rate:.0},,,,{n}\n"));
    let out = std::env::current_exe().unwrap().parent().and_then(|p| p.parent()).and_then(|p| p.parent()).unwrap().join("bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("handout.csv"), csv).unwrap();
    println!("wrote {}", out.join("handout.csv").display());

    cancel.cancel();
    daemon.join().unwrap();
    drop(bench_ns);
    let _ = std::fs::remove_dir_all(&dir);
}

fn acquire(c: &OwnedFd, dest: Dest, seq: u32, buf: &mut [u8; 64]) -> Option<wire::LeaseId> {
    let n = wire::encode(&Msg::Acquire(dest), seq, buf);
    wire::unix::send(c.as_raw_fd(), &buf[..n], None, 0).unwrap();
    let got = wire::unix::recv(c.as_raw_fd(), buf, 0).unwrap();
    match wire::decode(&buf[..got.len]).unwrap().0 {
        Msg::Grant { lease, .. } => {
            drop(got.fd);
            Some(lease)
        }
        _ => None,
    }
}

fn release(c: &OwnedFd, lease: wire::LeaseId, buf: &mut [u8; 64]) {
    let n = wire::encode(&Msg::Release { lease, disposition: Disposition::Clean }, 0, buf);
    wire::unix::send(c.as_raw_fd(), &buf[..n], None, 0).unwrap();
}

