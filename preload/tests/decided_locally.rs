//! Bypasses the shim decides without asking the pool manager (the socket, its options, its
//! fd number, the process, the thread), and the ones that need another thread or a signal:
//! each counted under its name and the program's own `connect()` still runs.

mod common;

use common::{python, require_root, run, FakeDaemon, Got, Scratch, Server, IMPLICIT, LIMIT};
use std::os::fd::AsRawFd;
use std::process::Command;

/// Sockets and options that decide a bypass before the daemon is asked. `(reason, python
/// setup of socket s)`; the ones after `ROOT_FROM` need root.
const LOCAL: [(&str, &str); 13] = [
    ("buffer_size", "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)"),
    ("maxseg", "s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)"),
    ("window_clamp", "s.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 65536)"),
    ("md5sig", "s.setsockopt(socket.IPPROTO_TCP, 14, md5sig())"),
    ("freebind", "s.setsockopt(socket.IPPROTO_IP, 15, 1)"),
    ("fastopen_connect", "s.setsockopt(socket.IPPROTO_TCP, 30, 1)"),
    ("bound", "s.bind(('127.0.0.1', 0))"),
    ("not_fresh_tcp", "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"),
    // root from here
    ("mark", "s.setsockopt(socket.SOL_SOCKET, 36, 7)"),
    ("bindtodevice", "s.setsockopt(socket.SOL_SOCKET, 25, b'lo')"),
    ("transparent", "s.setsockopt(socket.IPPROTO_IP, 19, 1)"),
    ("repair", "s.setsockopt(socket.IPPROTO_TCP, 19, 1)"),
    ("buffer_size", "s.setsockopt(socket.SOL_SOCKET, 32, 65536)"),
];
const ROOT_FROM: usize = 8;

#[test]
fn decided_before_asking() {
    let root = require_root("decided_before_asking (the root-only options)");
    let cases = if root { &LOCAL[..] } else { &LOCAL[..ROOT_FROM] };
    let mut script = String::from(
        r#"
def md5sig():
    sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", ADDR[1]) + socket.inet_aton(ADDR[0])
    return sa.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, 4, 0) + b"key!".ljust(80, b"\0")
def case(name, setup):
    s = socket.socket()
    s = setup(s) or s
    s.setblocking(False)
    before = count(name)
    s.connect_ex(ADDR)
    out(name + str(before), count(name) - before)
    s.close()
u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
u.connect_ex("/nonexistent/warmpool-test.sock")
out("not_inet", count("not_inet"))
# The program connects the shim's own link (fd 512, opened at load time) somewhere.
sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", ADDR[1]) + socket.inet_aton(ADDR[0]) + bytes(8)
out("link_rc", ctypes.CDLL(None).connect(512, sa, 16))
out("link", count("link"))
"#,
    );
    for (name, setup) in cases {
        // `setup` either changes s in place or (not_fresh_tcp) makes another socket.
        let body = setup.strip_prefix("s = ").map_or_else(|| format!("{setup}; return s"), |e| format!("return {e}"));
        script.push_str(&format!("def setup_{name}(s):\n    {body}\ncase('{name}', setup_{name})\n"));
    }
    script.push_str("out('total', count())\n");
    let server = Server::start();
    let d = FakeDaemon::start(|_| {});
    let r = python(&script, Some(&d.path), &server, &[]);
    assert!(r.status.success(), "{r}");
    assert_eq!((r.field("not_inet"), r.field("link"), r.field("link_rc")), ("1", "1", "-1"), "{r}");
    let mut seen = std::collections::HashMap::new();
    for (name, _) in cases {
        let before = seen.entry(*name).or_insert(0);
        assert_eq!(r.field(&format!("{name}{before}")), "1", "{name}: one bypass\n{r}");
        *before += 1;
    }
    assert_eq!(r.field("total"), (cases.len() + 2).to_string(), "nothing else was bypassed\n{r}");
    assert_eq!(r.logged("link"), 1, "{r}");
    assert_eq!(r.logged("bound"), 1, "{r}");
    assert!(d.got().is_empty(), "decided without asking: {:?}", d.got());
}

/// An fd number the lease table cannot hold (65536 and up) is never pooled.
#[test]
fn fd_beyond_the_table_is_not_pooled() {
    if !require_root("fd_beyond_the_table_is_not_pooled") {
        return;
    }
    let server = Server::start();
    let d = FakeDaemon::start(|_| {});
    let script = r#"
import resource
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (70000, 70000))
except ValueError:
    out("skip", "no CAP_SYS_RESOURCE to raise RLIMIT_NOFILE"); sys.exit(0)
s0 = socket.socket(); os.dup2(s0.fileno(), 66000); s0.close()
s = socket.socket(fileno=66000)
s.connect(ADDR); s.sendall(b"x"); out("local", local(s))
out("fd_range", count("fd_range")); out("total", count())
"#;
    let r = python(script, Some(&d.path), &server, &[]);
    assert!(r.status.success(), "{r}");
    if let Some(why) = r.fields.get("skip") {
        // Only a missing CAP_SYS_RESOURCE may stop it (containers without it cap RLIMIT_NOFILE below
        // the table's 65,536 fds); anything else failing to raise the limit is a failure.
        let caps = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let eff = caps.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        assert!(eff.is_some_and(|e| e & (1 << 24) == 0), "RLIMIT_NOFILE not raised although CAP_SYS_RESOURCE is held: {r}");
        eprintln!("SKIP fd_beyond_the_table_is_not_pooled: {why} (this machine withholds CAP_SYS_RESOURCE)");
        return;
    }
    assert_eq!((r.field("fd_range"), r.field("total")), ("1", "1"), "{r}");
    assert_eq!(server.bytes_from(r.field("local"), 1), b"x", "{r}");
    assert!(d.got().is_empty(), "decided without asking: {:?}", d.got());
}

