//! Restart without losing the pool: `pool-manager serve --takeover` receives the running
//! daemon's listening socket, pooled sockets, client connections and leases over
//! `SCM_RIGHTS`. Real nginx, real Python functions under the shim.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
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

/// A successor on the predecessor's socket (its own metrics port and log).
fn successor(old: &Daemon, args: &[&str]) -> Daemon {
    let dir = TempDir::new();
    let metrics = localhost(free_port());
    let log_path = dir.join("successor.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(pool_manager_bin())
        .args(["serve", "--takeover", "--socket"])
        .arg(&old.socket)
        .args(["--metrics", &metrics.to_string()])
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/hold_get.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args(["127.0.0.1", &nginx.addr().port().to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped());
    shim_env(&mut cmd, &old);
    let mut holder = cmd.spawn().unwrap();
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
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
    holder.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("done") && line.trim().ends_with("200"), "{line}");
    assert!(holder.wait().unwrap().success());
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
