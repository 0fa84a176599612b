//! Shared integration-test harness for `pool-manager`.
//!
//! Used from the test files in `pool-manager/tests/` via `mod common;`. std, libc, and
//! `shim` for whether the eBPF programs were built.
//!
//! Every helper that spawns a process owns its `Child` and guarantees in `Drop` that the
//! process is signalled *by PID* (never by name) and reaped. A PID is only ever signalled
//! while the `Child` has not been reaped yet, so a recycled PID can never be hit.
//!
//! Set `WARMPOOL_TEST_KEEP=1` to keep the temporary directories (logs, configs) after a
//! test for post-mortem inspection; their paths are printed on stderr.
#![allow(dead_code, unreachable_pub, missing_debug_implementations)]
pub mod containers;
pub mod nat;
pub mod ns;
pub mod pyhttp;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Environment / preconditions
// ---------------------------------------------------------------------------------------

/// True when running under CI (`CI=true`, also accepts `1`/`yes`).
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"),
        Err(_) => false,
    }
}

/// Returns true if the test may proceed as root. Outside CI, a non-root run prints a skip
/// reason and returns false; in CI (`CI=true`) a non-root run panics.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if in_ci() {
        panic!("{test}: must run as root in CI (euid={euid}); run the test suite with sudo");
    }
    eprintln!("SKIP {test}: requires root (euid={euid}); set up sudo or run as root");
    false
}

/// Looks `name` up in `$PATH` and the usual sbin/bin directories; returns the first
/// executable regular file found.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Returns true if the binary `name` is available. Otherwise: panics in CI, else prints a
/// skip reason and returns false.
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        return true;
    }
    if in_ci() {
        panic!("required tool `{name}` not found in PATH or /usr/sbin; run scripts/setup.sh");
    }
    eprintln!("SKIP: required tool `{name}` not found in PATH or /usr/sbin (run scripts/setup.sh)");
    false
}

/// Whether the kernel-assist tests can run: root, the `tools`, and a build with the eBPF
/// programs (CI must have them: panics there when they are missing).
pub fn assist_available(test: &str, tools: &[&str]) -> bool {
    if !require_root(test) || !tools.iter().all(|t| require_tool(t)) {
        return false;
    }
    if !shim::assist::KernelAssist::built() {
        assert!(!in_ci(), "{test}: this build has no eBPF programs; CI must build them");
        eprintln!("SKIP {test}: built without the eBPF toolchain (scripts/setup-ebpf.sh)");
        return false;
    }
    true
}

/// Like `find_tool` but panics with a helpful message.
pub fn tool_path(name: &str) -> PathBuf {
    find_tool(name)
        .unwrap_or_else(|| panic!("tool `{name}` not found in PATH or /usr/sbin; run scripts/setup.sh"))
}

/// A currently free TCP port on 127.0.0.1 (bind :0, read the port, drop the listener).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// `127.0.0.1:port`
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Directory holding the built binaries (the directory of the `pool-manager` test binary
/// target, e.g. `target/release`).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pool-manager"))
        .parent()
        .expect("CARGO_BIN_EXE_pool-manager has a parent directory")
        .to_path_buf()
}

/// Path of the pool-manager binary under test.
pub fn pool_manager_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pool-manager"))
}

/// `target_dir()/libwarmpool_preload.so`; panics if it has not been built.
pub fn preload_path() -> PathBuf {
    let p = target_dir().join("libwarmpool_preload.so");
    if !p.is_file() {
        panic!(
            "{} is missing: build it first: cargo build --release (the cdylib is built by \
             the workspace build, not by `cargo test -p pool-manager`)",
            p.display()
        );
    }
    p
}

/// Polls `f` every 10 ms until it returns true or `timeout` elapses. Returns the last
/// result (`f` is evaluated once more at the deadline).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn read_lossy(p: &Path) -> String {
    match fs::read(p) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<could not read {}: {e}>", p.display()),
    }
}

// ---------------------------------------------------------------------------------------
// Process handling
// ---------------------------------------------------------------------------------------

