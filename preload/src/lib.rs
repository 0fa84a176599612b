//! `libwarmpool_preload.so`: gives unmodified programs pooled TCP connections.
//!
//! Loaded with `LD_PRELOAD`, it interposes `connect()` and the calls that end or duplicate
//! an fd. For an AF_INET/AF_INET6 stream socket that the program did not bind, `connect()`
//! asks the pool manager over its Unix socket ([`client`]); on a grant the pooled socket is
//! placed on the program's own fd number with `dup3` ([`hooks`]), with the program's
//! `O_NONBLOCK`, `FD_CLOEXEC` and socket options carried over ([`sockopt`]), and the fd is
//! recorded in a lock-free table ([`table`]). `close()` of a recorded fd tells the daemon how
//! the socket was let go; the daemon decides whether it is reused. Sockets still open at a
//! normal exit are let go the same way ([`exit`]). All of this state belongs to one process
//! ([`owner`]): a `vfork` child running on the same memory leaves it alone.
//!
//! Fail open is the rule everywhere: when anything is unexpected (no daemon, a slow daemon,
//! a refusal, a panic, a reentrant call) the real libc function runs with the original
//! arguments: a *bypass*, named and counted ([`bypass`]). Nothing is printed unless
//! `WARMPOOL_LOG` is set.
//!
//! System calls: the interposed functions' next definitions are in [`real`]; every other
//! libc call the library makes is a small safe wrapper in [`sys`] (no allocation, no lock).
//!
//! Environment: `WARMPOOL_SOCKET` (default `/run/warmpool/pool.sock`), `WARMPOOL_DISABLE=1`,
//! `WARMPOOL_LOG=1` (`totals`: the bypass counts at exit; `all`: both), `WARMPOOL_TIMEOUT_MS` (daemon answer bound, default 50),
//! `WARMPOOL_PREFETCH=0` (take no sockets offered at load time), `WARMPOOL_PASSTHROUGH=1`
//! (intercept everything but never ask the daemon: measures the
//! shim's own cost), `WARMPOOL_LAZY=1` (open the daemon link at the first `connect()`
//! even when the daemon prefetches).
//!
//! What every process pays at load is kept to reading the environment (no allocation), one
//! `access()` of the daemon's prefetch hint, and opening its link to the daemon without
//! waiting for anything (the daemon identifies the process meanwhile); offers are asked for
//! only when the hint says a pool prefetches. `WARMPOOL_LAZY=1` opens the link at the first
//! `connect()` instead.

pub mod bypass;
mod client;
mod exit;
pub mod hooks;
mod log;
mod owner;
mod real;
mod sockopt;
mod sys;
mod table;

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::OnceLock;
use sys::getenv as env;

