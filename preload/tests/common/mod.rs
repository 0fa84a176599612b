//! The preload library against a fake pool manager: the test's own thread serves the
//! shim's `SOCK_SEQPACKET` link and answers what each test scripts (a grant of a socket it
//! connected itself, a miss, garbage, silence, ...), a local TCP server records which
//! connections really arrived and what they carried, and a small program (`/usr/bin/python3`,
//! or a C client) runs with the built `libwarmpool_preload.so` in `LD_PRELOAD`.
//!
//! Every wait is bounded: the fake daemon gives up after [`LIMIT`], programs are killed
//! (by PID, through their `Child`) after [`LIMIT`].
#![allow(dead_code, unreachable_pub, missing_debug_implementations)]

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use wire::{Dest, Msg};

/// Bound on every wait in these tests.
pub const LIMIT: Duration = Duration::from_secs(20);
/// The system's Python (not a pyenv shim: a shell script would load the shim too).
pub const PYTHON: &str = "/usr/bin/python3";

/// True when running under CI (`CI=true`, `1` or `yes`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// Whether a test that needs root may run: outside CI a non-root run is skipped (said on
/// stderr); in CI it fails.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    assert!(!in_ci(), "{test}: must run as root in CI (euid={euid})");
    eprintln!("SKIP {test}: requires root (euid={euid})");
    false
}

/// The preload library of this build (`target/<profile>/libwarmpool_preload.so`, beside the
/// `deps` directory holding this test).
pub fn preload_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let p = dir.join("libwarmpool_preload.so");
    assert!(p.is_file(), "{} is missing: cargo build --release --workspace", p.display());
    // `cargo test` does not rebuild a cdylib for its integration tests: refuse a stale one.
    let built = std::fs::metadata(&p).and_then(|m| m.modified()).expect("mtime of the library");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [root.join("src"), root.join("../wire/src")] {
        for e in std::fs::read_dir(&dir).expect("read_dir src").flatten() {
            let changed = e.metadata().and_then(|m| m.modified()).expect("mtime of a source");
            assert!(changed <= built, "{} is older than {}: cargo build --release -p preload", p.display(), e.path().display());
        }
    }
    p
}

/// Polls `f` every 5 ms until it is true or `timeout` passes; the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A scratch directory, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("warmpool-preload-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir scratch");
        Scratch(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// The fake pool manager
// ---------------------------------------------------------------------------------------

/// What the shim sent, as the fake daemon saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// `Acquire` and its sequence number.
    Acquire(Dest, u32),
    /// `Release`: lease id (raw, as on the wire) and disposition byte.
    Release(u64, u8),
    /// Any other kind (its kind byte).
    Other(u8),
}

/// `Disposition` bytes on the wire.
pub const CLEAN: u8 = 0;
pub const IMPLICIT: u8 = 2;
pub const UNUSED: u8 = 3;

/// Decode what the shim sends: `Release` by hand (its lease stays the raw `u64`, whatever
/// type `wire` gives it), the rest with `wire::decode`.
fn parse(buf: &[u8]) -> Got {
    if buf.len() == 17 && buf[3] == 2 {
        let lease = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        return Got::Release(lease, buf[16]);
    }
    match wire::decode(buf) {
        Ok((Msg::Acquire(d), seq)) => Got::Acquire(d, seq),
        _ => Got::Other(buf.get(3).copied().unwrap_or(0)),
    }
}

/// The daemon's end of one shim link.
pub struct Link {
    fd: Mutex<Option<OwnedFd>>,
    got: Arc<Mutex<Vec<Got>>>,
}

