//! Tenants come and go (root only; must run in CI): the pools of a tenant whose cgroup was
//! removed are closed, configured pools included (case 05), a cgroup made again under the same
//! name is another tenant, and one tenant cannot use up the `[auto]` budget of others
//! (case 07). Real cgroups (v2, below the test's own), real uids, redis-server and nginx.

mod common;

use common::*;
use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A function instance: connect to `port` through the shim, one redis PING, close, exit.
fn redis_function(d: &Daemon, cg: &Cgroup, port: u16) {
    let script = format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {port})); s.sendall(b'PING\\r\\n'); \
         assert s.recv(16).startswith(b'+PONG'); s.close()"
    );
    let mut c = cg.command(std::path::Path::new(SYSTEM_PYTHON), &["-c", &script]);
    shim_env(&mut c, d);
    let o = c.stdin(Stdio::null()).output().expect("run function");
    assert!(o.status.success(), "function: {}", String::from_utf8_lossy(&o.stderr));
}

/// A function instance: `http_get.py blocking` through the shim; the path names the request
/// in nginx's log.
fn http_function(d: &Daemon, cg: &Cgroup, nginx: &Nginx, path: &str) {
    let script = client_script("http_get.py");
    let port = nginx.port.to_string();
    let mut c = cg.command(std::path::Path::new(SYSTEM_PYTHON), &[script.to_str().unwrap(), "blocking", "127.0.0.1", &port, path]);
    shim_env(&mut c, d);
    let o = c.stdin(Stdio::null()).output().expect("run function");
    assert!(o.status.success() && o.stdout.ends_with(b"200 hello\n"), "function: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// redis-server's `connected_clients`, less the connection that asks.
fn redis_clients(r: &Redis) -> i64 {
    let info = r.command(&["INFO", "clients"]);
    let n: i64 = info.lines().find_map(|l| l.strip_prefix("connected_clients:")).and_then(|v| v.trim().parse().ok()).expect("connected_clients");
    n - 1
}

/// The daemon's pools: the columns of each row of `pool-manager status` (TENANT,
/// DESTINATION, POLICY, IDLE, QUAR, LEASED, CONNECTING, WARM, REUSE, ...).
fn rows(d: &Daemon) -> Vec<Vec<String>> {
    d.status().lines().skip(1).take_while(|l| !l.trim().is_empty()).map(|l| l.split_whitespace().map(str::to_owned).collect()).collect()
}

/// (tenant, destination) of every pool.
fn pools(d: &Daemon) -> Vec<(String, String)> {
    rows(d).into_iter().map(|r| (r[0].clone(), r[1].clone())).collect()
}

/// The cgroup's path as `/proc/PID/cgroup` and the daemon's status show it.
fn cgroup_name(cg: &Cgroup) -> String {
    let root = tenancy::cgroup::cgroup2_mount().expect("cgroup2");
    format!("/{}", cg.0.strip_prefix(&root).expect("below the mount").display())
}

/// Case 05: 25 short-lived cgroups, each one function instance against a configured reuse
/// pool (min_idle 2); once their cgroups are gone, so are their pools, and redis-server has
/// only the connections the one remaining pool explains.
#[test]
fn pools_of_removed_cgroups_are_closed() {
    if !require_root("pools_of_removed_cgroups_are_closed") || !require_tool("redis-server") {
        return;
    }
    let redis = Redis::start();
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\n[[pool]]\ndestination = \"{}\"\npolicy = \"reuse\"\nprotocol = \"redis\"\nmin_idle = 2\nidle_timeout = \"2s\"\n",
        redis.addr()
    ));
    assert_eq!(redis_clients(&redis), 0);
    // A tenant that stays: its pool stays too.
    let keeper = Cgroup::new("keeper");
    redis_function(&d, &keeper, redis.port);
    let n = 25;
    for i in 0..n {
        let cg = Cgroup::new(&format!("fn{i}"));
        redis_function(&d, &cg, redis.port);
        let path = cg.0.clone();
        drop(cg);
        assert!(!path.exists(), "cgroup {} could not be removed", path.display());
    }
    let keeper_name = cgroup_name(&keeper);
    let only_keeper = || {
        let p = pools(&d);
        p.len() == 1 && p[0].0 == format!("0:{keeper_name}")
    };
    assert!(wait_until(Duration::from_secs(5), only_keeper), "pools left of removed cgroups:\n{}\n{}", d.status(), d.log());
    assert_eq!(d.metric("warmpool_tenants_closed_total{reason=\"cgroup_gone\"}"), f64::from(n), "{}", d.metrics());
    // redis-server sees exactly the remaining pool's sockets (min_idle 2; idle_timeout 2s
    // closes and refills them meanwhile, so wait for a moment where both agree).
    let daemon_sockets = || d.metric("warmpool_pool_sockets") as i64;
    let explained = wait_until(Duration::from_secs(5), || {
        let (before, clients, after) = (daemon_sockets(), redis_clients(&redis), daemon_sockets());
        before == after && clients == before && (1..=3).contains(&clients)
    });
    assert!(explained, "redis clients {} vs the daemon's pool sockets {}\n{}", redis_clients(&redis), daemon_sockets(), d.status());
}

