//! Why a `connect()` ran as the program asked instead of on a pooled socket: a *bypass*,
//! with a name for every reason and a count per reason.
//!
//! Every way out of the pooled path of `connect()` ([`crate::hooks`], [`crate::client`],
//! [`crate::sockopt`]) returns a [`Bypass`]; the interposed `connect()` then counts it here
//! (one relaxed `AtomicU64` add: no allocation, no lock, fork- and signal-safe), prints one
//! short `WARMPOOL_LOG` line naming it, and runs the real call. A process reads its counts
//! with `warmpool_bypass_count(name)` (exported below), or sees them all in one line at a
//! normal exit with `WARMPOOL_LOG=totals` (only the totals) or `WARMPOOL_LOG=all` (lines
//! and totals). A `fork` child starts from zero; a `vfork` child counts into its parent's
//! memory (it runs on it).
//!
//! The counts stay in the process: they are not sent to the pool manager. Many bypasses
//! mean that the daemon cannot be reached or does not answer sensibly, which is when a
//! report to it could not arrive; `_exit` and fatal signals skip the exit path; and the wire
//! would need a message of its own for numbers the program can read itself.
//!
//! What is *not* a bypass: the close path (`close`, `dup2` onto, `close_range`) always runs
//! the real call and never asks the daemon, it only decides how a lease ends; a `vfork`
//! child's close leaves its parent's leases alone on purpose ([`crate::owner`]). Giving
//! offers and leases back at exit or `execve` is best effort and counted nowhere.
//! `warmpool_connect_peer` fails with `ENOTCONN` where `connect()` would bypass: its reason
//! is logged, not counted.

use crate::log::wlog;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use wire::{Dest, MissReason};

/// Defines [`Bypass`], its names and [`Bypass::ALL`] from one list, so the three cannot
/// disagree.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $variant:ident = $name:literal,)+) => {
        /// Why the shim let the program's own `connect()` run. The name (the string after
        /// `=`) is what `WARMPOOL_LOG` prints and what `warmpool_bypass_count` takes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Bypass {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Bypass {
            /// Every reason, in declaration order (the counter index).
            pub(crate) const ALL: &'static [Bypass] = &[$(Bypass::$variant,)+];

            /// The reason's name, as logged and as `warmpool_bypass_count` takes it.
            pub(crate) const fn name(self) -> &'static str {
                match self {
                    $(Bypass::$variant => $name,)+
                }
            }
        }
    };
}

