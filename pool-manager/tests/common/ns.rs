//! A network namespace a test makes (`ip netns add`), optionally with a veth pair to the
//! test's own namespace; removed on drop.

use super::tool_path;
use std::process::{Command, Output, Stdio};

/// A named network namespace (`ip netns add`), with its loopback up and optionally a veth
/// pair to the host. Removed (with the host end) on drop.
pub struct Ns {
    pub name: String,
    pub host_if: Option<String>,
}

pub fn ip(args: &[&str]) -> Output {
    let o = Command::new(tool_path("ip")).args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

impl Ns {
    /// `tag`: a short name unique per test (also the /30's third octet offset).
    pub fn new(tag: &str) -> Ns {
        let name = format!("wpn{tag}{}", std::process::id());
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Ns { name, host_if: None };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Add a veth pair: the host end gets `198.18.<octet>.1/30`, the namespace end `.2`.
    pub fn with_veth(mut self, octet: u8) -> Ns {
        let host = format!("wph{}{}", octet, std::process::id() % 100_000);
        let inside = format!("wpi{}{}", octet, std::process::id() % 100_000);
        let _ = Command::new(tool_path("ip")).args(["link", "del", &host]).output();
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &inside]);
        self.host_if = Some(host.clone());
        ip(&["link", "set", &inside, "netns", &self.name]);
        ip(&["addr", "add", &format!("198.18.{octet}.1/30"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        self.exec_ok(&["ip", "addr", "add", &format!("198.18.{octet}.2/30"), "dev", &inside]);
        self.exec_ok(&["ip", "link", "set", &inside, "up"]);
        self
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(tool_path("ip"));
        c.args(["netns", "exec", &self.name, prog]).env_remove("LD_PRELOAD").stdin(Stdio::null());
        c
    }

    pub fn exec_ok(&self, args: &[&str]) {
        let o = self.cmd(args[0]).args(&args[1..]).output().expect("ip netns exec");
        assert!(o.status.success(), "{args:?} in {}: {}", self.name, String::from_utf8_lossy(&o.stderr));
    }

    /// The namespace's inode (as /proc/PID/ns/net shows it).
    pub fn inode(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/run/netns/{}", self.name)).expect("stat netns"))
    }

    pub fn delete(&mut self) {
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &self.name]).output();
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.delete();
        if let Some(h) = &self.host_if {
            let _ = Command::new(tool_path("ip")).args(["link", "del", h]).output();
        }
    }
}
