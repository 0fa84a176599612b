//! Network namespaces that an experiment creates and removes, and running code in them.
//!
//! Programs run inside by `setns(CLONE_NEWNET)` between fork and exec (not `ip netns exec`,
//! whose private mount namespace and `/sys` remount cost every start an expedited RCU grace
//! period, i.e. an interrupt on every CPU, and the programs here need neither); in-process
//! work (opening a TUN device, creating a probe socket) runs on a short-lived thread that
//! `setns`-es into the namespace, since a network namespace switch applies to the calling
//! thread only, and the fds it creates keep their namespace wherever they are used
//! afterwards.

use anyhow::{bail, Context, Result};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
    /// `/run/netns/NAME`, held open for `setns` in the programs started inside.
    file: std::fs::File,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    /// Create `name` (replacing a leftover of the same name) with loopback up.
    pub(crate) fn create(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]).context("creating a network namespace (needs root)")?;
        let path = format!("/run/netns/{name}");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
                return Err(e).with_context(|| format!("opening {path}"));
            }
        };
        let ns = Self { name: name.to_owned(), file };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME args...`.
    pub(crate) fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `prog` inside the namespace.
    pub(crate) fn command(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        use rustix::process::{getppid, set_parent_process_death_signal, Signal};
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
        let fd = self.file.as_raw_fd();
        let parent = rustix::process::getpid();
        let mut c = Command::new(prog);
        // SAFETY: the closure only makes system calls (rustix's, raw: no allocation, no lock;
        // prctl, getppid and setns are async-signal-safe); `fd` stays open in the parent
        // (self.file) until the child has exec'd, and the child's copy is close-on-exec, so
        // borrowing it in the child is sound.
        unsafe {
            c.pre_exec(move || {
                // Whatever runs in the namespace ends with this run, even if it is killed
                // (its namespaces can then be removed: see `reap_stale`). Children are
                // spawned by threads that outlive them (the main thread, or one that waits).
                if set_parent_process_death_signal(Some(Signal::TERM)).is_err() || getppid() != Some(parent) {
                    return Err(std::io::Error::other("the experiment is gone"));
                }
                Ok(move_into_link_name_space(std::os::fd::BorrowedFd::borrow_raw(fd), Some(LinkNameSpaceType::Network))?)
            });
        }
        c
    }

    /// Run `f` on a thread inside the namespace.
    pub(crate) fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::spawn(move || {
            // Only this thread changes namespace; it ends when `f` returns.
            use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
            if let Err(e) = move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)) {
                bail!("setns: {}", std::io::Error::from(e));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// Write a sysctl under `/proc/sys/net` for this namespace.
    pub(crate) fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.enter(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))
    }
}

/// Remove the namespaces of `experiments` runs that were killed before their cleanup ran (a
/// run names its namespaces `wp<PID>c` and `wp<PID>s`, tests `wpt<PID>…`): those whose
/// process is gone and inside which nothing runs any more.
pub(crate) fn reap_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = run_pid(&name) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let busy = Command::new("ip").args(["netns", "pids", &name]).output().map_or(true, |o| !o.stdout.is_empty());
        if busy {
            continue;
        }
        eprintln!("removing network namespace {name}: left by experiments process {pid}, which is gone");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
}

/// The PID in a namespace name this module's users make (`wp<PID>c`, `wp<PID>s`, `wpt<PID>c`,
/// `wpt<PID>s`).
fn run_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("wpt").or_else(|| name.strip_prefix("wp"))?;
    let digits = rest.strip_suffix('c').or_else(|| rest.strip_suffix('s'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}


impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_names_are_recognised_and_nothing_else() {
        assert_eq!(super::run_pid("wp1234c"), Some(1234));
        assert_eq!(super::run_pid("wpt99s"), Some(99));
        for other in ["wpn12x0i", "wp12", "wpc", "wp12x", "other", "wp1a2c"] {
            assert_eq!(super::run_pid(other), None, "{other}");
        }
    }
}