reasons! {
    /// The shim is off: `WARMPOOL_DISABLE=1`, a setuid program, the pool manager itself, or
    /// a `WARMPOOL_SOCKET` no `sockaddr_un` can hold.
    Off = "off",
    /// `connect()` was called from inside the shim on the same thread (a signal handler that
    /// interrupted it, or a library the shim itself called).
    Reentrant = "reentrant",
    /// The shim panicked (a bug); the panic was caught.
    Panic = "panic",
    /// A process that does not own the shim's state asked: a `vfork` child, or a child made
    /// without fork handlers (a raw `clone`/`fork` system call).
    Guest = "guest",
    /// Not an IPv4/IPv6 address (Unix, `AF_UNSPEC`, a short or null address).
    NotInet = "not_inet",
    /// Not a TCP stream socket in state CLOSE: UDP, MPTCP/SCTP, a listening socket, or one
    /// already connecting (a second `connect()` of a non-blocking client).
    NotFreshTcp = "not_fresh_tcp",
    /// The program connected the shim's own link to the daemon.
    Link = "link",
    /// A `connect()` on a pooled socket: the same address (learning the result: `EISCONN`)
    /// keeps the lease, any other ends it first, as not reusable.
    Leased = "leased",
    /// The program bound the socket (a source address or port) or the families differ.
    Bound = "bound",
    /// `SO_RCVBUF`/`SO_SNDBUF` (or their `FORCE` forms) were set: autotuning is off for good.
    BufferSize = "buffer_size",
    /// `TCP_MAXSEG` was set.
    Maxseg = "maxseg",
    /// `TCP_WINDOW_CLAMP` was set.
    WindowClamp = "window_clamp",
    /// `TCP_MD5SIG`/`TCP_MD5SIG_EXT` keys were set.
    Md5sig = "md5sig",
    /// A ULP (`TCP_ULP`) was set.
    Ulp = "ulp",
    /// `TCP_REPAIR` was set.
    Repair = "repair",
    /// `SO_BINDTODEVICE` is set.
    BindToDevice = "bindtodevice",
    /// `SO_MARK` is set.
    Mark = "mark",
    /// `IP_TRANSPARENT`/`IPV6_TRANSPARENT` is set.
    Transparent = "transparent",
    /// `IP_FREEBIND`/`IPV6_FREEBIND` is set.
    Freebind = "freebind",
    /// `TCP_FASTOPEN_CONNECT` is set.
    FastopenConnect = "fastopen_connect",
    /// The program chose another congestion control than the pooled socket runs (the
    /// granted socket goes back to its pool unused).
    Congestion = "congestion",
    /// `WARMPOOL_PASSTHROUGH=1`: intercept, never ask.
    Passthrough = "passthrough",
    /// The fd number is beyond what the lease table holds (65536 and up).
    FdRange = "fd_range",
    /// The program's fd went away or changed while the daemon answered (another thread
    /// closed it); the granted socket goes back as not reusable.
    FdChanged = "fd_changed",
    /// The daemon failed within the last second: running without it for a while.
    Backoff = "backoff",
    /// No pool manager listens on `WARMPOOL_SOCKET`.
    Unreachable = "unreachable",
    /// The request could not be sent (the daemon closed the link).
    SendFailed = "send_failed",
    /// No answer within `WARMPOOL_TIMEOUT_MS`.
    Timeout = "timeout",
    /// Receiving the answer failed otherwise (`EINTR`: a signal arrived meanwhile).
    RecvFailed = "recv_failed",
    /// The daemon closed the link instead of answering.
    DaemonClosed = "daemon_closed",
    /// The answer's file descriptors did not fit (`MSG_CTRUNC`).
    Truncated = "truncated",
    /// The answer is not a message of this protocol (bad magic, version, kind or length).
    Malformed = "malformed",
    /// Only answers to other requests came (four of them), or an offer out of turn.
    WrongSeq = "wrong_seq",
    /// A well-formed message that does not answer the request (a `StatusReply`, ...).
    Unexpected = "unexpected",
    /// The daemon said `Miss(Pending)` and never finished.
    PendingTimeout = "pending_timeout",
    /// `Miss(Empty)`: the destination is pooled, nothing idle is ready.
    Empty = "empty",
    /// `Miss(NotPooled)`: the daemon pools nothing for this destination.
    NotPooled = "not_pooled",
    /// `Miss(AtLimit)`: the pool is at `max_per_destination`.
    AtLimit = "at_limit",
    /// The daemon answered `Miss` with a `retry_after_ms` recently (it pools nothing for
    /// this destination): not asked again until then.
    CachedMiss = "cached_miss",
    /// The daemon answered `Error` (its text is in the `WARMPOOL_LOG` output).
    DaemonError = "daemon_error",
    /// A `Grant` without a socket attached (its lease goes back).
    NoFd = "no_fd",
    /// A `Grant` whose lease id is 0 or wider than 48 bits (its lease goes back).
    BadLease = "bad_lease",
}

/// How many reasons there are.
const COUNT: usize = Bypass::ALL.len();

/// One counter per reason, indexed by `Bypass as usize`.
static COUNTS: [AtomicU64; COUNT] = [const { AtomicU64::new(0) }; COUNT];

/// Whether to print the totals at exit (`WARMPOOL_LOG=totals` or `all`).
static TOTALS: AtomicBool = AtomicBool::new(false);

impl From<MissReason> for Bypass {
    fn from(r: MissReason) -> Self {
        match r {
            MissReason::Empty => Self::Empty,
            MissReason::NotPooled => Self::NotPooled,
            MissReason::AtLimit => Self::AtLimit,
            // Only a final answer is a bypass; `Pending` that never ends is this.
            MissReason::Pending => Self::PendingTimeout,
        }
    }
}

impl Bypass {
    /// The reason called `name`, if there is one.
    fn by_name(name: &[u8]) -> Option<Self> {
        Self::ALL.iter().copied().find(|b| b.name().as_bytes() == name)
    }

    /// How many `connect()` calls this process let through for this reason.
    pub(crate) fn count(self) -> u64 {
        COUNTS[self as usize].load(Ordering::Relaxed)
    }
}

