//! End to end: real programs (curl, redis-cli, Python) under the preload shim, against real
//! servers (nginx, redis-server, a Python line server), through a real pool manager.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn client_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

/// Run `prog args` under the shim pointed at `d`; returns its output.
fn shimmed(d: &Daemon, prog: &str, args: &[&str]) -> Output {
    let mut c = Command::new(tool_path(prog));
    c.args(args).stdin(Stdio::null());
    shim_env(&mut c, d);
    c.output().unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

fn plain(prog: &str, args: &[&str]) -> Output {
    Command::new(tool_path(prog)).args(args).env_remove("LD_PRELOAD").stdin(Stdio::null()).output().expect("run")
}

fn ok_stdout(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}\nstdout: {}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Fill this test process's pool for `dest` (same uid and cgroup as the programs it starts)
/// and wait until `n` sockets are idle.
fn prewarm(d: &Daemon, dest: &str, n: usize) {
    let o = Command::new(pool_manager_bin())
        .args(["prewarm", "--socket"])
        .arg(&d.socket)
        .arg(dest)
        .env_remove("LD_PRELOAD")
        .output()
        .expect("pool-manager prewarm");
    ok_stdout(&o, "pool-manager prewarm");
    let idle = format!("warmpool_pool_sockets{{dest=\"{dest}\"");
    assert!(
        wait_until(Duration::from_secs(5), || idle_sockets(d, &idle) >= n as f64),
        "pool for {dest} never reached {n} idle sockets\n{}",
        d.metrics()
    );
}

fn idle_sockets(d: &Daemon, prefix: &str) -> f64 {
    metric_samples(&d.metrics(), prefix).iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum()
}

fn curl_args(url: &str) -> Vec<String> {
    ["-sS", "--http1.1", "--max-time", "5", "-o", "-", "-w", " %{http_code}", url].iter().map(|s| s.to_string()).collect()
}

#[test]
fn curl_50_processes_share_at_most_two_connections_with_reuse() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    prewarm(&d, &dest, 1);
    let url = nginx.url("/with-shim");
    let args = curl_args(&url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for i in 0..50 {
        // Sequential invocations, each after the last one's socket is back from its checks
        // (holders walk, proof: ~10-20 ms; back-to-back curls make the pool grow to 3).
        let back = || !d.metrics().lines().any(|l| (l.contains("state=\"checking\"") || l.contains("state=\"quarantine\"")) && !l.ends_with(" 0"));
        assert!(wait_until(Duration::from_secs(5), back), "{}", d.metrics());
        let out = ok_stdout(&shimmed(&d, "curl", &args), &format!("curl #{i}"));
        assert_eq!(out, "hello\n 200", "curl #{i}");
    }
    let with: HashSet<u64> = nginx.connections().iter().filter(|(_, u)| u == "/with-shim").map(|(c, _)| *c).collect();
    assert_eq!(nginx.connections().iter().filter(|(_, u)| u == "/with-shim").count(), 50);
    assert!(with.len() <= 2, "50 requests through the pool used {} TCP connections", with.len());
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 48.0, "{}", d.metrics());

    let url = nginx.url("/without-shim");
    let args = curl_args(&url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for i in 0..50 {
        assert_eq!(ok_stdout(&plain("curl", &args), &format!("plain curl #{i}")), "hello\n 200");
    }
    let without: HashSet<u64> = nginx.connections().iter().filter(|(_, u)| u == "/without-shim").map(|(c, _)| *c).collect();
    assert_eq!(without.len(), 50, "without the shim every process opens its own connection");
}

fn client_ids(redis: &Redis) -> HashSet<u64> {
    redis
        .command(&["CLIENT", "LIST"])
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")).and_then(|v| v.parse().ok()))
        .collect()
}

#[test]
fn redis_cli_gets_connections_established_before_it_started() {
    if !require_tool("redis-server") || !require_tool("redis-cli") {
        return;
    }
    let redis = Redis::start();
    let dest = redis.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=warm")]);
    let port = redis.port.to_string();
    prewarm(&d, &dest, 1);
    for i in 0..12 {
        let idle = format!("warmpool_pool_sockets{{dest=\"{dest}\"");
        assert!(wait_until(Duration::from_secs(5), || idle_sockets(&d, &idle) >= 1.0), "pool not refilled");
        let before = client_ids(&redis);
        let id: u64 = ok_stdout(&shimmed(&d, "redis-cli", &["-p", &port, "CLIENT", "ID"]), "redis-cli CLIENT ID")
            .trim()
            .parse()
            .expect("CLIENT ID answers an integer");
        assert!(before.contains(&id), "run {i}: connection {id} did not exist before the process started ({before:?})");
        // The next process may start before the refill (deferred by 1 ms, then one connect)
        // has landed; wait for it, as the first one did.
        assert!(wait_until(Duration::from_secs(5), || idle_sockets(&d, &idle) >= 1.0), "pool not refilled");
        let key = format!("k{i}");
        let set = ok_stdout(&shimmed(&d, "redis-cli", &["-p", &port, "SET", &key, &format!("v{i}")]), "redis-cli SET");
        assert_eq!(set.trim(), "OK");
        let value = format!("v{i}");
        assert_eq!(redis.command(&["GET", &key]), format!("${}\r\n{value}\r\n", value.len()));
    }
    assert!(d.metric("warmpool_handouts_total{kind=\"warm\"") >= 24.0, "{}", d.metrics());
    // Warm sockets carried a function's bytes: they are never handed out again.
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"reuse\""), 0.0);
}

