//! Peer links between functions on two hosts, each behind its own NAT (network namespaces,
//! nftables masquerade, unsolicited inbound SYNs dropped silently), coordinated by
//! `pool-manager rendezvous` on the "internet" segment. The functions are unmodified Python
//! programs under the preload library: they `connect()` to the peer's virtual address, or
//! call `warmpool_connect_peer()`.
//!
//! Root only (netns, nftables); with `CI=true` these tests run, never skip.

mod common;

use common::nat::{Mapping, NatTopology};
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const RDV_PORT: u16 = 7700;
const RDV_METRICS_PORT: u16 = 7701;
const DAEMON_METRICS: &str = "127.0.0.1:9464";
const CHANNEL: u16 = 7000;

fn preconditions(test: &str) -> bool {
    require_root(test) && require_tool("ip") && require_tool("nft") && require_tool("python3") && require_tool("curl")
}

/// A process in a namespace, stopped by PID when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn stop(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(3));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(3));
    }
}

/// One job: a rendezvous server, `job/a` on host 1 and `job/b` on host 2.
struct Job {
    topo: NatTopology,
    dir: TempDir,
    rdv: Option<Proc>,
    daemons: Vec<Proc>,
}

fn peer_config(dir: &TempDir, topo: &NatTopology, name: &str, secret: &Path, extra: &str) -> String {
    format!(
        "socket = \"{sock}\"\n\
         [peer]\n\
         name = \"job/{name}\"\n\
         rendezvous = \"{rdv}:{RDV_PORT}\"\n\
         secret_file = \"{secret}\"\n\
         peers = [\"job/a\", \"job/b\"]\n{extra}\n",
        sock = dir.join(format!("{name}.sock")).display(),
        rdv = topo.rendezvous_addr(),
        secret = secret.display(),
    )
}

