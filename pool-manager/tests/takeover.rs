//! Restart without losing the pool: `pool-manager serve --takeover` receives the running
//! daemon's listening socket, pooled sockets, client connections and leases over
//! `SCM_RIGHTS`. Real nginx, real Python functions under the shim.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

fn function(d: &Daemon, nginx: &Nginx, path: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/http_get.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args(["blocking", "127.0.0.1", &nginx.addr().port().to_string(), path]);
    shim_env(&mut cmd, d);
    let out = cmd.output().expect("run function");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A function holding one keep-alive connection (a lease) until told to finish
/// (`hold_get.py`), optionally in a cgroup.
struct Holder {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Holder {
    /// Started and past its first request.
    fn start(d: &Daemon, nginx: &Nginx, cgroup: Option<&Path>) -> Holder {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/hold_get.py");
        let port = nginx.addr().port().to_string();
        let mut cmd = match cgroup {
            // The cgroup path as an argument, never spliced into the script: it may hold any byte.
            Some(cg) => {
                let mut c = Command::new("/bin/sh");
                c.args(["-c", "echo $$ > \"$1\" && shift && exec \"$@\"", "sh"]).arg(cg.join("cgroup.procs")).arg("python3");
                c
            }
            None => Command::new("python3"),
        };
        cmd.arg(script).args(["127.0.0.1", &port]).stdin(Stdio::piped()).stdout(Stdio::piped());
        shim_env(&mut cmd, d);
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "{line}");
        Holder { child, out }
    }

    /// One more request on the held connection, then close it (a give-back).
    fn finish(&mut self) {
        self.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert!(line.starts_with("done") && line.trim().ends_with("200"), "{line}");
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(2));
    }
}

/// A successor on the predecessor's socket (its own metrics port and log).
fn successor(old: &Daemon, args: &[&str]) -> Daemon {
    let dir = TempDir::new();
    let metrics = localhost(free_port());
    let log_path = dir.join("successor.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(pool_manager_bin())
        .args(["serve", "--takeover", "--socket"])
        .arg(&old.socket)
        .args(["--metrics", &metrics.to_string(), "--metrics-tenant-labels"])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon { child, socket: old.socket.clone(), metrics, log_path, dir };
    assert!(
        wait_until(Duration::from_secs(10), || matches!(http_get(d.metrics, "/metrics", Duration::from_millis(500)), Ok((200, _)))),
        "successor did not come up:\n{}",
        d.log()
    );
    d
}

#[test]
fn takeover_keeps_pooled_sockets_and_leases() {
    if !(require_tool("nginx") && require_tool("python3")) {
        return;
    }
    let nginx = Nginx::start();
    let pool = format!("{}=reuse:http", nginx.addr());
    let mut old = Daemon::start(&["--pool", &pool]);
    // Two functions in a row: the pool now holds a socket that has served requests.
    for _ in 0..2 {
        function(&old, &nginx, "/warmup");
    }
    assert!(wait_until(Duration::from_secs(5), || old.metric("warmpool_returned_total") >= 1.0));
    // A function that holds its socket (a lease) across the restart.
    let mut holder = Holder::start(&old, &nginx, None);
    // (nginx logs a request just after answering it.)
    assert!(wait_until(Duration::from_secs(3), || nginx.log_entries().iter().any(|e| e.2 == "/before")));
    let conns_before = nginx.distinct_connections();

    let started = Instant::now();
    let mut new = successor(&old, &["--pool", &pool]);
    let old_status = old.child.wait().expect("predecessor exits");
    eprintln!("take-over done in {:?}", started.elapsed());
    assert!(old_status.success(), "predecessor exit: {old_status}\n{}", old.log());
    assert!(old.log().contains("handed over"), "{}", old.log());
    assert!(new.log().contains("took over"), "{}", new.log());
    assert!(old.socket.exists(), "the socket file stays for the successor");

    // The holder finishes on its old socket and closes it: the release reaches the successor,
    // which knows the lease and takes the socket back into the pool.
    holder.finish();
    assert!(
        wait_until(Duration::from_secs(5), || new.metric("warmpool_returned_total") >= 1.0),
        "the successor took the lease back\n{}",
        new.log()
    );
    // New functions are served from the handed-over sockets: nginx sees no new connection.
    for _ in 0..3 {
        function(&new, &nginx, "/after-takeover");
    }
    assert!(wait_until(Duration::from_secs(3), || nginx.log_entries().iter().filter(|e| e.2 == "/after-takeover").count() == 3));
    assert_eq!(nginx.distinct_connections(), conns_before, "no warm connection was lost in the restart");
    assert!(new.metric("warmpool_handouts_total{kind=\"reuse\"}") >= 3.0);
    // And the successor is a full daemon: it stops cleanly and removes the socket.
    assert!(new.stop().success());
    assert!(!new.socket.exists());
}

#[test]
fn takeover_without_a_running_daemon_starts_fresh() {
    let dir = TempDir::new();
    let socket = dir.join("pool.sock");
    let metrics = localhost(free_port());
    let mut child = Command::new(pool_manager_bin())
        .args(["serve", "--takeover", "--socket"])
        .arg(&socket)
        .args(["--metrics", &metrics.to_string()])
        .env_remove("LD_PRELOAD")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || socket.exists()));
    terminate_child(&mut child, Duration::from_secs(5));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("starting fresh"), "{err}");
}

