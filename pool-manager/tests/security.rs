//! Who may use the pool at all: `socket_mode` (who can connect) and `allow_uids` /
//! `allow_cgroups` (who is served once connected). A client that may not use the pool never
//! gets a socket, and the program under the shim still works: it connects itself (fail-open).
//! Real uids (setpriv), real cgroups, a real nginx; root only (must run in CI).

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Other uids cannot read root's pyenv: use Debian's interpreter.
/// The uid (and gid) of the unprivileged functions.
const NOBODY: u32 = 65_534;


/// `prog args` as `uid` (gid `gid`, no supplementary groups), or as root when `uid` is None.
fn as_user(uid: Option<(u32, u32)>, prog: &Path, args: &[&str]) -> Command {
    match uid {
        None => {
            let mut c = Command::new(prog);
            c.args(args);
            c
        }
        Some((uid, gid)) => {
            let mut c = Command::new(tool_path("setpriv"));
            c.args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups"]).arg(prog).args(args);
            c
        }
    }
}

fn output(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run command")
}

fn text(o: &Output) -> String {
    format!("status {}\nstdout: {}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// One HTTP GET of `path` by `http_get.py` under the shim (`WARMPOOL_LOG=1`); asserts it
/// succeeded and returns its stderr (the shim's diagnostics).
fn function(st: &Staged, d: &Daemon, mut c: Command, path: &str) -> String {
    shim_env(&mut c, d);
    c.env("LD_PRELOAD", st.preload()).env("WARMPOOL_LOG", "1");
    let o = output(c);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && out.ends_with("200 hello\n"), "function {path}: {}\n--- daemon log ---\n{}", text(&o), d.log());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn http_get_args<'a>(st: &'a Staged, port: &'a str, path: &'a str) -> Vec<String> {
    vec![st.script().display().to_string(), "blocking".into(), "127.0.0.1".into(), port.into(), path.into()]
}

fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"")
}

fn denied(d: &Daemon) -> f64 {
    d.metric("warmpool_denied_total")
}

