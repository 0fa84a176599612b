//! Test (e) of issue 11: every process of a container served whatever its libc, through the
//! seccomp agent (`pool-manager seccomp-agent`, the OCI seccomp `listenerPath` receiver: no
//! `LD_PRELOAD`, no supervisor) and through the musl build of the preload library.
//!
//! Containers run under runc directly (root only; must run in CI), from a bundle the test
//! writes: the rootfs is the musl image (a small directory cached under
//! `target/containers/musl-rootfs`: musl's loader from Debian's `musl`, a musl-gcc-built HTTP
//! client, Debian's `busybox-static`, the musl preload library), the network namespace is one
//! the test made (a veth pair to ours, 198.18.113.0/30, no default route); the server
//! (python, logging each connection's peer) and the daemon run in the test's namespace.

mod common;

use common::ns::Ns;
use common::pyhttp::PyServer;
use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The server's address (our end of the veth pair) and the container's.
const SERVER: &str = "198.18.113.1";
const CONTAINER: &str = "198.18.113.2";

fn needs(test: &str) -> bool {
    require_root(test) && require_tool("runc") && require_tool("musl-gcc") && require_tool("python3") && require_tool("ip")
}

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    o
}

/// The musl image: built once per machine (its preload library refreshed every run).
fn musl_rootfs() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = target_dir().parent().expect("target/").join("containers");
        let root = dir.join("musl-rootfs");
        if !root.join("bin/http_get").exists() {
            let tmp = dir.join("musl-rootfs.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            for d in ["bin", "lib", "proc", "sys", "dev", "tmp", "etc", "run/warmpool", "opt/warmpool"] {
                std::fs::create_dir_all(tmp.join(d)).expect("mkdir in the rootfs");
            }
            // Mount points podman binds over (so that it leaves the cached image alone).
            for f in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
                std::fs::write(tmp.join(f), "").expect("touch in the rootfs");
            }
            // musl's loader is its libc too (Debian's `musl`: /lib/ld-musl-x86_64.so.1).
            std::fs::copy("/lib/ld-musl-x86_64.so.1", tmp.join("lib/ld-musl-x86_64.so.1")).expect("copy musl's loader");
            let bb = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists()).expect("busybox-static");
            std::fs::copy(bb, tmp.join("bin/busybox")).expect("copy busybox");
            for link in ["sh", "sleep", "wget"] {
                std::os::unix::fs::symlink("busybox", tmp.join("bin").join(link)).expect("busybox link");
            }
            let mut cc = Command::new(tool_path("musl-gcc"));
            let o = cc.arg("-O1").arg("-o").arg(tmp.join("bin/http_get")).arg(client_script("musl_http_get.c")).output().unwrap();
            ok(o, "musl-gcc musl_http_get.c");
            std::fs::create_dir_all(&dir).expect("mkdir target/containers");
            let _ = std::fs::remove_dir_all(&root);
            std::fs::rename(&tmp, &root).expect("rename the rootfs");
        }
        let lib = target_dir().join("libwarmpool_preload-musl.so");
        assert!(lib.is_file(), "{} is missing: build it with `bash scripts/build-musl.sh`", lib.display());
        std::fs::copy(&lib, root.join("opt/warmpool/libwarmpool_preload-musl.so")).expect("copy the musl preload library");
        root
    })
}

