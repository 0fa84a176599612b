//! Nothing of a function's socket state reaches the next function: options and file status
//! flags are put back (or the socket is discarded), a socket whose peer changed is never
//! given back, options that cannot be carried onto a pooled socket make connect() pass
//! through, and the fd cases that were right stay right. Real redis-server and nginx, Python
//! functions under the preload shim (tests/clients/sockstate.py), a real pool manager.

mod common;

use common::*;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Run `sockstate.py MODE ARGS...` (under the shim when `d` is given); its JSON line.
fn run(d: Option<&Daemon>, envs: &[(&str, &str)], args: &[&str]) -> (String, String) {
    let mut c = Command::new(SYSTEM_PYTHON);
    c.arg(client_script("sockstate.py")).args(args).stdin(Stdio::null()).env_remove("LD_PRELOAD");
    if let Some(d) = d {
        shim_env(&mut c, d);
    }
    for (k, v) in envs {
        c.env(k, v);
    }
    let o: Output = c.output().expect("run python3");
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "sockstate.py {args:?} failed ({}):\n{out}\n{err}", o.status);
    (out, err)
}

fn shimmed(d: &Daemon, args: &[&str]) -> String {
    run(Some(d), &[], args).0
}

/// The text of JSON field `key` (a number, a string with its quotes, or an object).
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\": ");
    let start = json.find(&k).unwrap_or_else(|| panic!("no {key} in {json}")) + k.len();
    let rest = &json[start..];
    let end = if rest.starts_with('{') {
        rest.find('}').expect("object ends") + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    rest[..end].trim()
}

/// Fill this test process's pool for `dest` and wait until `n` sockets are idle.
fn prewarm(d: &Daemon, dest: &str, n: usize) {
    let o = Command::new(pool_manager_bin())
        .args(["prewarm", "--socket"])
        .arg(&d.socket)
        .arg(dest)
        .env_remove("LD_PRELOAD")
        .output()
        .expect("pool-manager prewarm");
    assert!(o.status.success(), "prewarm: {}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_until(Duration::from_secs(5), || idle(d) >= n as f64), "pool never reached {n} idle sockets\n{}", d.metrics());
}

fn idle(d: &Daemon) -> f64 {
    metric_samples(&d.metrics(), "warmpool_pool_sockets{").iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum()
}

/// Wait for a give-back to be settled (returned or discarded).
fn settled(d: &Daemon, n: f64) {
    let done = || d.metric("warmpool_returned_total") + d.metric("warmpool_discarded_total") >= n;
    assert!(wait_until(Duration::from_secs(5), done), "no give-back settled\n{}", d.metrics());
}

fn reuse_pool(dest: &str, protocol: &str, min_idle: usize) -> Daemon {
    Daemon::with_config(&format!(
        "keep_window_when_idle = false\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"{protocol}\"\nmin_idle = {min_idle}\nquarantine = \"1ms\"\n"
    ))
}

/// Case 01: the next function finds the options of a fresh socket, on the same connection.
#[test]
fn options_a_function_set_never_reach_the_next_and_the_socket_is_still_reused() {
    if !require_tool("redis-server") {
        return;
    }
    let redis = Redis::start();
    let dest = redis.addr().to_string();
    let port = redis.addr().port().to_string();
    let d = reuse_pool(&dest, "redis", 1);
    prewarm(&d, &dest, 1);
    let plain = run(None, &[], &["look", &port]).0;
    for round in 0..3 {
        let f1 = shimmed(&d, &["dirty", &port]);
        assert_eq!(field(&f1, "answer"), "\"+PONG\"", "{f1}");
        assert_ne!(field(field(&f1, "options"), "TCP_NODELAY"), "0", "the function's options did not take: {f1}");
        settled(&d, f64::from(2 * round + 1));
        assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "{}", d.metrics());
        let f2 = shimmed(&d, &["look", &port]);
        assert_eq!(field(&f2, "port"), field(&f1, "port"), "not reused: the next function got another connection\n{}", d.metrics());
        assert_eq!(field(&f2, "options"), field(&plain, "options"), "round {round}: options leaked (left: next function, right: a fresh socket)");
        assert_eq!(field(&f2, "blpop"), "\"*-1\\r\\n\"", "a blocking read did not block: {f2}");
        settled(&d, f64::from(2 * round + 2));
    }
    assert_eq!(d.metric("warmpool_discarded_total{reason=\"sockopt\"}"), 0.0, "{}", d.metrics());
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"}") >= 5.0, "{}", d.metrics());
}

