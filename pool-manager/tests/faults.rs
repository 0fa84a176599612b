//! Faults: the daemon killed mid-load, the server restarted behind pooled sockets, threads
//! racing connect/close on the same fd numbers. Real nginx, curl and Python under the shim.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn curl(socket: &Path, nginx: &Nginx, path: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", &nginx.url(path)])
        .env("LD_PRELOAD", preload_path())
        .env("WARMPOOL_SOCKET", socket)
        .output()
        .map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && body == "hello\n" {
        Ok(body)
    } else {
        Err(format!("curl {path}: {} {body:?} {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn daemon_killed_mid_load_functions_keep_working_and_a_restarted_daemon_serves() {
    if !(require_tool("nginx") && require_tool("curl")) {
        return;
    }
    let nginx = Nginx::start();
    let pool = format!("{}=reuse:http", nginx.addr());
    let mut daemon = Daemon::start(&["--pool", &pool]);
    let socket = daemon.socket.clone();
    let load = {
        let socket = socket.clone();
        let url_nginx = Nginx::url(&nginx, "/");
        std::thread::spawn(move || {
            let mut failures = vec![];
            for i in 0..60 {
                let out = Command::new("curl")
                    .args(["-s", "--max-time", "10", &format!("{url_nginx}load{i}")])
                    .env("LD_PRELOAD", preload_path())
                    .env("WARMPOOL_SOCKET", &socket)
                    .output()
                    .unwrap();
                if !out.status.success() || out.stdout != b"hello\n" {
                    failures.push(format!("{i}: {}", out.status));
                }
            }
            failures
        })
    };
    // Kill the daemon while the load runs.
    assert!(wait_until(Duration::from_secs(20), || daemon.metric("warmpool_handouts_total{kind=\"reuse\"}") >= 5.0));
    daemon.kill(libc::SIGKILL);
    let failures = load.join().unwrap();
    assert!(failures.is_empty(), "functions failed while the daemon died: {failures:?}");
    // A new daemon on the same path (the dead one left its socket file) serves again, and has
    // nothing stale: its first hand-outs are warm sockets it made itself.
    let log = TempDir::new();
    let metrics = localhost(free_port());
    let mut child = Command::new(pool_manager_bin())
        .args(["serve", "--socket"])
        .arg(&socket)
        .args(["--metrics", &metrics.to_string(), "--pool", &pool])
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log.join("d.log")).unwrap())
        .spawn()
        .unwrap();
    let metric = |name: &str| -> f64 {
        http_get(metrics, "/metrics", Duration::from_secs(1)).ok().and_then(|(_, b)| metric_samples(&b, name).first().map(|s| s.1)).unwrap_or(-1.0)
    };
    assert!(wait_until(Duration::from_secs(10), || metric("warmpool_returned_total") >= 0.0));
    for i in 0..5 {
        curl(&socket, &nginx, &format!("/after{i}")).unwrap();
    }
    assert!(metric("warmpool_handouts_total{kind=\"warm\"}") + metric("warmpool_handouts_total{kind=\"reuse\"}") >= 3.0);
    terminate_child(&mut child, Duration::from_secs(5));
}

#[test]
fn server_restart_behind_pooled_sockets_is_caught_before_hand_out() {
    if !(require_tool("nginx") && require_tool("curl")) {
        return;
    }
    let mut nginx = Nginx::start();
    let daemon = Daemon::with_config(&format!(
        "[[pool]]\ndestination = \"{}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 4\nmax_idle = 8\n",
        nginx.addr()
    ));
    for i in 0..3 {
        curl(&daemon.socket, &nginx, &format!("/before{i}")).unwrap();
    }
    // The pool is full (min_idle = 4) before the server goes away.
    assert!(wait_until(Duration::from_secs(5), || {
        daemon.status().lines().any(|l| l.contains(&nginx.addr().to_string()) && l.split_whitespace().nth(3).and_then(|v| v.parse::<u32>().ok()).is_some_and(|n| n >= 4))
    }), "{}", daemon.status());
    // Every pooled socket now points at a server process that is gone.
    nginx.restart();
    for i in 0..10 {
        curl(&daemon.socket, &nginx, &format!("/after{i}")).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    }
    let stale = daemon.metric("warmpool_discarded_total{reason=\"peer_closed\"}")
        + daemon.metric("warmpool_discarded_total{reason=\"error\"}")
        + daemon.metric("warmpool_discarded_total{reason=\"not_established\"}");
    assert!(stale >= 4.0, "the stale sockets were found and closed before hand-out: {stale}\n{}", daemon.metrics());
}

#[test]
fn threads_racing_connect_and_close_on_the_same_fd_numbers() {
    if !(require_tool("nginx") && require_tool("python3")) {
        return;
    }
    let nginx = Nginx::start();
    let daemon = Daemon::start(&["--pool", &format!("{}=reuse:http", nginx.addr())]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/race.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args([&nginx.addr().port().to_string(), "8", "50"]);
    shim_env(&mut cmd, &daemon);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("400 ok, 0 errors"), "{text}");
    assert!(daemon.metric("warmpool_handouts_total{kind=\"reuse\"}") > 0.0, "the pool served the threads");
    assert_eq!(daemon.metric("warmpool_fallbacks_total{reason=\"error\"}"), 0.0);
}