/// How the container's connects reach the pool.
enum Via<'a> {
    /// The seccomp profile names the agent's socket as `listenerPath`.
    Agent(&'a Path),
    /// `LD_PRELOAD` of the musl library, the daemon's socket directory mounted.
    Library(&'a Daemon),
}

/// One runc container (`sleep` as its first process), in network namespace `ns`; deleted on
/// drop.
struct Container {
    id: String,
    root: PathBuf,
    env: Vec<String>,
    _bundle: TempDir,
}

fn runc(root: &Path) -> Command {
    let mut c = Command::new(tool_path("runc"));
    c.arg("--root").arg(root).env_remove("LD_PRELOAD");
    c
}

impl Container {
    fn start(ns: &Ns, via: &Via<'_>, tag: &str) -> Container {
        let bundle = TempDir::new();
        let id = format!("wpsc{tag}{}", std::process::id());
        let root = bundle.join("runc");
        let (env, seccomp, mount) = match via {
            Via::Agent(listen) => (
                vec![],
                format!(
                    r#","seccomp": {{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "listenerPath": "{}",
                        "syscalls": [{{"names": ["connect"], "action": "SCMP_ACT_NOTIFY"}}]}}"#,
                    listen.display()
                ),
                String::new(),
            ),
            Via::Library(d) => (
                vec!["LD_PRELOAD=/opt/warmpool/libwarmpool_preload-musl.so".to_owned(), "WARMPOOL_SOCKET=/run/warmpool/pool.sock".to_owned()],
                String::new(),
                format!(r#",{{"destination": "/run/warmpool", "type": "bind", "source": "{}", "options": ["rbind", "rw"]}}"#, d.dir.path().display()),
            ),
        };
        let config = format!(
            r#"{{"ociVersion": "1.0.2",
  "process": {{"terminal": false, "user": {{"uid": 0, "gid": 0}}, "args": ["/bin/sleep", "300"], "env": ["PATH=/bin"], "cwd": "/",
    "noNewPrivileges": true, "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}}]}},
  "root": {{"path": "{rootfs}", "readonly": true}},
  "hostname": "{id}",
  "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=1024k"]}},
    {{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1024k"]}}{mount}],
  "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "mount"}}, {{"type": "network", "path": "/run/netns/{netns}"}}],
    "cgroupsPath": "/warmpool-test/{id}"{seccomp}}}}}"#,
            rootfs = musl_rootfs().display(),
            netns = ns.name,
        );
        std::fs::write(bundle.join("config.json"), config).expect("write config.json");
        let log = bundle.join("runc.log");
        let o = runc(&root)
            .args(["run", "-d", "--bundle"])
            .arg(bundle.path())
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("runc log"))
            .status()
            .expect("runc run");
        assert!(o.success(), "runc run: {}", std::fs::read_to_string(&log).unwrap_or_default());
        Container { id, root, env, _bundle: bundle }
    }

    /// The pid of the container's first process (runc's view: ours).
    fn pid(&self) -> u32 {
        let o = ok(runc(&self.root).args(["state", &self.id]).output().expect("runc state"), "runc state");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let at = text.find("\"pid\":").expect("pid in runc state") + 6;
        text[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next().and_then(|p| p.parse().ok()).expect("a pid")
    }

    /// Whether `/bin/sh` runs in the container (exec'd: past runc's hand-over to the agent).
    fn shell_started(&self) -> bool {
        let o = runc(&self.root).args(["ps", &self.id]).output().expect("runc ps");
        String::from_utf8_lossy(&o.stdout).lines().any(|l| l.contains("/bin/sh -c"))
    }

    /// Run `args` in the container (`runc exec`): its output.
    fn exec(&self, args: &[&str]) -> Output {
        let mut c = runc(&self.root);
        c.args(["exec"]);
        for e in &self.env {
            c.args(["--env", e]);
        }
        c.arg(&self.id).args(args).stdin(Stdio::null()).output().expect("runc exec")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = runc(&self.root).args(["delete", "-f", &self.id]).output();
        // runc leaves the (then empty) parent cgroup of cgroupsPath; rmdir fails while another
        // test's container is in it.
        let parents = std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|e| e.path().join("warmpool-test"));
        for dir in parents.chain([PathBuf::from("/sys/fs/cgroup/warmpool-test")]) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The agent, stopped by PID on drop.
struct Agent {
    child: Child,
    listen: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(d: &Daemon) -> Agent {
        let listen = d.dir.join("agent.sock");
        let log = d.dir.join("agent.log");
        let f = std::fs::File::create(&log).expect("agent log");
        let child = Command::new(pool_manager_bin())
            .args(["seccomp-agent", "--listen"])
            .arg(&listen)
            .arg("--socket")
            .arg(&d.socket)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .expect("spawn seccomp-agent");
        let agent = Agent { child, listen, log };
        assert!(wait_until(Duration::from_secs(5), || agent.listen.exists()), "the agent did not listen:\n{}", agent.log());
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(2));
    }
}

