//! Sockets made in the client's network namespace, with real namespaces (root only; must
//! run in CI): a client in a namespace gets no connection its namespace could not make
//! itself (case 06: only loopback; an nft rule that rejects the destination), the server
//! sees the client's own address on pooled connections, and the daemon lets a removed
//! namespace go once its last client left (`netns_linger`).
//!
//! Addresses: 198.18.10x.0/30 on a veth pair per test (host .1, namespace .2).

mod common;

use common::ns::Ns;
use common::pyhttp::PyServer;
use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// `curl` in `ns` with the shim pointed at `d`: (exit success, stdout+stderr).
fn curl_in(ns: &Ns, d: &Daemon, url: &str) -> (bool, String) {
    let mut c = ns.cmd("curl");
    c.args(["-sS", "--max-time", "3", url]);
    shim_env(&mut c, d);
    let o = c.output().expect("run curl");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// `curl` in `ns` without the shim.
fn curl_plain(ns: &Ns, url: &str) -> bool {
    ns.cmd("curl").args(["-sS", "--max-time", "3", url]).output().expect("run curl").status.success()
}

fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}")
}

fn daemon(extra: &str) -> Daemon {
    Daemon::with_config(&format!("keep_window_when_idle = false\n{extra}\n[auto]\nenabled = true\npolicy = \"warm\"\n"))
}

/// Case 06: a namespace with only loopback reaches nothing on the host's loopback, with the
/// shim exactly as without it, also after `pool-manager prewarm` from inside it.
#[test]
fn a_namespace_with_only_loopback_is_refused_with_the_shim_too() {
    if !require_root("a_namespace_with_only_loopback_is_refused_with_the_shim_too") || !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon("");
    let ns = Ns::new("l");
    let url = nginx.url("/");
    assert!(!curl_plain(&ns, &url), "without the shim the host's loopback is out of reach");
    for i in 0..3 {
        let (ok, out) = curl_in(&ns, &d, &url);
        assert!(!ok, "connect {i} through the shim reached the host's loopback: {out}");
    }
    let o = ns.cmd(pool_manager_bin().to_str().unwrap()).arg("prewarm").arg("--socket").arg(&d.socket).arg(nginx.addr().to_string()).output().unwrap();
    assert!(o.status.success(), "prewarm: {}", String::from_utf8_lossy(&o.stderr));
    // The prewarm's connects run (in the namespace) and fail.
    assert!(wait_until(Duration::from_secs(5), || d.metric("warmpool_connects_total{result=\"failed\"}") >= 1.0), "{}", d.log());
    for i in 0..2 {
        let (ok, out) = curl_in(&ns, &d, &url);
        assert!(!ok, "connect {i} after prewarm reached the host's loopback: {out}");
    }
    assert_eq!(handouts(&d), 0.0, "no socket may be handed to the namespace:\n{}", d.metrics());
    assert_eq!(d.metric("warmpool_connects_total{result=\"ok\"}"), 0.0, "no connect from the daemon's namespace");
    assert!(nginx.log_entries().is_empty(), "nginx served the namespace: {:?}", nginx.log_entries());
}

/// Shimmed curls in `ns` until `want` hand-outs happened (bounded); every one must succeed.
fn run_until_handouts(ns: &Ns, d: &Daemon, url: &str, want: f64) {
    for _ in 0..20 {
        let (ok, out) = curl_in(ns, d, url);
        assert!(ok, "curl through the shim failed: {out}\n{}", d.log());
        if handouts(d) >= want {
            return;
        }
    }
    panic!("fewer than {want} hand-outs after 20 runs:\n{}\n{}", d.metrics(), d.log());
}

/// The server sees the namespace's own address on pooled connections, never the host's.
#[test]
fn the_server_sees_the_clients_own_address() {
    if !require_root("the_server_sees_the_clients_own_address") || !require_tool("curl") {
        return;
    }
    let ns = Ns::new("a").with_veth(101);
    let port = free_port();
    let srv = PyServer::start("198.18.101.1", port);
    let url = format!("http://198.18.101.1:{port}/");
    let d = daemon("");
    run_until_handouts(&ns, &d, &url, 3.0);
    let lines = srv.lines();
    assert!(lines.iter().any(|(k, _, _)| k == "req"), "{lines:?}");
    let foreign: Vec<_> = lines.iter().filter(|(_, a, _)| a != "198.18.101.2").collect();
    assert!(foreign.is_empty(), "connections from another address than the namespace's: {foreign:?}");
}

/// An nft rule inside the namespace that rejects the destination rejects it through the
/// shim too, on every connect.
#[test]
fn a_namespace_firewall_still_rejects_through_the_shim() {
    if !require_root("a_namespace_firewall_still_rejects_through_the_shim") || !require_tool("curl") || !require_tool("nft") {
        return;
    }
    let ns = Ns::new("f").with_veth(102);
    let port = free_port();
    let srv = PyServer::start("198.18.102.1", port);
    let url = format!("http://198.18.102.1:{port}/");
    // The path works before the rule (so the refusals below are the rule's).
    assert!(curl_plain(&ns, &url), "the namespace reaches the server before the rule");
    let rules = format!(
        "table inet wptest {{\n chain out {{\n type filter hook output priority 0;\n ip daddr 198.18.102.1 tcp dport {port} reject with tcp reset\n }}\n}}\n"
    );
    let mut c = ns.cmd("nft");
    c.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = c.spawn().expect("nft");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "nft rule");
    assert!(!curl_plain(&ns, &url), "the rule rejects without the shim");
    let before = srv.lines().len();
    let d = daemon("");
    for i in 0..3 {
        let (ok, out) = curl_in(&ns, &d, &url);
        assert!(!ok, "connect {i} through the shim passed the namespace's firewall: {out}");
    }
    assert!(wait_until(Duration::from_secs(5), || d.metric("warmpool_connects_total{result=\"failed\"}") >= 1.0), "{}", d.log());
    assert_eq!(handouts(&d), 0.0, "{}", d.metrics());
    assert_eq!(srv.lines().len(), before, "the server saw connections past the rule: {:?}", srv.lines());
}

/// Inodes of the network namespaces of every thread of `pid`.
fn thread_namespaces(pid: u32) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return vec![] };
    rd.filter_map(Result::ok)
        .filter_map(|t| std::fs::metadata(t.path().join("ns/net")).ok())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// After its last client, a removed namespace is freed: the daemon's maker thread leaves
/// it and its pools close after `netns_linger`, and the kernel destroys it (its veth pair
/// disappears, which happens only when the namespace itself is gone).
#[test]
fn a_removed_namespace_is_freed_after_its_last_client() {
    if !require_root("a_removed_namespace_is_freed_after_its_last_client") || !require_tool("curl") {
        return;
    }
    let mut ns = Ns::new("g").with_veth(103);
    let host_if = ns.host_if.clone().unwrap();
    let port = free_port();
    let _srv = PyServer::start("198.18.103.1", port);
    let url = format!("http://198.18.103.1:{port}/");
    let d = daemon("netns_linger = \"300ms\"");
    run_until_handouts(&ns, &d, &url, 1.0);
    let ino = ns.inode();
    assert!(thread_namespaces(d.pid()).contains(&ino), "a daemon thread makes the namespace's sockets");
    ns.delete();
    assert!(
        wait_until(Duration::from_secs(20), || !link_exists(&host_if)),
        "the namespace was not freed (its veth {host_if} is still there)\n{}",
        d.log()
    );
    assert!(!thread_namespaces(d.pid()).contains(&ino));
    assert!(d.log().contains("its pools are closed"), "{}", d.log());
}