/// Runtime settings read once from the environment at load time.
#[derive(Debug)]
struct Settings {
    /// The socket path, NUL-terminated, as a `sockaddr_un` wants it (fixed size: nothing
    /// here allocates, so a process that never connects never initialises malloc for us).
    socket_path: [u8; SUN_PATH],
    /// Its length without the NUL.
    socket_len: usize,
    /// Bound on a daemon answer.
    timeout_ms: u32,
    /// Intercept but never ask the daemon.
    passthrough: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
/// Set when the shim must do nothing at all (disabled, setuid, not initialised).
static OFF: AtomicBool = AtomicBool::new(true);
static LOG: AtomicBool = AtomicBool::new(false);

/// What the load writes and a process's first pooled `connect()` touches, in one page: the
/// load's write of the owner's pid makes the page present, so recording the first lease on a
/// low fd number costs no page fault. (With the table in its own pages, that first lease cost
/// a read fault on the zero page and then a copy-on-write fault: about 10 µs of the first
/// pooled `connect()` on the 2-vCPU VM.)
#[repr(C, align(4096))]
struct Hot {
    /// The pid of the process the state belongs to ([`owner`]).
    owner: AtomicI32,
    /// Process-wide count of fds currently leased (skips table scans when zero).
    active: AtomicU32,
    /// The lease table's entries for fds below [`table::FRONT`].
    front: [table::Entry; table::FRONT],
}
const _: () = assert!(std::mem::size_of::<Hot>() == 4096, "the hot state is one page");

static HOT: Hot = Hot { owner: AtomicI32::new(0), active: AtomicU32::new(0), front: [const { table::Entry::empty() }; table::FRONT] };

/// `sizeof(sockaddr_un.sun_path)`.
const SUN_PATH: usize = 108;
/// What the daemon appends to its socket path for the prefetch hint (see
/// `pool_manager::config::prefetch_hint_path`).
const PREFETCH_HINT_SUFFIX: &[u8] = b".prefetch";
const DEFAULT_SOCKET: &str = "/run/warmpool/pool.sock";
const DEFAULT_TIMEOUT_MS: u32 = 50;

fn truthy(v: Option<&[u8]>) -> bool {
    matches!(v, Some(b) if !b.is_empty() && b != b"0")
}

/// The pool manager must never ask itself for sockets (a preload environment inherited by
/// the daemon, e.g. from `pool-manager exec`, would otherwise loop through its own socket).
/// The file name the kernel executed (`AT_EXECFN`, in the auxiliary vector: no system call;
/// `readlink("/proc/self/exe")` cost every process about 15 µs).
fn is_the_daemon() -> bool {
    sys::execfn().is_some_and(|name| name.rsplit(|b| *b == b'/').next() == Some(b"pool-manager".as_slice()))
}

/// Whether the daemon behind `path` has a prefetching pool (its hint file exists): one
/// `access()`, no allocation.
fn daemon_prefetches(path: &[u8]) -> bool {
    let mut hint = [0u8; SUN_PATH + 16];
    let n = path.len();
    if n + PREFETCH_HINT_SUFFIX.len() >= hint.len() {
        return false;
    }
    hint[..n].copy_from_slice(path);
    hint[n..n + PREFETCH_HINT_SUFFIX.len()].copy_from_slice(PREFETCH_HINT_SUFFIX);
    // NUL-terminated: zero-filled beyond what we copied.
    CStr::from_bytes_until_nul(&hint).is_ok_and(sys::exists)
}

extern "C" fn init() {
    let _ = std::panic::catch_unwind(init_inner);
}

fn init_inner() {
    if sys::secure_execution() || is_the_daemon() {
        return; // not even a log line: a setuid program, or the daemon's own connects
    }
    let (lines, totals) = bypass::log_mode(env(c"WARMPOOL_LOG"));
    LOG.store(lines, Ordering::Relaxed);
    bypass::set_totals(totals);
    if truthy(env(c"WARMPOOL_DISABLE")) {
        return;
    }
    real::resolve();
    let path = env(c"WARMPOOL_SOCKET").unwrap_or(DEFAULT_SOCKET.as_bytes());
    if path.is_empty() || path.len() >= SUN_PATH {
        return; // a path no sockaddr_un can hold: the shim stays off
    }
    let mut socket_path = [0u8; SUN_PATH];
    socket_path[..path.len()].copy_from_slice(path);
    let socket_len = path.len();
    let timeout_ms = env(c"WARMPOOL_TIMEOUT_MS")
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(DEFAULT_TIMEOUT_MS)
        .clamp(1, 10_000);
    let passthrough = truthy(env(c"WARMPOOL_PASSTHROUGH"));
    if SETTINGS.set(Settings { socket_path, socket_len, timeout_ms, passthrough }).is_err() {
        return;
    }
    owner::claim();
    client::install_fork_handlers();
    bypass::install_fork_handler();
    OFF.store(false, Ordering::Release);
    // The link opens at load time, so that the daemon identifies this process (pidfd,
    // cgroup, network namespace) while the program starts rather than inside its first
    // connect(): opened lazily, that cost the first connect() about 180 µs on a 2-vCPU VM.
    // Offers are asked for only when the daemon has a prefetching pool (its hint).
    // WARMPOOL_LAZY=1: link at the first connect() instead (a process that never connects
    // then costs the daemon nothing).
    if !passthrough && !truthy(env(c"WARMPOOL_LAZY")) {
        // WARMPOOL_PREFETCH=0: open the link, but take no offers.
        client::open_early(daemon_prefetches(path) && env(c"WARMPOOL_PREFETCH") != Some(b"0".as_slice()));
    }
}

/// Runs at exit (`exit()` or a return from `main`; not `_exit` or a fatal signal): offers
/// the program never used and sockets it still holds go back to the daemon ([`exit`]);
/// then the bypass totals, if `WARMPOOL_LOG` asks for them (not in a guest: [`owner`]).
extern "C" fn fini() {
    let off = OFF.load(Ordering::Acquire);
    if !off {
        let _ = std::panic::catch_unwind(client::release_unused_offers);
        let _ = std::panic::catch_unwind(exit::give_back_leases);
    }
    // The owner's `getpid` only when the totals are asked for.
    if bypass::totals_wanted() && (off || owner::is_owner()) {
        let _ = std::panic::catch_unwind(bypass::print_totals);
    }
}

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = fini;

/// Runs at load time, before `main` and before most other constructors.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