fn handouts(d: &Daemon) -> f64 {
    d.metric("warmpool_handouts_total{kind=\"warm\"}") + d.metric("warmpool_handouts_total{kind=\"reuse\"}")
}

/// Every socket handed out is back and checked (a reused socket is back in its pool), and
/// no pool is still filling.
fn settled(d: &Daemon) {
    let ok = wait_until(Duration::from_secs(5), || {
        let m = d.metrics();
        let busy = |l: &str| ["quarantine", "checking", "leased", "connecting"].iter().any(|s| l.contains(&format!("state=\"{s}\"")));
        metric_samples(&m, "warmpool_pool_sockets{").iter().filter(|(l, _)| busy(l)).all(|(_, v)| *v == 0.0)
    });
    assert!(ok, "sockets not back after 5 s\n{}\n{}", d.metrics(), d.log());
}

/// The pools of the container's tenant: one whose cgroup is the container's.
fn container_pools(d: &Daemon, id: &str) -> usize {
    metric_samples(&d.metrics(), "warmpool_pool_sockets{").iter().filter(|(l, _)| l.contains(id) && l.contains("state=\"idle\"")).count()
}

/// The invocations of one test: `n` runs of the musl client, then `n` of busybox-static's wget
/// (with `wget` false: the musl client only), each waited for until its socket is back.
fn invoke(c: &Container, d: &Daemon, port: u16, n: usize, wget: bool) -> usize {
    let mut done = 0;
    let path = |kind: &str, i: usize| format!("/{kind}{i}");
    for i in 0..n {
        let o = c.exec(&["/bin/http_get", SERVER, &port.to_string(), &path("musl", i)]);
        assert_eq!(String::from_utf8_lossy(&ok(o, "http_get in the container").stdout).trim(), "200", "musl invocation {i}");
        done += 1;
        settled(d);
    }
    for i in 0..if wget { n } else { 0 } {
        let url = format!("http://{SERVER}:{port}{}", path("wget", i));
        // busybox wget says "Connection: close"; asking for keep-alive as well lets the
        // server keep the connection for the next invocation.
        let o = c.exec(&["/bin/busybox", "wget", "-q", "--header", "Connection: keep-alive", "-O", "-", &url]);
        assert_eq!(String::from_utf8_lossy(&ok(o, "busybox wget in the container").stdout), "hello\n", "wget invocation {i}");
        done += 1;
        settled(d);
    }
    done
}

/// The requests since `from` all came from the container's own address, over at most
/// `max_conns` connections.
fn assert_from_container(srv: &PyServer, from: usize, n: usize, max_conns: usize, d: &Daemon) {
    let reqs: Vec<(String, u16)> = srv.request_peers().into_iter().skip(from).collect();
    assert_eq!(reqs.len(), n, "{reqs:?}");
    assert!(reqs.iter().all(|(a, _)| a == CONTAINER), "the server saw requests from another address than the container's: {reqs:?}");
    let conns: HashSet<u16> = reqs.iter().map(|(_, p)| *p).collect();
    assert!(conns.len() <= max_conns, "{n} invocations used {} upstream connections: {reqs:?}\n{}", conns.len(), d.metrics());
}

fn reuse_pool(port: u16) -> String {
    format!("[[pool]]\ndestination = \"{SERVER}:{port}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 1\n")
}

