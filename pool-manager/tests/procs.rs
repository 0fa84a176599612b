//! Process boundaries: what the preload library does in a `vfork` child and at a normal exit,
//! and whom `pool-manager exec` serves (the thread's own tenant, an unshaped socket, the
//! daemon named by `WARMPOOL_SOCKET`). Real nginx, real Python, a real daemon.

mod common;

use common::*;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65_534;

/// The daemon configuration for one pooled destination. Every test here writes its pools
/// through this function, so that a setting every reuse pool needs is one line to add.
fn pool_toml(dest: &str, policy: &str) -> String {
    // A reuse pool names its protocol (every server here is nginx).
    let protocol = if policy == "reuse" { "protocol = \"http\"\n" } else { "" };
    format!("keep_window_when_idle = false\n\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"{policy}\"\n{protocol}min_idle = 1\n")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok_stdout(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}\nstdout: {}\nstderr: {}", o.status, text(o), String::from_utf8_lossy(&o.stderr));
    text(o)
}

/// Warm and reused hand-outs so far (all tenants).
fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"")
}

/// Idle sockets in all pools.
fn idle(d: &Daemon) -> f64 {
    metric_samples(&d.metrics(), "warmpool_pool_sockets").iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum()
}

/// Fill this test's pool for `dest` and wait until a socket is ready.
fn prewarm(d: &Daemon, dest: &str) {
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).arg(dest).env_remove("LD_PRELOAD").output().unwrap();
    ok_stdout(&o, "pool-manager prewarm");
    assert!(wait_until(Duration::from_secs(5), || idle(d) >= 1.0), "no idle socket after prewarm\n{}", d.log());
}

fn python(script: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(SYSTEM_PYTHON);
    c.arg(script).args(args).stdin(Stdio::null());
    c
}

/// `pool-manager exec [--socket S] -- PROG ARGS` without the shim; the caller sets the rest.
fn exec_cmd(socket: Option<&Path>, prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(pool_manager_bin());
    c.arg("exec");
    if let Some(s) = socket {
        c.arg("--socket").arg(s);
    }
    c.arg("--").arg(prog).args(args).env_remove("LD_PRELOAD").env_remove("WARMPOOL_SOCKET").stdin(Stdio::null());
    c
}

/// Case 08: Python's `subprocess` (vfork, then close_range in the child) used to run the
/// shim's close_range hook on the parent's memory: the parent lost its link (the fd leaked,
/// the daemon kept one more client per call) and its leases (never given back).
#[test]
fn python_subprocess_calls_leave_the_parents_link_and_leases_alone() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "reuse"));
    prewarm(&d, &dest);
    let port = nginx.port.to_string();
    let pid = d.pid().to_string();
    let mut c = python(&client_script("subprocess_loop.py"), &["127.0.0.1", &port, "20", &pid]);
    shim_env(&mut c, &d);
    let out = ok_stdout(&c.output().unwrap(), "subprocess_loop.py");
    let counts = |tag: &str| -> (i64, i64) {
        let l = out.lines().find_map(|l| l.strip_prefix(tag)).unwrap_or_else(|| panic!("no {tag:?} line in {out}"));
        let v: Vec<i64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
        (v[0], v[1])
    };
    let ((fds0, daemon0), (fds1, daemon1)) = (counts("start "), counts("end "));
    assert_eq!(fds1, fds0, "20 subprocess calls changed the function's fd count:\n{out}");
    // The daemon's client links (Unix sockets; each `true` links while it runs, then exits):
    // a leaked link per call would add 20.
    assert!(daemon1 - daemon0 <= 3, "the daemon gained {} client links over 20 calls:\n{out}", daemon1 - daemon0);
    assert_eq!(nginx.connections().iter().filter(|(_, u)| u.starts_with("/sub")).count(), 21);
    // Every pooled socket's close() reached the daemon as a clean give-back (none ended with
    // the link), and given-back sockets were reused once their checks passed.
    let handed = || d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}");
    // (A give-back the pool has no room for is closed as over capacity, not counted returned.)
    let settled = || d.metric("warmpool_returned_total") + d.metric("warmpool_discarded_total{reason=\"over_capacity\"}");
    assert!(wait_until(Duration::from_secs(5), || settled() >= handed()), "{}", d.metrics());
    assert_eq!(d.metric("warmpool_orphaned_leases_total"), 0.0, "{}", d.metrics());
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"}") >= 1.0, "{}", d.metrics());
}

