//! The preload library for musl-linked programs (`libwarmpool_preload-musl.so`, built by
//! `scripts/build-musl.sh` beside the glibc one): a program built with musl-gcc, under that
//! library, gets pooled sockets from a real daemon in front of a real nginx.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// `target_dir()/libwarmpool_preload-musl.so`; panics with the build command if missing.
fn musl_preload_path() -> PathBuf {
    let p = target_dir().join("libwarmpool_preload-musl.so");
    assert!(p.is_file(), "{} is missing: build it with `bash scripts/build-musl.sh` (scripts/test.sh does)", p.display());
    p
}

/// Warm and reused hand-outs so far (all tenants).
fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"") + d.metric("warmpool_handouts_total{kind=\"reuse\"")
}

/// Idle sockets in all pools.
fn idle(d: &Daemon) -> f64 {
    metric_samples(&d.metrics(), "warmpool_pool_sockets").iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum()
}

/// Three musl functions in a row, each connect → GET → close, each started once a socket is
/// idle: every connect() is served from the pool (no miss), every socket is given back clean,
/// and nginx sees the three requests on at most two connections (the prewarmed one, reused).
#[test]
fn a_musl_program_under_the_musl_library_gets_pooled_sockets() {
    if !require_tool("nginx") || !require_tool("musl-gcc") {
        return;
    }
    let lib = musl_preload_path();
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&format!(
        "keep_window_when_idle = false\n\n[[pool]]\ndestination = \"{dest}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 1\n"
    ));
    let o = Command::new(pool_manager_bin()).args(["prewarm", "--socket"]).arg(&d.socket).arg(&dest).env_remove("LD_PRELOAD").output().unwrap();
    assert!(o.status.success(), "prewarm: {o:?}");
    assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "no idle socket after prewarm\n{}", d.log());
    let bin = d.dir.join("http_get");
    let o = Command::new(tool_path("musl-gcc")).arg("-O1").arg("-o").arg(&bin).arg(client_script("musl_http_get.c")).output().unwrap();
    assert!(o.status.success(), "musl-gcc musl_http_get.c: {}", String::from_utf8_lossy(&o.stderr));
    let elf = std::fs::read(&bin).unwrap();
    assert!(elf.windows(b"ld-musl-x86_64.so.1".len()).any(|w| w == b"ld-musl-x86_64.so.1"), "http_get is not a musl program");
    let before = handouts(&d);
    for i in 0..3 {
        assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "function {i}: no idle socket\n{}", d.metrics());
        let o = Command::new(&bin)
            .args(["127.0.0.1", &nginx.port.to_string(), &format!("/musl{i}")])
            .env("LD_PRELOAD", &lib)
            .env("WARMPOOL_SOCKET", &d.socket)
            .env_remove("WARMPOOL_DISABLE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "function {i}: {}\n{stderr}", o.status);
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "200", "function {i}");
        // Nothing printed: in particular no loader error ("cannot be preloaded", a missing libc).
        assert!(stderr.is_empty(), "function {i} printed: {stderr}");
        assert!(
            wait_until(Duration::from_secs(5), || d.metric("warmpool_returned_total") > i as f64),
            "function {i}'s socket never came back\n{}\n{}",
            d.metrics(),
            d.log()
        );
    }
    assert_eq!(handouts(&d) - before, 3.0, "not every connect() was served by the pool\n{}", d.metrics());
    assert_eq!(d.metric("warmpool_handouts_total{kind=\"miss\""), 0.0, "{}", d.metrics());
    let conns: HashSet<u64> = nginx.connections().iter().filter(|(_, u)| u.starts_with("/musl")).map(|(c, _)| *c).collect();
    assert!(conns.len() <= 2, "three pooled functions used {} upstream connections", conns.len());
}
