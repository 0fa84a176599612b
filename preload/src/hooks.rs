//! The interposed libc functions. Each one either handles the call completely or falls
//! through to the real function with the original arguments; for `connect()` that is a
//! bypass, named and counted ([`crate::bypass`]). A panic or a reentrant call is always one.

use crate::bypass::{self, Bypass};
use crate::log::wlog;
use crate::sys::set_errno;
use crate::{client, owner, real, sockopt, table, OFF, SETTINGS};
use libc::{c_char, c_int, c_uint, c_void, pid_t, sockaddr, socklen_t};
use std::cell::Cell;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use wire::sockaddr::{address_of, unshaped_tcp, Shaped, SOCKADDR_MAX};
use wire::{Dest, Disposition};

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside the shim; dropping it clears the mark.
struct Entered;

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

/// `Ok` when the shim may act: it is on and this thread is not already inside it.
fn enter() -> Result<Entered, Bypass> {
    if OFF.load(Ordering::Acquire) {
        return Err(Bypass::Off);
    }
    BUSY.try_with(|b| (!b.replace(true)).then_some(Entered)).ok().flatten().ok_or(Bypass::Reentrant)
}

/// The remote address of the inet socket `fd`.
fn peer_address(fd: c_int) -> Option<Dest> {
    let mut b = [0u8; SOCKADDR_MAX];
    address_of(fd, true, &mut b).and_then(|n| Dest::from_sockaddr(&b[..n]))
}

/// How a lease ends when the program lets go of its fd in a way described by `how`.
pub(crate) fn ending(l: table::Lease, how: Disposition) -> Disposition {
    if l.shared {
        Disposition::Shared
    } else if l.altered {
        Disposition::Implicit
    } else {
        how
    }
}

/// A `connect()` on an fd that holds a pooled socket. Anything but the address it is
/// connected to (`AF_UNSPEC` disconnects it, a new address follows) ends the lease first,
/// as not reusable: the pool manager never takes back a socket whose peer may change.
/// The same address is the program asking how its connect went (`EISCONN`): the lease
/// stays. No allocation, no lock.
fn connect_on_lease(fd: c_int, dest: Option<&Dest>) {
    if dest.is_some_and(|d| peer_address(fd).as_ref() == Some(d)) {
        return;
    }
    if let Some(l) = table::take(fd) {
        wlog!("fd {fd}: connect on a pooled socket: its lease {} ends", l.id);
        client::release(l.id, ending(l, Disposition::Implicit));
    }
}

