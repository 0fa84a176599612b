//! Short runs of each experiment on the local topology (root: network namespaces and TUN;
//! must run in CI), checking the files a user recomputes figures from.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{test} must run as root in CI");
    eprintln!("SKIP {test}: needs root (network namespaces, TUN devices)");
    false
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("warmpool-exp-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_experiments")).args(args).output().expect("run experiments");
    assert!(
        o.status.success(),
        "experiments {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn csv(path: &Path) -> (String, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().expect("header row").to_owned();
    (header, lines.map(|l| l.split(',').map(str::to_owned).collect()).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every configuration of `experiments reuse`, in its default order.
const REUSE_CONFIGS: [&str; 14] = [
    "baseline",
    "dummy-shim",
    "warm",
    "reuse",
    "prefetch",
    "reuse-lazy",
    "empty-preload",
    "nginx-keepalive",
    "haproxy",
    "true-baseline",
    "true-empty-preload",
    "true-shim",
    "true-shim-prefetch",
    "true-shim-lazy",
];

/// The numbers in the summary's table row that starts with `| name |`.
fn table_row(summary: &str, name: &str) -> Vec<String> {
    let row = summary.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_else(|| panic!("no row {name} in\n{summary}"));
    row.split('|').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).skip(1).collect()
}

#[test]
fn reuse_short_run_writes_csv_plot_and_summary_and_uses_the_pool() {
    if !root_or_skip("reuse_short_run") {
        return;
    }
    let out = out_dir("reuse");
    run(&["reuse", "--runs", "6", "--out", out.to_str().unwrap()]);
    let (header, rows) = csv(&out.join("reuse.csv"));
    assert_eq!(header, "config,run,latency_us,connect_us,function_us");
    assert_eq!(rows.len(), 6 * REUSE_CONFIGS.len(), "6 runs x every configuration");
    for c in REUSE_CONFIGS {
        assert_eq!(rows.iter().filter(|r| r[0] == c).count(), 6, "{c}");
    }
    for r in &rows {
        let function: f64 = r[4].parse().unwrap();
        if r[0].starts_with("true-") {
            // /bin/true connects nowhere: only the launcher's time.
            assert!(r[2].is_empty() && r[3].is_empty() && function > 0.0, "{r:?}");
        } else {
            // The whole process contains its connect → close, which contains its connect().
            let (latency, connect): (f64, f64) = (r[2].parse().unwrap(), r[3].parse().unwrap());
            assert!(function > latency && latency > connect && connect > 0.0, "{r:?}");
        }
    }
    let polylines = |f: &str| std::fs::read_to_string(out.join(f)).unwrap().matches("<polyline").count();
    assert_eq!(polylines("reuse_cdf.svg"), 9, "connect → close: the configurations that connect");
    assert_eq!(polylines("reuse_function_cdf.svg"), 14, "whole function: every configuration");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| reuse |") && summary.contains("RTT 200µs"), "{summary}");
    // Both metrics per connecting configuration, /bin/true's against the empty preload library.
    assert_eq!(table_row(&summary, "prefetch").len(), 10, "{summary}");
    assert_eq!(table_row(&summary, "true-empty-preload")[3], "1.00x", "{summary}");
    // The targets say what the best preload could do in this run: the empty library with a free
    // connect(), i.e. below the empty library's own connect → close.
    let best = summary.lines().find(|l| l.starts_with("| connect→close, reuse / baseline")).expect("target row");
    let cells: Vec<&str> = best.split('|').map(str::trim).collect();
    let floor: f64 = cells[3].trim_end_matches('x').parse().unwrap_or_else(|_| panic!("{best}"));
    let empty: f64 = table_row(&summary, "empty-preload")[3].trim_end_matches('x').parse().expect("empty-preload ratio");
    assert!(floor > 0.0 && floor < empty, "{best}");
    // And the per-phase account, from the same medians: every phase has a number.
    let phases = summary.split("## Where the whole function's time goes").nth(1).expect("phases section");
    let rows: Vec<&str> = phases.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| phase")).take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 14, "{phases}");
    assert!(rows.iter().all(|r| r.trim_end().ends_with(" µs |")), "{phases}");
    // The local proxies kept their upstream connections: the server saw each proxy's 16
    // requests (10 warm-up rounds + 6 runs) on far fewer connections.
    let upstream = summary.split("## What the proxies did upstream").nth(1).expect("proxies section");
    for proxy in ["nginx-keepalive", "haproxy"] {
        let row = table_row(upstream, proxy);
        let (requests, conns): (u64, u64) = (row[0].parse().unwrap(), row[1].parse().unwrap());
        assert!(requests == 16 && (1..=3).contains(&conns), "{proxy}: {requests} requests on {conns} connections");
    }
    // The reuse pool served the reuse runs (status table: REUSE is the 9th column).
    let reuse_block = summary.split("# reuse pool").nth(1).expect("pool status in summary");
    let row = reuse_block.lines().find(|l| l.contains("198.18.0.2")).expect("pool row");
    let reused: u64 = row.split_whitespace().nth(8).unwrap().parse().unwrap();
    assert!(reused >= 6, "{row}");
    // And the prefetch pool's offers served the prefetch runs.
    let prefetch_block = summary.split("# reuse pool with prefetch").nth(1).expect("prefetch pool status in summary");
    let row = prefetch_block.lines().find(|l| l.contains("198.18.0.2")).expect("prefetch pool row");
    let reused: u64 = row.split_whitespace().nth(8).unwrap().parse().unwrap();
    assert!(reused >= 6, "{row}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn fct_short_run_warmed_and_learned_connections_skip_slow_start() {
    if !root_or_skip("fct_short_run") {
        return;
    }
    let out = out_dir("fct");
    run(&["fct", "--reps", "3", "--sizes", "1024,65536", "--rtt", "5ms", "--out", out.to_str().unwrap()]);
    let (header, rows) = csv(&out.join("fct.csv"));
    assert_eq!(header, "config,congestion,size_bytes,rep,fct_us");
    assert_eq!(rows.len(), 3 * 2 * 2 * 3, "configs x congestion x sizes x reps");
    let med = |config: &str, size: &str| {
        median(rows.iter().filter(|r| r[0] == config && r[1] == "off" && r[2] == size).map(|r| r[4].parse().unwrap()).collect())
    };
    // A new connection pays a handshake and slow start (>= 2 RTTs for 64 KB from IW10); a
    // warmed one needs one RTT: the difference is several milliseconds at 5 ms RTT.
    let (new, warm) = (med("new", "65536"), med("warm", "65536"));
    assert!(warm + 5_000.0 < new, "64 KB: new {new} µs, warm {warm} µs");
    // With the kernel assist a new connection still pays the handshake but not slow start.
    let learned = med("learned", "65536");
    assert!(learned + 4_000.0 < new && learned > warm, "64 KB: new {new} µs, learned {learned} µs, warm {warm} µs");
    assert!(out.join("fct.svg").exists() && out.join("summary.md").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn two_node_mode_runs_against_experiments_server_on_another_host() {
    if !root_or_skip("two_node_mode") {
        return;
    }
    // The "other node" is this machine's loopback: `experiments server` as a separate process.
    let mut server = Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(["server", "--listen", "127.0.0.1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start experiments server");
    let stdout = server.stdout.take().unwrap();
    let _stop = StopOnDrop(Some(server));
    {
        use std::io::BufRead;
        let lines = std::io::BufReader::new(stdout).lines();
        assert!(lines.map_while(Result::ok).any(|l| l == "ready"), "experiments server did not come up");
    }
    let out = out_dir("two-node");
    let reuse_out = out.join("reuse");
    let fct_out = out.join("fct");
    let common = ["--topology", "two-node", "--server", "127.0.0.1"];
    let mut args = vec!["reuse", "--runs", "3", "--out", reuse_out.to_str().unwrap()];
    args.extend(common);
    run(&args);
    let mut args = vec!["fct", "--reps", "1", "--sizes", "1024", "--congestion", "off", "--out", fct_out.to_str().unwrap()];
    args.extend(common);
    run(&args);
    assert_eq!(csv(&reuse_out.join("reuse.csv")).1.len(), 3 * REUSE_CONFIGS.len(), "3 runs x every configuration");
    assert_eq!(csv(&fct_out.join("fct.csv")).1.len(), 3, "new, learned, warm");
    let summary = std::fs::read_to_string(reuse_out.join("summary.md")).unwrap();
    assert!(summary.contains("two-node: servers on 127.0.0.1"), "{summary}");
    let _ = std::fs::remove_dir_all(&out);
}

/// Stops a process we started, by its PID, even when the test fails (its nginx follows).
/// Our child, stopped (SIGTERM, by its PID) and reaped on drop.
struct StopOnDrop(Option<std::process::Child>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

#[test]
fn burst_short_run_writes_csv_and_the_pool_serves_the_burst() {
    if !root_or_skip("burst_short_run") {
        return;
    }
    let out = out_dir("burst");
    run(&["burst", "--sizes", "1,8", "--reps", "2", "--out", out.to_str().unwrap()]);
    let (header, rows) = csv(&out.join("burst.csv"));
    assert_eq!(header, "config,n,rep,total_us");
    assert_eq!(rows.len(), 2 * 2 * 2, "sizes x configs x reps");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    // The pool handed out a warm socket to every function of the pool bursts (1+1+8+8).
    let row = summary.lines().find(|l| l.contains("198.18.0.2")).expect("pool row");
    let warm: u64 = row.split_whitespace().nth(7).unwrap().parse().unwrap();
    assert!(warm >= 18, "{row}");
    assert!(out.join("burst.svg").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn link_short_run_times_links_and_relays() {
    if !root_or_skip("link_short_run") {
        return;
    }
    let out = out_dir("link");
    run(&["link", "--rtt", "5ms", "--reps", "4", "--bytes", "20000000", "--out", out.to_str().unwrap()]);
    let (header, rows) = csv(&out.join("link.csv"));
    assert_eq!(header, "config,rep,connect_us");
    for c in ["on-demand", "prewarmed", "relayed"] {
        assert_eq!(rows.iter().filter(|r| r[0] == c).count(), 4, "{c}");
    }
    let med = |c: &str| median(rows.iter().filter(|r| r[0] == c).map(|r| r[2].parse::<f64>().unwrap()).collect());
    // A new link needs the rendezvous and the punch: at least one RTT of the 5 ms path; a
    // prewarmed link is handed out without touching the path.
    assert!(med("on-demand") > 5_000.0, "on-demand {} us", med("on-demand"));
    assert!(med("relayed") > 5_000.0, "relayed {} us", med("relayed"));
    assert!(med("prewarmed") < 5_000.0, "prewarmed {} us", med("prewarmed"));
    let (header, rows) = csv(&out.join("throughput.csv"));
    assert_eq!(header, "path,bytes,seconds,gbit_per_s");
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["direct", "relayed"]);
    // The direct phase's links were made by hole punching, the relayed phase's by the relay.
    let direct = std::fs::read_to_string(out.join("status-direct.txt")).unwrap();
    assert!(direct.contains("exp/b"), "{direct}");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| on-demand |") && summary.contains("3 RTTs + 5 ms"), "{summary}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn shuffle_short_run_every_exchange_computes_the_same_result() {
    if !root_or_skip("shuffle_short_run") {
        return;
    }
    let out = out_dir("shuffle");
    // The driver checks every reducer's digest against a local computation and fails the
    // run on any difference, so a successful run is a correct shuffle over every exchange.
    run(&["shuffle", "--rtt", "1ms", "--mappers", "2", "--reducers", "3", "--bytes", "640000", "--reps", "1", "--out", out.to_str().unwrap()]);
    let (header, rows) = csv(&out.join("shuffle.csv"));
    assert_eq!(header, "via,rep,mappers,reducers,bytes_per_mapper,job_ms,bytes_moved");
    let vias: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(vias, ["peer", "peer-prewarmed", "redis", "s3"]);
    for r in &rows {
        assert!(r[5].parse::<f64>().unwrap() > 0.0);
    }
    // Through a store every byte is written and read: twice the payload.
    let moved = |v: &str| rows.iter().find(|r| r[0] == v).unwrap()[6].parse::<u64>().unwrap();
    assert_eq!(moved("s3"), 2 * moved("peer"));
    let status = std::fs::read_to_string(out.join("status-peer.txt")).unwrap();
    assert!(status.contains("PEER shuf/a"), "{status}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn burst_with_peers_short_run_uses_prewarmed_links() {
    if !root_or_skip("burst_with_peers_short_run") {
        return;
    }
    let out = out_dir("burst-peer");
    run(&["burst", "--peer", "--sizes", "1,4", "--reps", "1", "--out", out.to_str().unwrap()]);
    let (header, rows) = csv(&out.join("burst.csv"));
    assert_eq!(header, "config,n,rep,total_us");
    assert_eq!(rows.len(), 4, "2 sizes x 2 configurations");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("one exchange with a peer function"), "{summary}");
    // The pool's functions reached their peers over links from the pool (every burst checks
    // its peers' answers; the status shows the peer section of the pool).
    assert!(summary.contains("PEER burst/a"), "{summary}");
    let _ = std::fs::remove_dir_all(&out);
}
