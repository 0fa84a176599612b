//! The eBPF kernel assist per network namespace, with the real kernel and real namespaces
//! (root; must run in CI): a learned congestion window belongs to the (namespace,
//! destination) it was learned in, since the same address can be another host on another
//! path in another namespace; and demand counted in a namespace prewarms a pool in that
//! namespace, never in the daemon's.
//!
//! Addresses: 198.18.201.0/30 (host .1, namespace .2); the window test uses each
//! namespace's own loopback.

mod common;

use common::ns::{ip, Ns};
use common::pyhttp::PyServer;
use common::*;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

/// A process that is stopped by PID and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        terminate_child(&mut self.0, Duration::from_secs(2));
    }
}

/// `sink.py PORT` on 127.0.0.1 inside `ns`, once it listens.
fn sink_in(ns: &Ns, port: u16) -> Proc {
    let py = tool_path("python3");
    let mut c = ns.cmd(py.to_str().unwrap());
    c.args([script("sink.py").to_str().unwrap(), &port.to_string()]);
    let mut child = c.stdout(Stdio::piped()).spawn().expect("start sink");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    Proc(child)
}

/// `cwnd.py PORT MODE` inside `ns` and `cg`: the connection's tcpi_snd_cwnd.
fn cwnd_in(ns: &Ns, cg: &Cgroup, port: u16, mode: &str) -> u32 {
    let py = tool_path("python3");
    let o = ns.cmd_in(cg, py.to_str().unwrap(), &[script("cwnd.py").to_str().unwrap(), &port.to_string(), mode]).output().unwrap();
    assert!(o.status.success(), "cwnd.py {mode}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().parse().expect("a number")
}

/// The cookie of `ns` (`SO_NETNS_COOKIE` on a socket made there): the daemon labels what it
/// learned in a namespace it has no entry for `cookie:N` (`net:[INODE]` once it has one:
/// a client, or demand it traced there).
fn cookie_of(ns: &Ns) -> u64 {
    let py = tool_path("python3");
    let code = "import socket; print(int.from_bytes(socket.socket().getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))";
    let o = ns.cmd(py.to_str().unwrap()).args(["-c", code]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().parse().expect("a cookie")
}

/// The window learned for `dest` in `ns` (with cookie `cookie`), under either label.
fn learned_in(d: &Daemon, dest: &str, ns: &Ns, cookie: u64) -> Option<u32> {
    let body = d.metrics();
    [format!("cookie:{cookie}"), ns.label()]
        .iter()
        .find_map(|l| metric_samples(&body, &format!("warmpool_learned_cwnd{{dest=\"{dest}\",netns=\"{l}\"}}")).first().map(|(_, v)| *v as u32))
}

/// The daemon's `max_initial_window` in the window test: learned windows start connections
/// clamped to it.
const MAX_IW: u32 = 4000;

/// Two namespaces hold the same destination (127.0.0.1:PORT, each its own sink on its own
/// loopback) on different paths (loopback MTU 65536 against 1500: windows counted in
/// segments converge apart). What one learned never starts the other's connections; each
/// starts with its own. (Every connection that closes teaches its namespace, so the windows
/// are read again before each new connection: the EWMA moves.)
#[test]
fn each_namespace_starts_new_connections_with_its_own_learned_window() {
    if !assist_available("each_namespace_starts_new_connections_with_its_own_learned_window", &["python3", "ip"]) {
        return;
    }
    let (a, b) = (Ns::new("wa"), Ns::new("wb"));
    ip(&["-n", &b.name, "link", "set", "lo", "mtu", "1500"]);
    let (ca, cb) = (cookie_of(&a), cookie_of(&b));
    assert_ne!(ca, cb);
    let port = free_port();
    let _sinks = (sink_in(&a, port), sink_in(&b, port));
    let cg = Cgroup::new("nswin");
    let d = Daemon::with_config(&format!("[kernel]\nassist = \"on\"\ncgroups = [\"{}\"]\nmax_initial_window = {MAX_IW}\n", cg.0.display()));
    assert_eq!(d.metric("warmpool_kernel_assist"), 1.0, "{}", d.log());
    let dest = format!("127.0.0.1:{port}");

    // A learns; B has learned nothing and starts at the kernel's IW10, not at A's window.
    cwnd_in(&a, &cg, port, "bulk");
    assert!(wait_until(Duration::from_secs(3), || learned_in(&d, &dest, &a, ca).is_some_and(|w| w > 10)), "nothing learned in A:\n{}", d.metrics());
    assert_eq!(learned_in(&d, &dest, &b, cb), None, "B learned from A's connection:\n{}", d.metrics());
    let win_a = learned_in(&d, &dest, &a, ca).unwrap();
    assert_eq!(cwnd_in(&b, &cg, port, "new"), 10, "B must not start with A's window ({win_a})");
    assert_eq!(cwnd_in(&a, &cg, port, "new"), win_a.min(MAX_IW), "A starts with what A learned");

    // B learns its own (from its IW10 connection above and a bulk one); each namespace then
    // starts with its own window.
    cwnd_in(&b, &cg, port, "bulk");
    let learned_b = || learned_in(&d, &dest, &b, cb).filter(|w| *w > 10);
    assert!(wait_until(Duration::from_secs(3), || learned_b().is_some()), "nothing learned in B:\n{}", d.metrics());
    let (win_a, win_b) = (learned_in(&d, &dest, &a, ca).unwrap(), learned_b().unwrap());
    eprintln!("learned windows for {dest}: namespace A {win_a}, namespace B {win_b} segments");
    assert_ne!(win_a, win_b, "the two paths converged to the same window: the test shows nothing\n{}", d.metrics());
    assert_ne!(win_a.min(MAX_IW), win_b.min(MAX_IW), "the same initial window either way: the test shows nothing");
    assert_eq!(cwnd_in(&b, &cg, port, "new"), win_b.min(MAX_IW), "B starts with what B learned (A: {win_a})");
    assert_eq!(cwnd_in(&a, &cg, port, "new"), win_a.min(MAX_IW), "A starts with what A learned (B: {win_b})");
}

fn pools_of(d: &Daemon, dest: &str) -> Vec<(String, f64)> {
    metric_samples(&d.metrics(), &format!("warmpool_pool_sockets{{dest=\"{dest}\""))
}

/// Plain connects (no shim) from a namespace prewarm a pool made in that namespace: its
/// sockets come from the namespace's address, and a shim client there is served warm at its
/// first connect. No pool for that destination is made in the daemon's namespace.
#[test]
fn demand_in_a_namespace_prewarms_in_that_namespace_and_no_other() {
    if !assist_available("demand_in_a_namespace_prewarms_in_that_namespace_and_no_other", &["python3", "ip"]) || !require_tool("curl") {
        return;
    }
    let ns = Ns::new("wd").with_veth(201);
    let port = free_port();
    let srv = PyServer::start("198.18.201.1", port);
    let dest = format!("198.18.201.1:{port}");
    let url = format!("http://{dest}/");
    let cg = Cgroup::new("nsdemand");
    // A process that stays in the namespace and the cgroup (a container's init would): the
    // daemon finds the namespace of the demand through the cgroup's processes.
    let _init = Proc(ns.cmd_in(&cg, "sleep", &["60"]).spawn().expect("start sleep"));
    let d = Daemon::with_config(&format!("[kernel]\nassist = \"on\"\ncgroups = [\"{}\"]\nprewarm_threshold = 2\n", cg.0.display()));
    for i in 0..3 {
        let o = ns.cmd_in(&cg, "curl", &["-sS", "--max-time", "5", "-o", "/dev/null", &url]).output().unwrap();
        assert!(o.status.success(), "plain curl #{i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let label = format!("netns=\"{}\"", ns.label());
    assert!(
        wait_until(Duration::from_secs(5), || pools_of(&d, &dest).iter().any(|(l, v)| l.contains(&label) && l.contains("state=\"idle\"") && *v >= 1.0)),
        "no pool prewarmed in the namespace:\n{}\n{}",
        d.metrics(),
        d.log()
    );
    let elsewhere: Vec<_> = pools_of(&d, &dest).into_iter().filter(|(l, _)| !l.contains(&label)).collect();
    assert!(elsewhere.is_empty(), "a pool for the namespace's demand outside it: {elsewhere:?}");
    assert!(d.metric("warmpool_prewarmed_pools_total") >= 1.0);
    let counted = format!("warmpool_demand_connects{{dest=\"{dest}\",uid=\"0\",netns=\"{}\"}}", ns.label());
    assert!(d.metric(&counted) >= 3.0, "demand not counted for the namespace:\n{}", d.metrics());
    // Every connection the server saw came from the namespace's address (plain curls and the
    // prewarmed sockets alike).
    let conns = || srv.lines().into_iter().filter(|(k, _, _)| k == "conn").collect::<Vec<_>>();
    assert!(wait_until(Duration::from_secs(3), || conns().len() >= 4), "3 plain connects and at least one prewarmed: {:?}", conns());
    let conns = conns();
    assert!(conns.iter().all(|(_, a, _)| a == "198.18.201.2"), "a connection from outside the namespace: {conns:?}");
    // A function with the shim in the namespace is served warm at its first connect.
    let mut c = ns.cmd_in(&cg, "curl", &["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", &url]);
    shim_env(&mut c, &d);
    let o = c.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\""), 1.0, "{}", d.metrics());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\""), 0.0);
}