/// Wait for an idle socket in the pool for `dest` whose labels contain `labels`.
fn wait_idle(d: &Daemon, dest: &str, labels: &str) {
    let prefix = format!("warmpool_pool_sockets{{dest=\"{dest}\"");
    let idle = || -> f64 {
        metric_samples(&d.metrics(), &prefix)
            .iter()
            .filter(|(l, _)| l.contains("state=\"idle\"") && l.contains(labels))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(wait_until(Duration::from_secs(5), || idle() >= 1.0), "pool never warmed: {}", d.metrics());
}

/// nginx access log: the requests for `uri` as (connection serial, requests on it so far).
fn served(nginx: &Nginx, uri: &str) -> Vec<(u64, u64)> {
    nginx.log_entries().into_iter().filter(|(_, _, u)| u == uri).map(|(c, n, _)| (c, n)).collect()
}

/// The request for `uri` was the first and only one on a connection of its own: the program
/// connected itself (a pooled socket is made by the daemon and, with `reuse`, used again).
fn assert_own_connection(nginx: &Nginx, uri: &str) {
    // nginx logs a request when it finalizes it, which may be just after the client has its
    // answer.
    wait_until(Duration::from_secs(3), || !served(nginx, uri).is_empty());
    let all = nginx.log_entries();
    let mine = served(nginx, uri);
    assert_eq!(mine.len(), 1, "{uri}: {all:?}");
    let (conn, n) = mine[0];
    assert_eq!(n, 1, "{uri} was not the first request on its connection: {all:?}");
    assert_eq!(all.iter().filter(|e| e.0 == conn).count(), 1, "{uri}'s connection carried other requests: {all:?}");
}

fn not_allowed_lines(d: &Daemon) -> usize {
    d.log().lines().filter(|l| l.contains("client not allowed")).count()
}

#[test]
fn allow_uids_serves_listed_uids_and_others_connect_themselves() {
    if !require_root("allow_uids_serves_listed_uids_and_others_connect_themselves") || !require_tool("nginx") || !require_tool("setpriv") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let port = nginx.port.to_string();
    let d = Daemon::with_config(&format!("allow_uids = [0]\n\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 1\n"));
    let st = Staged::new();
    let nobody = Some((NOBODY, NOBODY));

    // Root: prewarmed, then served from the pool (and the socket reused).
    let o = output(as_user(None, &pool_manager_bin(), &["prewarm", "--socket", d.socket.to_str().unwrap(), &dest]));
    assert!(o.status.success(), "{}", text(&o));
    wait_idle(&d, &dest, "uid=\"0\"");
    for i in 1..=3 {
        let args = http_get_args(&st, &port, &format!("/root-{i}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        function(&st, &d, as_user(None, Path::new(SYSTEM_PYTHON), &args), &format!("/root-{i}"));
    }
    assert!(handouts(&d) >= 3.0, "every root function got a pooled socket: {}", d.metrics());
    let root_reqs: Vec<(u64, u64)> = (1..=3).flat_map(|i| served(&nginx, &format!("/root-{i}"))).collect();
    assert!(root_reqs.iter().any(|(_, n)| *n >= 2), "root's requests reused a pooled connection: {root_reqs:?}");
    assert_eq!(denied(&d), 0.0);

    // uid 65534: every request refused, and the program connects itself.
    let before = handouts(&d);
    let o = output(as_user(nobody, &st.bin(), &["prewarm", "--socket", d.socket.to_str().unwrap(), &dest]));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("uid 65534 is not allowed by this pool manager's allow_uids"), "{}", text(&o));
    for i in 1..=2 {
        let args = http_get_args(&st, &port, &format!("/nobody-{i}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = function(&st, &d, as_user(nobody, Path::new(SYSTEM_PYTHON), &args), &format!("/nobody-{i}"));
        assert!(log.contains("uid 65534 is not allowed"), "the shim was told why: {log}");
        assert_own_connection(&nginx, &format!("/nobody-{i}"));
    }
    // curl too.
    let mut c = as_user(nobody, &tool_path("curl"), &["-sS", &nginx.url("/nobody-curl")]);
    shim_env(&mut c, &d);
    c.env("LD_PRELOAD", st.preload());
    let o = output(c);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout) == "hello\n", "{}", text(&o));
    assert_own_connection(&nginx, "/nobody-curl");
    assert_eq!(handouts(&d), before, "a refused uid got a socket: {}", d.metrics());
    // prewarm + two python functions + curl, one request each.
    assert!(wait_until(Duration::from_secs(2), || denied(&d) == 4.0), "{}", d.metrics());
    // Nothing was pooled for the refused uid.
    assert!(!d.metrics().contains("uid=\"65534\""), "{}", d.metrics());

    // One process asking many times is logged once.
    let logged = not_allowed_lines(&d);
    assert_eq!(logged, 4, "one line per refused client:\n{}", d.log());
    let script = format!(
        "import socket\nfor i in range(3):\n    s = socket.create_connection(('127.0.0.1', {port}))\n    \
         s.sendall(b'GET /nobody-many-%d HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' % i)\n    \
         assert s.recv(100).split()[1] == b'200'\n    s.close()\n"
    );
    let mut c = as_user(nobody, Path::new(SYSTEM_PYTHON), &["-c", &script]);
    shim_env(&mut c, &d);
    c.env("LD_PRELOAD", st.preload());
    let o = output(c);
    assert!(o.status.success(), "{}", text(&o));
    for i in 0..3 {
        assert_own_connection(&nginx, &format!("/nobody-many-{i}"));
    }
    assert!(wait_until(Duration::from_secs(2), || denied(&d) == 7.0), "{}", d.metrics());
    assert_eq!(not_allowed_lines(&d), logged + 1, "logged once for the process's connection:\n{}", d.log());
    assert_eq!(handouts(&d), before);
}

/// `path` relative to the cgroup2 mount, as `/proc/PID/cgroup` shows it.
fn cgroup_name(path: &Path) -> String {
    let mount = tenancy::cgroup::cgroup2_mount().expect("cgroup2 mounted");
    format!("/{}", path.strip_prefix(&mount).expect("under the cgroup2 mount").display())
}

#[test]
fn allow_cgroups_serves_that_cgroup_and_below_and_refuses_others() {
    if !require_root("allow_cgroups_serves_that_cgroup_and_below_and_refuses_others") || !require_tool("nginx") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let port = nginx.port.to_string();
    let st = Staged::new();
    let allowed = Cgroup::new("allowed");
    let below_path = allowed.0.join("below");
    std::fs::create_dir(&below_path).unwrap_or_else(|e| panic!("mkdir {}: {e}", below_path.display()));
    // Declared after `allowed`: removed first.
    let below = Cgroup(below_path);
    let other = Cgroup::new("other");
    let allowed_name = cgroup_name(&allowed.0);
    for tenant in ["uid+cgroup", "uid"] {
        let d = Daemon::with_config(&format!(
            "tenant = \"{tenant}\"\nallow_cgroups = [\"{allowed_name}\"]\n\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"http\"\n"
        ));
        let sock = d.socket.to_str().unwrap().to_owned();
        // Inside the allowed cgroup and below it: served from the pool.
        for (cg, name) in [(&allowed, "allowed"), (&below, "below")] {
            let o = output(cg.command(&pool_manager_bin(), &["prewarm", "--socket", &sock, &dest]));
            assert!(o.status.success(), "{tenant} {name}: {}", text(&o));
            let cgroup = if tenant == "uid" { String::new() } else { cgroup_name(&cg.0) };
            wait_idle(&d, &dest, &format!("cgroup=\"{cgroup}\""));
            let before = handouts(&d);
            let uri = format!("/{tenant}-{name}");
            let args = http_get_args(&st, &port, &uri);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            function(&st, &d, cg.command(Path::new(SYSTEM_PYTHON), &args), &uri);
            assert_eq!(handouts(&d), before + 1.0, "{tenant}: the function in {name} got a pooled socket: {}", d.metrics());
        }
        assert_eq!(denied(&d), 0.0, "{}", d.metrics());
        // Another cgroup, and the test's own: refused; the programs connect themselves.
        let before = handouts(&d);
        let o = output(other.command(&pool_manager_bin(), &["prewarm", "--socket", &sock, &dest]));
        assert!(!o.status.success(), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("is not allowed by this pool manager's allow_cgroups"), "{}", text(&o));
        for (i, cg) in [Some(&other), None].into_iter().enumerate() {
            let uri = format!("/{tenant}-outside-{i}");
            let args = http_get_args(&st, &port, &uri);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let c = match cg {
                Some(cg) => cg.command(Path::new(SYSTEM_PYTHON), &args),
                None => as_user(None, Path::new(SYSTEM_PYTHON), &args),
            };
            let log = function(&st, &d, c, &uri);
            assert!(log.contains("allow_cgroups"), "{log}");
            assert_own_connection(&nginx, &uri);
        }
        assert_eq!(handouts(&d), before, "{tenant}: a refused cgroup got a socket: {}", d.metrics());
        assert!(wait_until(Duration::from_secs(2), || denied(&d) == 3.0), "{tenant}: {}", d.metrics());
    }
}

#[test]
fn socket_mode_is_applied_and_a_uid_without_access_runs_without_the_pool() {
    if !require_root("socket_mode_is_applied_and_a_uid_without_access_runs_without_the_pool")
        || !require_tool("nginx")
        || !require_tool("setpriv")
    {
        return;
    }
    let mode = |d: &Daemon| std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&Daemon::start(&[])), 0o666, "the default");

    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&format!("socket_mode = \"0660\"\n\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"http\"\n"));
    assert_eq!(mode(&d), 0o660);
    let st = Staged::new();
    let sock = d.socket.to_str().unwrap().to_owned();
    let group = 64_210;
    std::os::unix::fs::chown(&d.socket, None, Some(group)).unwrap();

    // Not the owner, not in the group: the kernel refuses the connect.
    let o = output(as_user(Some((NOBODY, NOBODY)), &st.bin(), &["status", "--socket", &sock]));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied"), "{}", text(&o));
    // ... and a function under the shim runs without the pool.
    let args = http_get_args(&st, &nginx.port.to_string(), "/nobody");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // (setpriv itself still runs as root, which may connect: the message is python's.)
    let log = function(&st, &d, as_user(Some((NOBODY, NOBODY)), Path::new(SYSTEM_PYTHON), &args), "/nobody");
    assert!(log.contains("not reachable"), "{log}");
    assert_own_connection(&nginx, "/nobody");

    // A member of the socket's group may connect, and is served.
    let member = Some((64_211, group));
    let o = output(as_user(member, &st.bin(), &["prewarm", "--socket", &sock, &dest]));
    assert!(o.status.success(), "{}", text(&o));
    wait_idle(&d, &dest, "uid=\"64211\"");
    let args = http_get_args(&st, &nginx.port.to_string(), "/member");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    function(&st, &d, as_user(member, Path::new(SYSTEM_PYTHON), &args), "/member");
    assert!(handouts(&d) >= 1.0, "{}", d.metrics());
}

