//! This process's link to the pool manager: one `SOCK_SEQPACKET` connection, opened on first
//! use, moved to a high fd number and marked close-on-exec.
//!
//! The link itself is a [`wire::client::Link`] over the fd in [`CONN`]: connect, request and
//! answer, stale answers and `Miss(Pending)` are the wire crate's; what is here is the
//! process's side: when to open the link, the lock, back-off, the negative cache, offers and
//! fork. Requests that expect an answer (`Acquire`) hold [`STATE`]'s lock for one round trip,
//! bounded by `SO_RCVTIMEO`/`SO_SNDTIMEO`; any failure drops the connection and backs off, so
//! a missing or stuck daemon costs the program at most one timeout per back-off period.
//! `Release` needs no answer and no lock: a datagram is atomic, so the close path only loads
//! the fd from [`CONN`]. Fork: the lock is taken in the prepare handler so the child never
//! inherits it held; the child forgets the parent's connection and leases, the parent marks
//! its leases shared because the child now holds the same sockets.
//!
//! Prefetch: right after opening the link at load time, the shim sends `Prefetch` and does
//! not wait. The daemon answers with `Offer`s (a socket per destination whose pool
//! prefetches) while the program starts up. The first request reads them (they are queued
//! ahead of any other answer) and keeps them in [`State::offers`]; a `connect()` to an
//! offered destination then takes its socket with no message at all, and it is released
//! like a granted one. Offers live on high, close-on-exec fd numbers; a fork child closes
//! its copies; offers never used are released as `Unused` at exit and before `execve`, so
//! that the daemon pools them again (it checks they carried no byte).

use crate::bypass::Bypass;
use crate::log::wlog;
use crate::sys::{effective_ids as creds, monotonic_coarse_ms as now_ms};
use crate::{owner, real, sys, table, SETTINGS};
use std::cell::RefCell;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use wire::client::{Answer, Link, Options};
use wire::{Dest, Disposition, LeaseId, Msg};

/// The connection fd, or -1. Read without the lock by the close path.
static CONN: AtomicI32 = AtomicI32::new(-1);

/// After a failure, how long to run without the daemon before trying again.
const BACKOFF_MS: u64 = 1000;
/// Negative cache entries ("this destination is not pooled").
const NEG_SLOTS: usize = 32;
/// Set once this process has asked for offers (`Prefetch`): only then can there be offers to
/// give back at exit, so a process that never asked skips even the owner's `getpid` there.
static PREFETCH_ASKED: AtomicBool = AtomicBool::new(false);
/// Keep the link out of the low fd numbers that programs tend to assume are theirs.
const HIGH_FD: i32 = 512;

/// Most offers kept (the daemon sends at most this many).
const OFFER_SLOTS: usize = wire::MAX_OFFERS;

/// The fd of each offer in [`State::offers`] (same index), or -1: read and cleared without
/// the lock by the close path, so that a program that closes or replaces an fd number it
/// does not own (a `closefrom` loop, `dup2` onto it) ends the offer instead of leaving a
/// stale number behind. Whoever swaps a slot from the offer's fd to -1 owns that fd.
static OFFER_FDS: [AtomicI32; OFFER_SLOTS] = [const { AtomicI32::new(-1) }; OFFER_SLOTS];