/// Case 12: a function in a cgroup whose name holds a tab (anyone with a delegated subtree
/// can make one) is handed over like any other: the successor takes over, adopts the client
/// and its lease in that tenant, and takes the socket back when the function closes it.
#[test]
fn takeover_carries_a_cgroup_name_with_a_tab() {
    if !(require_root("takeover_carries_a_cgroup_name_with_a_tab") && require_tool("nginx") && require_tool("python3")) {
        return;
    }
    let nginx = Nginx::start();
    let pool = format!("{}=reuse:http", nginx.addr());
    let mut old = Daemon::start(&["--pool", &pool]);
    // (The kernel refuses a newline in a cgroup name; a tab and a space it takes.)
    let cg = Cgroup::new("fn\tx y");
    let name = cg.0.file_name().unwrap().to_str().unwrap().to_owned();
    // A first function there makes the tenant's pool (its own connect was a miss) ...
    Holder::start(&old, &nginx, Some(&cg.0)).finish();
    let idle_there = |d: &Daemon| {
        metric_samples(&d.metrics(), "warmpool_pool_sockets{").iter().any(|(l, v)| l.contains(&format!("/{name}\"")) && l.contains("idle") && *v >= 1.0)
    };
    assert!(wait_until(Duration::from_secs(5), || idle_there(&old)), "{}", old.metrics());
    // ... and the next one holds a pooled socket of it across the take-over.
    let mut holder = Holder::start(&old, &nginx, Some(&cg.0));
    let mut new = successor(&old, &["--pool", &pool]);
    let old_status = old.child.wait().expect("predecessor exits");
    assert!(old_status.success(), "predecessor exit: {old_status}\n{}", old.log());
    assert!(new.log().contains("1 clients, 1 leases"), "{}", new.log());
    holder.finish();
    assert!(
        wait_until(Duration::from_secs(5), || new.metric("warmpool_returned_total") >= 1.0),
        "the successor took the lease of the tab-named cgroup back\n{}",
        new.log()
    );
    assert!(new.metrics().contains(&format!("/{name}\",")), "the tenant's pool, its cgroup intact:\n{}", new.metrics());
    assert!(new.stop().success());
}

/// Warm a reuse pool (two functions, one socket given back), then hold a lease: what a
/// failed take-over must leave with the running daemon.
fn pooled_and_leased(old: &Daemon, nginx: &Nginx) -> Holder {
    for _ in 0..2 {
        function(old, nginx, "/warmup");
    }
    assert!(wait_until(Duration::from_secs(5), || old.metric("warmpool_returned_total") >= 1.0));
    Holder::start(old, nginx, None)
}

/// After a failed take-over the running daemon serves as before: the held lease comes back
/// to it, and new functions get its pooled socket (nginx sees no new connection).
fn serves_on(old: &mut Daemon, nginx: &Nginx, mut holder: Holder, connections: usize) {
    assert!(old.try_wait().is_none(), "the running daemon stopped:\n{}", old.log());
    assert!(wait_until(Duration::from_secs(5), || old.log().contains("serving on")), "{}", old.log());
    assert_eq!(old.metric("warmpool_takeovers_failed_total"), 1.0);
    let returned = old.metric("warmpool_returned_total");
    holder.finish();
    assert!(wait_until(Duration::from_secs(5), || old.metric("warmpool_returned_total") > returned), "the lease came back\n{}", old.log());
    let reused = old.metric("warmpool_handouts_total{kind=\"reuse\"}");
    for _ in 0..3 {
        function(old, nginx, "/after-failed-takeover");
    }
    assert!(old.metric("warmpool_handouts_total{kind=\"reuse\"}") >= reused + 3.0, "{}", old.metrics());
    assert_eq!(nginx.distinct_connections(), connections, "no pooled socket was lost");
    assert!(old.stop().success());
}