/// A cgroup removed and made again under the same name is another tenant: its pool starts
/// empty, and no socket of the old tenant serves it, even while the old tenant's pool is
/// still there (a sweep every hour here, so that only the tenant's identity keeps them apart).
#[test]
fn a_cgroup_made_again_under_its_old_name_is_a_new_tenant() {
    if !require_root("a_cgroup_made_again_under_its_old_name_is_a_new_tenant") || !require_tool("nginx") {
        return;
    }
    let nginx = Nginx::start();
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\ntenant_sweep = \"1h\"\n[[pool]]\ndestination = \"{}\"\npolicy = \"reuse\"\nprotocol = \"http\"\n",
        nginx.addr()
    ));
    let old = Cgroup::new("again");
    let path = old.0.clone();
    for i in 0..3 {
        // Each one after the pool has a socket ready (the first one misses and connects itself).
        if i > 0 {
            assert!(wait_until(Duration::from_secs(5), || status_idle(&d) >= 1), "{}", d.status());
        }
        http_function(&d, &old, &nginx, &format!("/old{i}"));
    }
    let served_old = d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}");
    assert_eq!(served_old, 2.0, "{}", d.metrics());
    assert!(wait_until(Duration::from_secs(5), || status_idle(&d) >= 1), "{}", d.status());
    let old_conns: HashSet<u64> = nginx.connections().into_iter().filter(|(_, u)| u.starts_with("/old")).map(|(c, _)| c).collect();
    drop(old);
    assert!(!path.exists());
    std::fs::create_dir(&path).expect("make the cgroup again");
    let new = Cgroup(path);
    let misses = d.metric("warmpool_handouts_total{kind=\"miss\"}");
    http_function(&d, &new, &nginx, "/new0");
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\"}"), misses + 1.0, "the new tenant's pool starts empty\n{}", d.status());
    let served = d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}");
    assert_eq!(served, served_old, "no socket of the old tenant was handed out\n{}", d.status());
    let new_conn: Vec<u64> = nginx.connections().into_iter().filter(|(_, u)| u == "/new0").map(|(c, _)| c).collect();
    assert_eq!(new_conn.len(), 1);
    assert!(!old_conns.contains(&new_conn[0]), "the old tenant's connection {} served the new one", new_conn[0]);
    // Two pools under one name: the old tenant's (still there) and the new one's.
    let rows = pools(&d);
    assert_eq!(rows.len(), 2, "{}", d.status());
    assert_eq!(rows[0].0, rows[1].0);
}

/// IDLE column summed over the status rows.
fn status_idle(d: &Daemon) -> usize {
    rows(d).iter().filter_map(|r| r.get(3)?.parse::<usize>().ok()).sum()
}

/// `n` loopback ports that are bound but not listening (reserved: nobody else can listen on
/// them while the fds are open, so a connect to them is refused).
fn closed_ports(n: usize) -> (Vec<OwnedFd>, Vec<u16>) {
    let mut fds = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n {
        // SAFETY: plain socket creation; the fd goes straight into an OwnedFd.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a new fd, ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sin = libc::sockaddr_in { sin_family: libc::AF_INET as libc::sa_family_t, sin_port: 0, sin_addr: libc::in_addr { s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be() }, sin_zero: [0; 8] };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: bind and getsockname with a sockaddr_in of the size given.
        unsafe {
            assert_eq!(libc::bind(fd.as_raw_fd(), (&sin as *const libc::sockaddr_in).cast(), len), 0);
            assert_eq!(libc::getsockname(fd.as_raw_fd(), (&mut sin as *mut libc::sockaddr_in).cast(), &mut len), 0);
        }
        ports.push(u16::from_be(sin.sin_port));
        fds.push(fd);
    }
    (fds, ports)
}

fn as_uid(uid: u32, prog: &std::path::Path) -> Command {
    let mut c = Command::new(tool_path("setpriv"));
    c.args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]).arg(prog).env_remove("LD_PRELOAD").stdin(Stdio::null());
    c
}