fn poll_in(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

impl Link {
    fn raw(&self) -> Option<RawFd> {
        self.fd.lock().expect("link lock").as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The next message (recorded), or None at EOF, hang-up or after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Got> {
        let fd = self.raw()?;
        if !poll_in(fd, timeout) {
            return None;
        }
        let mut buf = [0u8; 512];
        let r = wire::unix::recv(fd, &mut buf, 0).ok()?;
        if r.len == 0 {
            return None;
        }
        let g = parse(&buf[..r.len]);
        self.got.lock().expect("got lock").push(g.clone());
        Some(g)
    }

    /// The next `Acquire` (anything else before it is recorded and skipped); panics after [`LIMIT`].
    pub fn expect_acquire(&self) -> (Dest, u32) {
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            match self.recv(deadline - Instant::now()) {
                Some(Got::Acquire(d, seq)) => return (d, seq),
                Some(_) => {}
                None => break,
            }
        }
        panic!("the shim sent no Acquire");
    }

    /// Send `bytes` as one datagram with `fds` attached (any number: the shim takes one).
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) {
        let fd = self.raw().expect("link is open");
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        let mut cbuf = [0u64; 32];
        // SAFETY: msghdr is plain old data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data = std::mem::size_of_val(fds) as u32;
            // SAFETY: pure size computations.
            let space = unsafe { libc::CMSG_SPACE(data) } as usize;
            assert!(space <= std::mem::size_of_val(&cbuf), "too many fds for the control buffer");
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer holds `space` bytes, aligned for cmsghdr.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
            }
        }
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        assert_eq!(n, bytes.len() as isize, "sendmsg: {}", std::io::Error::last_os_error());
    }

    /// Send `msg` (encoded by `wire`) with `seq`.
    pub fn send(&self, msg: &Msg<'_>, seq: u32) {
        let mut buf = [0u8; 512];
        let n = wire::encode(msg, seq, &mut buf);
        self.send_raw(&buf[..n], &[]);
    }

    /// A `Grant` of `lease` (raw: any `u64`, valid or not) with `fds` attached.
    pub fn grant(&self, seq: u32, lease: u64, fds: &[RawFd]) {
        let mut b = [0u8; 17];
        b[..2].copy_from_slice(&wire::MAGIC.to_le_bytes());
        b[2] = wire::VERSION;
        b[3] = wire::Kind::Grant as u8;
        b[4..8].copy_from_slice(&seq.to_le_bytes());
        b[8..16].copy_from_slice(&lease.to_le_bytes());
        b[16] = wire::Source::Warm as u8;
        self.send_raw(&b, fds);
    }

    /// A `Miss` for `reason` with `retry_after_ms`.
    pub fn miss(&self, seq: u32, reason: wire::MissReason, retry_after_ms: u32) {
        self.send(&Msg::Miss { reason, retry_after_ms }, seq);
    }

    /// The pid of the process at the other end (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> i32 {
        let fd = self.raw().expect("link is open");
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED into a ucred of the given length.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
        assert_eq!(r, 0, "SO_PEERCRED: {}", std::io::Error::last_os_error());
        cred.pid
    }

    /// Close the link (the shim sees EOF or `EPIPE`).
    pub fn hang_up(&self) {
        self.fd.lock().expect("link lock").take();
    }
}

/// A fake pool manager listening on a path: accepts one link and runs a script on it, then
/// records whatever else comes (releases) until the shim's process closes the link.
pub struct FakeDaemon {
    pub path: PathBuf,
    got: Arc<Mutex<Vec<Got>>>,
    thread: Option<JoinHandle<()>>,
    _dir: Scratch,
}

fn seqpacket_listener(path: &Path) -> OwnedFd {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket creation; owned at once.
    let fd = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)) };
    // SAFETY: sockaddr_un is plain old data.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sun.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: binding and listening on our own socket with a valid address.
    let ok = unsafe { libc::bind(fd.as_raw_fd(), (&sun as *const libc::sockaddr_un).cast(), len) == 0 && libc::listen(fd.as_raw_fd(), 8) == 0 };
    assert!(ok, "bind {}: {}", path.display(), std::io::Error::last_os_error());
    fd
}

impl FakeDaemon {
    /// Listen, and run `script` on the first link the shim opens.
    pub fn start(script: impl FnOnce(&Link) + Send + 'static) -> FakeDaemon {
        let dir = Scratch::new();
        let path = dir.join("pool.sock");
        let listener = seqpacket_listener(&path);
        let got = Arc::new(Mutex::new(Vec::new()));
        let got2 = Arc::clone(&got);
        let thread = thread::spawn(move || {
            if !poll_in(listener.as_raw_fd(), LIMIT) {
                return; // the shim never came: the test's own assertions say so
            }
            // SAFETY: accept on our listener; the fd is owned at once.
            let fd = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
            assert!(fd >= 0, "accept: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh fd from accept.
            let link = Link { fd: Mutex::new(Some(unsafe { OwnedFd::from_raw_fd(fd) })), got: got2 };
            script(&link);
            let deadline = Instant::now() + LIMIT;
            while Instant::now() < deadline && link.recv(deadline - Instant::now()).is_some() {}
        });
        FakeDaemon { path, got, thread: Some(thread), _dir: dir }
    }

    /// Make the daemon's prefetch hint (`<socket>.prefetch`): the shim then sends `Prefetch`
    /// at load time and reads its answer before its first request.
    pub fn hint_prefetch(&self) {
        let mut hint = self.path.clone().into_os_string();
        hint.push(".prefetch");
        std::fs::write(hint, b"").expect("write the prefetch hint");
    }

    /// Everything recorded so far.
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().expect("got lock").clone()
    }

