//! The deployment files (deploy/): what can be checked without an init system or a cluster.
//! The systemd unit passes `systemd-analyze verify` with the binary where it says, and its
//! command line starts a daemon that gets ready and stops cleanly; the DaemonSet's pieces
//! agree with each other and with the binary (probe port, socket and library paths between
//! the pool manager and a function pod), and its container arguments with its ConfigMap's
//! configuration start a daemon. Root: private mount namespaces (the host's /usr/local/bin
//! and /etc/hosts are never touched).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn deploy(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name)
}

/// Start `args` (a `pool-manager` command line) with `setup` run first in a private mount
/// namespace; wait for `/ready` on `metrics`; SIGTERM; the daemon must exit 0 and remove
/// `socket`. Returns its log.
fn serve_and_stop(setup: &str, args: &[String], metrics: std::net::SocketAddr, socket: &Path, log: &Path) -> String {
    let mut script = String::from(setup);
    script.push_str(" exec \"$0\" \"$@\"");
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .arg(pool_manager_bin())
        .args(args)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("unshare");
    let ready = wait_until(Duration::from_secs(10), || matches!(http_get(metrics, "/ready", Duration::from_millis(300)), Ok((200, _))));
    let text = || std::fs::read_to_string(log).unwrap_or_default();
    if !ready {
        let _ = terminate_child(&mut child, Duration::from_secs(2));
        panic!("never ready; log:\n{}", text());
    }
    assert!(socket.exists(), "no socket at {}", socket.display());
    let status = terminate_child(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status}; log:\n{}", text());
    assert!(!socket.exists(), "socket file left behind");
    text()
}

/// `args` with the value after each flag in `with` replaced.
fn substitute(args: &[String], with: &[(&str, String)]) -> Vec<String> {
    let mut out = args.to_vec();
    for (flag, value) in with {
        let i = out.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} not in {args:?}"));
        out[i + 1] = value.clone();
    }
    out
}

#[test]
fn the_systemd_unit_verifies_and_its_command_line_serves() {
    if !require_root("systemd unit") || !require_tool("systemd-analyze") || !require_tool("unshare") {
        return;
    }
    let unit = deploy("warmpool.service");
    let text = std::fs::read_to_string(&unit).expect("unit");
    let exec: Vec<String> =
        text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart").split_whitespace().map(str::to_owned).collect();
    let (path, args) = exec.split_first().expect("a command");
    assert_eq!(path, "/usr/local/bin/pool-manager");
    // The binary where the unit says, on a tmpfs in a private mount namespace.
    let script = format!(
        "mount -t tmpfs tmpfs /usr/local/bin && cp {} {path} && systemd-analyze verify {}",
        pool_manager_bin().display(),
        unit.display()
    );
    let o = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().expect("unshare");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify: {}\n{err}", o.status);
    // The same file with a key systemd does not know is caught (the check can fail).
    let bad = TempDir::new();
    let bad_unit = bad.join("warmpool.service");
    std::fs::write(&bad_unit, text.replace("RestartSec=", "RestartSecs=")).unwrap();
    let script = script.replace(&unit.display().to_string(), &bad_unit.display().to_string());
    let o = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().expect("unshare");
    assert!(String::from_utf8_lossy(&o.stderr).contains("RestartSecs"), "a bad key went unnoticed");

    // Its command line, with the embedded default configuration as the file it names.
    let dir = TempDir::new();
    let config = dir.join("pool.toml");
    let o = Command::new(pool_manager_bin()).arg("config").output().expect("pool-manager config");
    std::fs::write(&config, &o.stdout).unwrap();
    let socket = dir.join("pool.sock");
    let metrics = localhost(free_port());
    let args = substitute(
        args,
        &[("--config", config.display().to_string()), ("--socket", socket.display().to_string()), ("--metrics", metrics.to_string())],
    );
    let log = serve_and_stop("", &args, metrics, &socket, &dir.join("log"));
    // --log-format json: every line a JSON object.
    assert!(log.lines().count() >= 2 && log.lines().all(|l| l.starts_with('{') && l.ends_with('}')), "{log}");
}

