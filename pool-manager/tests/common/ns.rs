//! Named network namespaces for tests (root): loopback up, an optional veth pair to the host
//! with addresses from 198.18.0.0/15, commands run inside (also inside a test cgroup).
//! Removed on drop (deleting the namespace deletes its veth pair with it).

use super::{tool_path, Cgroup};
use std::process::{Command, Output, Stdio};

/// A named network namespace (`ip netns add`), removed (with its veth pair) on drop.
pub struct NetNs {
    pub name: String,
    host_if: Option<String>,
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) -> Output {
    let o = Command::new(tool_path("ip")).args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

impl NetNs {
    /// `tag`: short and unique per test file and test.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("wp{tag}{}", std::process::id());
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name, host_if: None };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Add a veth pair: the host end gets `<prefix>.1/30`, the namespace end `<prefix>.2/30`
    /// (`prefix`: three octets inside 198.18.0.0/15, e.g. "198.19.201").
    pub fn with_veth(mut self, prefix: &str) -> NetNs {
        let tag = prefix.rsplit('.').next().unwrap_or("0");
        let host = format!("wpvh{tag}{}", std::process::id() % 100_000);
        let _ = Command::new(tool_path("ip")).args(["link", "del", &host]).output();
        ip(&["link", "add", &host, "type", "veth", "peer", "name", "wpveth", "netns", &self.name]);
        self.host_if = Some(host.clone());
        ip(&["addr", "add", &format!("{prefix}.1/30"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ip(&["-n", &self.name, "addr", "add", &format!("{prefix}.2/30"), "dev", "wpveth"]);
        ip(&["-n", &self.name, "link", "set", "wpveth", "up"]);
        self
    }

    /// `prog ARGS` inside the namespace (`ip netns exec`), without LD_PRELOAD.
    pub fn cmd(&self, prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new(tool_path("ip"));
        c.args(["netns", "exec", &self.name, prog]).args(args).env_remove("LD_PRELOAD").stdin(Stdio::null());
        c
    }

    /// `prog ARGS` inside the namespace and inside `cg`.
    pub fn cmd_in(&self, cg: &Cgroup, prog: &str, args: &[&str]) -> Command {
        let mut all = vec!["netns", "exec", self.name.as_str(), prog];
        all.extend_from_slice(args);
        let mut c = cg.command(&tool_path("ip"), &all);
        c.env_remove("LD_PRELOAD").stdin(Stdio::null());
        c
    }

    /// The namespace's inode (what `/proc/PID/ns/net` and the daemon's `net:[INODE]` show).
    pub fn inode(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/run/netns/{}", self.name)).expect("stat netns"))
    }

    /// How the daemon labels this namespace in metrics.
    pub fn label(&self) -> String {
        format!("net:[{}]", self.inode())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &self.name]).output();
        if let Some(h) = &self.host_if {
            let _ = Command::new(tool_path("ip")).args(["link", "del", h]).output();
        }
    }
}