/// Sends `sig` to the child by PID, unless the child has already been reaped (then the PID
/// may have been recycled and nothing is sent). Returns false if nothing was sent.
fn signal_child(child: &mut Child, sig: libc::c_int) -> bool {
    if !matches!(child.try_wait(), Ok(None)) {
        return false;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a PID we own and have not reaped (checked above); no memory
    // is involved.
    let rc = unsafe { libc::kill(pid, sig) };
    rc == 0
}

/// SIGTERM, wait up to `grace`, then SIGKILL and wait. Returns the exit status.
pub fn terminate_child(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(st)) = child.try_wait() {
        return st;
    }
    signal_child(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(st)) => return st,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    signal_child(child, libc::SIGKILL);
    child.wait().expect("wait for child after SIGKILL")
}

/// SIGKILL (by PID) and reap; used from Drop impls. Never panics.
fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal_child(child, libc::SIGKILL);
        let _ = child.wait();
    }
}

/// Opens `path` for appending as a child's stdout/stderr.
fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    let f2 = f.try_clone().expect("clone log fd");
    (Stdio::from(f), Stdio::from(f2))
}

// ---------------------------------------------------------------------------------------
// TempDir
// ---------------------------------------------------------------------------------------

static TEMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique directory `$TMPDIR/warmpool-test-<pid>-<counter>` (mode 0755), removed
/// recursively on Drop (unless `WARMPOOL_TEST_KEEP=1`).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("warmpool-test-{}-{n}", std::process::id()));
        if path.exists() {
            // Leftover from an earlier run whose PID was recycled.
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WARMPOOL_TEST_KEEP").is_some_and(|v| v != "0" && !v.is_empty()) {
            eprintln!("WARMPOOL_TEST_KEEP: keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP helper (used for /metrics)
// ---------------------------------------------------------------------------------------

/// Plain HTTP/1.0 GET; returns (status code, body). Honours Content-Length if present,
/// otherwise reads until EOF.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(hend) = find_subslice(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..hend]).into_owned();
            if let Some(len) = content_length(&head) {
                if buf.len() >= hend + 4 + len {
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "http response timed out"));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let hend = find_subslice(&buf, b"\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no HTTP header terminator in {:?}", String::from_utf8_lossy(&buf)),
        )
    })?;
    let head = String::from_utf8_lossy(&buf[..hend]).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line: {head:?}")))?;
    let mut body = buf[hend + 4..].to_vec();
    if let Some(len) = content_length(&head) {
        body.truncate(len);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
    })
}

fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// All samples of a Prometheus text body whose line starts with `prefix`, as
/// (full sample line minus value, value). If `prefix` has no `{`, it must match the
/// whole metric name (the next char must be `{` or a space), so `foo_total` does not
/// match `foo_total_bar`. With a `{`, a plain prefix match is done, e.g.
/// `warmpool_handouts_total{kind="warm"`.
pub fn metric_samples(body: &str, prefix: &str) -> Vec<(String, f64)> {
    let exact_name = !prefix.contains('{');
    let mut out = Vec::new();
    for line in body.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || !line.starts_with(prefix) {
            continue;
        }
        if exact_name && !matches!(line.as_bytes().get(prefix.len()), Some(b'{') | Some(b' ')) {
            continue;
        }
        // Value follows the label set (labels may contain spaces) or the bare name.
        let split_at = match line.rfind('}') {
            Some(i) => i + 1,
            None => line.find(' ').unwrap_or(line.len()),
        };
        let (series, rest) = line.split_at(split_at);
        let Some(tok) = rest.split_whitespace().next() else { continue };
        let v = match tok {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            t => match t.parse::<f64>() {
                Ok(v) => v,
                Err(_) => panic!("unparsable metric value in line {line:?}"),
            },
        };
        out.push((series.to_string(), v));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------------------

/// A running `pool-manager serve` with its own socket, metrics port and temp dir.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    /// Unix socket path (`<dir>/pool.sock`).
    pub socket: PathBuf,
    /// Metrics listen address (127.0.0.1:<free port>).
    pub metrics: SocketAddr,
    /// Daemon log (stdout+stderr, RUST_LOG=info).
    pub log_path: PathBuf,
    // Declared last so it is removed after the child has been killed.
    pub dir: TempDir,
}

