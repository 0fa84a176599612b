//! Real containers for the tests: podman with runc inside a network namespace the test
//! made (see `tests/containers.rs` for the network-safety rules), the function image built
//! locally and cached, containers started with the shim's library and the daemon's socket.

use super::*;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub const IMAGE: &str = "localhost/warmpool-fn-bookworm:test";
pub const SERVER: &str = "198.18.110.1";

pub fn podman() -> Command {
    let mut c = Command::new(tool_path("podman"));
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]).env_remove("LD_PRELOAD").stdin(Stdio::null());
    c
}

pub fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    o
}

/// The function image: built once (cached tarball), imported once per machine.
pub fn image() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = target_dir().parent().expect("target/").join("containers");
        std::fs::create_dir_all(&dir).expect("mkdir target/containers");
        let tar = dir.join("fn-bookworm.tar");
        if !tar.exists() {
            let tmp = dir.join("fn-bookworm.tar.tmp");
            let o = Command::new(tool_path("mmdebstrap"))
                .args(["--variant=minbase", "--format=tar", "--include=curl,python3", "bookworm"])
                .arg(&tmp)
                .output()
                .expect("run mmdebstrap");
            ok(o, "mmdebstrap");
            std::fs::rename(&tmp, &tar).expect("rename image tarball");
        }
        if !podman().args(["image", "exists", IMAGE]).status().expect("podman").success() {
            ok(podman().arg("import").arg(&tar).arg(IMAGE).output().expect("podman import"), "podman import");
        }
    });
    IMAGE
}

/// A network namespace this test's thread runs in, with a podman network in it.
pub struct Lab {
    pub name: String,
    pub net: String,
    /// `--hooks-dir` for every podman command that starts a container (OCI hooks).
    pub hooks: Option<std::path::PathBuf>,
    home: std::fs::File,
}

impl Lab {
    pub fn new() -> Lab {
        let name = format!("wpct{}", std::process::id());
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &name]).output();
        ok(Command::new(tool_path("ip")).args(["netns", "add", &name]).output().unwrap(), "ip netns add");
        let home = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
        // SAFETY: setns on fds we hold; it moves only this (test) thread.
        assert_eq!(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
        let lab = Lab { name, net: format!("wpnet{}", std::process::id()), hooks: None, home };
        for args in [vec!["link", "set", "lo", "up"], vec!["addr", "add", &format!("{SERVER}/32"), "dev", "lo"]] {
            ok(Command::new(tool_path("ip")).args(&args).output().unwrap(), "ip in the lab");
        }
        let _ = podman().args(["network", "rm", "-f", &lab.net]).output();
        ok(podman().args(["network", "create", "--disable-dns", "--subnet", "198.18.111.0/24", &lab.net]).output().unwrap(), "podman network create");
        lab
    }

    /// `podman run` of `script` (sh -c) as container `ip` (198.18.111.`ip`); with the
    /// daemon's socket directory mounted when `d` is given; always with the library
    /// mounted and LD_PRELOAD set.
    pub fn run_args(&self, d: Option<&Daemon>, ip: u8, detach: bool) -> Command {
        self.run_args_with(d, ip, detach, &[])
    }

    /// [`Lab::run_args`] with `extra` options for `podman run` (e.g. `--annotation`).
    pub fn run_args_with(&self, d: Option<&Daemon>, ip: u8, detach: bool, extra: &[&str]) -> Command {
        let mut c = podman();
        if let Some(h) = &self.hooks {
            c.arg("--hooks-dir").arg(h);
        }
        c.args(["run", "--rm", "--network", &self.net, "--ip", &format!("198.18.111.{ip}")]);
        c.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "--name", &format!("wpfn{ip}-{}", std::process::id())]);
        if detach {
            c.arg("-d");
        }
        c.args(extra);
        c.arg("-v").arg(format!("{}:/opt/warmpool/libwarmpool_preload.so:ro", preload_path().display()));
        c.args(["-e", "LD_PRELOAD=/opt/warmpool/libwarmpool_preload.so", "-e", "WARMPOOL_SOCKET=/run/warmpool/pool.sock"]);
        if let Some(d) = d {
            c.arg("-v").arg(format!("{}:/run/warmpool", d.dir.path().display()));
        }
        c.arg(image());
        c
    }

    pub fn run(&self, d: Option<&Daemon>, ip: u8, script: &str) -> String {
        let o = self.run_args(d, ip, false).args(["sh", "-c", script]).output().expect("podman run");
        String::from_utf8_lossy(&ok(o, "podman run").stdout).into_owned()
    }

    /// A long-running container (as a function platform's watchdog): invocations are
    /// `podman exec`s into it.
    pub fn start(&self, d: Option<&Daemon>, ip: u8) -> Running {
        self.start_with(d, ip, &[])
    }

    /// [`Lab::start`] with `extra` options for `podman run`.
    pub fn start_with(&self, d: Option<&Daemon>, ip: u8, extra: &[&str]) -> Running {
        ok(self.run_args_with(d, ip, true, extra).args(["sleep", "300"]).output().unwrap(), "podman run -d");
        Running { name: format!("wpfn{ip}-{}", std::process::id()) }
    }
}

/// A running container, removed on drop.
pub struct Running {
    pub name: String,
}

impl Running {
    /// Run `script` (sh -c) in the container, with the shim or with LD_PRELOAD emptied.
    pub fn exec(&self, shim: bool, script: &str) -> String {
        let mut c = podman();
        c.arg("exec");
        if !shim {
            c.args(["-e", "LD_PRELOAD="]);
        }
        c.args([self.name.as_str(), "sh", "-c", script]);
        String::from_utf8_lossy(&c.output().expect("podman exec").stdout).into_owned()
    }

    /// The pid (in the test's pid namespace) of the container's first process.
    pub fn pid(&self) -> String {
        let o = ok(podman().args(["inspect", "-f", "{{.State.Pid}}", &self.name]).output().unwrap(), "podman inspect");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = podman().args(["network", "rm", "-f", &self.net]).output();
        // SAFETY: back to the namespace this thread came from (an fd we hold).
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new(tool_path("ip")).args(["netns", "del", &self.name]).output();
    }
}

pub fn needs(test: &str) -> bool {
    require_root(test) && require_tool("podman") && require_tool("runc") && require_tool("mmdebstrap") && require_tool("nsenter")
}

/// `n` curls, each a new process, printing the status code each.
pub fn curls(n: usize, url: &str) -> String {
    format!("for i in $(seq {n}); do curl -sS --max-time 5 -o /dev/null -w '%{{http_code}}\\n' {url} || echo failed; done")
}

pub fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}")
}