#[test]
fn bad_allow_lists_and_socket_mode_are_clear_errors() {
    let dir = TempDir::new();
    for (i, (toml, want)) in [
        ("allow_uids = [\"root\"]\n", "allow_uids: \"root\" is not a uid"),
        ("allow_uids = [-1]\n", "allow_uids: -1 is not a uid"),
        ("allow_uids = []\n", "allow_uids: an empty list would refuse every client"),
        ("allow_uids = 0\n", "allow_uids"),
        ("allow_cgroups = [\"system.slice/fn.slice\"]\n", "allow_cgroups: \"system.slice/fn.slice\" is not absolute"),
        ("allow_cgroups = [\"/sys/fs/cgroup/fn.slice\"]\n", "allow_cgroups: \"/sys/fs/cgroup/fn.slice\" is a path under the cgroup2 mount"),
        ("allow_cgroups = [\"/a/../b\"]\n", "allow_cgroups: \"/a/../b\" has an empty"),
        ("allow_cgroups = [1000]\n", "allow_cgroups: 1000 is not a cgroup path"),
        ("allow_cgroup = [\"/a\"]\n", "allow_cgroup"),
        ("socket_mode = \"rw-rw----\"\n", "socket_mode: \"rw-rw----\" is not octal permission bits"),
        ("socket_mode = \"01777\"\n", "socket_mode"),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = dir.join(format!("bad{i}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let socket = dir.join(format!("x{i}.sock"));
        let out = Command::new(pool_manager_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--config")
            .arg(&cfg)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml:?} was accepted: {err}");
        assert!(err.contains(want), "{toml:?}: expected {want:?} in: {err}");
        assert!(!socket.exists(), "{toml:?}: a daemon that does not start leaves no socket");
    }
}

/// The preload library does nothing in the pool manager itself: a daemon started with the
/// shim in its environment (as `pool-manager exec` or a careless unit file would give it)
/// still makes its own connections, and never becomes its own client.
#[test]
fn the_shim_does_nothing_in_the_daemon_itself() {
    if !(require_tool("nginx") && require_tool("python3")) {
        return;
    }
    let nginx = Nginx::start();
    // Started by hand: the shim in the daemon's environment points at the daemon's own socket.
    let dir = TempDir::new();
    let sock = dir.join("self.sock");
    let metrics = localhost(free_port());
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(pool_manager_bin())
        .args(["serve", "--socket", sock.to_str().unwrap(), "--metrics", &metrics.to_string(), "--pool", &format!("{}=warm", nginx.addr())])
        .env("LD_PRELOAD", preload_path())
        .env("WARMPOOL_SOCKET", &sock)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon { child, socket: sock, metrics, log_path, dir };
    assert!(wait_until(Duration::from_secs(10), || d.socket.exists()), "{}", d.log());
    // Fill the pool (the CLI is the one client): the daemon connects with its own connects,
    // not through itself ...
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket", d.socket.to_str().unwrap(), &nginx.addr().to_string()]).env_remove("LD_PRELOAD").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_until(Duration::from_secs(5), || d.metric("warmpool_connects_total{result=\"ok\"}") >= 1.0), "{}", d.log());
    // ... and the daemon never became its own client: the CLI was the only one.
    assert_eq!(d.metric("warmpool_clients_total"), 1.0, "the daemon linked to itself:\n{}", d.log());
}