/// The pooled path of `connect()`: its result, or why the real call runs instead (nothing
/// was changed then).
///
/// # Safety
/// Same contract as `connect(2)`.
unsafe fn pooled_connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> Result<c_int, Bypass> {
    // SAFETY: the caller's addr/len, as connect(2) gets them.
    let dest = unsafe { Dest::from_raw_sockaddr(addr, len) };
    if table::contains(fd) {
        connect_on_lease(fd, dest.as_ref());
        return Err(Bypass::Leased);
    }
    let dest = dest.ok_or(Bypass::NotInet)?;
    if client::is_link(fd) {
        return Err(Bypass::Link);
    }
    if client::known_unpooled(&dest) {
        return Err(Bypass::CachedMiss);
    }
    // Bound ones are not ours to pool; a family mismatch is the kernel's error to report.
    match unshaped_tcp(fd, dest.domain) {
        Ok(()) => {}
        Err(Shaped::NotFreshTcp) => return Err(Bypass::NotFreshTcp),
        Err(Shaped::Bound) => return Err(Bypass::Bound),
    }
    if let Some(why) = sockopt::bypass_reason(fd, dest.domain) {
        return Err(why);
    }
    if !table::holds_fd(fd) {
        return Err(Bypass::FdRange);
    }
    if SETTINGS.get().is_none_or(|s| s.passthrough) {
        return Err(Bypass::Passthrough);
    }
    let (pooled, lease) = match client::acquire(&dest) {
        client::Outcome::Grant(fd, lease) => (fd, lease),
        client::Outcome::Bypass(why) => return Err(why),
        client::Outcome::Refused => {
            set_errno(libc::ECONNREFUSED);
            return Ok(-1);
        }
    };
    let real = real::get();
    // SAFETY: F_GETFL/F_GETFD/F_SETFL on fds we were given; variadic calls with one int.
    let (status, fdflags) = unsafe { ((real.fcntl)(fd, libc::F_GETFL), (real.fcntl)(fd, libc::F_GETFD)) };
    if status < 0 || fdflags < 0 {
        client::release(lease, Disposition::Implicit);
        return Err(Bypass::FdChanged);
    }
    if sockopt::congestion_differs(fd, pooled.as_raw_fd()) {
        // The program never had it: an offer goes back to its pool as it was.
        client::release(lease, Disposition::Unused);
        return Err(Bypass::Congestion);
    }
    sockopt::replay(fd, pooled.as_raw_fd());
    let nonblock = status & libc::O_NONBLOCK;
    // The daemon's sockets are O_RDWR|O_NONBLOCK; the program's file status flags win.
    // SAFETY: as above, on the pooled socket.
    unsafe { (real.fcntl)(pooled.as_raw_fd(), libc::F_SETFL, status) };
    let cloexec = if fdflags & libc::FD_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
    let pooled_raw = pooled.into_raw_fd();
    // SAFETY: dup3 replaces the program's unconnected socket with the pooled one, atomically.
    let r = unsafe { (real.dup3)(pooled_raw, fd, cloexec) };
    // SAFETY: our received fd, no longer needed either way.
    unsafe { (real.close)(pooled_raw) };
    if r < 0 {
        client::release(lease, Disposition::Implicit);
        return Err(Bypass::FdChanged);
    }
    table::insert(fd, lease);
    wlog!("fd {fd}: pooled socket (lease {lease}) to {}", dest.socket_addr());
    if nonblock != 0 {
        set_errno(libc::EINPROGRESS);
        Ok(-1)
    } else {
        Ok(0)
    }
}

/// Interposed `connect(2)`.
///
/// # Safety
/// Same contract as `connect(2)`.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let why = match enter() {
        // SAFETY: forwarding connect's own contract.
        Ok(_entered) => match std::panic::catch_unwind(|| unsafe { pooled_connect(fd, addr, len) }) {
            Ok(Ok(r)) => return r,
            Ok(Err(why)) => why,
            Err(_) => Bypass::Panic,
        },
        Err(why) => why,
    };
    // SAFETY: the caller's addr/len, as connect(2) gets them (read only for the log line).
    bypass::note(fd, why, || unsafe { Dest::from_raw_sockaddr(addr, len) });
    // SAFETY: the real connect with the caller's arguments.
    unsafe { (real::get().connect)(fd, addr, len) }
}

/// Whether the shim keeps anything about `fd` (lock-free, no system call).
fn known_fd(fd: c_int) -> bool {
    client::is_link(fd) || client::is_offer(fd) || table::contains(fd) || sockopt::recorded(fd)
}

/// End the lease on `fd` (if any) after `op` closed or replaced the fd. In a process that
/// does not own the shim's state (a `vfork` child: [`owner`]) only `op` runs: the child
/// closes its own copy, the parent's link, lease and records stay as they are.
fn around_close(fd: c_int, how: Disposition, op: impl FnOnce() -> c_int) -> c_int {
    if !known_fd(fd) || !owner::is_owner() {
        return op();
    }
    if client::is_link(fd) {
        client::forget_link(fd);
    }
    client::forget_offer(fd);
    sockopt::forget(fd);
    let lease = if OFF.load(Ordering::Relaxed) { None } else { table::take(fd) };
    let r = op();
    if let Some(l) = lease {
        client::release(l.id, ending(l, how));
    }
    r
}

/// Interposed `close(2)`: no lock, no allocation, no output (it may run in a signal handler,
/// between fork and exec, or after the program closed stderr).
///
/// # Safety
/// Same contract as `close(2)`.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: the real close with the caller's fd.
    around_close(fd, Disposition::Clean, || unsafe { (real::get().close)(fd) })
}

/// Interposed `setsockopt(2)`: records which replayable options the program set.
///
/// # Safety
/// Same contract as `setsockopt(2)`.
#[no_mangle]
pub unsafe extern "C" fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int {
    // SAFETY: the real setsockopt with the caller's arguments.
    let r = unsafe { (real::get().setsockopt)(fd, level, name, val, len) };
    if r == 0 {
        sockopt::record(fd, level, name);
    }
    r
}

