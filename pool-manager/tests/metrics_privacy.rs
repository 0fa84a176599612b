//! `/metrics` is private by default (case 16): `status` shows a caller only its own uid's
//! pools, and `/metrics`, which anyone who can reach it reads, shows no destination, uid or
//! cgroup of any tenant unless `metrics_tenant_labels = true` says so. Real daemon, real
//! nginx, the scrape made by another uid (setpriv); root only (must run in CI).

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `pool-manager serve --config` with `toml`, its own socket and metrics port; stopped by PID
/// when dropped (with its directory).
struct Served {
    child: Child,
    metrics: std::net::SocketAddr,
    socket: std::path::PathBuf,
    _dir: TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(5));
    }
}

/// Started without the test helpers' `--metrics-tenant-labels`: the configuration decides.
fn serve(toml: &str) -> Served {
    let dir = TempDir::new();
    let (config, socket, metrics) = (dir.join("pool.toml"), dir.join("pool.sock"), localhost(free_port()));
    std::fs::write(&config, format!("metrics = \"{metrics}\"\n{toml}")).unwrap();
    let child = Command::new(pool_manager_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let s = Served { child, metrics, socket, _dir: dir };
    assert!(wait_until(Duration::from_secs(10), || matches!(http_get(metrics, "/ready", Duration::from_millis(300)), Ok((200, _)))));
    s
}

/// Root's pool for `dest`, filled; returns when one socket of it is idle.
fn prewarm_as_root(s: &Served, dest: &str) {
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&s.socket).arg(dest).env_remove("LD_PRELOAD").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let idle = || http_get(s.metrics, "/metrics", Duration::from_secs(1)).map(|(_, b)| b).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), || metric_samples(&idle(), "warmpool_pool_sockets{").iter().any(|(l, v)| l.contains("idle") && *v >= 1.0)),
        "{}",
        idle()
    );
}

/// What uid 65534 gets from `/metrics`.
fn scrape_as_nobody(s: &Served) -> String {
    let o = Command::new(tool_path("setpriv"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(tool_path("curl"))
        .args(["-s", "--max-time", "5", &format!("http://{}/metrics", s.metrics)])
        .output()
        .expect("curl");
    assert!(o.status.success(), "curl as uid 65534: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn metrics_show_no_tenant_data_unless_configured() {
    if !require_root("metrics_show_no_tenant_data_unless_configured") || !require_tool("nginx") || !require_tool("setpriv") || !require_tool("curl") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();

    // The embedded default's [auto] pools, as in case 16: root's pool for nginx.
    let private = serve("[auto]\nenabled = true\n");
    prewarm_as_root(&private, &dest);
    let body = scrape_as_nobody(&private);
    for secret in [dest.as_str(), "dest=\"", "uid=\"", "cgroup=\""] {
        assert!(!body.contains(secret), "/metrics shows {secret:?} to uid 65534:\n{body}");
    }
    // The sums are there: one warm pool, its idle socket.
    assert_eq!(metric_samples(&body, "warmpool_pools{policy=\"warm\"}").first().map(|s| s.1), Some(1.0), "{body}");
    let idle = metric_samples(&body, "warmpool_pool_sockets{state=\"idle\"}");
    assert!(idle.first().is_some_and(|s| s.1 >= 1.0), "{body}");

    // Opt-in: the operator asks for per-pool series.
    let labelled = serve("metrics_tenant_labels = true\n[auto]\nenabled = true\n");
    prewarm_as_root(&labelled, &dest);
    let body = scrape_as_nobody(&labelled);
    let per_pool = format!("warmpool_pool_sockets{{dest=\"{dest}\",uid=\"0\",cgroup=\"");
    assert!(body.contains(&per_pool), "{body}");
}