/// Acceptance: 1,000 functions in a row, each setting options of its own, on few upstream
/// connections: not one finds an option another one set.
#[test]
fn a_thousand_reuse_cycles_leak_no_option() {
    if !require_tool("redis-server") {
        return;
    }
    let redis = Redis::start();
    let dest = redis.addr().to_string();
    let d = reuse_pool(&dest, "redis", 1);
    prewarm(&d, &dest, 1);
    let out = shimmed(&d, &["cycles", &redis.addr().port().to_string(), "1000"]);
    assert_eq!(field(&out, "leaks"), "0", "{out}");
    let reused = d.metric("warmpool_handouts_total{kind=\"reuse\"}");
    assert!(reused >= 900.0, "only {reused} of 1000 functions got a reused socket\n{out}\n{}", d.metrics());
    assert_eq!(d.metric("warmpool_discarded_total{reason=\"sockopt\"}"), 0.0, "{}", d.metrics());
    eprintln!("1000 cycles: {out}");
}

/// A buffer size locks autotuning off for good: such a socket is never reused, whether the
/// pool manager sees it (a size below the socket's own) or only the shim does (above).
#[test]
fn a_socket_whose_buffer_size_was_set_is_not_reused() {
    if !require_tool("redis-server") {
        return;
    }
    let redis = Redis::start();
    let dest = redis.addr().to_string();
    let port = redis.addr().port().to_string();
    let d = reuse_pool(&dest, "redis", 1);
    for (how, reason) in [("raw", "sockopt"), ("libc", "implicit")] {
        prewarm(&d, &dest, 1);
        let before = d.metric(&format!("warmpool_discarded_total{{reason=\"{reason}\"}}"));
        let f1 = shimmed(&d, &["buffer", &port, how]);
        assert_eq!(field(&f1, "answer"), "\"+PONG\"", "{f1}");
        let discarded = || d.metric(&format!("warmpool_discarded_total{{reason=\"{reason}\"}}")) > before;
        assert!(wait_until(Duration::from_secs(5), discarded), "{how}: not discarded as {reason}\n{}", d.metrics());
        prewarm(&d, &dest, 1);
        let f2 = shimmed(&d, &["look", &port]);
        assert_ne!(field(&f2, "port"), field(&f1, "port"), "{how}: the socket with a locked buffer was reused");
    }
}

/// Case 17: a function disconnects its pooled socket and connects it elsewhere; the next
/// function that connects to the pool's destination reaches that destination. Through the
/// shim's connect() (the lease ends at the reconnect) and beside it (raw system calls: the
/// pool manager sees another peer at give-back).
#[test]
fn a_socket_reconnected_elsewhere_is_never_given_back() {
    if !require_tool("nginx") {
        return;
    }
    let (n, m) = (Nginx::start(), Nginx::start());
    let dest = n.addr().to_string();
    let (np, mp) = (n.addr().port().to_string(), m.addr().port().to_string());
    let d = reuse_pool(&dest, "http", 1);
    for how in ["libc", "raw"] {
        prewarm(&d, &dest, 1);
        let settled_before = d.metric("warmpool_returned_total") + d.metric("warmpool_discarded_total");
        let f1 = shimmed(&d, &["reconnect", &np, &mp, how]);
        assert_eq!((field(&f1, "first"), field(&f1, "now")), (np.as_str(), mp.as_str()), "{how}: {f1}");
        assert_eq!(field(&f1, "status"), "\"HTTP/1.1 200 OK\"", "{f1}");
        settled(&d, settled_before + 1.0);
        for _ in 0..2 {
            let f2 = shimmed(&d, &["peer", &np]);
            assert_eq!(field(&f2, "peer"), np, "{how}: a connect to {dest} reached another server\n{}", d.metrics());
        }
    }
    let peer_changed = || d.metric("warmpool_discarded_total{reason=\"peer_changed\"}");
    assert!(wait_until(Duration::from_secs(5), || peer_changed() >= 1.0), "{}", d.metrics());
    // The raw-syscall reconnect is invisible to the shim: its close() gives the socket back
    // (counted returned) and the checker then discards it as peer_changed. Only the four plain
    // functions' sockets went back into the pool.
    let kept = d.metric("warmpool_returned_total") - d.metric("warmpool_discarded_total{reason=\"peer_changed\"}");
    assert_eq!(kept, 4.0, "only the four plain functions gave back\n{}", d.metrics());
}

