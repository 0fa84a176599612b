//! The local keep-alive proxies users run instead of a socket pool, for `reuse` to compare
//! with: nginx with `upstream { keepalive }` (see [`Nginx::start_proxy`]) and HAProxy with
//! `http-reuse always`. Both listen on the client host's loopback, so a function's connect()
//! is local and only the proxy's upstream connections cross the emulated path; both mark what
//! they forward with `X-Via: <name>`, and the server nginx logs the connection each such
//! request arrived on, from which [`upstream_use`] counts the connections each proxy opened.

use crate::hosts::Hosts;
use crate::nginx::Nginx;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The nginx proxy's port on the client host (local topology).
pub(crate) const NGINX_PORT: u16 = 8081;
/// HAProxy's port on the client host (local topology).
pub(crate) const HAPROXY_PORT: u16 = 8082;
/// Idle upstream connections the nginx proxy keeps (`keepalive N`): more than the one a
/// sequential run uses, as a deployment would configure it.
const NGINX_KEEPALIVE: usize = 16;

/// The nginx keep-alive proxy on the client host, forwarding to `upstream`.
pub(crate) fn start_nginx(work: &Path, hosts: &Hosts, upstream: SocketAddr) -> Result<Nginx> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, hosts.client_port(NGINX_PORT)?));
    Nginx::start_proxy(&work.join("nginx-proxy"), hosts, listen, upstream, NGINX_KEEPALIVE)
}

/// A running HAProxy in the foreground (`-db`), stopped by PID on drop.
#[derive(Debug)]
pub(crate) struct Haproxy {
    child: Child,
    pub(crate) addr: SocketAddr,
}

fn haproxy_binary() -> Result<PathBuf> {
    for p in ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy", "/usr/bin/haproxy"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("haproxy not found: run scripts/setup.sh (Debian package haproxy)")
}

impl Haproxy {
    /// Start HAProxy on the client host, files in `dir`, forwarding to `upstream` with
    /// `http-reuse always`: one thread, as the nginx proxy has one worker.
    pub(crate) fn start(dir: &Path, hosts: &Hosts, upstream: SocketAddr) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, hosts.client_port(HAPROXY_PORT)?));
        let conf = format!(
            "global\n    nbthread 1\n    maxconn 4096\n\
             defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             \x20   timeout http-keep-alive 30s\n\
             frontend local\n    bind {addr}\n    default_backend origin\n\
             backend origin\n    http-reuse always\n    http-request set-header X-Via haproxy\n    server origin {upstream}\n"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, conf)?;
        let log = dir.join("haproxy.log");
        let mut cmd = hosts.client(haproxy_binary()?, &[]);
        crate::hosts::die_with_us(&mut cmd);
        let mut child = cmd
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting haproxy")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hosts.reachable(addr) {
            if Instant::now() > deadline || child.try_wait().is_ok_and(|s| s.is_some()) {
                crate::launch::signal(child.id(), rustix::process::Signal::TERM);
                let _ = child.wait();
                bail!("haproxy did not start:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, addr })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        crate::launch::signal(self.child.id(), rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

/// What a proxy did upstream: requests forwarded and distinct connections they arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct UpstreamUse {
    pub(crate) requests: u64,
    pub(crate) connections: usize,
}

/// Per `X-Via` value, from the server nginx's log (`<via> <connection number>` per line).
pub(crate) fn upstream_use(log: &str) -> BTreeMap<String, UpstreamUse> {
    let mut seen: BTreeMap<String, (u64, std::collections::BTreeSet<u64>)> = BTreeMap::new();
    for line in log.lines() {
        let mut f = line.split_whitespace();
        if let (Some(via), Some(Ok(conn))) = (f.next(), f.next().map(str::parse::<u64>)) {
            let e = seen.entry(via.to_owned()).or_default();
            e.0 += 1;
            e.1.insert(conn);
        }
    }
    seen.into_iter().map(|(via, (requests, conns))| (via, UpstreamUse { requests, connections: conns.len() })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_and_distinct_connections_per_proxy() {
        let log = "haproxy 3\nnginx-keepalive 5\nhaproxy 3\nhaproxy 9\nnginx-keepalive 5\ngarbage\n";
        let u = upstream_use(log);
        assert_eq!(u["haproxy"], UpstreamUse { requests: 3, connections: 2 });
        assert_eq!(u["nginx-keepalive"], UpstreamUse { requests: 2, connections: 1 });
        assert_eq!(u.len(), 2);
    }
}