impl Daemon {
    /// `pool-manager serve --socket <tmp>/pool.sock --metrics 127.0.0.1:<port> <args...>`;
    /// waits (≤10 s) for the socket and the metrics endpoint, panics with the log otherwise.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with_env(args, &[])
    }

    /// `start` with a TOML configuration file holding `toml` (read once at start-up).
    pub fn with_config(toml: &str) -> Daemon {
        let dir = TempDir::new();
        let cfg = dir.join("pool.toml");
        fs::write(&cfg, toml).expect("write pool.toml");
        Self::start(&["--config", cfg.to_str().expect("utf-8 temp path")])
    }

    /// Same as `start`, with extra environment variables for the daemon.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        Self::start_via(None, args, envs)
    }

    /// `start`, in a private mount namespace (root) after the shell commands `setup` (e.g.
    /// a bind mount over /etc/hosts): the host's mounts are never touched.
    pub fn start_in_mount_ns(setup: &str, args: &[&str]) -> Daemon {
        Self::start_via(Some(setup), args, &[])
    }

    fn start_via(setup: Option<&str>, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = TempDir::new();
        let socket = dir.join("pool.sock");
        let metrics = localhost(free_port());
        let log_path = dir.join("daemon.log");
        let (out, err) = log_stdio(&log_path);
        let mut cmd = match setup {
            None => Command::new(pool_manager_bin()),
            Some(setup) => {
                // unshare and sh exec in turn: the child's PID is the daemon's.
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "sh", "-c", &format!("{setup} && exec \"$0\" \"$@\"")])
                    .arg(pool_manager_bin());
                c
            }
        };
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics")
            .arg(metrics.to_string())
            // Tests read per-pool series; their endpoint is theirs alone.
            .arg("--metrics-tenant-labels")
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("LD_PRELOAD")
            .env_remove("WARMPOOL_SOCKET")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", pool_manager_bin().display()));
        // Construct first so that Drop kills the child if we panic below.
        let mut d = Daemon { child, socket, metrics, log_path, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!(
                    "pool-manager exited during startup ({st}); args={args:?}\n--- daemon log ---\n{}",
                    d.log()
                );
            }
            if d.socket.exists()
                && matches!(
                    http_get(d.metrics, "/metrics", Duration::from_millis(500)),
                    Ok((200, _))
                )
            {
                return d;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pool-manager not ready after 10 s (socket {} exists: {}, metrics {}); \
                     args={args:?}\n--- daemon log ---\n{}",
                    d.socket.display(),
                    d.socket.exists(),
                    d.metrics,
                    d.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Contents of the daemon log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// GET /metrics; returns the body. Panics (with the daemon log) on failure / non-200.
    pub fn metrics(&self) -> String {
        match http_get(self.metrics, "/metrics", Duration::from_secs(5)) {
            Ok((200, body)) => body,
            Ok((code, body)) => panic!("GET /metrics -> {code}: {body}\n--- daemon log ---\n{}", self.log()),
            Err(e) => panic!("GET http://{}/metrics failed: {e}\n--- daemon log ---\n{}", self.metrics, self.log()),
        }
    }

    /// Sum of all samples whose line starts with `prefix` (see `metric_samples` for the
    /// matching rule). 0.0 if there are none.
    pub fn metric(&self, prefix: &str) -> f64 {
        metric_samples(&self.metrics(), prefix).iter().map(|(_, v)| v).sum()
    }

    /// Whether at least one sample matches `prefix`.
    pub fn has_metric(&self, prefix: &str) -> bool {
        !metric_samples(&self.metrics(), prefix).is_empty()
    }

    /// Raw output of `pool-manager status --socket <socket>`.
    pub fn status_output(&self) -> Output {
        Command::new(pool_manager_bin())
            .arg("status")
            .arg("--socket")
            .arg(&self.socket)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .output()
            .expect("run pool-manager status")
    }

    /// stdout of `pool-manager status`; panics if it fails.
    pub fn status(&self) -> String {
        let o = self.status_output();
        if !o.status.success() {
            panic!(
                "pool-manager status failed ({}):\nstdout: {}\nstderr: {}\n--- daemon log ---\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                self.log()
            );
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the daemon by PID. Panics if the daemon
    /// has already been reaped.
    pub fn kill(&mut self, signal: libc::c_int) {
        assert!(
            signal_child(&mut self.child, signal),
            "cannot send signal {signal} to pool-manager pid {}: already exited\n--- daemon log ---\n{}",
            self.pid(),
            self.log()
        );
    }

    /// Non-blocking: `Some(status)` if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        terminate_child(&mut self.child, Duration::from_secs(5))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Points `cmd` at the daemon through the preload shim: sets LD_PRELOAD and
/// WARMPOOL_SOCKET (and removes an inherited WARMPOOL_DISABLE).
pub fn shim_env(cmd: &mut Command, d: &Daemon) {
    cmd.env("LD_PRELOAD", preload_path())
        .env("WARMPOOL_SOCKET", &d.socket)
        .env_remove("WARMPOOL_DISABLE");
}

// ---------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------

/// A single-process nginx on 127.0.0.1:<port> answering `200 "hello\n"` on every path but
/// `/big` (20 KB of `B`, sent at 2 KB/s), with an access log of
/// `$connection $connection_requests $request_uri`.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub access_log: PathBuf,
    pub error_log: PathBuf,
    pub conf: PathBuf,
    pub dir: TempDir,
}

impl Nginx {
    pub fn start() -> Nginx {
        Self::start_with("75s")
    }

    /// `keepalive_timeout` value verbatim, e.g. "75s", "2s", "0" (disables keep-alive).
    pub fn start_with(keepalive_timeout: &str) -> Nginx {
        Self::start_with_connections(keepalive_timeout, 1024)
    }

    /// `start_with` and `worker_connections` (default 1024). nginx also needs an
    /// RLIMIT_NOFILE above that; it inherits the test process's limit.
    pub fn start_with_connections(keepalive_timeout: &str, worker_connections: u32) -> Nginx {
        let bin = tool_path("nginx");
        let dir = TempDir::new();
        let port = free_port();
        let d = dir.path().display().to_string();
        // A connection that never sent a request is closed after client_header_timeout, an
        // idle keep-alive one after keepalive_timeout: keep them equal so "the server closes
        // idle connections" means both.
        let header_timeout = if keepalive_timeout == "0" { "60s" } else { keepalive_timeout };
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).expect("mkdir nginx temp dir");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let conf_text = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;

events {{
    worker_connections {worker_connections};
}}

http {{
    log_format conn '$connection $connection_requests $request_uri';
    access_log {d}/access.log conn;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_timeout {keepalive_timeout};
    keepalive_requests 10000;
    client_header_timeout {header_timeout};

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location / {{
            return 200 "hello\n";
        }}
        # 20 KB of 'B' at 2 KB/s: a body a function can give up on half-way.
        location = /big {{
            limit_rate 2k;
            alias {d}/big;
        }}
    }}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        fs::write(&conf, conf_text).expect("write nginx.conf");
        fs::write(dir.join("big"), vec![b'B'; 20_000]).expect("write big");
        let access_log = dir.join("access.log");
        let error_log = dir.join("error.log");
        let (out, err) = log_stdio(&dir.join("nginx.out"));
        let child = Command::new(&bin)
            .arg("-e")
            .arg(&error_log) // avoid touching /var/log/nginx before the config is read
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut n = Nginx { child, port, access_log, error_log, conf, dir };
        n.wait_ready();
        n
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("nginx exited during startup ({st})\n{}", self.diagnostics());
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("nginx not accepting on {} after 10 s\n{}", self.addr(), self.diagnostics());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- error.log ---\n{}\n--- stdout/stderr ---\n{}",
            read_lossy(&self.error_log),
            read_lossy(&self.dir.join("nginx.out"))
        )
    }

    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Access log entries: (connection serial, connection_requests, request_uri).
    pub fn log_entries(&self) -> Vec<(u64, u64, String)> {
        let text = fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                let conn = it.next()?.parse().ok()?;
                let reqs = it.next()?.parse().ok()?;
                let uri = it.next().unwrap_or("").to_string();
                Some((conn, reqs, uri))
            })
            .collect()
    }

    /// Access log entries as (nginx connection serial, request_uri), in log order.
    /// Requests that share a connection serial were served over the same TCP connection.
    pub fn connections(&self) -> Vec<(u64, String)> {
        self.log_entries().into_iter().map(|(c, _, u)| (c, u)).collect()
    }

    /// Number of distinct TCP connections that carried at least one logged request.
    pub fn distinct_connections(&self) -> usize {
        let mut c: Vec<u64> = self.log_entries().into_iter().map(|e| e.0).collect();
        c.sort_unstable();
        c.dedup();
        c.len()
    }

    /// Contents of nginx's error log.
    pub fn error_log_text(&self) -> String {
        read_lossy(&self.error_log)
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL.
    pub fn stop(&mut self) -> ExitStatus {
        terminate_child(&mut self.child, Duration::from_secs(5))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// A throw-away `redis-server` on 127.0.0.1:<port> without persistence.
#[derive(Debug)]
pub struct Redis {
    child: Child,
    pub port: u16,
    pub log_path: PathBuf,
    pub dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let bin = tool_path("redis-server");
        let dir = TempDir::new();
        let port = free_port();
        let log_path = dir.join("redis.log");
        let (out, err) = log_stdio(&log_path);
        let child = Command::new(&bin)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut r = Redis { child, port, log_path, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("redis-server exited during startup ({st})\n--- log ---\n{}", read_lossy(&r.log_path));
            }
            if matches!(r.try_command(&["PING"], Duration::from_millis(500)), Ok(ref s) if s.starts_with("+PONG")) {
                return r;
            }
            if Instant::now() >= deadline {
                panic!("redis-server not answering PING on {} after 10 s\n--- log ---\n{}", r.addr(), read_lossy(&r.log_path));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command as a RESP array on a fresh connection and returns the raw reply
    /// text (e.g. "+OK\r\n", "$5\r\nhello\r\n", ":3\r\n"). Panics on I/O error / timeout (2 s).
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("redis {args:?} on {} failed: {e}", self.addr()))
    }

    pub fn try_command(&self, args: &[&str], timeout: Duration) -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&self.addr(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(&resp_encode(args))?;
        read_resp_reply(&mut s, timeout)
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL.
    pub fn stop(&mut self) -> ExitStatus {
        terminate_child(&mut self.child, Duration::from_secs(5))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// RESP array of bulk strings.
pub fn resp_encode<S: AsRef<OsStr>>(args: &[S]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let b = a.as_ref().as_bytes();
        out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads from `s` until one complete RESP reply is buffered; returns it as text.
pub fn read_resp_reply(s: &mut impl Read, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(n) = resp_complete(&buf) {
            buf.truncate(n);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("incomplete RESP reply: {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF in RESP reply: {:?}", String::from_utf8_lossy(&buf)),
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// If `buf` starts with a complete RESP value, returns its length in bytes.
pub fn resp_complete(buf: &[u8]) -> Option<usize> {
    let line_end = find_subslice(buf, b"\r\n")?;
    let header = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match *buf.first()? {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(after),
        b'$' | b'!' | b'=' => {
            let n: i64 = header.trim().parse().ok()?;
            if n < 0 {
                return Some(after); // null bulk string
            }
            let end = after + n as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' | b'~' | b'>' | b'%' => {
            let mut n: i64 = header.trim().parse().ok()?;
            if n < 0 {
                return Some(after); // null array
            }
            if buf[0] == b'%' {
                n *= 2; // map: key + value
            }
            let mut pos = after;
            for _ in 0..n {
                pos += resp_complete(&buf[pos..])?;
            }
            Some(pos)
        }
        _ => Some(after), // unknown type: treat as a single line
    }
}

// ---------------------------------------------------------------------------------------
// Self-tests of the pure helpers (run in every test binary that includes `mod common;`,
// cheap and dependency-free).
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod harness_selftest {
    use super::*;

    #[test]
    fn harness_metric_parsing() {
        let body = "# HELP x y\n# TYPE warmpool_handouts_total counter\n\
                    warmpool_handouts_total{kind=\"warm\",dest=\"127.0.0.1:80\"} 3\n\
                    warmpool_handouts_total{kind=\"warm\",dest=\"a b\"} 2 1700000000\n\
                    warmpool_handouts_total{kind=\"reuse\"} 7\n\
                    warmpool_handouts_total_extra 100\n\
                    warmpool_up 1\n";
        let sum = |p: &str| metric_samples(body, p).iter().map(|s| s.1).sum::<f64>();
        assert_eq!(sum("warmpool_handouts_total{kind=\"warm\""), 5.0);
        assert_eq!(sum("warmpool_handouts_total"), 12.0);
        assert_eq!(sum("warmpool_up"), 1.0);
        assert_eq!(sum("warmpool_missing"), 0.0);
    }

    #[test]
    fn harness_resp_framing() {
        assert_eq!(resp_complete(b"+PONG\r\n"), Some(7));
        assert_eq!(resp_complete(b"+PON"), None);
        assert_eq!(resp_complete(b"$5\r\nhel"), None);
        assert_eq!(resp_complete(b"$5\r\nhello\r\n"), Some(11));
        assert_eq!(resp_complete(b"$-1\r\n"), Some(5));
        assert_eq!(resp_complete(b"*2\r\n$1\r\na\r\n:1\r\n"), Some(15));
        assert_eq!(resp_complete(b"*2\r\n$1\r\na\r\n"), None);
        assert_eq!(resp_encode(&["GET", "k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
    }
}

/// A child cgroup (v2) of the test process's own cgroup, removed on drop once its processes
/// have exited.
#[derive(Debug)]
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new(name: &str) -> Self {
        let root = tenancy::cgroup::cgroup2_mount().expect("cgroup2 mounted");
        let own = tenancy::cgroup::cgroup_of(std::process::id() as i32).expect("our cgroup");
        let path = root.join(own.trim_start_matches('/')).join(format!("warmpool-test-{}-{name}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self(path)
    }

    /// `sh -c 'echo $$ > cgroup.procs && exec PROG ARGS'`: PROG runs inside this cgroup.
    pub fn command(&self, prog: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("/bin/sh");
        let mut script = format!("echo $$ > {}/cgroup.procs && exec \"$0\"", self.0.display());
        for i in 0..args.len() {
            script.push_str(&format!(" \"${{{}}}\"", i + 1));
        }
        c.arg("-c").arg(script).arg(prog).args(args);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = wait_until(Duration::from_secs(2), || fs::remove_dir(&self.0).is_ok());
    }
}

impl Nginx {
    /// Stop nginx (by PID) and start it again on the same port with the same
    /// configuration: every connection it had is closed by the server.
    pub fn restart(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(5));
        let (out, err) = log_stdio(&self.dir.join("nginx.out"));
        self.child = Command::new(tool_path("nginx"))
            .arg("-e")
            .arg(&self.error_log)
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(self.dir.path())
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("respawn nginx");
        self.wait_ready();
    }
}

// ---------------------------------------------------------------------------------------
// Other uids
// ---------------------------------------------------------------------------------------

/// The system Python (the one other uids can run, whatever PATH says).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A file in `tests/clients/`.
pub fn client_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

/// Copies of what other uids must read, in a world-readable temporary directory: the
/// checkout itself may live under a directory only root can enter (e.g. /root).
pub struct Staged {
    dir: TempDir,
}

impl Staged {
    pub fn new() -> Self {
        let dir = TempDir::new();
        for (from, to) in [
            (preload_path(), "libwarmpool_preload.so"),
            (client_script("http_get.py"), "http_get.py"),
            (pool_manager_bin(), "pool-manager"),
        ] {
            fs::copy(&from, dir.join(to)).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
        Self { dir }
    }
    pub fn preload(&self) -> PathBuf {
        self.dir.join("libwarmpool_preload.so")
    }
    pub fn script(&self) -> PathBuf {
        self.dir.join("http_get.py")
    }
    pub fn bin(&self) -> PathBuf {
        self.dir.join("pool-manager")
    }
}
