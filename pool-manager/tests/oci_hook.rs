//! `pool-manager oci-hook` (root only; must run in CI), test (d) of issue 11: the hook
//! warms a container's pools in its network namespace before its program starts, and at
//! its stop (or its process's exit) the daemon closes them at once and keeps nothing that
//! pins the namespace.
//!
//! Two set-ups: a process in a namespace the test made, the hook run by hand with the OCI
//! state on stdin (fast, and no runtime in the way), and podman with runc running the hook
//! from a hooks directory (the shared container set-up of `common::containers`).
//! Addresses: 198.18.105.0/30 and 198.18.106.0/30 on veth pairs; the podman lab as in
//! `tests/containers.rs`.

mod common;

use common::containers::{self, Lab};
use common::ns::{Ns, Sleeper};
use common::pyhttp::PyServer;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `pool-manager oci-hook <stage>` with `state` on stdin: (exit success, stderr).
fn hook(d: &Daemon, stage: &str, state: &str) -> (bool, String) {
    let mut c = Command::new(pool_manager_bin());
    c.args(["oci-hook", stage, "--socket"]).arg(&d.socket).env_remove("LD_PRELOAD").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("run oci-hook");
    child.stdin.take().expect("stdin").write_all(state.as_bytes()).expect("write state");
    let o = child.wait_with_output().expect("oci-hook");
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Inodes of the network namespaces the daemon's threads are in, and of the namespace
/// files it holds open.
fn daemon_namespaces(pid: u32) -> Vec<u64> {
    let ino = |p: std::path::PathBuf| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().filter_map(Result::ok);
    let mut v: Vec<u64> = tasks.filter_map(|t| ino(t.path().join("ns/net"))).collect();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().filter_map(Result::ok);
    v.extend(fds.filter_map(|f| std::fs::read_link(f.path()).ok()).filter_map(|l| {
        let l = l.to_string_lossy().into_owned();
        l.strip_prefix("net:[").and_then(|r| r.strip_suffix(']')).and_then(|n| n.parse::<u64>().ok())
    }));
    v
}

/// Pools of the status table (aligned columns) for `dest`: (idle, connecting) each.
fn pools_for(d: &Daemon, dest: &str) -> Vec<(u64, u64)> {
    d.status()
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(dest))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3].parse().unwrap_or(0), f[6].parse().unwrap_or(0))
        })
        .collect()
}