/// The musl client and busybox-static's wget, in a container with no `LD_PRELOAD`, get pooled
/// sockets through the agent: the daemon hands out sockets to the container's tenant (a pool
/// under the container's cgroup), the server sees the container's own address, and 8
/// invocations use at most 2 upstream connections (reuse). With the agent gone, a new
/// process cannot join the container (the runtime cannot reach `listenerPath`).
#[test]
fn musl_and_static_programs_in_a_container_are_served_through_the_seccomp_agent() {
    if !needs("musl_and_static_programs_in_a_container_are_served_through_the_seccomp_agent") {
        return;
    }
    let ns = Ns::new("sc").with_veth(113);
    let port = free_port();
    let srv = PyServer::start(SERVER, port);
    let d = Daemon::with_config(&reuse_pool(port));
    let mut agent = Agent::start(&d);
    let c = Container::start(&ns, &Via::Agent(&agent.listen), "a");
    let before = handouts(&d);
    let n = invoke(&c, &d, port, 4, true);
    let served = handouts(&d) - before;
    assert!(served >= (n - 2) as f64, "pooled hand-outs: {served} of {n}\n{}\n--- agent\n{}", d.metrics(), agent.log());
    assert_eq!(container_pools(&d, &c.id), 1, "no pool of the container's tenant\n{}", d.metrics());
    assert_from_container(&srv, 0, n, 2, &d);

    // The agent dies (the documented failure mode): a process already running in the
    // container gets ENOSYS from connect(), and no new process can join the container.
    let get = format!("/bin/http_get {SERVER} {port} /after-agent");
    let waiting = format!("i=0; while [ ! -e /tmp/go ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; {get}");
    let mut cmd = runc(&c.root);
    cmd.args(["exec", &c.id, "/bin/sh", "-c", &waiting]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let running = cmd.spawn().expect("runc exec");
    // Its notification fd reached the agent once a thread serves it (the fd is the agent's).
    assert!(wait_until(Duration::from_secs(5), || c.shell_started()), "the waiting shell did not start");
    terminate_child(&mut agent.child, Duration::from_secs(2));
    std::fs::write(format!("/proc/{}/root/tmp/go", c.pid()), "").expect("signal the waiting shell");
    let o = running.wait_with_output().expect("wait for the waiting shell");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("Function not implemented"), "connect() after the agent died: {o:?}");
    let o = c.exec(&["/bin/http_get", SERVER, &port.to_string(), "/no-agent"]);
    assert!(!o.status.success(), "runc exec without the agent: {o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("seccomp agent"), "{o:?}");
}

/// The shipped profile (deploy/seccomp/warmpool-connect.json), its `listenerPath` pointed at
/// the test's agent, as podman's `--security-opt seccomp=`: podman 4.3 passes `listenerPath`
/// through to runc, and the processes of a container without the preload library
/// (busybox-static's wget, the musl client) are served from the pool, from the container's
/// own address.
#[test]
fn podman_passes_the_shipped_profile_to_the_agent() {
    if !(needs("podman_passes_the_shipped_profile_to_the_agent") && require_tool("podman")) {
        return;
    }
    let ns = Ns::new("sp").with_veth(115);
    let port = free_port();
    let srv = PyServer::start("198.18.115.1", port);
    let d = Daemon::with_config(&format!("[[pool]]\ndestination = \"198.18.115.1:{port}\"\npolicy = \"warm\"\nmin_idle = 2\n"));
    let agent = Agent::start(&d);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/seccomp/warmpool-connect.json");
    let shipped = std::fs::read_to_string(shipped).expect("the shipped profile");
    assert!(shipped.contains("\"/run/warmpool/seccomp-agent.sock\""), "{shipped}");
    let profile = d.dir.join("profile.json");
    std::fs::write(&profile, shipped.replace("/run/warmpool/seccomp-agent.sock", &agent.listen.display().to_string())).unwrap();
    let podman = || {
        let mut c = Command::new(tool_path("podman"));
        c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]).env_remove("LD_PRELOAD").stdin(Stdio::null());
        c
    };
    let name = format!("wpscpod{}", std::process::id());
    let mut run = podman();
    run.args(["run", "-d", "--rm", "--name", &name, "--network", &format!("ns:/run/netns/{}", ns.name)]);
    run.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "--security-opt"]).arg(format!("seccomp={}", profile.display()));
    ok(run.arg("--rootfs").arg(musl_rootfs()).args(["/bin/sleep", "300"]).output().expect("podman run"), "podman run");
    /// Removes the container on drop.
    struct Removed<F: Fn() -> Command>(F, String);
    impl<F: Fn() -> Command> Drop for Removed<F> {
        fn drop(&mut self) {
            let _ = (self.0)().args(["rm", "-f", "-t", "0", &self.1]).output();
        }
    }
    let _removed = Removed(podman, name.clone());
    let exec = |args: &[&str]| {
        let o = podman().arg("exec").arg(&name).args(args).output().expect("podman exec");
        String::from_utf8_lossy(&ok(o, &format!("podman exec {args:?}\n--- agent\n{}", agent.log())).stdout).into_owned()
    };
    // The first connect of a fresh container makes its tenant's pool (without the OCI hook,
    // which would prewarm it, it may be a miss); the next ones are hand-outs.
    assert_eq!(exec(&["/bin/http_get", "198.18.115.1", &port.to_string(), "/podman-musl"]), "200\n");
    let idle = |d: &Daemon| metric_samples(&d.metrics(), "warmpool_pool_sockets{").iter().filter(|(l, _)| l.contains("state=\"idle\"")).map(|(_, v)| v).sum::<f64>();
    assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "the container's pool never filled\n{}", d.metrics());
    let before = handouts(&d);
    assert_eq!(exec(&["/bin/busybox", "wget", "-q", "-O", "-", &format!("http://198.18.115.1:{port}/podman-wget")]), "hello\n");
    assert!(wait_until(Duration::from_secs(5), || idle(&d) >= 1.0), "the container's pool never refilled\n{}", d.metrics());
    assert_eq!(exec(&["/bin/http_get", "198.18.115.1", &port.to_string(), "/podman-musl2"]), "200\n");
    assert_eq!(handouts(&d) - before, 2.0, "not pooled through podman's profile\n{}\n--- agent\n{}", d.metrics(), agent.log());
    let reqs = srv.request_peers();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert!(reqs.iter().all(|(a, _)| a == "198.18.115.2"), "{reqs:?}");
}