#[test]
fn python_blocking_and_asyncio_clients_work_through_the_pool() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    prewarm(&d, &dest, 1);
    let script = client_script("http_get.py");
    let port = nginx.port.to_string();
    let mut local_ports = HashSet::new();
    for mode in ["blocking", "asyncio", "blocking", "asyncio", "blocking", "asyncio"] {
        let out = ok_stdout(&shimmed(&d, "python3", &[script.to_str().unwrap(), mode, "127.0.0.1", &port, "/py"]), mode);
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(&f[1..], ["200", "hello"], "{mode}: {out}");
        local_ports.insert(f[0].to_owned());
    }
    assert!(local_ports.len() <= 2, "six functions used {} connections", local_ports.len());
    let served = d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"");
    assert!(served >= 6.0, "{}", d.metrics());
}

#[test]
fn pooled_connect_behaves_like_a_real_one() {
    if !require_tool("nginx") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    // The script connects several times in quick succession: keep enough sockets ready.
    let d = Daemon::with_config(&format!("[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 6\n"));
    prewarm(&d, &dest, 6);
    let out = ok_stdout(
        &shimmed(&d, "python3", &[client_script("semantics.py").to_str().unwrap(), "127.0.0.1", &nginx.port.to_string()]),
        "semantics.py",
    );
    let got: std::collections::HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let expect = [
        ("blocking_connect", "0"),
        ("same_fd", "True"),
        ("nodelay", "1"),
        ("keepalive", "1"),
        ("keepidle", "77"),
        ("rcvtimeo", "3"),
        ("cloexec", "True"),
        ("blocking", "True"),
        ("peer", "True"),
        ("http", "True"),
        ("nonblocking_connect", "EINPROGRESS"),
        ("writable", "True"),
        ("so_error", "0"),
        ("still_nonblocking", "True"),
        // A second connect on a connected socket: EISCONN, which CPython reports as 0.
        ("connect_again", "0"),
        ("http_nb", "True"),
        ("inheritable", "True"),
        ("dup_works", "True"),
        ("fork_child_ok", "True"),
        ("bound_kept", "True"),
        ("http_bound", "True"),
        ("udp", "True"),
    ];
    for (k, v) in expect {
        assert_eq!(got.get(k).copied(), Some(v), "{k}\nfull output:\n{out}");
    }
    // Every unbound TCP connect was pooled; dup and fork made their sockets unreusable.
    assert!(d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 5.0, "{}", d.metrics());
    assert!(d.metric("warmpool_discarded_total{reason=\"shared\"") >= 2.0, "{}", d.metrics());
}

