//! The eBPF kernel assist with the real kernel (root; must run in CI): learned congestion
//! windows start new connections converged, and nothing stays attached after the daemon.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

fn cwnd(cmd: &mut Command) -> u32 {
    let o = cmd.output().expect("run cwnd.py");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().parse().expect("a number")
}

#[test]
fn a_learned_window_starts_new_connections_converged_and_nothing_stays_attached() {
    if !assist_available("a_learned_window_starts_new_connections_converged", &["python3", "bpftool"]) {
        return;
    }
    let port = free_port();
    let mut sink = Command::new(tool_path("python3"))
        .args([script("sink.py").to_str().unwrap(), &port.to_string()])
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sink");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(sink.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let cg = Cgroup::new("assist");
    let mut d =
        Daemon::with_config(&format!("[kernel]\nassist = \"on\"\ncgroups = [\"{}\"]\nmax_initial_window = 1000\n", cg.0.display()));
    assert_eq!(d.metric("warmpool_kernel_assist"), 1.0, "{}", d.log());
    let show = || {
        let o = Command::new(tool_path("bpftool")).args(["cgroup", "show"]).arg(&cg.0).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(show().contains("warmpool_sockop"), "attached: {}", show());

    let py = tool_path("python3");
    let cw = script("cwnd.py");
    let p = port.to_string();
    let args = |mode: &'static str| [cw.to_str().unwrap().to_owned(), p.clone(), mode.to_owned()];
    let run_in_cg = |mode: &'static str| {
        let a = args(mode);
        cwnd(&mut cg.command(&py, &[&a[0], &a[1], &a[2]]))
    };
    // Before anything was learned, a new connection starts at the kernel's IW10.
    assert_eq!(run_in_cg("new"), 10);
    // One bulk transfer; the window it converged to is learned when it closes.
    run_in_cg("bulk");
    let dest = format!("warmpool_learned_cwnd{{dest=\"127.0.0.1:{port}\"");
    assert!(wait_until(Duration::from_secs(3), || d.metric(&dest) > 10.0), "nothing learned:\n{}", d.metrics());
    let learned = d.metric(&dest) as u32;
    // A new connection in the cgroup starts at the learned window, before sending anything.
    assert_eq!(run_in_cg("new"), learned, "learned {learned}");
    // Outside the attached cgroup nothing changes.
    let a = args("new");
    assert_eq!(cwnd(Command::new(&py).args(&a)), 10);
    assert!(d.status().contains("LEARNED"), "{}", d.status());

    // Stopped: detached, and new connections start at IW10 again.
    assert!(d.stop().success());
    assert!(!show().contains("warmpool"), "still attached after stop: {}", show());
    assert_eq!(run_in_cg("new"), 10);
    let _ = sink.kill();
    let _ = sink.wait();
}

#[test]
fn kernel_assist_on_refuses_to_start_where_it_cannot_attach_and_auto_runs_without() {
    if !assist_available("kernel_assist_on_refuses_to_start", &["python3", "bpftool"]) {
        return;
    }
    let dir = TempDir::new();
    let cfg = dir.join("pool.toml");
    std::fs::write(&cfg, "[kernel]\nassist = \"on\"\ncgroups = [\"/nonexistent/cgroup\"]\n").unwrap();
    let sock = dir.join("p.sock");
    let o = Command::new(pool_manager_bin())
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--config")
        .arg(&cfg)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/cgroup"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!sock.exists(), "no socket file left behind");
    std::fs::write(&cfg, "[kernel]\nassist = \"auto\"\ncgroups = [\"/nonexistent/cgroup\"]\n").unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(d.metric("warmpool_kernel_assist"), 0.0);
    assert!(d.log().contains("kernel assist unavailable"), "{}", d.log());
}

#[test]
fn demand_from_programs_without_the_shim_prewarms_a_pool_that_later_connects_use() {
    if !assist_available("demand_prewarms_a_pool", &["python3", "bpftool"]) || !require_tool("nginx") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let cg = Cgroup::new("demand");
    // No pools and no [auto] section: nothing would be pooled but for the demand.
    let d = Daemon::with_config(&format!("[kernel]\nassist = \"on\"\ncgroups = [\"{}\"]\nprewarm_threshold = 2\n", cg.0.display()));
    let curl = tool_path("curl");
    let url = nginx.url("/demand");
    for i in 0..3 {
        let o = cg.command(&curl, &["-sS", "--max-time", "5", "-o", "/dev/null", &url]).env_remove("LD_PRELOAD").output().unwrap();
        assert!(o.status.success(), "plain curl #{i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let idle = format!("warmpool_pool_sockets{{dest=\"{dest}\",uid=\"0\"");
    assert!(
        wait_until(Duration::from_secs(5), || {
            metric_samples(&d.metrics(), &idle).iter().any(|(l, v)| l.contains("state=\"idle\"") && *v >= 1.0)
        }),
        "no prewarmed pool:\n{}",
        d.metrics()
    );
    assert!(d.metric("warmpool_prewarmed_pools_total") >= 1.0);
    assert!(d.metric(&format!("warmpool_demand_connects{{dest=\"{dest}\"")) >= 3.0, "{}", d.metrics());
    // A function with the shim in that cgroup is served warm on its very first connect.
    let mut c = cg.command(&curl, &["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", &nginx.url("/served")]);
    shim_env(&mut c, &d);
    let o = c.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"warm\""), 1.0, "{}", d.metrics());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\""), 0.0);
}
