//! The daemon at the protocol level: bad input, fd hygiene over 10,000 cycles, leases that
//! end without a give-back, a clean SIGTERM, and a client that reads its answers late. A real pool manager process, real servers.

mod common;

use common::*;
use pool_manager::wire::{self, Dest, Disposition, ErrorCode, Msg, Source};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

fn connect(d: &Daemon) -> OwnedFd {
    wire::client::Link::connect(&d.socket, None).expect("connect to daemon").into_fd()
}

fn send(c: &OwnedFd, m: &Msg<'_>, seq: u32) {
    let mut buf = [0u8; 64];
    let n = wire::encode(m, seq, &mut buf);
    wire::unix::send(c.as_raw_fd(), &buf[..n], None, 0).expect("send");
}

/// Receive one reply: (kind summary, fd).
fn recv(c: &OwnedFd) -> (String, Option<OwnedFd>) {
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    let got = wire::unix::recv(c.as_raw_fd(), &mut buf, 0).expect("recv");
    let summary = match wire::decode(&buf[..got.len]).expect("daemon replies decode") {
        (Msg::Grant { lease, source }, seq) => format!("grant {lease} {source:?} seq={seq}"),
        (Msg::Miss { reason, .. }, seq) => format!("miss {reason:?} seq={seq}"),
        (Msg::Error { code, text }, _) => format!("error {code:?} {text}"),
        (Msg::StatusReply(t), _) => format!("status {t}"),
        (other, _) => format!("unexpected {other:?}"),
    };
    (summary, got.fd)
}

fn acquire(c: &OwnedFd, dest: std::net::SocketAddr, seq: u32) -> (String, Option<OwnedFd>) {
    send(c, &Msg::Acquire(Dest::from_socket_addr(dest)), seq);
    recv(c)
}

fn lease_of(summary: &str) -> wire::LeaseId {
    summary.split_whitespace().nth(1).and_then(|s| s.parse().ok()).and_then(wire::LeaseId::new).unwrap_or_else(|| panic!("not a grant: {summary}"))
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd").count()
}

/// The daemon's fds open on `target` (e.g. /dev/null): what a client could have smuggled in.
fn fds_on(pid: u32, target: &str) -> usize {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd");
    dir.flatten().filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == std::path::Path::new(target))).count()
}

/// Wait (bounded) until the daemon is at rest: no socket connecting, in quarantine or under
/// check, and the same fd count in three samples in a row. Returns (fds, pooled sockets).
fn at_rest(d: &Daemon) -> (usize, f64) {
    let busy = ["state=\"connecting\"", "state=\"quarantine\"", "state=\"checking\""];
    let (mut last, mut same, mut pooled) = (None, 0, 0.0);
    let ok = wait_until(Duration::from_secs(10), || {
        let m = d.metrics();
        let quiet = metric_samples(&m, "warmpool_pool_sockets{").iter().all(|(l, v)| *v == 0.0 || !busy.iter().any(|b| l.contains(b)));
        pooled = metric_samples(&m, "warmpool_pool_sockets").iter().map(|(_, v)| v).sum();
        let n = fd_count(d.pid());
        same = if quiet && last == Some(n) { same + 1 } else { 0 };
        last = Some(n);
        same >= 2
    });
    assert!(ok, "daemon not at rest within 10 s (fds {last:?})\n{}", d.metrics());
    (last.unwrap(), pooled)
}

fn warm_pool(d: &Daemon, c: &OwnedFd, dest: std::net::SocketAddr, n: f64) {
    send(c, &Msg::Prewarm(Dest::from_socket_addr(dest)), 1);
    let (r, _) = recv(c);
    assert!(r.starts_with("status prewarming"), "{r}");
    let prefix = format!("warmpool_pool_sockets{{dest=\"{dest}\"");
    let idle = || -> f64 {
        metric_samples(&d.metrics(), &prefix).iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum()
    };
    assert!(wait_until(Duration::from_secs(5), || idle() >= n), "pool never warmed: {}", d.metrics());
}