/// Case 14, the shim's half: options set before connect() that a pooled socket cannot have
/// make connect() pass through (with its reason in the WARMPOOL_LOG output) and keep their
/// value; an option that can be carried (SO_RCVTIMEO) is, on a pooled socket.
#[test]
fn options_that_cannot_be_carried_make_connect_pass_through() {
    if !require_tool("nginx") || !require_root("options_that_cannot_be_carried_make_connect_pass_through") {
        return;
    }
    let n = Nginx::start();
    let dest = n.addr().to_string();
    let port = n.addr().port().to_string();
    let d = Daemon::with_config(&format!("keep_window_when_idle = false\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"warm\"\nmin_idle = 2\n"));
    let lo = std::fs::read_to_string("/sys/class/net/lo/ifindex").expect("lo ifindex").trim().to_owned();
    let cases: [(&str, &str); 8] = [
        ("bindtodevice", lo.as_str()),
        ("congestion", "true"),
        ("bound", "\"127.0.0.2\""),
        ("mark", "7"),
        ("transparent", "1"),
        ("freebind", "1"),
        ("fastopen_connect", "1"),
        ("buffer_size", "131072"),
    ];
    for (opt, want) in cases {
        prewarm(&d, &dest, 2);
        let handouts = d.metric("warmpool_handouts_total{kind=\"warm\"}");
        let (out, log) = run(Some(&d), &[("WARMPOOL_LOG", "1")], &["preconnect", &port, opt]);
        assert_eq!(field(&out, "status"), "\"HTTP/1.1 200 OK\"", "{opt}: {out}");
        assert!(log.contains(&format!("passes through: {opt}")), "{opt}: no pass-through reason in the log:\n{log}");
        assert_eq!(field(&out, "value"), want, "{opt}: the option was lost");
        if opt != "congestion" {
            // Decided before asking: no socket left the pool.
            assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\"}"), handouts, "{opt}: a socket was handed out\n{log}");
        }
    }
    prewarm(&d, &dest, 2);
    let (out, log) = run(Some(&d), &[("WARMPOOL_LOG", "1")], &["preconnect", &port, "rcvtimeo"]);
    assert!(log.contains("pooled socket"), "SO_RCVTIMEO alone must not stop pooling:\n{log}");
    assert_eq!(field(&out, "value"), "1", "SO_RCVTIMEO was not carried over: {out}");
}

/// Case 15: fd cases that were right stay right: a socket that was duplicated, inherited or
/// closed implicitly is never reused; a plain close and a close-on-exec socket across
/// posix_spawn are.
#[test]
fn fd_cases_that_were_right_stay_right() {
    if !require_tool("nginx") {
        return;
    }
    let n = Nginx::start();
    let dest = n.addr().to_string();
    let d = reuse_pool(&dest, "http", 4);
    prewarm(&d, &dest, 4);
    let out = shimmed(&d, &["fdcases", &n.addr().port().to_string()]);
    assert_eq!(field(&out, "done"), "7", "{out}");
    settled(&d, 7.0);
    let m = |reason: &str| d.metric(&format!("warmpool_discarded_total{{reason=\"{reason}\"}}"));
    assert_eq!((m("shared"), m("implicit")), (3.0, 2.0), "dup, F_DUPFD, fork: shared; dup2 over, close_range: implicit\n{}", d.metrics());
    assert_eq!(d.metric("warmpool_returned_total"), 2.0, "posix_spawn (close-on-exec) and a plain close\n{}", d.metrics());
    assert_eq!(d.metric("warmpool_discarded_total"), 5.0, "{}", d.metrics());
}