/// An injected failure at the last step before the commit: the successor cannot bind its
/// metrics endpoint (the port is taken). It exits; the running daemon serves on with its
/// pools, clients and leases.
#[test]
fn a_successor_that_fails_before_its_commit_leaves_the_daemon_serving() {
    if !(require_tool("nginx") && require_tool("python3")) {
        return;
    }
    let nginx = Nginx::start();
    let pool = format!("{}=reuse:http", nginx.addr());
    let mut old = Daemon::start(&["--pool", &pool]);
    let holder = pooled_and_leased(&old, &nginx);
    assert!(wait_until(Duration::from_secs(3), || nginx.log_entries().iter().any(|e| e.2 == "/before")));
    let connections = nginx.distinct_connections();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let o = Command::new(pool_manager_bin())
        .args(["serve", "--takeover", "--socket"])
        .arg(&old.socket)
        .args(["--metrics", &taken.local_addr().unwrap().to_string(), "--pool", &pool])
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("binding metrics endpoint"), "{}\n{err}", o.status);
    serves_on(&mut old, &nginx, holder, connections);
}

/// A successor that goes away in the middle of the hand-over (here: reads the first record
/// and closes): the running daemon serves on.
#[test]
fn a_successor_that_vanishes_mid_handover_leaves_the_daemon_serving() {
    if !(require_tool("nginx") && require_tool("python3")) {
        return;
    }
    use pool_manager::wire::{self, Msg, Record};
    use std::os::fd::AsRawFd;
    let nginx = Nginx::start();
    let pool = format!("{}=reuse:http", nginx.addr());
    let mut old = Daemon::start(&["--pool", &pool]);
    let holder = pooled_and_leased(&old, &nginx);
    assert!(wait_until(Duration::from_secs(3), || nginx.log_entries().iter().any(|e| e.2 == "/before")));
    let connections = nginx.distinct_connections();
    {
        let conn = wire::client::Link::connect(&old.socket, None).unwrap().into_fd();
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let n = wire::encode(&Msg::Takeover, 1, &mut buf);
        wire::unix::send(conn.as_raw_fd(), &buf[..n], None, 0).unwrap();
        let got = wire::unix::recv(conn.as_raw_fd(), &mut buf, 0).unwrap();
        assert_eq!(wire::decode(&buf[..got.len]).map(|m| m.0), Ok(Msg::Handover(Record::Listener)));
        assert!(got.fd.is_some(), "the listener came with its fd");
    }
    serves_on(&mut old, &nginx, holder, connections);
}

/// A running daemon of a version before the commit (it answers `Takeover` with the retired
/// text records, kind 0x84, and stops whatever happens): the successor does not mistake it
/// for a failure that leaves it serving; it waits until it is gone and starts fresh. The old
/// daemon is played by this test (one accept, one record, then it goes away).
#[test]
fn a_legacy_predecessor_is_replaced_by_a_fresh_start() {
    use pool_manager::wire::{self, handover::LEGACY_KIND, Msg};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = TempDir::new();
    let socket = dir.join("pool.sock");
    let listener = pool_manager::server::bind(&socket, 0o600).unwrap();
    let path = socket.clone();
    let legacy = std::thread::spawn(move || {
        let mut conn = None;
        assert!(wait_until(Duration::from_secs(10), || {
            // SAFETY: accept4 on our (non-blocking) listener; a new fd goes into an OwnedFd.
            let fd = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
            // SAFETY: a fresh fd we own.
            conn = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
            conn.is_some()
        }));
        let conn = conn.unwrap();
        let mut buf = vec![0u8; 64];
        assert!(wait_until(Duration::from_secs(10), || wire::unix::recv(conn.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT).is_ok()));
        assert_eq!(wire::decode(&buf[..8]).map(|m| m.0), Ok(Msg::Takeover));
        // `Handover(Listener)` as the old text form: header with kind 0x84, item 1, no text.
        let n = wire::encode(&Msg::Status, 0, &mut buf);
        buf[3] = LEGACY_KIND;
        buf[n] = 1;
        wire::unix::send(conn.as_raw_fd(), &buf[..n + 1], Some(listener.as_raw_fd()), 0).unwrap();
        // The successor closes the connection; the old daemon finds it gone, stops and
        // removes its socket file.
        let closed = wait_until(Duration::from_secs(10), || {
            matches!(wire::unix::recv(conn.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT), Ok(r) if r.len == 0)
        });
        assert!(closed, "the successor hung up on the legacy hand-over");
        drop((conn, listener));
        std::fs::remove_file(&path).unwrap();
    });
    let metrics = localhost(free_port());
    let log = dir.join("successor.log");
    let mut child = Command::new(pool_manager_bin())
        .args(["serve", "--takeover", "--socket"])
        .arg(&socket)
        .args(["--metrics", &metrics.to_string()])
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    legacy.join().expect("the legacy daemon's part");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || matches!(http_get(metrics, "/ready", Duration::from_millis(300)), Ok((200, _)))),
        "the successor did not start fresh:\n{}",
        text()
    );
    assert!(text().contains("retired text hand-over"), "{}", text());
    let o = Command::new(pool_manager_bin()).args(["status", "--socket"]).arg(&socket).output().unwrap();
    assert!(o.status.success(), "the fresh daemon answers on the socket: {}", String::from_utf8_lossy(&o.stderr));
    let status = terminate_child(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status}\n{}", text());
}