/// A vfork child that closes its copy of the parent's pooled socket (by close(), then
/// close_range) must not give the parent's socket back: the parent still uses it, and the
/// next function must not be handed it meanwhile.
#[test]
fn a_vfork_child_closing_its_copy_never_gives_the_parents_socket_away() {
    if !require_tool("nginx") || !require_tool("cc") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "reuse"));
    prewarm(&d, &dest);
    let bin = d.dir.join("vfork_close");
    let o = Command::new(tool_path("cc")).arg("-O1").arg("-o").arg(&bin).arg(client_script("vfork_close.c")).output().unwrap();
    ok_stdout(&o, "cc vfork_close.c");
    let port = nginx.port.to_string();
    let mut c = Command::new(&bin);
    c.arg(&port).stdin(Stdio::piped()).stdout(Stdio::piped());
    shim_env(&mut c, &d);
    let mut parent = c.spawn().unwrap();
    let mut out = BufReader::new(parent.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "held", "vfork_close did not get through its first request");
    // A give-back from the child would show up here (bounded wait for what must not happen).
    wait_until(Duration::from_secs(1), || d.metric("warmpool_returned_total") >= 1.0);
    assert_eq!(d.metric("warmpool_returned_total"), 0.0, "the child's close gave the parent's socket back\n{}", d.status());
    // The next function meanwhile gets another connection than the one the parent holds.
    let mut f = python(&client_script("http_get.py"), &["blocking", "127.0.0.1", &port, "/other"]);
    shim_env(&mut f, &d);
    ok_stdout(&f.output().unwrap(), "http_get.py");
    parent.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(parent.wait().unwrap().success());
    assert_eq!(line.trim(), "done 200");
    // nginx logs a request after answering it: wait for all three lines.
    let logged = |uri: &str| nginx.connections().iter().any(|(_, u)| u == uri);
    assert!(wait_until(Duration::from_secs(5), || ["/parent1", "/parent2", "/other"].iter().all(|u| logged(u))), "{:?}", nginx.connections());
    let conn_of = |uri: &str| nginx.connections().iter().find(|(_, u)| u == uri).map(|(c, _)| *c).unwrap();
    assert_eq!(conn_of("/parent1"), conn_of("/parent2"), "the parent kept its connection");
    assert_ne!(conn_of("/other"), conn_of("/parent1"), "another function was handed the socket the parent still used");
}

/// Item 4: a function whose client keeps its connection until it exits normally gives it
/// back at exit, and the next function reuses it.
#[test]
fn a_connection_kept_until_a_normal_exit_is_given_back_and_reused() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "reuse"));
    prewarm(&d, &dest);
    let port = nginx.port.to_string();
    let before = d.metric("warmpool_handouts_total{kind=\"reuse\"");
    for i in 0..5 {
        let mut c = python(&client_script("keep_until_exit.py"), &["127.0.0.1", &port, &format!("/keep{i}")]);
        shim_env(&mut c, &d);
        let out = ok_stdout(&c.output().unwrap(), "keep_until_exit.py");
        assert!(out.trim().ends_with(" 200"), "function {i}: {out}");
        // The daemon takes a given-back socket through quarantine before reuse.
        assert!(
            wait_until(Duration::from_secs(5), || d.metric("warmpool_returned_total") > i as f64),
            "function {i}'s socket never came back\n{}\n{}",
            d.metrics(),
            d.log()
        );
    }
    let keep: Vec<u64> = nginx.connections().iter().filter(|(_, u)| u.starts_with("/keep")).map(|(c, _)| *c).collect();
    assert_eq!(keep.len(), 5);
    let distinct: HashSet<u64> = keep.iter().copied().collect();
    assert!(distinct.len() <= 2, "five functions that exit holding their connection used {} upstream connections", distinct.len());
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"") - before >= 3.0, "{}", d.metrics());
}

/// At exit only a socket the fd number still holds goes back: a pooled fd closed behind the
/// shim's back (raw system call) whose number now holds the program's own connection is not
/// given back as clean, and that connection is left alone.
#[test]
fn at_exit_an_fd_number_that_holds_another_socket_is_not_given_back() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "reuse"));
    prewarm(&d, &dest);
    let implicit = d.metric("warmpool_discarded_total{reason=\"implicit\"}");
    let mut c = python(&client_script("exit_fd_replaced.py"), &["127.0.0.1", &nginx.port.to_string()]);
    shim_env(&mut c, &d);
    let out = ok_stdout(&c.output().unwrap(), "exit_fd_replaced.py");
    let fds: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fds.first(), fds.get(1), "the new socket did not take the pooled fd number: {out}");
    assert!(
        wait_until(Duration::from_secs(5), || d.metric("warmpool_discarded_total{reason=\"implicit\"}") > implicit),
        "the lease did not end as implicit\n{}",
        d.metrics()
    );
    assert_eq!(d.metric("warmpool_returned_total"), 0.0, "a socket the fd no longer held was given back as clean");
}