/// A child made without fork handlers (a raw fork system call) is a guest: its connect is
/// its own, and the daemon never hears it speak for the parent.
#[test]
fn a_child_made_without_fork_handlers_is_a_guest() {
    let server = Server::start();
    let d = FakeDaemon::start(|_| {});
    let script = r#"
import platform
libc = ctypes.CDLL(None, use_errno=True)
if platform.machine() == "x86_64":
    pid = libc.syscall(57)  # fork
else:
    pid = libc.syscall(220, 17, 0, 0, 0, 0)  # clone(SIGCHLD)
if pid == 0:
    s = conn(); s.sendall(b"x")
    os.write(1, ("local=%s\nguest=%d\ntotal=%d\n" % (local(s), count("guest"), count())).encode())
    os._exit(0)
_, status = os.waitpid(pid, 0)
out("child_status", status); out("parent_total", count())
"#;
    let r = python(script, Some(&d.path), &server, &[]);
    assert!(r.status.success(), "{r}");
    assert_eq!(r.field("child_status"), "0", "{r}");
    assert_eq!((r.field("guest"), r.field("total"), r.field("parent_total")), ("1", "1", "0"), "{r}");
    assert_eq!(server.bytes_from(r.field("local"), 1), b"x", "{r}");
    assert!(d.got().is_empty(), "the guest never asked: {:?}", d.got());
}

/// Another thread closes the program's fd while the daemon is answering: the granted socket
/// goes back as not reusable and the program's own connect reports the closed fd.
#[test]
fn the_fd_closed_while_the_daemon_answers() {
    let server = Server::start();
    let sock = server.connect();
    let marks = Scratch::new();
    let (asked, closed) = (marks.join("asked"), marks.join("closed"));
    let (asked2, closed2) = (asked.clone(), closed.clone());
    let d = FakeDaemon::start(move |link| {
        let (_, seq) = link.expect_acquire();
        std::fs::create_dir(&asked2).expect("mkdir asked");
        assert!(common::wait_until(LIMIT, || closed2.exists()), "the program never closed its fd");
        link.grant(seq, 41, &[sock.as_raw_fd()]);
    });
    let script = format!(
        r#"
import threading
s = socket.socket(); fd = s.fileno(); res = {{}}
def go():
    try:
        s.connect(ADDR); res["rc"] = 0
    except OSError as e:
        res["rc"] = e.errno
t = threading.Thread(target=go); t.start()
for _ in range(4000):
    if os.path.exists("{asked}"): break
    time.sleep(0.005)
os.close(fd)
os.mkdir("{closed}")
t.join()
out("rc", res["rc"]); out("fd_changed", count("fd_changed")); out("total", count())
"#,
        asked = asked.display(),
        closed = closed.display()
    );
    let r = python(&script, Some(&d.path), &server, &[("WARMPOOL_TIMEOUT_MS", "10000")]);
    let got = d.finish();
    assert!(r.status.success(), "{r}");
    assert_eq!(r.field("rc"), libc::EBADF.to_string(), "the program's own connect ran on its closed fd\n{r}");
    assert_eq!((r.field("fd_changed"), r.field("total")), ("1", "1"), "{r}");
    assert!(got.contains(&Got::Release(41, IMPLICIT)), "the grant went back, not reusable: {got:?}");
}

/// A signal handler's connect() inside the shim's wait is reentrant; the interrupted wait
/// fails with EINTR. Both connects are the program's own.
#[test]
fn a_signal_handler_connects_while_the_shim_waits() {
    let dir = Scratch::new();
    let bin = dir.join("reentrant");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/reentrant.c");
    let cc = Command::new("cc").args(["-O1", "-o"]).arg(&bin).arg(src).arg("-ldl").output().expect("cc");
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let server = Server::start();
    let d = FakeDaemon::start(|link| {
        let _ = link.expect_acquire();
        let pid = link.peer_pid();
        // The program is single-threaded: sleeping now means waiting for our answer.
        let sleeping = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit(") ").next().is_some_and(|t| t.starts_with('S')));
        assert!(common::wait_until(LIMIT, sleeping), "the program never waited");
        // SAFETY: kill with a pid of our own child, which has not exited (it waits for us).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    });
    let mut cmd = Command::new(&bin);
    cmd.arg(server.addr.port().to_string());
    let r = run(cmd, &[("WARMPOOL_SOCKET", d.path.to_str().expect("utf-8")), ("WARMPOOL_TIMEOUT_MS", "10000")]);
    d.finish();
    assert!(r.status.success(), "{r}");
    assert_eq!((r.field("main_rc"), r.field("handler_rc")), ("0", "0"), "{r}");
    assert_eq!((r.field("reentrant"), r.field("recv_failed"), r.field("total")), ("1", "1", "2"), "{r}");
    assert_eq!(server.bytes_from(r.field("local"), 1), b"x", "{r}");
}