#[test]
fn programs_never_notice_a_missing_stopped_killed_or_hung_daemon() {
    if !require_tool("nginx") || !require_tool("curl") || !require_tool("python3") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let url = nginx.url("/failopen");
    let args = curl_args(&url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let script = client_script("http_get.py");
    let port = nginx.port.to_string();
    let check = |o: Output, what: &str| {
        let out = ok_stdout(&o, what);
        assert!(out.contains("200"), "{what}: {out}");
        assert!(o.stderr.is_empty(), "{what} printed: {}", String::from_utf8_lossy(&o.stderr));
    };
    let run_all = |d: &Daemon, tag: &str| {
        check(shimmed(d, "curl", &args), &format!("{tag}: curl"));
        check(shimmed(d, "python3", &[script.to_str().unwrap(), "blocking", "127.0.0.1", &port]), &format!("{tag}: python"));
        check(shimmed(d, "python3", &[script.to_str().unwrap(), "asyncio", "127.0.0.1", &port]), &format!("{tag}: asyncio"));
    };

    // Killed mid-run.
    let mut d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    prewarm(&d, &dest, 1);
    for i in 0..30 {
        if i == 10 {
            d.kill(libc::SIGKILL);
        }
        check(shimmed(&d, "curl", &args), &format!("curl #{i} (daemon killed at #10)"));
    }
    // Gone entirely (stale socket file left by the kill; then no file at all).
    run_all(&d, "after SIGKILL");
    let _ = std::fs::remove_file(&d.socket);
    run_all(&d, "no daemon");

    // Hung: stopped with SIGSTOP, it accepts nothing and answers nothing.
    let mut d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    prewarm(&d, &dest, 1);
    check(shimmed(&d, "curl", &args), "before SIGSTOP");
    d.kill(libc::SIGSTOP);
    let t = std::time::Instant::now();
    run_all(&d, "hung daemon");
    assert!(t.elapsed() < Duration::from_secs(10), "a hung daemon must cost at most the answer bound per process");
    d.kill(libc::SIGCONT);

    // Stopped cleanly.
    assert!(d.stop().success(), "SIGTERM exit status");
    assert!(!d.socket.exists(), "socket file removed on SIGTERM");
    run_all(&d, "after SIGTERM");
}

#[test]
fn an_abandoned_reply_never_reaches_the_next_function() {
    if !require_tool("python3") {
        return;
    }
    let port = free_port();
    let mut server = Command::new(tool_path("python3"))
        .args([client_script("delayed_server.py").to_str().unwrap(), &port.to_string(), "0.3"])
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start delayed server");
    let _kill = KillOnDrop(server.id());
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let dest = format!("127.0.0.1:{port}");
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:unchecked")]);
    prewarm(&d, &dest, 1);
    let script = client_script("line_client.py");
    let p = port.to_string();
    for i in 0..4 {
        // A function sends a request and leaves without reading the (delayed) reply.
        ok_stdout(&shimmed(&d, "python3", &[script.to_str().unwrap(), &p, &format!("abandoned{i}")]), "abandoning client");
        // The next function must get the reply to its own request.
        let out = ok_stdout(&shimmed(&d, "python3", &[script.to_str().unwrap(), &p, &format!("mine{i}"), "--read"]), "reading client");
        assert_eq!(out.trim(), format!("reply:mine{i}"));
    }
    assert!(d.metric("warmpool_discarded_total{reason=\"pending_reply\"") >= 4.0, "{}", d.metrics());
    let _ = server.kill();
    let _ = server.wait();
}

/// Kills a process by PID when dropped (for servers a test starts itself).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling a child we started, by its PID.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

#[test]
fn sockets_closed_by_the_server_are_dropped_and_the_next_function_gets_a_good_one() {
    if !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start_with("1s");
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    prewarm(&d, &dest, 1);
    let url = nginx.url("/idle");
    let args = curl_args(&url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(ok_stdout(&shimmed(&d, "curl", &args), "first curl"), "hello\n 200");
    // nginx closes every idle connection after 1 s; the pool sees the FIN and drops them.
    assert!(
        wait_until(Duration::from_secs(5), || d.metric("warmpool_discarded_total{reason=\"peer_closed\"") >= 1.0),
        "{}",
        d.metrics()
    );
    let served_before = d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"");
    for i in 0..5 {
        assert_eq!(ok_stdout(&shimmed(&d, "curl", &args), &format!("curl after idle close #{i}")), "hello\n 200");
        // The test's timing, not a wait: functions 400 ms apart against nginx's 1 s keep-alive
        // timeout, so pooled sockets age past it and are closed by nginx between functions.
        std::thread::sleep(Duration::from_millis(400));
    }
    let served_after = d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"");
    assert!(served_after > served_before, "later functions were served from the pool");
    assert!(!nginx.error_log_text().contains("[error]"), "{}", nginx.error_log_text());
}

fn busybox() -> Option<std::path::PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"].iter().map(std::path::PathBuf::from).find(|p| p.exists())
}