#[test]
fn bad_input_gets_a_clear_error_and_harms_nobody() {
    if !require_tool("nginx") {
        return;
    }
    let nginx = Nginx::start();
    let d = Daemon::start(&["--pool", &format!("{}=reuse:http", nginx.addr())]);
    let bystander = connect(&d);
    warm_pool(&d, &bystander, nginx.addr(), 1.0);
    let c = connect(&d);

    wire::unix::send(c.as_raw_fd(), b"GET / HTTP/1.1\r\n\r\n", None, 0).unwrap();
    let (r, fd) = recv(&c);
    assert!(r.starts_with("error Malformed") && r.contains("magic"), "{r}");
    assert!(fd.is_none());

    let mut buf = [0u8; 64];
    let n = wire::encode(&Msg::Status, 5, &mut buf);
    buf[2] = 99;
    wire::unix::send(c.as_raw_fd(), &buf[..n], None, 0).unwrap();
    let (r, _) = recv(&c);
    assert!(r.starts_with("error Version") && r.contains("99"), "{r}");

    wire::unix::send(c.as_raw_fd(), &buf[..3], None, 0).unwrap();
    assert!(recv(&c).0.starts_with("error Malformed"));

    // A request with an fd attached: refused, and the fd does not stay in the daemon.
    let n = wire::encode(&Msg::Acquire(Dest::from_socket_addr(nginx.addr())), 6, &mut buf);
    let junk = std::fs::File::open("/dev/null").unwrap();
    // Counted by what they are, not in total: the metrics scrapes that at_rest makes come and
    // go as fds of their own.
    at_rest(&d);
    let fds_before = fds_on(d.pid(), "/dev/null");
    for _ in 0..20 {
        wire::unix::send(c.as_raw_fd(), &buf[..n], Some(junk.as_raw_fd()), 0).unwrap();
        let (r, fd) = recv(&c);
        assert!(r.starts_with(&format!("error {:?}", ErrorCode::UnexpectedFd)), "{r}");
        assert!(fd.is_none());
    }
    at_rest(&d);
    let fds_after = fds_on(d.pid(), "/dev/null");
    assert_eq!(fds_before, fds_after, "the daemon kept fds it was sent");
    // A reply kind sent as a request.
    let n = wire::encode(&Msg::Grant { lease: wire::LeaseId::new(1).unwrap(), source: Source::Warm }, 7, &mut buf);
    wire::unix::send(c.as_raw_fd(), &buf[..n], None, 0).unwrap();
    assert!(recv(&c).0.starts_with("error Malformed"));
    // Releasing a lease this client never had changes nothing (and gets no reply).
    send(&c, &Msg::Release { lease: wire::LeaseId::new(999_999).unwrap(), disposition: Disposition::Clean }, 8);

    // The same connection still works, and so does everyone else's.
    send(&c, &Msg::Status, 9);
    assert!(recv(&c).0.starts_with("status TENANT"));
    let (r, fd) = acquire(&bystander, nginx.addr(), 10);
    assert!(r.starts_with("grant"), "{r}");
    assert!(fd.is_some());
    send(&bystander, &Msg::Release { lease: lease_of(&r), disposition: Disposition::Clean }, 11);
    drop(fd);
}

#[test]
fn no_fd_leak_after_10000_acquire_give_back_cycles() {
    if !require_tool("nginx") {
        return;
    }
    let nginx = Nginx::start();
    let d = Daemon::with_config(&format!(
        "[[pool]]\ndestination = \"{}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 2\nmax_idle = 16\nmax_per_destination = 16\nquarantine = \"0ms\"\n",
        nginx.addr()
    ));
    let c = connect(&d);
    warm_pool(&d, &c, nginx.addr(), 2.0);
    let cycle = |seq: u32| {
        // Given-back sockets are out for the holders walk: a miss waits for one (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (r, fd) = loop {
            let (r, fd) = acquire(&c, nginx.addr(), seq);
            if r.starts_with("grant") || std::time::Instant::now() > deadline {
                break (r, fd);
            }
            // The poll interval of this wait (short: it runs 10,100 times).
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(r.starts_with("grant"), "cycle {seq}: {r}");
        drop(fd.expect("grant carries an fd"));
        send(&c, &Msg::Release { lease: lease_of(&r), disposition: Disposition::Clean }, seq);
    };
    for i in 0..100 {
        cycle(i);
    }
    // The daemon's fds minus the sockets its pools hold (the pool may grow or shrink by a
    // socket or two with demand; anything else that grows is a leak).
    let other_fds = |d: &Daemon| {
        let (fds, pooled) = at_rest(d);
        (fds as f64 - pooled, pooled)
    };
    let (before, pooled_before) = other_fds(&d);
    for i in 0..10_000 {
        cycle(100 + i);
    }
    let (after, pooled_after) = other_fds(&d);
    eprintln!("daemon fds besides pooled sockets: {before} before, {after} after 10,000 cycles (pooled {pooled_before} -> {pooled_after})");
    assert!(after <= before + 1.0, "daemon fd count (besides pooled sockets) grew from {before} to {after}");
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 10_000.0, "{}", d.metrics());
    // Every cycle ran on the pool's few server connections (at most max_per_destination).
    assert!(d.metric("warmpool_connects_total{result=\"ok\"") <= 16.0, "{}", d.metrics());
}

