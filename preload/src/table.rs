//! Which fds of this process hold leased sockets: one `AtomicU64` per fd number, so the
//! `close()` path needs no lock and no allocation (it may run in a signal handler or between
//! `fork` and `exec`). Fds at or above [`MAX_FD`] are never pooled.
//!
//! Entry layout: 0 = no lease; otherwise bit 63 set, bit 62 = shared (dup'd or inherited by
//! a child: never reusable), bit 61 = altered (the program set an option that cannot be
//! undone: never reusable), bits 0..48 = the lease id the daemon granted ([`wire::LeaseId`], 48 bits).
//!
//! Beside each lease, the identity of the socket it was granted on (its inode; sockets all
//! live on one device, recorded once): at exit the shim gives a socket back only if the fd
//! number still holds that very socket ([`still_holds`]), not whatever a close the shim
//! never saw (a raw system call, libc-internal code) left on that number.

use crate::sys::identity;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

pub(crate) const MAX_FD: usize = 65_536;
/// Fds below this number have their entries in [`crate::HOT`], the page the load has already
/// written (see there); the others in [`BACK`].
pub(crate) const FRONT: usize = 255;
const PRESENT: u64 = 1 << 63;
const SHARED: u64 = 1 << 62;
const ALTERED: u64 = 1 << 61;
const ID_MASK: u64 = wire::LeaseId::MAX.get();
const _: () = assert!(ID_MASK & (PRESENT | SHARED | ALTERED) == 0, "lease ids and flag bits overlap");

/// One fd number's entry: its lease (layout above) and the inode of the socket granted on it
/// (0: unknown).
#[derive(Debug)]
pub(crate) struct Entry {
    lease: AtomicU64,
    inode: AtomicU64,
}

impl Entry {
    pub(crate) const fn empty() -> Self {
        Self { lease: AtomicU64::new(0), inode: AtomicU64::new(0) }
    }
}

static BACK: [Entry; MAX_FD - FRONT] = [const { Entry::empty() }; MAX_FD - FRONT];
/// Highest fd ever recorded, bounding the scans in [`for_each`].
static HIGH: AtomicI32 = AtomicI32::new(-1);
/// The device every socket's inode lives on (sockfs), from the first grant (0: none yet).
static SOCK_DEV: AtomicU64 = AtomicU64::new(0);

/// A lease as recorded for one fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) id: wire::LeaseId,
    pub(crate) shared: bool,
    pub(crate) altered: bool,
}

fn entry(fd: i32) -> Option<&'static Entry> {
    let i = usize::try_from(fd).ok()?;
    match i.checked_sub(FRONT) {
        None => crate::HOT.front.get(i),
        Some(back) => BACK.get(back),
    }
}

fn slot(fd: i32) -> Option<&'static AtomicU64> {
    entry(fd).map(|e| &e.lease)
}

fn decode(v: u64) -> Option<Lease> {
    let id = wire::LeaseId::new(v & ID_MASK).filter(|_| v & PRESENT != 0)?;
    Some(Lease { id, shared: v & SHARED != 0, altered: v & ALTERED != 0 })
}

/// Whether the table can hold a lease on `fd` (`0..MAX_FD`).
pub(crate) fn holds_fd(fd: i32) -> bool {
    slot(fd).is_some()
}

/// Record a fresh lease on `fd` (returns false if the fd is out of range).
pub(crate) fn insert(fd: i32, id: wire::LeaseId) -> bool {
    let Some(e) = entry(fd) else { return false };
    // Unknown (0) unless the socket lives where every socket does: never given back at exit.
    let ino = identity(fd).map_or(0, |(dev, ino)| match SOCK_DEV.compare_exchange(0, dev, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => ino,
        Err(known) if known == dev => ino,
        Err(_) => 0,
    });
    e.inode.store(ino, Ordering::Release);
    if e.lease.swap(PRESENT | id.get(), Ordering::AcqRel) == 0 {
        crate::HOT.active.fetch_add(1, Ordering::Relaxed);
    }
    HIGH.fetch_max(fd, Ordering::Relaxed);
    true
}

/// Remove and return the lease on `fd`.
pub(crate) fn take(fd: i32) -> Option<Lease> {
    let s = slot(fd)?;
    if s.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let l = decode(s.swap(0, Ordering::AcqRel));
    if l.is_some() {
        crate::HOT.active.fetch_sub(1, Ordering::Relaxed);
    }
    l
}

/// Whether `fd` still refers to the socket its lease was granted on.
pub(crate) fn still_holds(fd: i32) -> bool {
    let Some(ino) = entry(fd).map(|e| e.inode.load(Ordering::Acquire)) else {
        return false;
    };
    ino != 0 && identity(fd) == Some((SOCK_DEV.load(Ordering::Acquire), ino))
}

/// Whether `fd` holds a lease.
pub(crate) fn contains(fd: i32) -> bool {
    slot(fd).is_some_and(|s| s.load(Ordering::Relaxed) != 0)
}

fn mark(fd: i32, bit: u64) {
    if let Some(s) = slot(fd) {
        if s.load(Ordering::Relaxed) != 0 {
            let _ = s.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| (v != 0).then_some(v | bit));
        }
    }
}

/// Mark the lease on `fd` shared (it was duplicated or inherited).
pub(crate) fn mark_shared(fd: i32) {
    mark(fd, SHARED);
}

/// Mark the lease on `fd` altered (an option that cannot be undone was set on it).
pub(crate) fn mark_altered(fd: i32) {
    mark(fd, ALTERED);
}

/// Call `f(fd)` for every fd holding a lease.
pub(crate) fn for_each(mut f: impl FnMut(i32)) {
    if crate::HOT.active.load(Ordering::Relaxed) == 0 {
        return;
    }
    let high = HIGH.load(Ordering::Relaxed);
    for fd in 0..=high {
        if contains(fd) {
            f(fd);
        }
    }
}

/// Forget every lease without telling anyone (in a fork child: they are the parent's).
pub(crate) fn clear() {
    for_each(|fd| {
        let _ = take(fd);
    });
}
