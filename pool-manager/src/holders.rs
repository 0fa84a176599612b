//! Who else holds a socket: before a given-back socket is reused, the daemon proves that no
//! other process has a copy (one inherited through `system()`/`popen()`, kept by a `setsid`
//! helper, passed on). One walk of `/proc/*/fd` per batch of sockets under check, matching
//! `socket:[<inode>]` links against the sockets' inodes (`fstat`), skipping the daemon itself.
//!
//! Threads normally share their process's fd table; a thread that unshared it
//! (`unshare(CLONE_FILES)`, `clone` without `CLONE_FILES`) has its own, seen only under
//! `/proc/PID/task/TID/fd`: those tables are found with `kcmp(KCMP_FILES)` (one system call
//! per thread) and walked too.
//!
//! Limits: an fd in flight in a Unix socket's queue (sent with `SCM_RIGHTS`, not yet
//! received) is in no process's table and is invisible; the daemon must see the host's pid
//! namespace (`hostPID` in a container) and may read every process's `/proc/PID/fd`
//! (root, or `CAP_SYS_PTRACE`); a process it cannot read counts as holding nothing. Blocking
//! file-system work: run it with `spawn_blocking`.
//!
//! Preferred over the walk, where the daemon may load BPF programs: the kernel's own answer,
//! each socket's file reference count ([`crate::filerefs`]), which has none of these limits
//! and needs no waiting. [`find_held`] uses it when it loads and walks `/proc` otherwise
//! (`WARMPOOL_HOLDERS=proc` forces the walk, for comparison).

use crate::filerefs::FileRefs;
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The inode of a socket (what `/proc/PID/fd/N` links to as `socket:[inode]`).
#[must_use]
pub fn socket_inode(fd: impl std::os::fd::AsFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

/// What one walk cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct WalkStats {
    /// Processes whose fd table was read.
    pub processes: usize,
    /// Extra thread fd tables read (threads that do not share their process's).
    pub thread_tables: usize,
    /// Fd entries looked at.
    pub fds: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Answered by the kernel's reference counts (no walk).
    pub kernel: bool,
}

static KERNEL: OnceLock<Option<FileRefs>> = OnceLock::new();

/// The kernel's reference counts, loaded on first use (once per daemon process).
fn kernel() -> Option<&'static FileRefs> {
    KERNEL
        .get_or_init(|| {
            if std::env::var_os("WARMPOOL_HOLDERS").is_some_and(|v| v == "proc") {
                info!("holders check: walking /proc (WARMPOOL_HOLDERS=proc)");
                return None;
            }
            match FileRefs::load() {
                Ok(r) => {
                    info!(count = r.kind(), "holders check: file reference counts from the kernel (BPF iterator)");
                    Some(r)
                }
                Err(e) => {
                    warn!(error = %e, "holders check: BPF iterator unavailable, walking /proc instead");
                    None
                }
            }
        })
        .as_ref()
}

/// Whether the holders check is answered by the kernel (loads the iterator if not yet).
#[must_use]
pub fn by_kernel() -> bool {
    kernel().is_some()
}

/// Which of `socks` (this process's fds, each with its socket inode) some other process
/// holds, or a message in flight carries: one pass over our own file reference counts, or
/// one walk of `/proc` without BPF.
#[must_use]
pub fn find_held(socks: &[(RawFd, u64)], exclude_pid: u32) -> (Vec<bool>, WalkStats) {
    let started = Instant::now();
    if let Some(k) = kernel() {
        let fds: Vec<RawFd> = socks.iter().map(|(fd, _)| *fd).collect();
        match k.held(&fds) {
            Ok(held) => return (held, WalkStats { processes: 1, fds: fds.len(), elapsed: started.elapsed(), kernel: true, ..WalkStats::default() }),
            Err(e) => warn!(error = %e, "holders check: reading the iterator failed; walking /proc this time"),
        }
    }
    let wanted: HashSet<u64> = socks.iter().map(|(_, ino)| *ino).collect();
    let (found, stats) = find_holders(&wanted, exclude_pid);
    (socks.iter().map(|(_, ino)| found.contains(ino)).collect(), stats)
}

