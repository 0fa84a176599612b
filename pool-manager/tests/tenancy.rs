//! Tenant isolation with real uids and real cgroups (root only; must run in CI).

mod common;

use common::*;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};

/// Run `python3 http_get.py blocking ...` under the shim as `uid`, optionally inside `cgroup`
/// (moved there by a shell before exec); returns the local port the function used.
fn function(st: &Staged, d: &Daemon, uid: u32, cgroup: Option<&Path>, port: u16) -> String {
    let script = st.script();
    let py = format!("exec {} {} blocking 127.0.0.1 {port} /tenant", SYSTEM_PYTHON, script.display());
    let inner = match cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && {py}", cg.display()),
        None => py,
    };
    let mut c = Command::new(tool_path("setpriv"));
    if let Some(cgroup) = cgroup {
        // Join the cgroup as root first, then drop to the uid.
        c = Command::new("/bin/sh");
        c.args(["-c", &format!("echo $$ > {}/cgroup.procs && exec {} --reuid={uid} --regid={uid} --clear-groups {} {} blocking 127.0.0.1 {port} /tenant",
            cgroup.display(), tool_path("setpriv").display(), SYSTEM_PYTHON, script.display())]);
    } else {
        c.args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups", "/bin/sh", "-c", &inner]);
    }
    shim_env(&mut c, d);
    c.env("LD_PRELOAD", st.preload());
    let o = c.stdin(Stdio::null()).output().expect("run function");
    assert!(o.status.success(), "uid {uid}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.ends_with("200 hello\n"), "{out}");
    out.split_whitespace().next().unwrap().to_owned()
}

fn prewarm_as(st: &Staged, d: &Daemon, uid: u32, dest: &str) {
    let o = Command::new(tool_path("setpriv"))
        .args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"])
        .arg(st.bin())
        .args(["prewarm", "--socket"])
        .arg(&d.socket)
        .arg(dest)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn two_uids_never_receive_the_same_socket() {
    if !require_root("two_uids_never_receive_the_same_socket") || !require_tool("nginx") || !require_tool("setpriv") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    let st = Staged::new();
    let (a, b) = (64_101, 64_102);
    prewarm_as(&st, &d, a, &dest);
    prewarm_as(&st, &d, b, &dest);
    let mut ports = [HashSet::new(), HashSet::new()];
    for _ in 0..6 {
        ports[0].insert(function(&st, &d, a, None, nginx.port));
        ports[1].insert(function(&st, &d, b, None, nginx.port));
    }
    assert!(ports[0].is_disjoint(&ports[1]), "a socket crossed tenants: {ports:?}");
    // Within each tenant the pool did reuse (so isolation is not just "no pooling").
    assert!(ports[0].len() <= 2 && ports[1].len() <= 2, "{ports:?}");
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 8.0, "{}", d.metrics());
    let status = d.status();
    assert!(status.contains(&format!("{a}:")) && status.contains(&format!("{b}:")), "{status}");

    // A tenant's status shows only its own pools.
    let o = Command::new(tool_path("setpriv"))
        .args([&format!("--reuid={a}"), &format!("--regid={a}"), "--clear-groups"])
        .arg(st.bin())
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let own = String::from_utf8_lossy(&o.stdout);
    assert!(own.contains(&format!("{a}:")) && !own.contains(&format!("{b}:")), "{own}");
}

#[test]
fn two_cgroups_of_one_uid_never_receive_the_same_socket() {
    if !require_root("two_cgroups_of_one_uid_never_receive_the_same_socket") || !require_tool("nginx") || !require_tool("setpriv") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    let st = Staged::new();
    let (x, y) = (Cgroup::new("x"), Cgroup::new("y"));
    let uid = 64_103;
    let mut ports = [HashSet::new(), HashSet::new()];
    for _ in 0..6 {
        ports[0].insert(function(&st, &d, uid, Some(&x.0), nginx.port));
        ports[1].insert(function(&st, &d, uid, Some(&y.0), nginx.port));
    }
    assert!(ports[0].is_disjoint(&ports[1]), "a socket crossed cgroups: {ports:?}");
    assert!(d.metric("warmpool_handouts_total{kind=\"reuse\"") >= 6.0, "{}", d.metrics());
    let status = d.status();
    let tenants: HashSet<&str> = status.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(tenants.len(), 2, "{status}");
}

#[test]
fn a_process_that_drops_root_is_served_as_its_new_uid() {
    if !require_root("a_process_that_drops_root_is_served_as_its_new_uid") || !require_tool("nginx") {
        return;
    }
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::start(&["--pool", &format!("{dest}=reuse:http")]);
    let uid = 64_105;
    // Started as root (the shim opens its link at load time, as root), then drops to `uid`
    // before connecting, like a server's worker would.
    let script = format!(
        "import os, socket\nos.setgroups([])\nos.setgid({uid})\nos.setuid({uid})\n\
         s = socket.create_connection(('127.0.0.1', {}))\n\
         s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\nprint(s.recv(100).split()[1].decode())\n",
        nginx.port
    );
    for _ in 0..3 {
        let mut c = Command::new(SYSTEM_PYTHON);
        c.args(["-c", &script]);
        shim_env(&mut c, &d);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "200");
    }
    let status = d.status();
    assert!(status.contains(&format!("{uid}:")), "requests after setuid must be identified as uid {uid}:\n{status}");
    assert!(!status.lines().any(|l| l.starts_with("0:")), "nothing was asked as root:\n{status}");
}