/// The same musl client, in a container with the musl preload library instead (no seccomp
/// profile): served from the pool, from the container's own address.
#[test]
fn a_musl_program_in_a_container_is_served_through_the_musl_library() {
    if !needs("a_musl_program_in_a_container_is_served_through_the_musl_library") {
        return;
    }
    let ns = Ns::new("sl").with_veth(114);
    let port = free_port();
    let srv = PyServer::start("198.18.114.1", port);
    let d = Daemon::with_config(&format!("[[pool]]\ndestination = \"198.18.114.1:{port}\"\npolicy = \"reuse\"\nprotocol = \"http\"\nmin_idle = 1\n"));
    let c = Container::start(&ns, &Via::Library(&d), "l");
    let before = handouts(&d);
    for i in 0..4 {
        let o = c.exec(&["/bin/http_get", "198.18.114.1", &port.to_string(), &format!("/lib{i}")]);
        let o = ok(o, "http_get under the musl library");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "200", "invocation {i}");
        assert!(o.stderr.is_empty(), "invocation {i} printed: {}", String::from_utf8_lossy(&o.stderr));
        settled(&d);
    }
    assert!(handouts(&d) - before >= 2.0, "pooled hand-outs: {}\n{}", handouts(&d) - before, d.metrics());
    assert_eq!(container_pools(&d, &c.id), 1, "no pool of the container's tenant\n{}", d.metrics());
    let reqs = srv.request_peers();
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    assert!(reqs.iter().all(|(a, _)| a == "198.18.114.2"), "{reqs:?}");
    assert!(reqs.iter().map(|(_, p)| p).collect::<HashSet<_>>().len() <= 2, "{reqs:?}");
}