/// The inodes of `wanted` that some process other than `exclude_pid` holds.
#[must_use]
pub fn find_holders(wanted: &HashSet<u64>, exclude_pid: u32) -> (HashSet<u64>, WalkStats) {
    let started = Instant::now();
    let mut found = HashSet::new();
    let mut stats = WalkStats::default();
    if wanted.is_empty() {
        return (found, stats);
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (found, stats);
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == exclude_pid {
            continue;
        }
        stats.processes += 1;
        scan_table(&format!("/proc/{pid}/fd"), wanted, &mut found, &mut stats);
        for tid in own_table_threads(pid) {
            stats.thread_tables += 1;
            scan_table(&format!("/proc/{pid}/task/{tid}/fd"), wanted, &mut found, &mut stats);
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    stats.elapsed = started.elapsed();
    (found, stats)
}

/// Threads of `pid` whose fd table is not the process's own.
fn own_table_threads(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|tid| *tid != pid && !same_files(pid, *tid))
        .collect()
}

/// `kcmp(KCMP_FILES)`: whether two tasks share one fd table (unknown counts as not).
fn same_files(a: u32, b: u32) -> bool {
    const KCMP_FILES: libc::c_long = 2;
    // SAFETY: kcmp compares two tasks' kernel objects; no memory is passed. libc: rustix has
    // no kcmp.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, libc::c_long::from(a), libc::c_long::from(b), KCMP_FILES, 0 as libc::c_long, 0 as libc::c_long)
    };
    r == 0
}

fn scan_table(dir: &str, wanted: &HashSet<u64>, found: &mut HashSet<u64>, stats: &mut WalkStats) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(fds) = std::fs::read_dir(dir) else { return };
    // The directory again as an fd, so each link is read relative to it (no path to build).
    let Ok(dirfd) = std::fs::File::open(dir) else { return };
    let mut link = [0u8; 64];
    let mut name = [0u8; 16];
    for e in fds.flatten() {
        stats.fds += 1;
        let n = e.file_name();
        let n = n.as_bytes();
        if n.len() >= name.len() {
            continue; // an fd number has at most 10 digits
        }
        name[..n.len()].copy_from_slice(n);
        name[n.len()] = 0;
        let Ok(cname) = std::ffi::CStr::from_bytes_with_nul(&name[..=n.len()]) else { continue };
        let Ok(len) = rustix::fs::readlinkat_raw(&dirfd, cname, &mut link[..]) else { continue };
        if let Some(ino) = parse_socket_link(&link[..len]) {
            if wanted.contains(&ino) {
                found.insert(ino);
            }
        }
    }
}

/// `socket:[12345]` → 12345.
fn parse_socket_link(l: &[u8]) -> Option<u64> {
    let inner = l.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_parse() {
        assert_eq!(parse_socket_link(b"socket:[4242]"), Some(4242));
        assert_eq!(parse_socket_link(b"pipe:[4242]"), None);
        assert_eq!(parse_socket_link(b"/dev/null"), None);
    }

    #[test]
    fn a_socket_of_another_process_is_found_and_ours_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = socket_inode(&l).unwrap();
        let wanted: HashSet<u64> = [ino].into();
        // Only this process holds it: excluded, so nobody.
        let (found, stats) = find_holders(&wanted, std::process::id());
        assert!(found.is_empty());
        assert!(stats.processes > 0);
        // Not excluded: found (this process stands for "another process").
        let (found, _) = find_holders(&wanted, 0);
        assert_eq!(found, wanted);
    }
}

#[cfg(test)]
mod cost {
    /// `cargo test --release -p pool-manager --lib holders::cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a test"]
    fn walk_cost() {
        let wanted = [u64::MAX].into();
        let mut times = Vec::new();
        let mut last = super::WalkStats::default();
        for _ in 0..50 {
            let (_, s) = super::find_holders(&wanted, std::process::id());
            times.push(s.elapsed);
            last = s;
        }
        times.sort();
        eprintln!("walk: {} processes, {} thread tables, {} fds; p50 {:?} min {:?} max {:?}", last.processes, last.thread_tables, last.fds, times[25], times[0], times[49]);
    }
}
