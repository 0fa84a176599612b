//! What the daemon does for processes that link at load time and end at once (issue 13):
//! shell helpers, `/bin/true`, anything run under the shim that never asks for a socket.
//! A process gone before the daemon identified it is normal: no WARN, one count in
//! `warmpool_clients_gone_before_identified_total`; and a live process linked after a burst of
//! them is still identified and served. Real nginx, real processes, a real daemon.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

const GONE: &str = "warmpool_clients_gone_before_identified_total";

fn warm_pool(dest: std::net::SocketAddr) -> String {
    format!("keep_window_when_idle = false\n\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"warm\"\nmin_idle = 1\n")
}

/// Run `/bin/true` under the shim `n` times, one after the other.
fn run_true(d: &Daemon, n: usize) {
    for _ in 0..n {
        let mut c = Command::new("/bin/true");
        shim_env(&mut c, d);
        assert!(c.stdin(Stdio::null()).status().expect("run /bin/true").success());
    }
}

fn warnings(d: &Daemon) -> Vec<String> {
    d.log().lines().filter(|l| l.contains("WARN")).map(str::to_owned).collect()
}

fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"")
}

/// `curl` under the shim: the live process that must still get a pooled socket.
fn curl_gets_a_pooled_socket(d: &Daemon, nginx: &Nginx) {
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).arg(nginx.addr().to_string()).env_remove("LD_PRELOAD").output();
    assert!(o.expect("pool-manager prewarm").status.success());
    let idle = || metric_samples(&d.metrics(), "warmpool_pool_sockets").iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum::<f64>();
    assert!(wait_until(Duration::from_secs(5), || idle() >= 1.0), "no warm socket ready\n{}", d.log());
    let before = handouts(d);
    let mut c = Command::new(tool_path("curl"));
    c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).arg(nginx.url("/")).stdin(Stdio::null());
    shim_env(&mut c, d);
    let o = c.output().expect("curl");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "curl: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(handouts(d) - before, 1.0, "the live process got no pooled socket\n{}\n{}", d.metrics(), d.log());
}

/// 50 processes link while the daemon is stopped (the listener's backlog holds their
/// connections) and exit: every one is gone by the time it is accepted, deterministically.
/// 50 more run with the daemon running: it reaches some of them alive (identified as usual)
/// and the others gone. Neither kind is a WARN; the gone ones are counted; a live process after
/// them is served.
#[test]
fn processes_gone_before_identification_are_counted_not_warned() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let mut d = Daemon::with_config(&warm_pool(nginx.addr()));
    let clients = |d: &Daemon| d.metric("warmpool_clients_total");
    assert_eq!(d.metric(GONE), 0.0, "the metric is exported from the start\n{}", d.metrics());
    let at_start = clients(&d);

    d.kill(libc::SIGSTOP);
    run_true(&d, 50);
    d.kill(libc::SIGCONT);
    assert!(wait_until(Duration::from_secs(10), || clients(&d) - at_start >= 50.0), "{}", d.log());
    let counted = wait_until(Duration::from_secs(5), || d.metric(GONE) >= 50.0);
    let warns = warnings(&d);
    assert!(warns.is_empty(), "processes that had exited made the daemon warn:\n{}", warns.join("\n"));
    assert!(counted, "{}\n{}", d.metrics(), d.log());
    assert_eq!(d.metric(GONE), 50.0);

    run_true(&d, 50);
    assert!(wait_until(Duration::from_secs(10), || clients(&d) - at_start >= 100.0), "{}", d.log());
    assert!(d.metric(GONE) <= 100.0);
    let warns = warnings(&d);
    assert!(warns.is_empty(), "processes that exited at once made the daemon warn:\n{}", warns.join("\n"));

    curl_gets_a_pooled_socket(&d, &nginx);
    assert!(warnings(&d).is_empty(), "{}", d.log());
}

/// The link outlives the process that made it (its child keeps the fd): the link is not hung
/// up, but the pid the kernel reports for it has exited (and been reaped) before the daemon
/// looked. That is "gone", not a failure: no WARN, counted, and the link gets no sockets.
#[test]
fn a_link_whose_process_exited_while_a_child_holds_it_is_gone_not_a_failure() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let mut d = Daemon::with_config(&warm_pool(nginx.addr()));
    // The parent connects and exits at once; the child keeps the link until its stdin closes.
    let script = "import os, socket, sys\n\
                  s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
                  s.connect(sys.argv[1])\n\
                  if os.fork() == 0:\n    print('ready', flush=True)\n    sys.stdin.read()\n    os._exit(0)\n\
                  os._exit(0)\n";
    d.kill(libc::SIGSTOP);
    let mut py = Command::new(SYSTEM_PYTHON)
        .args(["-c", script])
        .arg(&d.socket)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let hold = py.stdin.take().expect("stdin");
    let mut out = py.stdout.take().expect("stdout");
    let mut ready = [0u8; 6];
    out.read_exact(&mut ready).expect("the child holds the link");
    assert!(py.wait().expect("reap the parent").success());
    d.kill(libc::SIGCONT);
    let counted = wait_until(Duration::from_secs(5), || d.metric(GONE) >= 1.0);
    let warns = warnings(&d);
    drop(hold); // the child reads EOF and exits
    assert!(warns.is_empty(), "a link whose process had exited made the daemon warn:\n{}", warns.join("\n"));
    assert!(counted, "{}\n{}", d.metrics(), d.log());
    curl_gets_a_pooled_socket(&d, &nginx);
}