/// The OCI state of a container whose process is `pid`.
fn state(pid: u32, id: &str, annotations: &str) -> String {
    format!(r#"{{"ociVersion":"1.0.2","id":"{id}","status":"creating","pid":{pid},"bundle":"/nonexistent","annotations":{{{annotations}}}}}"#)
}

/// The hand-run hook: createRuntime fills the configured pool (min_idle 2) and the
/// annotation's destination in the process's namespace before it answers; poststop closes
/// both at once (linger is 300 s, so nothing else explains it) and the namespace is freed.
#[test]
fn the_hook_warms_a_namespace_and_poststop_frees_it() {
    if !require_root("the_hook_warms_a_namespace_and_poststop_frees_it") {
        return;
    }
    let mut ns = Ns::new("h").with_veth(105);
    let host_if = ns.host_if.clone().expect("veth");
    let (p1, p2) = (free_port(), free_port());
    let srv1 = PyServer::start("198.18.105.1", p1);
    let srv2 = PyServer::start("198.18.105.1", p2);
    let (dest1, dest2) = (format!("198.18.105.1:{p1}"), format!("198.18.105.1:{p2}"));
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\nnetns_linger = \"300s\"\n[[pool]]\ndestination = \"{dest1}\"\npolicy = \"warm\"\nmin_idle = 2\n[auto]\nenabled = true\npolicy = \"warm\"\n"
    ));
    let mut sleeper = Sleeper::start(&ns);
    let (ok, err) = hook(&d, "createRuntime", &state(sleeper.pid(), "c1", &format!(r#""warmpool.prewarm":"{dest2}""#)));
    assert!(ok, "the hook always exits 0: {err}");
    assert!(err.contains("container c1: 2 pool(s), 3 idle socket(s)"), "filled before the hook returned: {err}\n{}", d.log());
    // Made in the namespace: the servers saw its address only.
    for srv in [&srv1, &srv2] {
        assert!(wait_until(Duration::from_secs(2), || !srv.lines().is_empty()), "the server logged no connection");
        assert!(srv.lines().iter().all(|(_, a, _)| a == "198.18.105.2"), "{:?}", srv.lines());
    }
    let ino = ns.inode();
    assert!(daemon_namespaces(d.pid()).contains(&ino), "a maker thread serves the namespace");
    assert_eq!(pools_for(&d, &dest1), vec![(2, 0)], "{}", d.status());
    assert_eq!(pools_for(&d, &dest2), vec![(1, 0)], "{}", d.status());

    let (ok, err) = hook(&d, "poststop", r#"{"ociVersion":"1.0.2","id":"c1","status":"stopped","bundle":"/nonexistent"}"#);
    assert!(ok && err.contains("container c1: 2 pool(s) closed, network namespace let go"), "{err}\n{}", d.log());
    assert!(pools_for(&d, &dest1).is_empty() && pools_for(&d, &dest2).is_empty(), "{}", d.status());
    assert!(wait_until(Duration::from_secs(1), || !daemon_namespaces(d.pid()).contains(&ino)), "the daemon still holds the namespace");
    // The kernel frees it once its last holder is gone (the veth pair goes with it).
    sleeper.kill();
    ns.delete();
    assert!(wait_until(Duration::from_secs(10), || !std::path::Path::new("/sys/class/net").join(&host_if).exists()), "namespace not freed\n{}", d.log());
    // A second stop is harmless.
    let (ok, err) = hook(&d, "poststop", r#"{"id":"c1","status":"stopped"}"#);
    assert!(ok && err.contains("not registered"), "{err}");
}

/// Without a stop hook, the exit of the container's process closes its pools at once; and
/// the hook never fails a container (no daemon, bad state, bad annotation: exit 0).
#[test]
fn the_processs_exit_closes_its_pools_and_the_hook_never_fails() {
    if !require_root("the_processs_exit_closes_its_pools_and_the_hook_never_fails") {
        return;
    }
    let ns = Ns::new("x").with_veth(106);
    let port = free_port();
    let _srv = PyServer::start("198.18.106.1", port);
    let dest = format!("198.18.106.1:{port}");
    let d = Daemon::with_config(&format!("keep_window_when_idle = false\nnetns_linger = \"300s\"\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"warm\"\nmin_idle = 1\n"));
    let mut sleeper = Sleeper::start(&ns);
    let (ok, err) = hook(&d, "createRuntime", &state(sleeper.pid(), "c2", ""));
    assert!(ok && err.contains("1 idle socket(s)"), "{err}");
    let ino = ns.inode();
    assert_eq!(pools_for(&d, &dest), vec![(1, 0)], "{}", d.status());
    sleeper.kill();
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(1), || pools_for(&d, &dest).is_empty()), "pools still open 1 s after the exit: {}", d.status());
    assert!(wait_until(Duration::from_secs(1), || !daemon_namespaces(d.pid()).contains(&ino)), "namespace still held");
    eprintln!("pools closed {:?} after the process exited", t.elapsed());
    assert!(d.log().contains("its process exited"), "{}", d.log());

    let mut nowhere = Command::new(pool_manager_bin());
    nowhere.args(["oci-hook", "createRuntime", "--socket", "/nonexistent/pool.sock"]).stdin(Stdio::null());
    assert!(nowhere.status().expect("oci-hook").success(), "no daemon: the container still starts");
    let (ok, err) = hook(&d, "createRuntime", "{ not json");
    assert!(ok && err.contains("container state"), "{err}");
    let (ok, err) = hook(&d, "createRuntime", &format!(r#"{{"id":"c3","pid":{},"annotations":{{"warmpool.prewarm":"nohost"}}}}"#, std::process::id()));
    assert!(ok && err.contains("warmpool.prewarm"), "{err}");
    let (ok, err) = hook(&d, "bogus", "{}");
    assert!(ok && err.contains("unknown hook stage"), "{err}");
}

/// (d) with podman and runc: the shipped hook definition (deploy/oci-hooks/warmpool.json) in
/// a hooks directory makes a fresh annotated container's first connect() a warm hand-out (no
/// miss), and within 1 s of the container's stop its pools are gone and nothing of the
/// daemon's refers to its namespace.
#[test]
fn podman_runs_the_hook_and_the_first_connect_is_warm() {
    if !containers::needs("podman_runs_the_hook_and_the_first_connect_is_warm") {
        return;
    }
    containers::image();
    let mut lab = Lab::new();
    let (p1, p2) = (free_port(), free_port());
    let srv = PyServer::start(containers::SERVER, p1);
    let srv2 = PyServer::start(containers::SERVER, p2);
    let (dest, dest2) = (format!("{}:{p1}", containers::SERVER), format!("{}:{p2}", containers::SERVER));
    let url = format!("http://{dest}/");
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\nnetns_linger = \"300s\"\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"warm\"\nmin_idle = 1\n[auto]\nenabled = true\npolicy = \"warm\"\n"
    ));
    // The shipped definition, pointed at this build and this daemon.
    let shipped = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/oci-hooks/warmpool.json")).expect("shipped hook");
    assert!(shipped.contains("\"/usr/local/bin/pool-manager\"") && shipped.contains("WARMPOOL_SOCKET=/run/warmpool/pool.sock"), "{shipped}");
    let hooks = TempDir::new();
    let text = shipped
        .replace("\"/usr/local/bin/pool-manager\"", &format!("{:?}", pool_manager_bin().display().to_string()))
        .replace("WARMPOOL_SOCKET=/run/warmpool/pool.sock", &format!("WARMPOOL_SOCKET={}", d.socket.display()));
    std::fs::write(hooks.join("warmpool.json"), text).expect("write hook");
    lab.hooks = Some(hooks.path().to_owned());

    // Without the annotation the hook does not run: nothing is warmed.
    let plain = lab.start(Some(&d), 41);
    assert!(pools_for(&d, &dest).is_empty(), "{}", d.status());
    drop(plain);
    let annotation = format!("warmpool.prewarm={dest2}");
    let c = lab.start_with(Some(&d), 40, &["--annotation", &annotation]);
    let pid = c.pid();
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("container netns"));
    assert_eq!(pools_for(&d, &dest).iter().map(|p| p.0).sum::<u64>(), 1, "warm before the first connect: {}\n{}", d.status(), d.log());
    assert_eq!(pools_for(&d, &dest2).iter().map(|p| p.0).sum::<u64>(), 1, "the annotation's destination too: {}", d.status());
    for s in [&srv, &srv2] {
        assert!(wait_until(Duration::from_secs(2), || !s.lines().is_empty()), "the server logged no connection");
        assert!(s.lines().iter().all(|(_, a, _)| a == "198.18.111.40"), "made in the container's namespace: {:?}", s.lines());
    }
    assert_eq!(c.exec(true, &containers::curls(1, &url)).trim(), "200", "{}", d.log());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\"}"), 1.0, "the first connect is a warm hand-out: {}", d.metrics());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\"}"), 0.0, "{}", d.metrics());
    assert!(daemon_namespaces(d.pid()).contains(&ino), "a maker thread serves the container's namespace");

    let stopped = Instant::now();
    drop(c); // podman rm -f -t 0: the runtime runs poststop
    let pools_gone = wait_until(Duration::from_secs(1), || pools_for(&d, &dest).is_empty() && pools_for(&d, &dest2).is_empty());
    let ns_gone = wait_until(Duration::from_secs(1), || !daemon_namespaces(d.pid()).contains(&ino));
    eprintln!("after the stop: pools gone {pools_gone}, namespace let go {ns_gone}, {:?}", stopped.elapsed());
    assert!(pools_gone, "pools of the stopped container still open: {}\n{}", d.status(), d.log());
    assert!(ns_gone, "the daemon still refers to the container's namespace\n{}", d.log());
    assert!(d.metric("warmpool_tenants_closed_total{reason=\"stopped\"}") >= 1.0, "{}", d.metrics());
    // The runtime's poststop reaches the daemon too (after the exit, it finds nothing left).
    assert!(wait_until(Duration::from_secs(5), || d.log().contains("stop hook")), "poststop never ran\n{}", d.log());
    let log = d.log();
    let stopped: Vec<&str> = log.lines().filter(|l| l.contains("container stopped") || l.contains("container registered") || l.contains("stop hook")).collect();
    eprintln!("{}", stopped.join("\n"));
    assert!(!stopped.is_empty(), "{log}");

    // A container whose program runs as another user (`--user 1000`): the runtime's init is
    // still root at createRuntime; the hook names the bundle's uid and the first connect of
    // the program (uid 1000) is a warm hand-out too.
    let u = lab.start_with(Some(&d), 42, &["--annotation", "warmpool.prewarm=", "--user", "1000"]);
    let tenants: Vec<String> = d.status().lines().filter(|l| l.split_whitespace().nth(1) == Some(dest.as_str())).map(String::from).collect();
    assert!(tenants.len() == 1 && tenants[0].starts_with("1000:"), "warmed for uid 1000 only: {tenants:?}\n{}", d.log());
    assert_eq!(u.exec(true, "id -u; ").trim(), "1000");
    let warm = d.metric("warmpool_handouts_total{kind=\"warm\"}");
    assert_eq!(u.exec(true, &containers::curls(1, &url)).trim(), "200", "{}", d.log());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\"}"), warm + 1.0, "uid 1000's first connect is warm: {}", d.metrics());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\"}"), 0.0, "{}", d.metrics());
}