impl Job {
    /// Build the topology and start everything. `extra[i]` is appended to the `[peer]`
    /// table of host i+1's daemon; `secrets[i]` is its job secret.
    fn start(m1: Mapping, m2: Mapping, extra: [&str; 2], secrets: [&str; 2]) -> Job {
        let topo = NatTopology::new(m1, m2);
        let dir = TempDir::new();
        let mut job = Job { topo, dir, rdv: None, daemons: vec![] };
        std::fs::write(job.dir.join("rdv.secret"), "the-job-secret-0123456789\n").unwrap();
        job.start_rendezvous();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let secret = job.dir.join(format!("{name}.secret"));
            std::fs::write(&secret, secrets[i]).unwrap();
            let cfg = job.dir.join(format!("{name}.toml"));
            std::fs::write(&cfg, peer_config(&job.dir, &job.topo, name, &secret, extra[i])).unwrap();
            let log = job.dir.join(format!("{name}.log"));
            let mut cmd = job.topo.command(job.topo.host_ns(i + 1), pool_manager_bin());
            cmd.args(["serve", "--config"]).arg(&cfg).args(["--metrics", DAEMON_METRICS]).env("RUST_LOG", "info");
            job.daemons.push(spawn(cmd, log));
            let sock = job.socket(i + 1);
            assert!(wait_until(Duration::from_secs(10), || sock.exists()), "daemon {name} did not start:\n{}", job.daemons[i].log());
        }
        job
    }

    fn start_rendezvous(&mut self) {
        let mut cmd = self.topo.command(self.topo.internet_ns(), pool_manager_bin());
        cmd.args(["rendezvous", "--listen", &format!("{}:{RDV_PORT}", self.topo.rendezvous_addr())])
            .arg("--job")
            .arg(format!("job={}", self.dir.join("rdv.secret").display()))
            .args(["--metrics", &format!("{}:{RDV_METRICS_PORT}", self.topo.rendezvous_addr())]);
        let n = std::fs::read_dir(self.dir.path()).map_or(0, Iterator::count);
        self.rdv = Some(spawn(cmd, self.dir.join(format!("rdv-{n}.log"))));
        assert!(
            wait_until(Duration::from_secs(10), || self.rdv_metrics().is_some()),
            "rendezvous did not start:\n{}",
            self.rdv.as_ref().unwrap().log()
        );
    }

    fn socket(&self, host: usize) -> PathBuf {
        self.dir.join(format!("{}.sock", ["a", "b"][host - 1]))
    }

    fn curl(&self, ns: &str, url: &str) -> Option<String> {
        let out = self.topo.command(ns, "curl").args(["-s", "--max-time", "2", url]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn rdv_metrics(&self) -> Option<String> {
        self.curl(self.topo.internet_ns(), &format!("http://{}:{RDV_METRICS_PORT}/metrics", self.topo.rendezvous_addr()))
    }

    fn rdv_metric(&self, name: &str) -> f64 {
        let m = self.rdv_metrics().expect("rendezvous metrics");
        metric_samples(&m, name).first().map_or(f64::NAN, |s| s.1)
    }

    fn daemon_metric(&self, host: usize, name: &str) -> f64 {
        let m = self.curl(self.topo.host_ns(host), &format!("http://{DAEMON_METRICS}/metrics")).expect("daemon metrics");
        metric_samples(&m, name).first().map_or(f64::NAN, |s| s.1)
    }

    fn status(&self, host: usize) -> String {
        let out = std::process::Command::new(pool_manager_bin()).arg("status").arg("--socket").arg(self.socket(host)).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_registered(&self, n: f64) {
        assert!(
            wait_until(Duration::from_secs(10), || self.rdv_metric("warmpool_rendezvous_members") == n),
            "expected {n} members registered; rendezvous log:\n{}\ndaemon logs:\n{}\n{}",
            self.rdv.as_ref().unwrap().log(),
            self.daemons[0].log(),
            self.daemons[1].log()
        );
    }

    /// Start a function on `host`: `role` (send|recv) to `target`.
    fn function(&self, host: usize, role: &str, target: &str, size: u64) -> Child {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/peer_xfer.py");
        let mut cmd = self.topo.command(self.topo.host_ns(host), "python3");
        cmd.arg(script)
            .args([role, target, &size.to_string()])
            .env("LD_PRELOAD", preload_path())
            .env("WARMPOOL_SOCKET", self.socket(host))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().expect("spawn function")
    }

    /// As [`Job::function`], but run under `pool-manager exec` without `LD_PRELOAD` (as a
    /// static binary would be): its connect() to a virtual address is served by the
    /// supervisor's seccomp notifications.
    fn function_under_exec(&self, host: usize, role: &str, target: &str, size: u64) -> Child {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/peer_xfer.py");
        let mut cmd = self.topo.command(self.topo.host_ns(host), pool_manager_bin());
        cmd.arg("exec").arg("--socket").arg(self.socket(host)).args(["--", "python3"]).arg(script).args([role, target, &size.to_string()]);
        cmd.env_remove("LD_PRELOAD").stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("spawn function under exec")
    }

    fn virtual_addr(&self, peer: &str) -> String {
        let out = std::process::Command::new(pool_manager_bin()).args(["peer-addr", peer]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn logs(&self) -> String {
        format!(
            "--- rendezvous\n{}\n--- a\n{}\n--- b\n{}\n--- topology\n{}",
            self.rdv.as_ref().map(Proc::log).unwrap_or_default(),
            self.daemons[0].log(),
            self.daemons[1].log(),
            self.topo.diagnostics()
        )
    }
}

fn spawn(mut cmd: std::process::Command, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    Proc { child: cmd.spawn().expect("spawn"), log }
}

/// Wait for a function (bounded) and parse its `key=value` line.
fn finish(mut child: Child, timeout: Duration) -> Result<HashMap<String, String>, String> {
    // Still running after the wait: killed, and an error.
    wait_until(timeout, || !matches!(child.try_wait(), Ok(None)));
    if child.try_wait().map_err(|e| e.to_string())?.is_none() {
        terminate_child(&mut child, Duration::from_secs(1));
        return Err("function timed out".into());
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("function failed ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let line = stdout.lines().last().unwrap_or_default();
    Ok(line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

/// `job/a` on host 1 sends `size` bytes to `job/b` on host 2 over one link; both check the
/// digest. `by_name`: host 2 asks with `warmpool_connect_peer` instead of a virtual address.
fn exchange(job: &Job, size: u64, by_name: bool) -> (HashMap<String, String>, HashMap<String, String>) {
    let to_b = format!("{}:{CHANNEL}", job.virtual_addr("job/b"));
    let to_a = if by_name { format!("name:job/a:{CHANNEL}") } else { format!("{}:{CHANNEL}", job.virtual_addr("job/a")) };
    let recv = job.function(2, "recv", &to_a, 0);
    let send = job.function(1, "send", &to_b, size);
    let s = finish(send, Duration::from_secs(90)).unwrap_or_else(|e| panic!("sender: {e}\n{}", job.logs()));
    let r = finish(recv, Duration::from_secs(30)).unwrap_or_else(|e| panic!("receiver: {e}\n{}", job.logs()));
    assert_eq!(s["bytes"], size.to_string());
    assert_eq!(r["bytes"], size.to_string(), "receiver got everything");
    assert_eq!(s["sha256"], r["sha256"], "data integrity");
    assert_eq!(s["peer_digest"], r["sha256"], "the sender got the receiver's digest back");
    (s, r)
}

const SECRET: &str = "the-job-secret-0123456789\n";

#[test]
fn direct_link_through_two_nats_carries_100_mb_intact() {
    if !preconditions("direct_link_through_two_nats_carries_100_mb_intact") {
        return;
    }
    let job = Job::start(Mapping::Independent, Mapping::Independent, ["", ""], [SECRET, SECRET]);
    job.wait_registered(2.0);
    let size = 100 * 1024 * 1024;
    let (s, r) = exchange(&job, size, false);
    eprintln!("direct: sender connect {} ms, receiver connect {} ms, transfer {} ms", s["connect_ms"], r["connect_ms"], s["total_ms"]);
    assert_eq!(job.daemon_metric(1, "warmpool_peer_links_total{path=\"direct\"}"), 1.0, "{}", job.logs());
    assert_eq!(job.daemon_metric(2, "warmpool_peer_links_total{path=\"direct\"}"), 1.0);
    assert_eq!(job.daemon_metric(1, "warmpool_peer_links_total{path=\"relayed\"}"), 0.0);
    assert_eq!(job.rdv_metric("warmpool_rendezvous_links_direct_total"), 1.0);
    assert_eq!(job.rdv_metric("warmpool_rendezvous_relay_bytes_total"), 0.0, "a direct link carries nothing through the rendezvous");
    assert!(job.daemon_metric(1, "warmpool_peer_punch_attempts_total") >= 1.0);
}

#[test]
fn endpoint_dependent_nat_falls_back_to_the_relay() {
    if !preconditions("endpoint_dependent_nat_falls_back_to_the_relay") {
        return;
    }
    let job = Job::start(Mapping::Independent, Mapping::Dependent, ["", ""], [SECRET, SECRET]);
    job.wait_registered(2.0);
    let size = 100 * 1024 * 1024;
    // The receiver asks by name this time: the C ABI and the virtual address meet.
    let (s, r) = exchange(&job, size, true);
    eprintln!("relayed: sender connect {} ms, receiver connect {} ms, transfer {} ms", s["connect_ms"], r["connect_ms"], s["total_ms"]);
    assert_eq!(job.daemon_metric(1, "warmpool_peer_links_total{path=\"relayed\"}"), 1.0, "{}", job.logs());
    assert_eq!(job.daemon_metric(2, "warmpool_peer_links_total{path=\"relayed\"}"), 1.0);
    assert_eq!(job.daemon_metric(1, "warmpool_peer_links_total{path=\"direct\"}"), 0.0);
    assert_eq!(job.rdv_metric("warmpool_rendezvous_links_relayed_total"), 1.0);
    let relayed = job.rdv_metric("warmpool_rendezvous_relay_bytes_total");
    assert!(relayed >= size as f64, "the relay carried the data: {relayed} bytes");
}

#[test]
fn wrong_secret_gets_nothing() {
    if !preconditions("wrong_secret_gets_nothing") {
        return;
    }
    let job = Job::start(Mapping::Independent, Mapping::Independent, ["", ""], [SECRET, "not-the-job-secret-987654321\n"]);
    job.wait_registered(1.0);
    assert!(wait_until(Duration::from_secs(5), || job.rdv_metric("warmpool_rendezvous_auth_failures_total") >= 1.0));
    assert!(job.daemons[1].log().contains("authentication failed"), "{}", job.daemons[1].log());
    // Neither side gets a link: b is not registered, and b itself has no rendezvous.
    let to_b = format!("{}:{CHANNEL}", job.virtual_addr("job/b"));
    let started = Instant::now();
    let a = finish(job.function(1, "send", &to_b, 1000), Duration::from_secs(20));
    let b = finish(job.function(2, "recv", &format!("name:job/a:{CHANNEL}"), 0), Duration::from_secs(20));
    let a = a.expect_err("a must not reach a peer that failed authentication");
    let b = b.expect_err("b must get no link with the wrong secret");
    assert!(a.contains("Connection refused"), "{a}");
    assert!(b.contains("Connection refused"), "{b}");
    assert!(started.elapsed() < Duration::from_secs(15), "refusals are prompt");
    assert_eq!(job.rdv_metric("warmpool_rendezvous_links_started_total"), 0.0);
    assert_eq!(job.rdv_metric("warmpool_rendezvous_relay_bytes_total"), 0.0);
    for d in &job.daemons {
        assert!(!d.log().contains(SECRET.trim()), "the secret never appears in logs");
    }
}

/// A program under `pool-manager exec` (no preload library) that connects to a peer's
/// virtual address gets the link, as under the library; and a refused link fails its
/// connect() with ECONNREFUSED at once (it never goes out to the virtual address).
#[test]
fn a_program_under_exec_gets_a_peer_link_by_virtual_address() {
    if !(preconditions("a_program_under_exec_gets_a_peer_link_by_virtual_address") && require_tool("setpriv")) {
        return;
    }
    let job = Job::start(Mapping::Independent, Mapping::Independent, ["", ""], [SECRET, SECRET]);
    job.wait_registered(2.0);
    let size = 1024 * 1024;
    let recv = job.function(2, "recv", &format!("{}:{CHANNEL}", job.virtual_addr("job/a")), 0);
    let send = job.function_under_exec(1, "send", &format!("{}:{CHANNEL}", job.virtual_addr("job/b")), size);
    let s = finish(send, Duration::from_secs(60)).unwrap_or_else(|e| panic!("sender under exec: {e}\n{}", job.logs()));
    let r = finish(recv, Duration::from_secs(30)).unwrap_or_else(|e| panic!("receiver: {e}\n{}", job.logs()));
    assert_eq!(r["bytes"], size.to_string(), "receiver got everything");
    assert_eq!(s["sha256"], r["sha256"], "data integrity");
    assert_eq!(job.daemon_metric(1, "warmpool_peer_handouts_total"), 1.0, "{}", job.logs());
    // A tenant the job does not admit (uid 65534: it cannot read the secret): refused after
    // Miss(Pending), at once, with ECONNREFUSED (before the fix, the supervisor let the
    // connect go out to the virtual address).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(job.dir.join("a.secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = job.dir.join("peer_xfer.py");
    std::fs::copy(client_script("peer_xfer.py"), &script).unwrap();
    let started = Instant::now();
    let mut cmd = job.topo.command(job.topo.host_ns(1), tool_path("setpriv"));
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]).arg(pool_manager_bin()).arg("exec").arg("--socket").arg(job.socket(1));
    cmd.args(["--", SYSTEM_PYTHON]).arg(&script).args(["send", &format!("{}:{CHANNEL}", job.virtual_addr("job/b")), "1000"]);
    cmd.env_remove("LD_PRELOAD").stdout(Stdio::piped()).stderr(Stdio::piped());
    let e = finish(cmd.spawn().expect("spawn"), Duration::from_secs(20)).expect_err("uid 65534 must get no link of the job");
    assert!(e.contains("Connection refused"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "the refusal is prompt");
    assert_eq!(job.daemon_metric(1, "warmpool_peer_denied_total"), 1.0, "{}", job.logs());
}

/// Ready links on `host`, from its status table.
fn ready_links(job: &Job, host: usize) -> usize {
    job.status(host).lines().filter(|l| l.starts_with("job/")).map(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0)).sum()
}

/// Case 10: a uid that cannot read the job secret (0600, root's) reaches the daemon's
/// socket (0666) and connect()s to a peer's virtual address: it gets no link (its connect()
/// is refused), the prewarmed links stay for the job's own functions, the refusal is
/// counted, and a function of the secret's owner still gets its link.
#[test]
fn peer_links_only_for_admitted_tenants() {
    if !(preconditions("peer_links_only_for_admitted_tenants") && require_tool("setpriv")) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let prewarm = format!("prewarm = [\"job/b:{CHANNEL}\"]\nprewarm_links = 2");
    let job = Job::start(Mapping::Independent, Mapping::Independent, [&prewarm, ""], [SECRET, SECRET]);
    for n in ["a", "b", "rdv"] {
        std::fs::set_permissions(job.dir.join(format!("{n}.secret")), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    job.wait_registered(2.0);
    assert!(wait_until(Duration::from_secs(15), || ready_links(&job, 1) == 2), "two links ready on a\n{}\n{}", job.status(1), job.logs());
    // What uid 65534 runs must be readable by it: copies in the job's (0755) directory.
    let (script, preload) = (job.dir.join("peer_xfer.py"), job.dir.join("libwarmpool_preload.so"));
    std::fs::copy(client_script("peer_xfer.py"), &script).unwrap();
    std::fs::copy(preload_path(), &preload).unwrap();
    let nobody = job.topo.command(job.topo.host_ns(1), tool_path("setpriv"));
    let mut cmd = nobody;
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", SYSTEM_PYTHON])
        .arg(&script)
        .args(["send", &format!("{}:{CHANNEL}", job.virtual_addr("job/b")), "1000"])
        .env("LD_PRELOAD", &preload)
        .env("WARMPOOL_SOCKET", job.socket(1))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let denied = finish(cmd.spawn().expect("spawn"), Duration::from_secs(20));
    let e = denied.expect_err("uid 65534 must get no link of the job");
    // Refused after `Miss(Pending)`: the shim fails the connect() at once (a virtual address
    // is nobody's real address, so the program's own connect never runs).
    assert!(e.contains("Connection refused"), "{e}");
    assert_eq!(job.daemon_metric(1, "warmpool_peer_denied_total"), 1.0, "{}", job.logs());
    assert_eq!(job.daemon_metric(1, "warmpool_peer_handouts_total"), 0.0);
    assert_eq!(ready_links(&job, 1), 2, "the prewarmed links are still there for the job");
    // The job's own function (root, the secret's owner) gets its link.
    exchange(&job, 1024 * 1024, false);
    assert_eq!(job.daemon_metric(1, "warmpool_peer_denied_total"), 1.0);
}

#[test]
fn prewarmed_links_survive_a_rendezvous_restart() {
    if !preconditions("prewarmed_links_survive_a_rendezvous_restart") {
        return;
    }
    let prewarm = format!("prewarm = [\"job/b:{CHANNEL}\"]\nprewarm_links = 2");
    let mut job = Job::start(Mapping::Independent, Mapping::Independent, [&prewarm, ""], [SECRET, SECRET]);
    job.wait_registered(2.0);
    let ready = ready_links;
    assert!(
        wait_until(Duration::from_secs(15), || ready(&job, 1) == 2 && ready(&job, 2) == 2),
        "two direct links ready on both sides\n{}\n{}\n{}",
        job.status(1),
        job.status(2),
        job.logs()
    );
    // The rendezvous goes away; links that exist do not need it.
    job.rdv.as_mut().unwrap().stop();
    job.rdv = None;
    let (s, r) = exchange(&job, 4 * 1024 * 1024, false);
    eprintln!("prewarmed link without rendezvous: connect {} ms / {} ms", s["connect_ms"], r["connect_ms"]);
    // A new rendezvous: the managers register again and new links work.
    job.start_rendezvous();
    job.wait_registered(2.0);
    exchange(&job, 1024 * 1024, true);
    assert_eq!(job.rdv_metric("warmpool_rendezvous_relay_bytes_total"), 0.0);
}

/// Success and time to a usable link for each combination of NAT mapping behaviour.
#[test]
fn nat_type_matrix() {
    if !preconditions("nat_type_matrix") {
        return;
    }
    use Mapping::{Dependent, Independent};
    let mut rows = vec![];
    for (m1, m2) in [(Independent, Independent), (Independent, Dependent), (Dependent, Independent), (Dependent, Dependent)] {
        let job = Job::start(m1, m2, ["", ""], [SECRET, SECRET]);
        job.wait_registered(2.0);
        let (s, r) = exchange(&job, 1024 * 1024, false);
        let direct = job.daemon_metric(1, "warmpool_peer_links_total{path=\"direct\"}");
        let relayed = job.daemon_metric(1, "warmpool_peer_links_total{path=\"relayed\"}");
        let path = if direct == 1.0 { "direct" } else if relayed == 1.0 { "relayed" } else { "?" };
        let expected = if m1 == Independent && m2 == Independent { "direct" } else { "relayed" };
        assert_eq!(path, expected, "{m1:?}/{m2:?}\n{}", job.logs());
        let setup = job.daemon_metric(1, "warmpool_peer_link_setup_seconds_sum") * 1e3;
        rows.push(format!("{m1:?}\t{m2:?}\t{path}\t{:.1}\t{}\t{}", setup, s["connect_ms"], r["connect_ms"]));
    }
    eprintln!("NAT 1\tNAT 2\tpath\tsetup_ms\tconnect_ms(a)\tconnect_ms(b)");
    for r in rows {
        eprintln!("{r}");
    }
}
