//! Prefetch: a pool with `prefetch` offers each starting process a socket while it loads,
//! so that its first `connect()` there needs no round trip to the daemon. Real nginx, real
//! programs (curl, Python, coreutils) under the shim, a real pool manager.

mod common;

use common::*;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn shimmed(d: &Daemon, prog: &str, args: &[&str]) -> Output {
    let mut c = Command::new(prog);
    c.args(args).stdin(Stdio::null()).env("PYTHONPATH", client_script("."));
    shim_env(&mut c, d);
    c.output().unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

fn ok_stdout(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn prefetch(d: &Daemon, outcome: &str) -> f64 {
    d.metric(&format!("warmpool_prefetch_total{{outcome=\"{outcome}\""))
}

/// No socket in quarantine or under check.
fn settled(d: &Daemon) -> bool {
    metric_samples(&d.metrics(), "warmpool_pool_sockets{").iter().filter(|(l, _)| l.contains("state=\"quarantine\"") || l.contains("state=\"checking\"")).all(|(_, v)| *v == 0.0)
}

fn idle(d: &Daemon) -> f64 {
    metric_samples(&d.metrics(), "warmpool_pool_sockets{").iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum()
}

/// A reuse pool with prefetch for `nginx`, filled (prewarmed) before the test starts.
fn daemon_for(nginx: &Nginx) -> Daemon {
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http+prefetch")]);
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).arg(&dest).env_remove("LD_PRELOAD").output().expect("prewarm");
    ok_stdout(&o, "pool-manager prewarm");
    assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "pool never filled\n{}", d.metrics());
    d
}

/// `prefetch_fn.py MODE HOST PORT [EXTRA...]` against `nginx` under the shim; its stdout.
fn py(d: &Daemon, nginx: &Nginx, mode: &str, extra: &[&str]) -> String {
    let script = client_script("prefetch_fn.py");
    let (host, port) = (nginx.addr().ip().to_string(), nginx.addr().port().to_string());
    let mut args = vec![script.to_str().expect("utf-8 path"), mode, &host, &port];
    args.extend_from_slice(extra);
    ok_stdout(&shimmed(d, SYSTEM_PYTHON, &args), mode)
}

#[test]
fn connect_takes_the_socket_offered_at_load_time() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon_for(&nginx);
    let url = nginx.url("/prefetched");
    for i in 0..20 {
        // Steady state: the last function's socket is back (quarantine and checks done).
        assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0 && settled(&d)), "nothing idle before curl #{i}\n{}", d.metrics());
        let o = shimmed(&d, "curl", &["-sS", "--http1.1", "--max-time", "5", "-o", "-", "-w", " %{http_code}", &url]);
        assert_eq!(ok_stdout(&o, &format!("curl #{i}")), "hello\n 200", "curl #{i}");
    }
    // Every curl took its offer (one per process) and gave it back clean: one connection,
    // reused twenty times, and no request for a socket was ever needed.
    assert_eq!(prefetch(&d, "taken"), 20.0, "{}", d.metrics());
    assert!(prefetch(&d, "offered") >= 20.0);
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\""), 0.0, "{}", d.metrics());
    // (The daemon's own end-of-exchange proofs, `HEAD /`, are logged too: not counted.)
    let mut used: Vec<u64> = nginx.connections().into_iter().filter(|(_, u)| u == "/prefetched").map(|(c, _)| c).collect();
    used.dedup();
    assert_eq!(used.len(), 1, "{:?}", nginx.connections());
    assert!(d.status().contains("reuse"), "{}", d.status());
}

#[test]
fn offers_a_process_never_uses_go_back_to_the_pool() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon_for(&nginx);
    // Programs that never connect anywhere: each is offered the socket and exits (or execs).
    for i in 0..10 {
        // (Each after the last offer is back: holders walk done.)
        for (prog, args) in [("/bin/true", &[][..]), ("/bin/ls", &["/"]), ("/bin/sh", &["-c", "exec /bin/true"])] {
            // A shell that replaces itself: its offer is given back before execve.
            assert!(wait_until(Duration::from_secs(5), || settled(&d)), "{}", d.metrics());
            ok_stdout(&shimmed(&d, prog, args), &format!("{prog} #{i}"));
        }
    }
    // (A process that starts while the only socket is still in quarantine after the last
    // one's offer came back is offered nothing: that is a plain miss, not an error.)
    assert!(
        wait_until(Duration::from_secs(5), || {
            let offered = prefetch(&d, "offered");
            offered >= 10.0 && prefetch(&d, "returned") == offered && idle(&d) >= 1.0
        }),
        "offers not returned\n{}",
        d.metrics()
    );
    assert_eq!(prefetch(&d, "taken"), 0.0);
    assert_eq!(prefetch(&d, "offered"), prefetch(&d, "returned"), "{}", d.metrics());
    let discarded: f64 = d.metric("warmpool_discarded_total");
    assert_eq!(discarded, 0.0, "an unused offer was closed:\n{}", d.metrics());
    // The socket is still good: the next function is served on the same connection.
    let o = shimmed(&d, "curl", &["-sS", "--http1.1", "--max-time", "5", "-o", "-", "-w", " %{http_code}", &nginx.url("/after")]);
    assert_eq!(ok_stdout(&o, "curl after"), "hello\n 200");
    // (From its offer or, if the socket was still in quarantine when curl started, asked for.)
    let served = d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"");
    assert_eq!(served, 1.0, "{}", d.metrics());
    let mut used: Vec<u64> = nginx.connections().into_iter().filter(|(_, u)| u == "/after").map(|(c, _)| c).collect();
    used.dedup();
    assert_eq!(used.len(), 1, "{:?}", nginx.connections());
}