#[test]
fn the_daemonset_agrees_with_itself_and_the_binary() {
    if !require_root("daemonset") || !require_tool("unshare") || !require_tool(SYSTEM_PYTHON) {
        return;
    }
    let dir = TempDir::new();
    let toml = dir.join("pool.toml");
    let o = Command::new(SYSTEM_PYTHON)
        .arg(client_script("deploy_facts.py"))
        .arg(deploy("daemonset.yaml"))
        .arg(&toml)
        .output()
        .expect("python3");
    assert!(o.status.success(), "deploy_facts.py (needs python3-yaml): {}", String::from_utf8_lossy(&o.stderr));
    let facts = String::from_utf8_lossy(&o.stdout).into_owned();
    let all = |key: &str| -> Vec<Vec<String>> {
        facts
            .lines()
            .filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
            .map(|r| r.split(' ').map(str::to_owned).collect())
            .collect()
    };
    let one = |key: &str| -> Vec<String> { all(key).into_iter().next().unwrap_or_else(|| panic!("no {key} in {facts}")) };
    let args: Vec<String> = all("arg").into_iter().map(|v| v.join(" ")).collect();
    let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone()).unwrap_or_else(|| panic!("{flag} in {args:?}"));

    // The readiness probe asks the metrics endpoint the daemon serves.
    let probe = one("probe");
    assert_eq!(probe[0], "/ready");
    let metrics_addr: std::net::SocketAddr = after("--metrics").parse().expect("--metrics ADDR:PORT");
    assert_eq!(metrics_addr.port().to_string(), probe[1], "probe port vs --metrics");
    // /metrics stays on the node (hostNetwork: 0.0.0.0 would publish it on every node
    // address), and the probe asks where it listens (without a host, the pod's IP).
    assert!(metrics_addr.ip().is_loopback(), "--metrics {metrics_addr} is not loopback");
    assert_eq!(probe[2], metrics_addr.ip().to_string(), "probe host vs --metrics");
    // The function pod finds the socket and the library where the pool manager puts them.
    let env = |name: &str| all("fn_env").into_iter().find(|v| v[0] == name).map(|v| v[1].clone()).unwrap_or_else(|| panic!("{name}"));
    let host_of = |container_path: &str| -> String {
        let dir = Path::new(container_path).parent().expect("a directory").to_str().unwrap().to_owned();
        all("fn_mount").into_iter().find(|m| m[0] == dir).map(|m| m[1].clone()).unwrap_or_else(|| panic!("no mount for {dir}"))
    };
    let socket = after("--socket");
    assert_eq!(Path::new(&socket).parent(), Some(Path::new("/run/warmpool")), "the socket is in the mounted run directory");
    assert_eq!(host_of(&env("WARMPOOL_SOCKET")), one("run")[0], "socket directory on the host");
    assert_eq!(Path::new(&env("WARMPOOL_SOCKET")).file_name(), Path::new(&socket).file_name());
    let publish = one("publish");
    assert_eq!(host_of(&env("LD_PRELOAD")), publish[1], "library directory on the host");
    assert_eq!(Path::new(&env("LD_PRELOAD")).file_name(), Path::new(&publish[0]).file_name());
    assert_eq!(Path::new(&publish[0]).file_name().and_then(|f| f.to_str()), Some("libwarmpool_preload.so"));

    // The container's arguments and the ConfigMap's configuration start a daemon. The
    // configuration names a cluster service: it resolves through an /etc/hosts of our own.
    let hosts = dir.join("hosts");
    let cm = std::fs::read_to_string(&toml).unwrap();
    let names: Vec<String> = cm
        .lines()
        .filter_map(|l| l.trim().strip_prefix("destination = \""))
        .filter_map(|d| d.trim_end_matches('"').rsplit_once(':').map(|(h, _)| h.to_owned()))
        .collect();
    assert!(!names.is_empty(), "{cm}");
    std::fs::write(&hosts, format!("127.0.0.1 localhost {}\n", names.join(" "))).unwrap();
    let sock = dir.join("pool.sock");
    let metrics = localhost(free_port());
    let args = substitute(
        &args[..],
        &[("--config", toml.display().to_string()), ("--socket", sock.display().to_string()), ("--metrics", metrics.to_string())],
    );
    assert_eq!(args[0], "serve");
    // That file is the only name service there: no DNS query leaves the machine.
    let nss = dir.join("nsswitch.conf");
    std::fs::write(&nss, "hosts: files\n").unwrap();
    let setup = format!("mount --bind {} /etc/hosts && mount --bind {} /etc/nsswitch.conf &&", hosts.display(), nss.display());
    let log = serve_and_stop(&setup, &args, metrics, &sock, &dir.join("log"));
    assert!(log.contains("pool manager listening"), "{log}");
}