/// Interposed `dup(2)`: the source, if leased, is now shared.
///
/// # Safety
/// Same contract as `dup(2)`.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: the real dup with the caller's fd.
    let r = unsafe { (real::get().dup)(fd) };
    if r >= 0 {
        table::mark_shared(fd);
    }
    r
}

fn dup_onto(old: c_int, new: c_int, op: impl FnOnce() -> c_int) -> c_int {
    if old == new {
        return op();
    }
    let r = around_close(new, Disposition::Implicit, op);
    if r >= 0 {
        table::mark_shared(old);
    }
    r
}

/// Interposed `dup2(2)`.
///
/// # Safety
/// Same contract as `dup2(2)`.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: the real dup2 with the caller's fds.
    dup_onto(old, new, || unsafe { (real::get().dup2)(old, new) })
}

/// Interposed `dup3(2)`.
///
/// # Safety
/// Same contract as `dup3(2)`.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: the real dup3 with the caller's arguments.
    dup_onto(old, new, || unsafe { (real::get().dup3)(old, new, flags) })
}

fn fcntl_common(fd: c_int, cmd: c_int, arg: usize, f: unsafe extern "C" fn(c_int, c_int, ...) -> c_int) -> c_int {
    // SAFETY: forwards the caller's three words; fcntl's optional argument is one word.
    let r = unsafe { f(fd, cmd, arg) };
    if r >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        table::mark_shared(fd);
    }
    r
}

/// Interposed `fcntl(2)`. Stable Rust cannot define a C-variadic function; on the Linux ABIs
/// we build for, fcntl's optional argument is passed in the third integer register, which is
/// what this three-argument definition reads and forwards.
///
/// # Safety
/// Same contract as `fcntl(2)`.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_common(fd, cmd, arg, real::get().fcntl)
}

/// Interposed `fcntl64` (what glibc headers call with 64-bit offsets).
///
/// # Safety
/// Same contract as `fcntl(2)`.
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_common(fd, cmd, arg, real::get().fcntl64)
}

/// Interposed `close_range(2)`: leases on closed fds end without reuse. In a `vfork` child
/// (Python's `subprocess` closes every fd there) only the real call runs: the link number,
/// leases and offers it would see are the parent's ([`owner`]).
///
/// # Safety
/// Same contract as `close_range(2)`.
#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let in_range = |fd: c_int| fd >= 0 && (fd as c_uint) >= first && (fd as c_uint) <= last;
    let mut ours = crate::HOT.active.load(Ordering::Relaxed) != 0 || in_range(client::link_fd());
    client::for_each_offer_fd(|fd| ours |= in_range(fd));
    let closing = flags & (libc::CLOSE_RANGE_CLOEXEC as c_int) == 0 && ours && owner::is_owner();
    let mut ended = [wire::LeaseId::MAX; 64];
    let mut n = 0;
    if closing {
        table::for_each(|fd| {
            if in_range(fd) && n < ended.len() {
                if let Some(l) = table::take(fd) {
                    ended[n] = l.id;
                    n += 1;
                }
            }
        });
        let link = client::link_fd();
        if link >= 0 && in_range(link) {
            client::forget_link(link);
        }
        client::for_each_offer_fd(|fd| {
            if in_range(fd) {
                client::forget_offer(fd);
            }
        });
    }
    // SAFETY: the real close_range with the caller's arguments.
    let r = unsafe { (real::get().close_range)(first, last, flags) };
    for id in &ended[..n] {
        client::release(*id, Disposition::Implicit);
    }
    r
}

/// A child is about to inherit our fds: leased sockets it can see are shared from now on.
fn mark_inheritable() {
    table::for_each(|fd| {
        // SAFETY: F_GETFD on a live fd.
        let fl = unsafe { (real::get().fcntl)(fd, libc::F_GETFD) };
        if fl >= 0 && fl & libc::FD_CLOEXEC == 0 {
            table::mark_shared(fd);
        }
    });
}