/// An offer the program used and left at exit without close() (`os._exit`): the daemon
/// judges the orphaned lease like a give-back (return check, holders walk, proof), and the
/// finished exchange is reused; it is never counted as an unused offer.
#[test]
fn an_offer_used_and_left_at_exit_is_judged_and_reused() {
    if !require_tool("nginx") || !require_tool(SYSTEM_PYTHON) {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon_for(&nginx);
    let first = py(&d, &nginx, "die-after", &[]);
    assert!(first.trim().ends_with(" 200"), "{first}");
    assert!(
        wait_until(Duration::from_secs(5), || d.metric("warmpool_orphaned_leases_total") >= 1.0 && settled(&d)),
        "the orphaned lease was not judged\n{}",
        d.metrics()
    );
    assert!(prefetch(&d, "offered") >= 1.0, "{}", d.metrics());
    assert_eq!(prefetch(&d, "returned"), 0.0, "a used offer counted as unused:\n{}", d.metrics());
    assert!(d.metric("warmpool_checks_total{protocol=\"http\",outcome=\"passed\"") >= 1.0, "{}", d.metrics());
    // The next function gets a clean reply, on the same connection.
    let next = py(&d, &nginx, "get", &[]);
    assert!(next.trim().ends_with(" 200"), "{next}");
    assert_eq!(first.split_whitespace().next(), next.split_whitespace().next(), "the finished exchange was not reused");
}

#[test]
fn a_fork_child_never_gets_its_parents_offer() {
    if !require_tool("nginx") || !require_tool(SYSTEM_PYTHON) {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon_for(&nginx);
    let out = py(&d, &nginx, "fork", &[]);
    let port_of = |tag: &str| -> String {
        let line = out.lines().find(|l| l.starts_with(tag)).unwrap_or_else(|| panic!("no {tag} line in {out:?}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[2], "200", "{line}");
        f[1].to_owned()
    };
    let (child, parent) = (port_of("child "), port_of("parent "));
    assert_ne!(child, parent, "parent and child used one TCP connection:\n{out}");
    // The parent used its own offer; the child asked the daemon over a link of its own.
    assert_eq!(prefetch(&d, "taken"), 1.0, "{}", d.metrics());
    let log = nginx.connections();
    let conn_of = |uri: &str| log.iter().find(|(_, u)| u == uri).map(|(c, _)| *c).unwrap_or_else(|| panic!("{uri} not in {log:?}"));
    assert_ne!(conn_of("/prefetch-child"), conn_of("/prefetch-parent"), "{log:?}");
}

#[test]
fn a_program_that_closes_fds_it_does_not_own_never_gets_a_stale_one() {
    if !require_tool("nginx") || !require_tool(SYSTEM_PYTHON) {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon_for(&nginx);
    let out = py(&d, &nginx, "closefrom", &[&free_port().to_string()]);
    let f: Vec<&str> = out.split_whitespace().collect();
    // The shim's link and its offer were among the closed numbers; the GET still worked (on a
    // socket asked for again), and the pipe put on those numbers was never touched.
    assert!(f[0].parse::<u32>().unwrap() >= 2, "the link and the offer should have been open: {out}");
    assert_eq!(f[2], "200", "{out}");
    assert_eq!(prefetch(&d, "taken"), 0.0, "{}", d.metrics());
    assert!(nginx.connections().iter().any(|(_, u)| u == "/prefetch-closefrom"));
}

#[test]
fn prefetch_off_in_the_environment_takes_no_offer() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let d = daemon_for(&nginx);
    let mut c = Command::new("curl");
    c.args(["-sS", "--http1.1", "--max-time", "5", "-o", "-", "-w", " %{http_code}", &nginx.url("/no-prefetch")]).stdin(Stdio::null());
    shim_env(&mut c, &d);
    c.env("WARMPOOL_PREFETCH", "0");
    assert_eq!(ok_stdout(&c.output().expect("curl"), "curl"), "hello\n 200");
    assert_eq!(prefetch(&d, "offered"), 0.0, "{}", d.metrics());
    // Served by an ordinary request instead.
    assert!(d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 1.0, "{}", d.metrics());
}

#[test]
fn auto_pools_prefetch_once_a_function_has_used_them() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\nmin_idle = 1\nprefetch = true\n");
    let url = nginx.url("/auto");
    let curl = || {
        let o = shimmed(&d, "curl", &["-sS", "--http1.1", "--max-time", "5", "-o", "-", "-w", " %{http_code}", &url]);
        assert_eq!(ok_stdout(&o, "curl"), "hello\n 200");
    };
    // The first process finds no pool: nothing to offer; its connect makes the warm pool
    // (and, finding it empty, connects itself).
    curl();
    assert_eq!(prefetch(&d, "offered"), 0.0, "{}", d.metrics());
    assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "the auto pool never filled\n{}", d.metrics());
    // From now on each process is offered a warm socket at load time and connects with it.
    curl();
    assert_eq!(prefetch(&d, "offered"), 1.0, "{}", d.metrics());
    assert_eq!(prefetch(&d, "taken"), 1.0, "{}", d.metrics());
    // (The first connect was a miss: it made the pool; the second was served by its offer.)
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\""), 1.0, "{}", d.metrics());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\""), 1.0, "{}", d.metrics());
}
