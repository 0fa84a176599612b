//! `Msg::Delegate` against a real daemon (root only; must run in CI): accepted only from uid
//! 0 in the daemon's own network namespace, refused for a dead process, and a delegated
//! connection is served as the pidfd's process: sockets made in its network namespace.
//! The client is `tests/clients/delegate.py` (a raw wire client).
//!
//! Addresses: 198.18.104.0/30 on a veth pair (host .1, namespace .2).

mod common;

use common::ns::Ns;
use common::pyhttp::PyServer;
use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;

/// The client script, copied where every uid can read it.
struct Script {
    dir: TempDir,
}

impl Script {
    fn new() -> Script {
        let dir = TempDir::new();
        std::fs::copy(client_script("delegate.py"), dir.join("delegate.py")).expect("copy delegate.py");
        Script { dir }
    }

    fn cmd(&self, d: &Daemon, target: &str, ops: &[&str]) -> Command {
        let mut c = Command::new(SYSTEM_PYTHON);
        c.arg(self.dir.join("delegate.py")).arg(&d.socket).arg(target).args(ops).env_remove("LD_PRELOAD").stdin(Stdio::null());
        c
    }
}

fn run(mut c: Command) -> String {
    let o = c.output().expect("run delegate.py");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "delegate.py: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn line<'a>(out: &'a str, op: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(&format!("{op} "))).unwrap_or_else(|| panic!("no answer to {op}: {out}"))
}

/// A `sleep` inside `ns` (the process whose tenant a connection is delegated to).
struct Sleeper(Child);

impl Sleeper {
    fn start(ns: &Ns) -> Sleeper {
        Sleeper(ns.cmd("sleep").arg("60").spawn().expect("sleep in the namespace"))
    }
    fn pid(&self) -> String {
        // `ip netns exec` execs the program: the child's pid is the sleep's.
        self.0.id().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        terminate_child(&mut self.0, Duration::from_secs(1));
    }
}

#[test]
fn delegate_is_refused_for_an_unprivileged_uid() {
    if !require_root("delegate_is_refused_for_an_unprivileged_uid") {
        return;
    }
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\n");
    let s = Script::new();
    let mut c = s.cmd(&d, "self", &["status"]);
    c.uid(NOBODY).gid(NOBODY);
    let out = run(c);
    let answer = line(&out, "delegate");
    assert!(answer.starts_with("delegate error 4 "), "{out}");
    assert!(answer.contains("only from uid 0"), "the refusal says why: {answer}");
    // The connection stays the caller's own: its status shows uid 65534's (empty) view.
    assert!(line(&out, "status").starts_with("status ok"), "{out}");
}

#[test]
fn delegate_is_refused_from_another_network_namespace() {
    if !require_root("delegate_is_refused_from_another_network_namespace") {
        return;
    }
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\n");
    let s = Script::new();
    let ns = Ns::new("d");
    // Root, but in another namespace (a container's root, say): refused.
    let mut c = ns.cmd(SYSTEM_PYTHON);
    c.arg(s.dir.join("delegate.py")).arg(&d.socket).arg("self");
    let out = run(c);
    let answer = line(&out, "delegate");
    assert!(answer.starts_with("delegate error 4 ") && answer.contains("own network namespace"), "{out}");
}

#[test]
fn delegate_of_a_dead_process_or_not_first_is_refused() {
    if !require_root("delegate_of_a_dead_process_or_not_first_is_refused") {
        return;
    }
    let d = Daemon::with_config("[auto]\nenabled = true\npolicy = \"warm\"\n");
    let s = Script::new();
    let out = run(s.cmd(&d, "dead", &["status"]));
    let answer = line(&out, "delegate");
    assert!(answer.starts_with("delegate error 4 ") && answer.contains("not a pidfd of a live process"), "{out}");
    // A refused delegation leaves the connection unidentified, not served as root.
    assert!(line(&out, "status").starts_with("status error 4 ") && out.contains("not identified"), "{out}");
    // Only the first message of a connection may delegate.
    let out = run(s.cmd(&d, "none", &["status", "delegate:self"]));
    assert!(line(&out, "delegate").contains("must be the first message"), "{out}");
}

/// The delegated connection's sockets are made in the pidfd process's namespace: the
/// granted socket's local address is the namespace's, and the server saw that address.
#[test]
fn a_delegated_connection_gets_sockets_made_in_the_processs_namespace() {
    if !require_root("a_delegated_connection_gets_sockets_made_in_the_processs_namespace") {
        return;
    }
    let ns = Ns::new("e").with_veth(104);
    let port = free_port();
    let srv = PyServer::start("198.18.104.1", port);
    let dest = format!("198.18.104.1:{port}");
    let d = Daemon::with_config("keep_window_when_idle = false\n[auto]\nenabled = true\npolicy = \"warm\"\n");
    let sleeper = Sleeper::start(&ns);
    let s = Script::new();
    let out = run(s.cmd(&d, &sleeper.pid(), &[&format!("prewarm:{dest}"), &format!("acquire:{dest}")]));
    let delegated = line(&out, "delegate");
    assert!(delegated.starts_with("delegate ok delegated: pid ") && delegated.contains(&format!("net:[{}]", ns.inode())), "{out}");
    let grant = line(&out, "acquire");
    assert!(grant.starts_with("acquire grant 198.18.104.2 "), "the socket was not made in the namespace: {out}\n{}", d.log());
    assert!(wait_until(Duration::from_secs(3), || !srv.lines().is_empty()), "the server saw no connection");
    let foreign: Vec<_> = srv.lines().into_iter().filter(|(_, a, _)| a != "198.18.104.2").collect();
    assert!(foreign.is_empty(), "connections from another address than the namespace's: {foreign:?}");
    // The same script without delegation, from the host: its socket is the host's own.
    let out = run(s.cmd(&d, "none", &[&format!("prewarm:{dest}"), &format!("acquire:{dest}")]));
    assert!(line(&out, "acquire").starts_with("acquire grant 198.18.104.1 "), "{out}");
}