/// Case 07: uid 0 fills its `[auto]` budget (64 destinations, by `prewarm`); uid 65534 still
/// gets its own auto pool, and its 3 curls are served from it over at most 2 upstream
/// connections (nginx's connection serials).
#[test]
fn one_tenant_cannot_use_up_the_auto_budget_of_others() {
    if !require_root("one_tenant_cannot_use_up_the_auto_budget_of_others") || !require_tool("nginx") || !require_tool("setpriv") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let d = Daemon::with_config("keep_window_when_idle = false\n[auto]\nenabled = true\npolicy = \"reuse\"\nprotocol = \"http\"\n");
    let st = Staged::new();
    let (_reserved, ports) = closed_ports(65);
    let dests: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).args(&dests[..64]).env_remove("LD_PRELOAD").output().unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(pools(&d).iter().filter(|(t, _)| t.starts_with("0:")).count(), 64, "{}", d.status());
    // Its budget is full: a 65th destination is not pooled for it.
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).arg(&dests[64]).env_remove("LD_PRELOAD").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("is not pooled"), "{text}");
    // Another tenant has a budget of its own.
    let mut c = as_uid(65534, &st.bin());
    let o = c.args(["prewarm", "--socket"]).arg(&d.socket).arg(nginx.addr().to_string()).output().unwrap();
    assert!(o.status.success(), "uid 65534 prewarm: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let nobody_idle = || rows(&d).iter().any(|r| r[0].starts_with("65534:") && r[3] != "0");
    for i in 0..3 {
        assert!(wait_until(Duration::from_secs(5), nobody_idle), "curl {i}: no ready socket for uid 65534\n{}", d.status());
        let mut c = as_uid(65534, &tool_path("curl"));
        c.args(["-sS", "-o", "/dev/null", "--max-time", "3", &nginx.url(&format!("/nobody{i}"))]);
        shim_env(&mut c, &d);
        c.env("LD_PRELOAD", st.preload());
        let o = c.output().unwrap();
        assert!(o.status.success(), "curl {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let conns: HashSet<u64> = nginx.connections().into_iter().filter(|(_, u)| u.starts_with("/nobody")).map(|(c, _)| c).collect();
    assert!(!conns.is_empty() && conns.len() <= 2, "3 curls of uid 65534 over {} connections: {:?}", conns.len(), nginx.connections());
    let row = rows(&d).into_iter().find(|r| r[0].starts_with("65534:")).expect("a pool of uid 65534");
    let (warm, reuse): (u64, u64) = (row[7].parse().unwrap(), row[8].parse().unwrap());
    assert_eq!(warm + reuse, 3, "every curl served from uid 65534's pool: {row:?}");
}

/// A network namespace with a veth pair to the host: host end `198.18.121.1/30`, the
/// namespace's `.2`. The host end disappears only once the kernel destroyed the namespace.
struct VethNs {
    name: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    let o = Command::new(tool_path("ip")).args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

impl VethNs {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let ns = Self { name: format!("wplc{id}"), host_if: format!("wplch{id}") };
        let inside = format!("wplci{id}");
        ns.delete();
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &inside]);
        ip(&["link", "set", &inside, "netns", &ns.name]);
        ip(&["addr", "add", "198.18.121.1/30", "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        for args in [vec!["link", "set", "lo", "up"], vec!["addr", "add", "198.18.121.2/30", "dev", &inside], vec!["link", "set", &inside, "up"]] {
            ip(&[&["netns", "exec", &ns.name, "ip"], &args[..]].concat());
        }
        ns
    }

    /// `prog` run inside the namespace.
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(tool_path("ip"));
        c.args(["netns", "exec", &self.name, prog]).env_remove("LD_PRELOAD").stdin(Stdio::null());
        c
    }

    fn host_end_exists(&self) -> bool {
        std::path::Path::new("/sys/class/net").join(&self.host_if).exists()
    }

    fn delete(&self) {
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &self.name]).output();
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        self.delete();
        let _ = Command::new(tool_path("ip")).args(["link", "del", &self.host_if]).output();
    }
}