/// The preload library does nothing in a setuid program even when the loader loads it
/// (from /etc/ld.so.preload, which applies to setuid programs too; here bind-mounted in a
/// private mount namespace so nothing else on the machine sees it).
#[test]
fn the_shim_does_nothing_in_setuid_programs() {
    if !(require_root("the_shim_does_nothing_in_setuid_programs") && require_tool("nginx") && require_tool("unshare")) {
        return;
    }
    let nginx = Nginx::start();
    let st = Staged::new();
    let d = Daemon::start(&["--pool", &format!("{}=warm", nginx.addr())]);
    // A setuid-root copy of the system Python and the staged library, readable by nobody.
    let suid_python = st.preload().with_file_name("python3-suid");
    std::fs::copy(SYSTEM_PYTHON, &suid_python).unwrap();
    std::fs::set_permissions(&suid_python, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let plain_python = st.preload().with_file_name("python3-plain");
    std::fs::copy(SYSTEM_PYTHON, &plain_python).unwrap();
    std::fs::set_permissions(&plain_python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let etc = st.preload().with_file_name("etc");
    let port = nginx.addr().port().to_string();
    let run = |python: &Path, args: &str| {
        // In a private mount namespace: a copy of /etc with an ld.so.preload naming the
        // library, bind-mounted over /etc. The host's /etc is never written.
        let script = format!(
            "rm -rf {etc} && cp -a /etc {etc} && echo {lib} > {etc}/ld.so.preload && mount --bind {etc} /etc && \
             exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups env WARMPOOL_SOCKET={sock} {python} {args}",
            etc = etc.display(),
            lib = st.preload().display(),
            sock = d.socket.display(),
            python = python.display(),
        );
        Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap()
    };
    // The setuid copy really runs with euid 0 here (no nosuid mount in the way).
    let o = run(&suid_python, "-c 'import os; print(os.geteuid())'");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0", "{}", String::from_utf8_lossy(&o.stderr));
    let get = format!("{} blocking 127.0.0.1 {port} /suid", st.script().display());
    let before = d.metric("warmpool_clients_total");
    // Control: the same program without the setuid bit is served through the pool.
    let o = run(&plain_python, &get);
    assert!(o.status.success(), "{}{}", text(&o), String::from_utf8_lossy(&o.stderr));
    assert!(d.metric("warmpool_clients_total") > before, "control: the preloaded plain program linked to the daemon\n{}", d.log());
    let before = d.metric("warmpool_clients_total");
    let o = run(&suid_python, &get);
    assert!(o.status.success(), "{}{}", text(&o), String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.metric("warmpool_clients_total"), before, "a setuid program must not talk to the daemon\n{}", d.log());
}