/// A lease whose process ends without a give-back is judged like one: a socket left
/// between requests is reused (after the holders walk and the proof), one with a reply
/// still unread is closed and never handed out again.
#[test]
fn a_lease_that_ends_without_give_back_is_judged_like_a_give_back() {
    if !require_tool("redis-server") {
        return;
    }
    let redis = Redis::start();
    let d = Daemon::start(&["--pool", &format!("{}=reuse:redis", redis.addr())]);
    let settled = |n: f64| wait_until(Duration::from_secs(5), || d.metric("warmpool_orphaned_leases_total") >= n && !d.metrics().lines().any(|l| (l.contains("state=\"checking\"") || l.contains("state=\"quarantine\"")) && !l.ends_with(" 0")));
    let c = connect(&d);
    warm_pool(&d, &c, redis.addr(), 1.0);
    let (r, fd) = acquire(&c, redis.addr(), 2);
    assert!(r.starts_with("grant"), "{r}");
    let port = pool_manager::sock::local_port(fd.as_ref().unwrap());
    // The function dies between requests: its link and its fd go away without a Release.
    drop(fd);
    drop(c);
    assert!(settled(1.0), "{}", d.metrics());
    let c = connect(&d);
    let (r, fd) = acquire(&c, redis.addr(), 3);
    assert!(r.starts_with("grant"), "{r}");
    let fd = fd.unwrap();
    assert_eq!(pool_manager::sock::local_port(&fd), port, "the finished exchange was not reused\n{}", d.metrics());
    // This one dies with a request whose reply it never read.
    let mut s = std::net::TcpStream::from(fd.try_clone().unwrap());
    std::io::Write::write_all(&mut s, b"PING\r\n").unwrap();
    drop(s);
    drop(fd);
    drop(c);
    assert!(settled(2.0), "{}", d.metrics());
    // The server sees the connection closed; nobody gets it again.
    let gone = format!("127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(3), || !redis.command(&["CLIENT", "LIST"]).contains(&gone)),
        "connection from port {port} still open"
    );
    let c = connect(&d);
    let (r, fd) = acquire(&c, redis.addr(), 4);
    if r.starts_with("grant") {
        assert_ne!(pool_manager::sock::local_port(fd.unwrap()), port, "an unfinished orphaned socket was handed out again");
    }
}

#[test]
fn sigterm_closes_pooled_sockets_and_removes_the_socket_file() {
    if !require_tool("redis-server") {
        return;
    }
    let redis = Redis::start();
    let mut d = Daemon::with_config(&format!("[[pool]]\ndestination = \"{}\"\npolicy = \"warm\"\nmin_idle = 3\n", redis.addr()));
    let c = connect(&d);
    warm_pool(&d, &c, redis.addr(), 3.0);
    let clients = || redis.command(&["CLIENT", "LIST"]).lines().filter(|l| l.starts_with("id=")).count();
    // Three pooled connections plus the one asking (earlier command connections may take a
    // moment to disappear from the list).
    assert!(wait_until(Duration::from_secs(3), || clients() == 4), "{}", redis.command(&["CLIENT", "LIST"]));
    let status = d.status();
    assert!(status.contains(&redis.addr().to_string()) && status.contains("warm"), "{status}");
    drop(c);
    assert!(d.stop().success());
    assert!(!d.socket.exists(), "socket file removed");
    assert!(wait_until(Duration::from_secs(3), || clients() == 1), "pooled connections closed on SIGTERM");
}