    /// Wait for the daemon thread (the script's panics fail the test) and return what it saw.
    pub fn finish(mut self) -> Vec<Got> {
        if let Some(t) = self.thread.take() {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        self.got()
    }

    /// How many `Acquire`s arrived.
    pub fn acquires(got: &[Got]) -> usize {
        got.iter().filter(|g| matches!(g, Got::Acquire(..))).count()
    }
}

// ---------------------------------------------------------------------------------------
// A TCP server that records what reached it
// ---------------------------------------------------------------------------------------

/// Each connection a [`Server`] accepted: its peer address and the bytes it carried.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A loopback TCP server: records each connection's peer address and the bytes it carried
/// up to EOF.
pub struct Server {
    pub addr: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = l.local_addr().expect("local_addr");
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if !poll_in(l.as_raw_fd(), Duration::from_millis(50)) {
                    continue;
                }
                let Ok((mut c, peer)) = l.accept() else { continue };
                let i = {
                    let mut s = seen2.lock().expect("seen lock");
                    s.push((peer, Vec::new()));
                    s.len() - 1
                };
                let seen3 = Arc::clone(&seen2);
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(LIMIT));
                    let mut buf = [0u8; 256];
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        seen3.lock().expect("seen lock")[i].1.extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Server { addr, seen, stop, thread: Some(thread) }
    }

    /// Each connection so far: (peer address, bytes received).
    pub fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// The bytes that came from `peer`, once `want` of them have arrived (bounded wait).
    pub fn bytes_from(&self, peer: &str, want: usize) -> Vec<u8> {
        let find = || self.seen().into_iter().find(|(p, _)| p.to_string() == peer).map(|(_, b)| b).unwrap_or_default();
        wait_until(LIMIT, || find().len() >= want);
        find()
    }

    /// A connection the daemon makes itself (to grant it).
    pub fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).expect("connect to the test server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Programs under the shim
// ---------------------------------------------------------------------------------------

/// A finished program: its `key=value` lines, its stderr (the `WARMPOOL_LOG` lines).
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub fields: HashMap<String, String>,
}

impl Run {
    /// The value printed as `key=value`; panics (with the whole output) if there is none.
    pub fn field(&self, key: &str) -> &str {
        self.fields.get(key).map_or_else(|| panic!("no {key}= in the output\n{self}"), String::as_str)
    }

    /// How many `WARMPOOL_LOG` lines name `reason` as a bypass.
    pub fn logged(&self, reason: &str) -> usize {
        let tail = format!("passes through: {reason}");
        self.stderr.lines().filter(|l| l.ends_with(&tail)).count()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status: {}\n--- stdout ---\n{}--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Run `cmd` with the shim (`LD_PRELOAD`), `WARMPOOL_LOG=1` and `envs` in an otherwise empty
/// environment; killed after [`LIMIT`].
pub fn run(mut cmd: Command, envs: &[(&str, &str)]) -> Run {
    cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LD_PRELOAD", preload_path()).env("WARMPOOL_LOG", "1");
    cmd.envs(envs.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the program");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().expect("stdout reader");
    let stderr = t_err.join().expect("stderr reader");
    let fields = stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    Run { status, stdout, stderr, fields }
}

/// What every Python program starts with: `count(name)` reads the shim's counter,
/// `ADDR` is the test server, `out(k, v)` prints a field, `conn()` connects to `ADDR`.
const PRELUDE: &str = r#"
import ctypes, errno, os, select, socket, struct, sys, time
_lib = ctypes.CDLL(None)
_lib.warmpool_bypass_count.restype = ctypes.c_longlong
_lib.warmpool_bypass_count.argtypes = [ctypes.c_char_p]
def count(name=None):
    return _lib.warmpool_bypass_count(None if name is None else name.encode())
ADDR = ("127.0.0.1", int(os.environ["TARGET_PORT"]))
def out(k, v):
    print(f"{k}={v}", flush=True)
def conn():
    s = socket.socket()
    s.connect(ADDR)
    return s
def local(s):
    return "%s:%d" % s.getsockname()
"#;

/// Run the Python `script` (after [`PRELUDE`]) under the shim, with the daemon at `socket`
/// (None: a path nothing listens on) and `server` as `ADDR`.
pub fn python(script: &str, socket: Option<&Path>, server: &Server, envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-c").arg(format!("{PRELUDE}\n{script}"));
    let nowhere = std::env::temp_dir().join("warmpool-preload-test-nobody-listens.sock");
    let socket = socket.map_or(nowhere, Path::to_path_buf);
    let port = server.addr.port().to_string();
    let mut all: Vec<(&str, &str)> = vec![("TARGET_PORT", &port), ("WARMPOOL_SOCKET", socket.to_str().expect("utf-8 path"))];
    all.extend_from_slice(envs);
    run(cmd, &all)
}
