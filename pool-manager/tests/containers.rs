//! Real containers (root only; must run in CI): podman with runc, an image built locally
//! (`mmdebstrap --variant=minbase --include=curl,python3 bookworm`, imported with `podman
//! import`; the tarball is cached under `target/containers/`), functions using the shim
//! through a mounted socket and library.
//!
//! Network safety: each test's thread enters a network namespace the test made (no default
//! route) before it starts anything, so podman, its bridge, the daemon and the servers all
//! live there: servers on that namespace's loopback (198.18.110.1), the podman network on
//! 198.18.111.0/24. The daemon is stopped before the network goes.

mod common;

use common::containers::*;
use common::pyhttp::PyServer;
use common::*;
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Requests the server saw since `from` (an index into its request list).
fn requests_since(srv: &PyServer, from: usize) -> Vec<(String, u16)> {
    srv.request_peers().into_iter().skip(from).collect()
}

/// Every quarantined socket has been checked (a reused socket is back in its pool).
fn settled(d: &Daemon) {
    let ok = wait_until(Duration::from_secs(5), || {
        let m = d.metrics();
        metric_samples(&m, "warmpool_pool_sockets{").iter().filter(|(l, _)| l.contains("state=\"quarantine\"") || l.contains("state=\"checking\"")).all(|(_, v)| *v == 0.0)
    });
    assert!(ok, "sockets still under check after 5 s\n{}", d.metrics());
}

/// The common start of a container test: the image, a lab (this thread in its namespace, a
/// podman network), an HTTP server on its loopback and the server's URL; `None` when the test
/// cannot run here (not root, or a tool missing outside CI).
fn lab_with_server(test: &str) -> Option<(Lab, u16, PyServer, String)> {
    if !needs(test) {
        return None;
    }
    image();
    let lab = Lab::new();
    let port = free_port();
    let srv = PyServer::start(SERVER, port);
    let url = format!("http://{SERVER}:{port}/");
    Some((lab, port, srv, url))
}

/// (a) + (c): each container's pooled connections come from its own address; two
/// containers of the same uid never share a socket; 20 fork-per-request invocations in one
/// container use at most 2 upstream connections with a reuse pool.
#[test]
fn containers_get_their_own_connections_from_their_own_address() {
    let Some((lab, port, srv, url)) = lab_with_server("containers_get_their_own_connections_from_their_own_address") else { return };
    let d = Daemon::with_config(&format!("[[pool]]\ndestination = \"{SERVER}:{port}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 1\n"));
    let mut used: Vec<HashSet<u16>> = Vec::new();
    for (ip, n) in [(10u8, 20), (11, 5)] {
        let c = lab.start(Some(&d), ip);
        let from = srv.request_peers().len();
        let before = handouts(&d);
        for i in 0..n {
            assert_eq!(c.exec(true, &curls(1, &url)).trim(), "200", "container {ip}, invocation {i}\n{}", d.log());
            settled(&d);
        }
        let reqs = requests_since(&srv, from);
        assert_eq!(reqs.len(), n, "{reqs:?}");
        let own = format!("198.18.111.{ip}");
        assert!(reqs.iter().all(|(a, _)| *a == own), "container {ip} reached the server from another address: {reqs:?}");
        let conns: HashSet<u16> = reqs.iter().map(|(_, p)| *p).collect();
        assert!(conns.len() <= 2, "{n} invocations used {} upstream connections: {reqs:?}\n{}", conns.len(), d.metrics());
        assert!(handouts(&d) - before >= (n - 2) as f64, "pooled hand-outs in container {ip}: {}", d.metrics());
        used.push(conns);
    }
    assert!(used[0].is_disjoint(&used[1]), "two containers shared a connection: {used:?}");
}

/// (b): an nft rule inside the container's namespace rejects the destination through the
/// shim exactly as without it, on every connect.
#[test]
fn a_container_firewall_still_rejects_through_the_shim() {
    if !require_tool("nft") {
        return;
    }
    let Some((lab, port, srv, url)) = lab_with_server("a_container_firewall_still_rejects_through_the_shim") else { return };
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\n");
    let c = lab.start(Some(&d), 20);
    let pid = c.pid();
    let exec = |shim: bool| c.exec(shim, &curls(1, &url));
    assert_eq!(exec(true).trim(), "200", "the path works before the rule");
    let rules = format!("table inet wptest {{\n chain out {{\n type filter hook output priority 0;\n ip daddr {SERVER} tcp dport {port} reject with tcp reset\n }}\n}}\n");
    let mut nft = Command::new(tool_path("nsenter"));
    nft.arg(format!("--net=/proc/{pid}/ns/net")).arg(tool_path("nft")).args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = nft.spawn().expect("nsenter nft");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "nft rule in the container");
    let seen = srv.request_peers().len();
    assert_ne!(exec(false).trim(), "200", "the rule rejects without the shim");
    for i in 0..3 {
        let out = exec(true);
        assert_ne!(out.trim(), "200", "connect {i} through the shim passed the container's firewall\n{}", d.metrics());
    }
    assert_eq!(srv.request_peers().len(), seen, "the server saw requests past the rule: {:?}", srv.request_peers());
}

/// (f): a container with the library and LD_PRELOAD but without the socket mount works
/// unchanged (its own connections; the daemon never hears of it).
#[test]
fn a_container_without_the_socket_mount_works_unchanged() {
    let Some((lab, _port, srv, url)) = lab_with_server("a_container_without_the_socket_mount_works_unchanged") else { return };
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\n");
    let out = lab.run(None, 30, &curls(3, &url));
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 3, "{out}");
    assert!(srv.request_peers().iter().all(|(a, _)| a == "198.18.111.30"), "{:?}", srv.request_peers());
    assert_eq!(handouts(&d), 0.0);
    assert_eq!(d.metric("warmpool_connects_total{result=\"ok\"}"), 0.0, "{}", d.metrics());
}