/// Case 13: a program under exec that drops to another uid connects on its own; the same
/// program as the supervisor's uid is served from the pool (control).
#[test]
fn exec_serves_only_threads_with_the_supervisors_identity() {
    if !require_root("exec_serves_only_threads_with_the_supervisors_identity") || !require_tool("nginx") || !require_tool("setpriv") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "warm"));
    prewarm(&d, &dest);
    let st = Staged::new();
    let script = st.script();
    let port = nginx.port.to_string();
    let get = |path: &str| -> Vec<String> { vec![script.display().to_string(), "blocking".into(), "127.0.0.1".into(), port.clone(), path.into()] };
    // Control: the supervisor's own uid is served.
    let before = handouts(&d);
    let args = get("/as-root");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok_stdout(&exec_cmd(Some(&d.socket), Path::new(SYSTEM_PYTHON), &args).output().unwrap(), "exec as root");
    assert_eq!(handouts(&d), before + 1.0, "control: exec served the root program from the pool\n{}", d.log());
    prewarm(&d, &dest);
    // The program drops to nobody before it connects: its connect continues.
    let before = handouts(&d);
    let mut args = vec![format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into(), SYSTEM_PYTHON.into()];
    args.extend(get("/as-nobody"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok_stdout(&exec_cmd(Some(&d.socket), &tool_path("setpriv"), &args).output().unwrap(), "exec setpriv");
    assert!(out.contains(" 200 "), "{out}");
    assert_eq!(handouts(&d), before, "a program running as nobody was handed root's pooled socket\n{}", d.status());
}

/// Case 14 (exec half): options set before connect() and a bound source address make exec
/// let the connect continue, so the program's socket keeps them; a plain socket is served.
#[test]
fn exec_lets_a_shaped_socket_connect_on_its_own() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "warm"));
    prewarm(&d, &dest);
    let port = nginx.port.to_string();
    let script = client_script("connect_semantics.py");
    let run = |variant: &str| -> String {
        let mut c = exec_cmd(Some(&d.socket), Path::new(SYSTEM_PYTHON), &[script.to_str().unwrap(), variant, "127.0.0.1", &port]);
        ok_stdout(&c.output().unwrap(), variant).trim().to_owned()
    };
    let before = handouts(&d);
    assert_eq!(run("plain"), "- 127.0.0.1 200");
    assert_eq!(handouts(&d), before + 1.0, "control: a plain socket is served from the pool\n{}", d.log());
    for (variant, want) in
        [("rcvtimeo", "3 127.0.0.1 200"), ("bindtodevice", "lo 127.0.0.1 200"), ("congestion", "reno 127.0.0.1 200"), ("bind", "- 127.0.0.2 200")]
    {
        prewarm(&d, &dest);
        let before = handouts(&d);
        assert_eq!(run(variant), want, "{variant}: the program's own setting is lost");
        assert_eq!(handouts(&d), before, "{variant}: a pooled socket replaced a socket the program had shaped");
    }
}

/// `pool-manager exec` (and `status`) find the daemon through `WARMPOOL_SOCKET`, as the shim does.
#[test]
fn exec_and_status_honour_warmpool_socket() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&pool_toml(&dest, "warm"));
    prewarm(&d, &dest);
    let before = handouts(&d);
    let script = client_script("http_get.py");
    let port = nginx.port.to_string();
    let mut c = exec_cmd(None, Path::new(SYSTEM_PYTHON), &[script.to_str().unwrap(), "blocking", "127.0.0.1", &port, "/env"]);
    c.env("WARMPOOL_SOCKET", &d.socket);
    ok_stdout(&c.output().unwrap(), "exec with WARMPOOL_SOCKET");
    assert_eq!(handouts(&d), before + 1.0, "exec did not reach the daemon named by WARMPOOL_SOCKET\n{}", d.log());
    let o = Command::new(pool_manager_bin()).arg("status").env_remove("LD_PRELOAD").env("WARMPOOL_SOCKET", &d.socket).output().unwrap();
    assert!(ok_stdout(&o, "status with WARMPOOL_SOCKET").contains(&dest));
    // The flag still wins over the environment.
    let o = Command::new(pool_manager_bin())
        .args(["status", "--socket"])
        .arg(&d.socket)
        .env_remove("LD_PRELOAD")
        .env("WARMPOOL_SOCKET", d.dir.join("nothing-here.sock"))
        .output()
        .unwrap();
    assert!(ok_stdout(&o, "status --socket").contains(&dest));
}