#[test]
fn static_busybox_wget_is_served_from_the_pool_through_exec() {
    if !require_tool("nginx") {
        return;
    }
    let Some(bb) = busybox() else {
        assert!(!in_ci(), "busybox-static must be installed in CI");
        eprintln!("SKIP: busybox not installed");
        return;
    };
    // Debian's busybox-static ignores LD_PRELOAD: it is statically linked.
    let ldd = Command::new("ldd").arg(&bb).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    assert!(!ldd.contains("libc.so"), "{} is not a static binary: {ldd}", bb.display());
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    prewarm(&d, &dest, 1);
    let wget = |d: &Daemon, path: &str| {
        // busybox wget sends "Connection: close"; asking for keep-alive as well lets nginx keep
        // the connection, so that it can be reused by the next invocation.
        Command::new(pool_manager_bin())
            .args(["exec", "--socket"])
            .arg(&d.socket)
            .arg("--")
            .arg(&bb)
            .args(["wget", "-q", "--header", "Connection: keep-alive", "-O", "-", &nginx.url(path)])
            .env_remove("LD_PRELOAD")
            .output()
            .expect("run pool-manager exec")
    };
    for i in 0..5 {
        let o = wget(&d, &format!("/static{i}"));
        assert_eq!(ok_stdout(&o, "busybox wget"), "hello\n", "invocation {i}");
        // Until the given-back socket has passed the return path (a fixed sleep was flaky
        // on a loaded machine).
        let back = f64::from(i + 1);
        assert!(wait_until(Duration::from_secs(5), || d.metric("warmpool_checked_idle_total") >= back), "{}", d.metrics());
    }
    let conns: HashSet<u64> =
        nginx.connections().iter().filter(|(_, u)| u.starts_with("/static")).map(|(c, _)| *c).collect();
    assert_eq!(nginx.connections().iter().filter(|(_, u)| u.starts_with("/static")).count(), 5);
    assert!(conns.len() <= 2, "five static invocations used {} connections", conns.len());
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 3.0, "{}", d.metrics());

    // Fail open: with the daemon gone, the program's own connect runs.
    let mut d = d;
    assert!(d.stop().success());
    let o = wget(&d, "/static-no-daemon");
    assert_eq!(ok_stdout(&o, "busybox wget without a daemon"), "hello\n");
}

/// A starting process links to the daemon at load time (the daemon identifies it while the
/// program starts) and asks for offers only when the daemon publishes its prefetch hint;
/// with `WARMPOOL_LAZY=1` a process that connects nowhere never links; the first connect()
/// to a pooled destination links either way; the hint goes with the daemon.
#[test]
fn link_at_load_and_offers_only_when_the_daemon_prefetches() {
    let nginx = Nginx::start();
    let pool = format!("{}=reuse:http", nginx.addr());
    let d = Daemon::start(&["--pool", &pool]);
    let hint = d.socket.with_file_name("pool.sock.prefetch");
    assert!(!hint.exists(), "no prefetching pool, yet a hint at {}", hint.display());
    let lazy = |prog: &str, args: &[&str]| {
        let mut c = Command::new(tool_path(prog));
        c.args(args).stdin(Stdio::null());
        shim_env(&mut c, &d);
        c.env("WARMPOOL_LAZY", "1");
        ok_stdout(&c.output().expect("run"), prog);
    };
    for _ in 0..5 {
        lazy("true", &[]);
        lazy("sh", &["-c", "exit 0"]);
    }
    assert_eq!(d.metric("warmpool_clients_total"), 0.0, "lazy processes that connect nowhere linked:\n{}", d.log());
    lazy("curl", &["-sf", &nginx.url("/lazy")]);
    assert_eq!(d.metric("warmpool_clients_total"), 1.0, "the first connect() to a pooled destination must link");
    ok_stdout(&shimmed(&d, "true", &[]), "true");
    assert!(wait_until(Duration::from_secs(5), || d.metric("warmpool_clients_total") >= 2.0), "no link at load time");
    assert_eq!(d.metric("warmpool_prefetch_total{outcome=\"offered\"}"), 0.0, "offers without a prefetching pool");
    drop(d);

    let pool = format!("{}=reuse:http+prefetch", nginx.addr());
    let mut d = Daemon::start(&["--pool", &pool]);
    let hint = d.socket.with_file_name("pool.sock.prefetch");
    assert!(hint.exists(), "a prefetching pool publishes {}", hint.display());
    assert!(d.stop().success(), "daemon did not stop cleanly:\n{}", d.log());
    assert!(!hint.exists(), "the hint outlived the daemon");
}

/// The library loads nothing but libc: std's unwinder (needed by the fail-open
/// `catch_unwind` guards) is linked in statically rather than loading libgcc_s.so.1 into
/// every process (about 70 µs each on the test VM; see preload/build.rs).
#[test]
fn preload_library_needs_only_libc() {
    let out = Command::new("ldd").arg(preload_path()).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd failed: {text}");
    let libs: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(libs.iter().any(|l| l.starts_with("libc.so")), "no libc in {libs:?}");
    assert!(!libs.iter().any(|l| l.contains("libgcc_s")), "libgcc_s is loaded again: {libs:?}");
}