/// The program is closing or replacing `fd`: if it is one of our offers, the offer ends
/// (closed, never pooled again). Lock-free, allocation-free: the close path.
pub(crate) fn forget_offer(fd: i32) {
    if fd < 0 {
        return;
    }
    for slot in &OFFER_FDS {
        // A plain load first: every close() of every program passes here, and a locked
        // compare-and-swap per slot would cost each of them for nothing.
        if slot.load(Ordering::Relaxed) == fd {
            // The offer is over: the program's own close (or dup2) closes the fd, and the
            // daemon, which never hears of it, closes its lease with the link.
            let _ = slot.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// Whether `fd` is one of our offers (lock-free).
pub(crate) fn is_offer(fd: i32) -> bool {
    fd >= 0 && OFFER_FDS.iter().any(|s| s.load(Ordering::Relaxed) == fd)
}

/// Call `f` with each live offer's fd (lock-free).
pub(crate) fn for_each_offer_fd(mut f: impl FnMut(i32)) {
    for slot in &OFFER_FDS {
        let fd = slot.load(Ordering::Acquire);
        if fd >= 0 {
            f(fd);
        }
    }
}

/// Take slot `i`'s fd if it still holds `fd` (the close path did not end it).
fn claim_offer_fd(i: usize, fd: i32) -> bool {
    OFFER_FDS[i].compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

#[derive(Clone, Copy)]
struct Offer {
    dest: Dest,
    fd: i32,
    lease: LeaseId,
}

#[derive(Clone, Copy)]
struct Neg {
    dest: Dest,
    until_ms: u64,
}

struct State {
    /// Effective uid and gid when the link was opened: the daemon identified us by them.
    creds: (u32, u32),
    seq: u32,
    retry_at_ms: u64,
    neg: [Option<Neg>; NEG_SLOTS],
    neg_next: usize,
    /// The `Prefetch` whose answer has not been read yet (0: none).
    prefetch_seq: u32,
    /// Sockets offered at load time and not used yet (the [`owner`]'s: a `vfork` child
    /// shares this memory, not that process's fds, and must not read or release them).
    offers: [Option<Offer>; OFFER_SLOTS],
}

static STATE: Mutex<State> = Mutex::new(State {
    creds: (u32::MAX, u32::MAX),
    seq: 0,
    retry_at_ms: 0,
    neg: [None; NEG_SLOTS],
    neg_next: 0,
    prefetch_seq: 0,
    offers: [None; OFFER_SLOTS],
});

/// Close every offer still ours. With `give_back`, tell the daemon first that the program
/// never had it (`Release(Unused)`); without, its lease ends with the link. Async-signal-safe
/// without `give_back` (a fork child).
fn close_offers(st: &mut State, give_back: bool) {
    st.prefetch_seq = 0;
    for (i, o) in st.offers.iter_mut().enumerate() {
        if let Some(o) = o.take() {
            if claim_offer_fd(i, o.fd) {
                if give_back {
                    release(o.lease, Disposition::Unused);
                }
                // SAFETY: our own copy of an offered socket, never the program's.
                unsafe { (real::get().close)(o.fd) };
            }
        }
    }
}

thread_local! {
    static FORK_GUARD: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the daemon recently said `dest` is not pooled (no round trip needed).
pub(crate) fn known_unpooled(dest: &Dest) -> bool {
    let st = lock();
    let now = now_ms();
    st.neg.iter().flatten().any(|n| n.dest == *dest && n.until_ms > now)
}

/// Whether `fd` is our link to the daemon (the program must not be allowed to use it).
pub(crate) fn is_link(fd: i32) -> bool {
    fd >= 0 && CONN.load(Ordering::Relaxed) == fd
}

/// The link's fd number, or -1.
pub(crate) fn link_fd() -> i32 {
    CONN.load(Ordering::Relaxed)
}

/// The program closed or replaced our link's fd number: forget it without closing.
pub(crate) fn forget_link(fd: i32) {
    let _ = CONN.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
}

fn drop_link(st: &mut State) {
    // Offers belong to the link they came on (and to the identity it was opened with).
    close_offers(st, false);
    let fd = CONN.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: closing our own link fd through the real close.
        unsafe { (real::get().close)(fd) };
    }
}

fn open_link() -> Option<i32> {
    let settings = SETTINGS.get()?;
    crate::log::quiet_panics();
    let timeout = Some(Duration::from_millis(u64::from(settings.timeout_ms)));
    let opts = Options { timeout, min_fd: Some(HIGH_FD) };
    wire::client::connect(&settings.socket_path[..settings.socket_len], &opts).ok().map(IntoRawFd::into_raw_fd)
}

/// The link over `fd` (from [`CONN`]), continuing `st`'s sequence numbers.
fn link(st: &State, fd: i32) -> Link<BorrowedFd<'static>> {
    // SAFETY: `fd` is our link's: only `drop_link` closes it, and only under STATE's lock,
    // which the caller holds for as long as it uses the link. (A program that closes our
    // number behind our back makes the calls fail, as with any fd it closes under us.)
    Link::with_seq(unsafe { BorrowedFd::borrow_raw(fd) }, st.seq)
}

/// Open the link at load time, so that the daemon identifies this process while the program
/// is still starting up rather than inside its first `connect()`. A failure here costs
/// nothing and sets no back-off: the first `connect()` simply tries again.
pub(crate) fn open_early(prefetch: bool) {
    let mut st = lock();
    if CONN.load(Ordering::Acquire) < 0 {
        if let Some(f) = open_link() {
            st.creds = creds();
            CONN.store(f, Ordering::Release);
            if prefetch {
                send_prefetch(&mut st, f);
            }
        }
    }
}

/// What the daemon said to a request for a socket.
pub(crate) enum Outcome {
    /// A connected socket and its lease.
    Grant(OwnedFd, LeaseId),
    /// Run the program's own call (no daemon, not pooled, nothing ready, any failure).
    Bypass(Bypass),
    /// The daemon took the request on (`Miss(Pending)`: a peer link) and then said no: the
    /// destination exists only through the daemon, so the program's own connect could only
    /// hang. Fail the call with `ECONNREFUSED`.
    Refused,
}

/// Ask the daemon for a socket to `dest`.
pub(crate) fn acquire(dest: &Dest) -> Outcome {
    request(&Msg::Acquire(*dest), Some(dest))
}

/// Ask the daemon for this side's end of a link to the peer `name` on channel `port`.
pub(crate) fn acquire_peer(name: &str, port: u16) -> Outcome {
    request(&Msg::AcquirePeer { port, name }, None)
}

fn request(msg: &Msg<'_>, dest: Option<&Dest>) -> Outcome {
    // A vfork child (or a child without fork handlers) runs on its parent's link and state.
    if !owner::is_owner() {
        return Outcome::Bypass(Bypass::Guest);
    }
    let mut st = lock();
    let now = now_ms();
    let mut fd = CONN.load(Ordering::Acquire);
    // The daemon knows us by the credentials we had when the link was opened (often at load
    // time). A process that changed them since (a server dropping root) must be identified
    // again, or it would be served from its former tenant's pools.
    if fd >= 0 && st.creds != creds() {
        drop_link(&mut st);
        fd = -1;
    }
    if fd < 0 {
        if now < st.retry_at_ms {
            return Outcome::Bypass(Bypass::Backoff);
        }
        match open_link() {
            Some(f) => {
                st.creds = creds();
                CONN.store(f, Ordering::Release);
                fd = f;
            }
            None => {
                st.retry_at_ms = now + BACKOFF_MS;
                wlog!("pool manager not reachable; running without it for {BACKOFF_MS} ms");
                return Outcome::Bypass(Bypass::Unreachable);
            }
        }
    }
    if st.prefetch_seq != 0 {
        match settle_prefetch(&mut st, fd, dest) {
            Ok(Some((sock, lease))) => return Outcome::Grant(sock, lease),
            Ok(None) => {}
            Err(why) => {
                drop_link(&mut st);
                st.retry_at_ms = now + BACKOFF_MS;
                return Outcome::Bypass(why);
            }
        }
    }
    if let Some((sock, lease)) = dest.and_then(|d| take_offer(&mut st, d)) {
        return Outcome::Grant(sock, lease);
    }
    let mut buf = [0u8; 512];
    let mut link = link(&st, fd);
    let answer = link.acquire(msg, &mut buf);
    st.seq = link.seq();
    match answer {
        Ok(Answer::Grant { fd, lease, .. }) => Outcome::Grant(fd, lease),
        Ok(Answer::Miss { reason, retry_after_ms }) => {
            let why = Bypass::from(reason);
            // "Not pooled": remember it so the next connect skips the round trip.
            if let Some(dest) = dest.filter(|_| retry_after_ms > 0) {
                let i = st.neg_next % NEG_SLOTS;
                st.neg[i] = Some(Neg { dest: *dest, until_ms: now + u64::from(retry_after_ms) });
                st.neg_next = st.neg_next.wrapping_add(1);
            }
            Outcome::Bypass(why)
        }
        Ok(Answer::Error { text }) => {
            wlog!("pool manager refused: {text}");
            Outcome::Bypass(Bypass::DaemonError)
        }
        Ok(Answer::NoFd) => Outcome::Bypass(Bypass::NoFd),
        Ok(Answer::Refused { text }) => {
            if let Some(text) = text {
                wlog!("pool manager: {text}");
            }
            Outcome::Refused
        }
        Err(e) => {
            wlog!("pool manager did not answer: {e}");
            let why = Bypass::from(&e);
            drop_link(&mut st);
            st.retry_at_ms = now + BACKOFF_MS;
            Outcome::Bypass(why)
        }
    }
}

/// Send `Prefetch` on a freshly opened link, without waiting for the answer.
fn send_prefetch(st: &mut State, fd: i32) {
    let mut link = link(st, fd);
    let seq = link.next_seq();
    st.seq = seq;
    if link.send(&Msg::Prefetch, seq, None, libc::MSG_DONTWAIT).is_ok() {
        PREFETCH_ASKED.store(true, Ordering::Release);
        st.prefetch_seq = seq;
    }
}

/// Read the answer to our `Prefetch` (it comes before any other) and keep the offers. The
/// first offer for `wanted` (the destination being connected to) is returned as it came, not
/// kept: it goes straight onto the program's fd (no move to a high fd and back). `Err` means
/// the link is unusable.
fn settle_prefetch(st: &mut State, fd: i32, wanted: Option<&Dest>) -> Result<Option<(OwnedFd, LeaseId)>, Bypass> {
    // Room for an `Error`'s text too: a longer answer is refused as truncated.
    let mut buf = [0u8; 512];
    let mut taken = None;
    let link = link(st, fd);
    while st.prefetch_seq != 0 {
        let reply = link.recv(&mut buf).map_err(|e| {
            wlog!("pool manager did not answer: {e}");
            Bypass::from(&e)
        })?;
        if reply.seq != st.prefetch_seq {
            return Err(Bypass::WrongSeq);
        }
        match (reply.msg, reply.fd) {
            (Msg::Offer { lease, dest, last, .. }, Some(sock)) => {
                if last {
                    st.prefetch_seq = 0;
                }
                if taken.is_none() && wanted == Some(&dest) {
                    taken = Some((sock, lease));
                    continue;
                }
                let real = real::get();
                // Out of the program's low fd numbers; close-on-exec came with MSG_CMSG_CLOEXEC.
                // SAFETY: F_DUPFD_CLOEXEC on the fd we were just given; variadic call with one int.
                let high = unsafe { (real.fcntl)(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
                let slot = st.offers.iter().position(Option::is_none);
                match slot {
                    Some(i) if high >= 0 => {
                        st.offers[i] = Some(Offer { dest, fd: high, lease });
                        OFFER_FDS[i].store(high, Ordering::Release);
                    }
                    _ => {
                        if high >= 0 {
                            // SAFETY: the duplicate we just made.
                            unsafe { (real.close)(high) };
                        }
                        // Not kept: the program will never use it (the daemon takes it back).
                    }
                }
            }
            (Msg::Miss { .. } | Msg::Error { .. }, None) => st.prefetch_seq = 0,
            _ => return Err(Bypass::Unexpected),
        }
    }
    Ok(taken)
}

/// The offered socket for `dest`, if the daemon offered one at load time: now the
/// program's, under the offer's lease. No message: the daemon learns it at release.
fn take_offer(st: &mut State, dest: &Dest) -> Option<(OwnedFd, LeaseId)> {
    loop {
        let i = st.offers.iter().position(|o| o.is_some_and(|o| o.dest == *dest))?;
        let o = st.offers[i].take()?;
        if claim_offer_fd(i, o.fd) {
            // SAFETY: the offer's fd is ours and referenced nowhere else.
            return Some((unsafe { OwnedFd::from_raw_fd(o.fd) }, o.lease));
        }
        // The program closed that fd number: the offer is gone; look for another.
    }
}

/// Give every offer the program never had back to the daemon (`Release(Unused)`) and close
/// it: at exit and before `execve`. Only in the process the offers were made to (not in a
/// `vfork` child, which shares this memory), and only if the lock is free (another thread
/// mid-request: the offers then end with the process, closed by the daemon).
pub(crate) fn release_unused_offers() {
    // No link, or a link that never asked for offers (every process when nothing
    // prefetches): no offers either, so nothing to do, not even the owner's `getpid`.
    if CONN.load(Ordering::Acquire) < 0 || !PREFETCH_ASKED.load(Ordering::Acquire) || !owner::is_owner() {
        return;
    }
    let Ok(mut st) = STATE.try_lock() else { return };
    let fd = CONN.load(Ordering::Acquire);
    if st.prefetch_seq != 0 && fd >= 0 {
        // A program that never asked for anything has not read the offers yet (they are
        // normally waiting in the socket; the wait is bounded by the link's timeout).
        if settle_prefetch(&mut st, fd, None).is_err() {
            return;
        }
    }
    close_offers(&mut st, true);
}

/// Tell the daemon a lease ended. No lock, no allocation, no answer; errno is preserved.
pub(crate) fn release(lease: LeaseId, disposition: Disposition) {
    let fd = CONN.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let saved = sys::errno();
    // SAFETY: the link's fd, borrowed for one send; a datagram needs no lock (the module
    // doc), and if the program closed the number meanwhile the send only fails.
    let link = Link::new(unsafe { BorrowedFd::borrow_raw(fd) });
    let _ = link.release(lease, disposition, libc::MSG_DONTWAIT);
    sys::set_errno(saved);
}

extern "C" fn before_fork() {
    let g = lock();
    let _ = FORK_GUARD.try_with(|slot| *slot.borrow_mut() = Some(g));
}

extern "C" fn after_fork_parent() {
    // The child now holds every leased socket too: none of them may be reused.
    table::for_each(table::mark_shared);
    let _ = FORK_GUARD.try_with(|slot| slot.borrow_mut().take());
}

extern "C" fn after_fork_child() {
    // The parent's link and leases are not ours. Close our copy of the link (the parent keeps
    // its own) and forget the leases: closing those fds here is a plain close. From here on,
    // this process owns what is left of the state (a fresh link, its own leases).
    table::clear();
    let fd = CONN.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: our inherited copy of the link fd.
        unsafe { (real::get().close)(fd) };
    }
    let _ = FORK_GUARD.try_with(|slot| {
        if let Some(mut g) = slot.borrow_mut().take() {
            // The offers are the parent's: close our copies (a plain close, no message).
            close_offers(&mut g, false);
            g.seq = 0;
            g.retry_at_ms = 0;
        }
    });
    owner::claim();
}

pub(crate) fn install_fork_handlers() {
    sys::atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child));
}