/// Count one bypass of `connect()` on `fd` for `why` and, with `WARMPOOL_LOG`, print one line
/// naming it (`dest` is only read for that line). No allocation, no lock.
pub(crate) fn note(fd: i32, why: Bypass, dest: impl FnOnce() -> Option<Dest>) {
    COUNTS[why as usize].fetch_add(1, Ordering::Relaxed);
    if crate::log::enabled() {
        match dest() {
            Some(d) => wlog!("fd {fd}: connect to {} passes through: {}", d.socket_addr(), why.name()),
            None => wlog!("fd {fd}: connect passes through: {}", why.name()),
        }
    }
}

/// What `WARMPOOL_LOG` asks for: `(lines, totals)`. `totals`: only the totals at exit;
/// `all`: both; any other value but empty and `0`: the lines.
pub(crate) fn log_mode(v: Option<&[u8]>) -> (bool, bool) {
    match v {
        None | Some(b"" | b"0") => (false, false),
        Some(b"totals") => (false, true),
        Some(b"all") => (true, true),
        Some(_) => (true, false),
    }
}

/// Print the totals at exit (set at load time from `WARMPOOL_LOG`).
pub(crate) fn set_totals(on: bool) {
    TOTALS.store(on, Ordering::Relaxed);
}

/// Every non-zero count as `name=n`, space-separated (the exit line).
struct Totals;

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut all = 0;
        for b in Bypass::ALL {
            let n = b.count();
            if n != 0 {
                write!(f, " {}={n}", b.name())?;
                all += n;
            }
        }
        write!(f, " (total {all})")
    }
}

/// At exit, with `WARMPOOL_LOG=totals` or `all`: one line with every non-zero count.
/// Whether `WARMPOOL_LOG` asked for the totals at exit.
pub(crate) fn totals_wanted() -> bool {
    TOTALS.load(Ordering::Relaxed)
}

pub(crate) fn print_totals() {
    if TOTALS.load(Ordering::Relaxed) {
        crate::log::emit_sized::<1024>(format_args!("bypass totals:{Totals}"));
    }
}

extern "C" fn after_fork_child() {
    for c in &COUNTS {
        c.store(0, Ordering::Relaxed);
    }
}

/// A `fork` child counts its own bypasses from zero.
pub(crate) fn install_fork_handler() {
    crate::sys::atfork(None, None, Some(after_fork_child));
}

/// `long long warmpool_bypass_count(const char *name)`: how many `connect()` calls this
/// process let run on its own for the reason `name` (see the README's troubleshooting
/// list), or for all reasons together when `name` is NULL; -1 for an unknown name.
/// Lock-free; callable from anywhere, the shim on or off.
///
/// # Safety
/// `name` must be NULL or point to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn warmpool_bypass_count(name: *const libc::c_char) -> libc::c_longlong {
    let n = if name.is_null() {
        Bypass::ALL.iter().map(|b| b.count()).sum()
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        match Bypass::by_name(unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes()) {
            Some(b) => b.count(),
            None => return -1,
        }
    };
    libc::c_longlong::try_from(n).unwrap_or(libc::c_longlong::MAX)
}

impl From<&wire::client::ClientError> for Bypass {
    fn from(e: &wire::client::ClientError) -> Self {
        use wire::client::ClientError as E;
        match e {
            E::PathTooLong { .. } | E::Connect(_) => Self::Unreachable,
            E::Send(_) | E::TooLong => Self::SendFailed,
            E::Recv(io) if io.kind() == std::io::ErrorKind::WouldBlock => Self::Timeout,
            E::Recv(_) => Self::RecvFailed,
            E::Closed => Self::DaemonClosed,
            E::Truncated | E::ExtraFds => Self::Truncated,
            E::Decode(wire::DecodeError::BadLease) => Self::BadLease,
            E::Decode(_) => Self::Malformed,
            E::Stale { .. } => Self::WrongSeq,
            E::PendingTimeout => Self::PendingTimeout,
            E::Unexpected(_) => Self::Unexpected,
            _ => Self::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, b) in Bypass::ALL.iter().enumerate() {
            assert_eq!(*b as usize, i, "ALL is in declaration order");
            assert_eq!(Bypass::by_name(b.name().as_bytes()), Some(*b));
        }
        assert_eq!(Bypass::by_name(b"nonsense"), None);
    }

    #[test]
    fn log_modes() {
        assert_eq!(log_mode(None), (false, false));
        assert_eq!(log_mode(Some(b"0")), (false, false));
        assert_eq!(log_mode(Some(b"1")), (true, false));
        assert_eq!(log_mode(Some(b"totals")), (false, true));
        assert_eq!(log_mode(Some(b"all")), (true, true));
    }
}
