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

use common::pyhttp::PyServer;
use common::*;
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const IMAGE: &str = "localhost/warmpool-fn-bookworm:test";
const SERVER: &str = "198.18.110.1";

fn podman() -> Command {
    let mut c = Command::new(tool_path("podman"));
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]).env_remove("LD_PRELOAD").stdin(Stdio::null());
    c
}

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    o
}

/// The function image: built once (cached tarball), imported once per machine.
fn image() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = target_dir().parent().expect("target/").join("containers");
        std::fs::create_dir_all(&dir).expect("mkdir target/containers");
        let tar = dir.join("fn-bookworm.tar");
        if !tar.exists() {
            let tmp = dir.join("fn-bookworm.tar.tmp");
            let o = Command::new(tool_path("mmdebstrap"))
                .args(["--variant=minbase", "--format=tar", "--include=curl,python3", "bookworm"])
                .arg(&tmp)
                .output()
                .expect("run mmdebstrap");
            ok(o, "mmdebstrap");
            std::fs::rename(&tmp, &tar).expect("rename image tarball");
        }
        if !podman().args(["image", "exists", IMAGE]).status().expect("podman").success() {
            ok(podman().arg("import").arg(&tar).arg(IMAGE).output().expect("podman import"), "podman import");
        }
    });
    IMAGE
}

/// A network namespace this test's thread runs in, with a podman network in it.
struct Lab {
    name: String,
    net: String,
    home: std::fs::File,
}

impl Lab {
    fn new() -> Lab {
        let name = format!("wpct{}", std::process::id());
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &name]).output();
        ok(Command::new(tool_path("ip")).args(["netns", "add", &name]).output().unwrap(), "ip netns add");
        let home = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
        // SAFETY: setns on fds we hold; it moves only this (test) thread.
        assert_eq!(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
        let lab = Lab { name, net: format!("wpnet{}", std::process::id()), home };
        for args in [vec!["link", "set", "lo", "up"], vec!["addr", "add", &format!("{SERVER}/32"), "dev", "lo"]] {
            ok(Command::new(tool_path("ip")).args(&args).output().unwrap(), "ip in the lab");
        }
        let _ = podman().args(["network", "rm", "-f", &lab.net]).output();
        ok(podman().args(["network", "create", "--disable-dns", "--subnet", "198.18.111.0/24", &lab.net]).output().unwrap(), "podman network create");
        lab
    }

    /// `podman run` of `script` (sh -c) as container `ip` (198.18.111.`ip`); with the
    /// daemon's socket directory mounted when `d` is given; always with the library
    /// mounted and LD_PRELOAD set.
    fn run_args(&self, d: Option<&Daemon>, ip: u8, detach: bool) -> Command {
        let mut c = podman();
        c.args(["run", "--rm", "--network", &self.net, "--ip", &format!("198.18.111.{ip}")]);
        c.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "--name", &format!("wpfn{ip}-{}", std::process::id())]);
        if detach {
            c.arg("-d");
        }
        c.arg("-v").arg(format!("{}:/opt/warmpool/libwarmpool_preload.so:ro", preload_path().display()));
        c.args(["-e", "LD_PRELOAD=/opt/warmpool/libwarmpool_preload.so", "-e", "WARMPOOL_SOCKET=/run/warmpool/pool.sock"]);
        if let Some(d) = d {
            c.arg("-v").arg(format!("{}:/run/warmpool", d.dir.path().display()));
        }
        c.arg(image());
        c
    }

    fn run(&self, d: Option<&Daemon>, ip: u8, script: &str) -> String {
        let o = self.run_args(d, ip, false).args(["sh", "-c", script]).output().expect("podman run");
        String::from_utf8_lossy(&ok(o, "podman run").stdout).into_owned()
    }

    /// A long-running container (as a function platform's watchdog): invocations are
    /// `podman exec`s into it.
    fn start(&self, d: Option<&Daemon>, ip: u8) -> Running {
        ok(self.run_args(d, ip, true).args(["sleep", "300"]).output().unwrap(), "podman run -d");
        Running { name: format!("wpfn{ip}-{}", std::process::id()) }
    }
}

/// A running container, removed on drop.
struct Running {
    name: String,
}

impl Running {
    /// Run `script` (sh -c) in the container, with the shim or with LD_PRELOAD emptied.
    fn exec(&self, shim: bool, script: &str) -> String {
        let mut c = podman();
        c.arg("exec");
        if !shim {
            c.args(["-e", "LD_PRELOAD="]);
        }
        c.args([self.name.as_str(), "sh", "-c", script]);
        String::from_utf8_lossy(&c.output().expect("podman exec").stdout).into_owned()
    }

    /// The pid (in the test's pid namespace) of the container's first process.
    fn pid(&self) -> String {
        let o = ok(podman().args(["inspect", "-f", "{{.State.Pid}}", &self.name]).output().unwrap(), "podman inspect");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = podman().args(["network", "rm", "-f", &self.net]).output();
        // SAFETY: back to the namespace this thread came from (an fd we hold).
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &self.name]).output();
    }
}

fn needs(test: &str) -> bool {
    require_root(test) && require_tool("podman") && require_tool("runc") && require_tool("mmdebstrap") && require_tool("nsenter")
}

/// `n` curls, each a new process, printing the status code each.
fn curls(n: usize, url: &str) -> String {
    format!("for i in $(seq {n}); do curl -sS --max-time 5 -o /dev/null -w '%{{http_code}}\\n' {url} || echo failed; done")
}

fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}")
}

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

/// (a) + (c): each container's pooled connections come from its own address; two
/// containers of the same uid never share a socket; 20 fork-per-request invocations in one
/// container use at most 2 upstream connections with a reuse pool.
#[test]
fn containers_get_their_own_connections_from_their_own_address() {
    if !needs("containers_get_their_own_connections_from_their_own_address") {
        return;
    }
    image();
    let lab = Lab::new();
    let port = free_port();
    let srv = PyServer::start(SERVER, port);
    let url = format!("http://{SERVER}:{port}/");
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
    if !needs("a_container_firewall_still_rejects_through_the_shim") || !require_tool("nft") {
        return;
    }
    image();
    let lab = Lab::new();
    let port = free_port();
    let srv = PyServer::start(SERVER, port);
    let url = format!("http://{SERVER}:{port}/");
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
    if !needs("a_container_without_the_socket_mount_works_unchanged") {
        return;
    }
    image();
    let lab = Lab::new();
    let port = free_port();
    let srv = PyServer::start(SERVER, port);
    let url = format!("http://{SERVER}:{port}/");
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\n");
    let out = lab.run(None, 30, &curls(3, &url));
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 3, "{out}");
    assert!(srv.request_peers().iter().all(|(a, _)| a == "198.18.111.30"), "{:?}", srv.request_peers());
    assert_eq!(handouts(&d), 0.0);
    assert_eq!(d.metric("warmpool_connects_total{result=\"ok\"}"), 0.0, "{}", d.metrics());
}
