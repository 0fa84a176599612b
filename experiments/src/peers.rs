//! Pieces the peer-link experiments (`link`, `shuffle`, `burst --peer`) share.

use crate::reuse::Daemon;
use anyhow::{bail, Result};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child process (a server or pool manager of the experiment), stopped by PID when dropped.
#[derive(Debug)]
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Before reaping it, so the pid is still this child's.
        crate::launch::signal(self.0.id(), rustix::process::Signal::TERM);
        let _ = self.0.wait();
    }
}

/// `pool-manager peer-addr NAME`: the virtual address standing for a peer.
pub(crate) fn vaddr(pool_manager: &Path, peer: &str) -> Result<std::net::IpAddr> {
    let o = Command::new(pool_manager).args(["peer-addr", peer]).output()?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().parse()?)
}

/// Ready links (direct + relayed) in a daemon's status to peers whose name starts with
/// `peer`, on channel `port` (any channel when `None`).
pub(crate) fn ready_links(status: &str, peer: &str, port: Option<u16>) -> usize {
    status
        .lines()
        .filter(|l| l.starts_with(peer))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if port.is_some_and(|p| f.get(1) != Some(&p.to_string().as_str())) {
                return None;
            }
            Some(f.get(3)?.parse::<usize>().ok()? + f.get(4)?.parse::<usize>().ok()?)
        })
        .sum()
}

/// Wait (at most 60 s) until the daemon holds `n` ready links as [`ready_links`] counts them.
pub(crate) fn wait_ready_links(daemon: &Daemon, peer: &str, port: Option<u16>, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = daemon.cli(&["status"])?;
        if ready_links(&status, peer, port) >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pool did not make {n} links to {peer}:\n{status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ready_links_reads_the_status_table() {
        let st = "PEER exp/a (rendezvous 1.2.3.4:7, connected)  PORT  ADDR  READY_DIRECT  READY_RELAYED  BUILDING\n\
                  exp/b  7000  198.19.1.1  2  1  0\n\
                  exp/b  7001  198.19.1.1  4  0  1\n";
        assert_eq!(super::ready_links(st, "exp/b", Some(7000)), 3);
        assert_eq!(super::ready_links(st, "exp/b", None), 7);
        assert_eq!(super::ready_links(st, "exp/c", None), 0);
    }
}