#[test]
fn a_second_daemon_refuses_a_live_socket_and_bad_config_is_a_clear_error() {
    let d = Daemon::start(&[]);
    let out = std::process::Command::new(pool_manager_bin())
        .args(["serve", "--socket"])
        .arg(&d.socket)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.socket.exists(), "the running daemon's socket is untouched");

    let dir = TempDir::new();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"sometimes\"\n").unwrap();
    let out = std::process::Command::new(pool_manager_bin())
        .args(["serve", "--socket"])
        .arg(dir.join("x.sock"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sometimes") && err.contains("bad.toml"), "{err}");
    let out = std::process::Command::new(pool_manager_bin()).args(["serve", "--pool", "nonsense"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST:PORT=reuse:http|redis|unchecked"));
}

/// A destination written as a host name that does not resolve when the daemon starts is not
/// an error: the daemon starts, says so, and pools it once the name resolves (here: once it
/// appears in a private /etc/hosts, the only name service in its mount namespace, resolved
/// again every 100 ms).
#[test]
fn a_destination_name_is_pooled_once_it_resolves() {
    if !require_root("name resolution") || !require_tool("unshare") || !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let port = nginx.addr().port();
    let dir = TempDir::new();
    let hosts = dir.join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let cfg = dir.join("pool.toml");
    fs::write(&cfg, format!("resolve_interval = \"100ms\"\n[[pool]]\ndestination = \"later.warmpool.test:{port}\"\npolicy = \"reuse\"\nprotocol = \"http\"\n")).unwrap();
    // Names come from that file only: no DNS query leaves the machine while it lacks the name.
    let nss = dir.join("nsswitch.conf");
    fs::write(&nss, "hosts: files\n").unwrap();
    let setup = format!("mount --bind {} /etc/hosts && mount --bind {} /etc/nsswitch.conf", hosts.display(), nss.display());
    let d = Daemon::start_in_mount_ns(&setup, &["--config", cfg.to_str().unwrap()]);
    assert!(d.log().contains("does not resolve yet"), "{}", d.log());
    let curl = |path: &str| {
        let mut c = Command::new(tool_path("curl"));
        c.args(["-sS", "--http1.1", "--max-time", "5", "-o", "-", "-w", " %{http_code}", &nginx.url(path)]).stdin(Stdio::null());
        shim_env(&mut c, &d);
        let o = c.output().expect("curl");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n 200", "{}", String::from_utf8_lossy(&o.stderr));
    };
    curl("/before");
    assert_eq!(d.metric("warmpool_fallbacks_total{reason=\"not_pooled\""), 1.0, "{}", d.metrics());
    // The name appears (the bind mount shows this very file).
    fs::write(&hosts, "127.0.0.1 localhost later.warmpool.test\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || d.log().contains("resolves now")), "{}", d.log());
    curl("/after-1");
    curl("/after-2");
    assert_eq!(d.metric("warmpool_fallbacks_total{reason=\"not_pooled\""), 1.0, "{}", d.metrics());
    // Pooled now: the first request made the pool (a miss), the second was handed a socket.
    let served = d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"");
    assert!(served >= 1.0, "{}", d.metrics());
    assert!(d.status().contains(&format!("127.0.0.1:{port}")), "{}", d.status());
}

/// A client that reads its answers late gets every one, in order: the daemon's answers fill the
/// client's socket (more than the kernel queues for an unread peer) and the daemon waits for room
/// rather than dropping the client. (Client links are registered for readability only, so the
/// daemon retries a full buffer on a timer.)
#[test]
fn a_client_that_reads_its_answers_late_gets_every_one() {
    let d = Daemon::start(&["--pool", "127.0.0.1:9=reuse:http"]);
    let c = connect(&d);
    let mut buf = [0u8; 64];
    // Send without reading until the daemon stops taking requests for 300 ms: it has stopped
    // reading because its answers have filled this socket (each side may queue about 200 kB).
    let (mut sent, mut stalled_since) = (0u32, None);
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < give_up {
        let n = wire::encode(&Msg::Status, sent + 1, &mut buf);
        match wire::unix::send(c.as_raw_fd(), &buf[..n], None, libc::MSG_DONTWAIT) {
            Ok(_) => (sent, stalled_since) = (sent + 1, None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    assert!(stalled_since.is_some_and(|t| t.elapsed() > Duration::from_millis(300)), "the daemon kept reading: {sent} requests");
    std::thread::sleep(Duration::from_millis(50)); // the test itself: answers read late
    let mut reply = vec![0u8; wire::MAX_MESSAGE];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = 0u32;
    while got < sent && std::time::Instant::now() < deadline {
        match wire::unix::recv(c.as_raw_fd(), &mut reply, libc::MSG_DONTWAIT) {
            Ok(r) => {
                let (m, seq) = wire::decode(&reply[..r.len]).expect("daemon replies decode");
                assert!(matches!(m, Msg::StatusReply(_)), "{m:?}");
                got += 1;
                assert_eq!(seq, got, "answers in order");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => panic!("after {got} of {sent} answers: {e}"),
        }
    }
    assert_eq!(got, sent, "every request answered");
}