/// Configured pools go with their network namespace too: once the namespace has had no
/// client for `netns_linger` its configured pool is closed (counted as `netns_gone`), and
/// the kernel can destroy the removed namespace (the daemon holds nothing of it).
#[test]
fn configured_pools_of_a_gone_namespace_are_closed_and_it_is_freed() {
    if !require_root("configured_pools_of_a_gone_namespace_are_closed_and_it_is_freed") || !require_tool("curl") || !require_tool("ip") {
        return;
    }
    let ns = VethNs::new();
    let port = free_port();
    let _server = common::pyhttp::PyServer::start("198.18.121.1", port);
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\nnetns_linger = \"300ms\"\n[[pool]]\ndestination = \"198.18.121.1:{port}\"\npolicy = \"warm\"\nmin_idle = 2\n"
    ));
    let url = format!("http://198.18.121.1:{port}/");
    let handouts = || d.metric("warmpool_handouts_total{kind=\"warm\"}");
    for i in 0..10 {
        let mut c = ns.cmd("curl");
        c.args(["-sS", "-o", "/dev/null", "--max-time", "3", &url]);
        shim_env(&mut c, &d);
        let o = c.output().expect("curl");
        assert!(o.status.success(), "curl {i}: {}", String::from_utf8_lossy(&o.stderr));
        if handouts() >= 1.0 {
            break;
        }
        wait_until(Duration::from_secs(2), || status_idle(&d) >= 1);
    }
    assert!(handouts() >= 1.0, "no hand-out in the namespace\n{}", d.log());
    let before = pools(&d);
    assert_eq!(before.len(), 1, "{}", d.status());
    assert!(rows(&d)[0][2] == "warm", "a configured pool, not an auto one: {}", d.status());
    ns.delete();
    assert!(wait_until(Duration::from_secs(10), || !ns.host_end_exists()), "the namespace was not freed\n{}\n{}", d.status(), d.log());
    assert!(pools(&d).is_empty(), "{}", d.status());
    assert_eq!(d.metric("warmpool_tenants_closed_total{reason=\"netns_gone\"}"), 1.0, "{}", d.metrics());
}

/// A socket out on lease when its tenant is closed is closed when it comes back, not pooled,
/// and the tenant's pools are not made again: a function moves itself out of its cgroup while
/// it holds a pooled connection, the cgroup is removed and swept, then it closes the socket
/// and connects once more (its link to the daemon still speaks for the old tenant).
#[test]
fn a_lease_of_a_closed_tenant_is_closed_when_it_comes_back() {
    if !require_root("a_lease_of_a_closed_tenant_is_closed_when_it_comes_back") || !require_tool("redis-server") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let redis = Redis::start();
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\n[[pool]]\ndestination = \"{}\"\npolicy = \"reuse\"\nprotocol = \"redis\"\n",
        redis.addr()
    ));
    let (old, elsewhere) = (Cgroup::new("leaving"), Cgroup::new("elsewhere"));
    redis_function(&d, &old, redis.port);
    assert!(wait_until(Duration::from_secs(5), || status_idle(&d) >= 1), "{}", d.status());
    let script = format!(
        "import os, socket, sys\n\
         def ping(s):\n    s.sendall(b'PING\\r\\n'); assert s.recv(16).startswith(b'+PONG')\n\
         s = socket.create_connection(('127.0.0.1', {port})); ping(s)\n\
         open('{procs}', 'w').write(str(os.getpid()))\n\
         print('moved', flush=True); sys.stdin.readline()\n\
         s.close()\n\
         t = socket.create_connection(('127.0.0.1', {port})); ping(t); t.close()\n\
         print('done', flush=True)\n",
        port = redis.port,
        procs = elsewhere.0.join("cgroup.procs").display()
    );
    let mut c = old.command(std::path::Path::new(SYSTEM_PYTHON), &["-c", &script]);
    shim_env(&mut c, &d);
    let mut f = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("function");
    let mut out = BufReader::new(f.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "moved\n");
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}"), 1.0, "served from the pool");
    let path = old.0.clone();
    drop(old);
    assert!(!path.exists(), "the cgroup was left by its only process and removed");
    assert!(wait_until(Duration::from_secs(5), || pools(&d).is_empty()), "{}", d.status());
    let (removed, not_pooled) = (d.metric("warmpool_discarded_total{reason=\"pool_removed\"}"), d.metric("warmpool_fallbacks_total{reason=\"not_pooled\"}"));
    f.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    assert!(f.wait().unwrap().success());
    assert_eq!(d.metric("warmpool_discarded_total{reason=\"pool_removed\"}"), removed + 1.0, "the lease was closed when it came back");
    assert_eq!(d.metric("warmpool_fallbacks_total{reason=\"not_pooled\"}"), not_pooled + 1.0, "no pool is made again for the closed tenant");
    assert!(pools(&d).is_empty(), "{}", d.status());
    assert!(wait_until(Duration::from_secs(5), || redis_clients(&redis) == 0), "redis still has {} clients", redis_clients(&redis));
}