type SpawnArgs = (*mut pid_t, *const c_char, *const c_void, *const c_void, *const *mut c_char, *const *mut c_char);

/// Both spawn functions: leased sockets the child can inherit are shared from now on.
fn spawn_with(real: Option<crate::real::SpawnFn>, (pid, file, actions, attr, argv, envp): SpawnArgs) -> c_int {
    mark_inheritable();
    match real {
        // SAFETY: the real function with the caller's arguments, under the caller's contract.
        Some(f) => unsafe { f(pid, file, actions, attr, argv, envp) },
        None => libc::ENOSYS,
    }
}

/// Interposed `posix_spawn(3)`.
///
/// # Safety
/// Same contract as `posix_spawn(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut pid_t,
    path: *const c_char,
    actions: *const c_void,
    attr: *const c_void,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    spawn_with(real::get().posix_spawn, (pid, path, actions, attr, argv, envp))
}

/// Interposed `posix_spawnp(3)`.
///
/// # Safety
/// Same contract as `posix_spawnp(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut pid_t,
    file: *const c_char,
    actions: *const c_void,
    attr: *const c_void,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    spawn_with(real::get().posix_spawnp, (pid, file, actions, attr, argv, envp))
}

/// Interposed `execve(2)`: after `vfork` the parent shares our memory, so marking here
/// protects the parent's leases too.
///
/// # Safety
/// Same contract as `execve(2)`.
#[no_mangle]
pub unsafe extern "C" fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    mark_inheritable();
    // Close-on-exec would close unused offers anyway, and the daemon would then have to
    // assume the program had them: give them back while we can.
    let _ = std::panic::catch_unwind(client::release_unused_offers);
    // SAFETY: the real execve with the caller's arguments.
    unsafe { (real::get().execve)(path, argv, envp) }
}

/// `int warmpool_connect_peer(const char *peer)`: this side's end of a link to another
/// function of the same job, by name: `"JOB/NAME"` or `"JOB/NAME:PORT"` (the channel, 0 when
/// absent; both ends must name the same channel). Returns a connected, blocking TCP socket
/// (close-on-exec) that the program owns and closes like any other, or -1 with `errno`:
/// `ENOTCONN` when no pool manager answers (or the shim is off), `ECONNREFUSED` when it has
/// no link to give, `EINVAL` for a malformed name.
///
/// # Safety
/// `peer` must be NULL or point to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn warmpool_connect_peer(peer: *const c_char) -> c_int {
    let Ok(_entered) = enter() else {
        set_errno(libc::ENOTCONN);
        return -1;
    };
    if peer.is_null() {
        set_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(peer) };
    let Ok(text) = text.to_str() else {
        set_errno(libc::EINVAL);
        return -1;
    };
    let (name, port) = match text.rsplit_once(':') {
        Some((n, p)) => match p.parse::<u16>() {
            Ok(p) => (n, p),
            Err(_) => {
                set_errno(libc::EINVAL);
                return -1;
            }
        },
        None => (text, 0),
    };
    if name.is_empty() || name.len() > wire::MAX_PEER_NAME || !name.contains('/') {
        set_errno(libc::EINVAL);
        return -1;
    }
    let outcome = std::panic::catch_unwind(|| client::acquire_peer(name, port));
    match outcome {
        Ok(client::Outcome::Grant(sock, lease)) => {
            let real = real::get();
            let fd = sock.into_raw_fd();
            // SAFETY: F_GETFL/F_SETFL/F_SETFD on the fd we just received; variadic with one int.
            unsafe {
                let fl = (real.fcntl)(fd, libc::F_GETFL);
                if fl >= 0 {
                    (real.fcntl)(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
                }
                (real.fcntl)(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            table::insert(fd, lease);
            wlog!("fd {fd}: peer link to {text} (lease {lease})");
            fd
        }
        Ok(client::Outcome::Refused) => {
            set_errno(libc::ECONNREFUSED);
            -1
        }
        Ok(client::Outcome::Bypass(why)) => {
            wlog!("peer link to {text}: no pool manager answer: {}", why.name());
            set_errno(libc::ENOTCONN);
            -1
        }
        Err(_) => {
            set_errno(libc::ENOTCONN);
            -1
        }
    }
}
