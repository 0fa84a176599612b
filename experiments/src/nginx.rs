//! A real nginx in a directory of its own, stopped by PID on drop: the server every experiment
//! talks to, and the local keep-alive proxy (`upstream { keepalive }`) that `reuse` compares with.

use crate::hosts::Hosts;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx (ours, or another machine's in two-node mode).
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
    /// Our own server nginx's directory (its logs).
    dir: Option<PathBuf>,
}

/// The server nginx's log of proxied requests, in its directory.
const VIA_LOG: &str = "via.log";

/// nginx's port on the server host.
pub(crate) const HTTP_PORT: u16 = 8080;

fn nginx_binary() -> Result<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("nginx not found: run scripts/setup.sh (Debian package nginx-light)")
}

impl Nginx {
    /// Start nginx here listening on `addr` (the two-node server side).
    pub(crate) fn start_at(dir: &Path, addr: SocketAddr) -> Result<Self> {
        Self::spawn(dir, addr, &Hosts::Loopback)
    }

    /// Start nginx on the server host, files in `dir`, keep-alive on; `/` answers a short body.
    pub(crate) fn start(dir: &Path, hosts: &Hosts) -> Result<Self> {
        let port = hosts.server_port(HTTP_PORT)?;
        let addr = SocketAddr::new(hosts.server_ip(), port);
        if hosts.remote() {
            if !hosts.reachable(addr) {
                bail!("nothing answers at {addr}: run `experiments server` on the other node");
            }
            return Ok(Self { child: None, addr, dir: None });
        }
        Self::spawn(dir, addr, hosts)
    }

    fn spawn(dir: &Path, addr: SocketAddr, hosts: &Hosts) -> Result<Self> {
        let d = dir.display();
        // Requests that came through a local proxy (`X-Via`, see `proxy`) are logged with the
        // number of the connection they arrived on: how many upstream connections each proxy
        // opened. Nothing else is logged.
        let http = format!(
            " log_format via '$http_x_via $connection';\n access_log {d}/{VIA_LOG} via if=$http_x_via;\n\
             keepalive_timeout 75s;\n keepalive_requests 100000;\n\
             server {{ listen {addr}; location / {{ return 200 \"hello from nginx\\n\"; }} }}\n"
        );
        let child = Self::launch(dir, hosts.server(nginx_binary()?), &http, addr, hosts)?;
        Ok(Self { child: Some(child), addr, dir: Some(dir.into()) })
    }

    /// A local keep-alive proxy on the client host: nginx listening on `listen` that forwards to
    /// `upstream` over at most `keepalive` idle HTTP/1.1 connections it keeps open, marking each
    /// request `X-Via: nginx-keepalive`.
    pub(crate) fn start_proxy(dir: &Path, hosts: &Hosts, listen: SocketAddr, upstream: SocketAddr, keepalive: usize) -> Result<Self> {
        let http = format!(
            " access_log off;\n upstream origin {{ server {upstream}; keepalive {keepalive}; }}\n\
             server {{ listen {listen};\n  location / {{ proxy_pass http://origin; proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\"; proxy_set_header X-Via nginx-keepalive; }} }}\n"
        );
        let child = Self::launch(dir, hosts.client(nginx_binary()?, &[]), &http, listen, hosts)?;
        Ok(Self { child: Some(child), addr: listen, dir: None })
    }

    /// Write `nginx.conf` (one worker, no master, files in `dir`, `http` inside the http
    /// block), run it with `cmd` and wait until `addr` answers from the client host.
    fn launch(dir: &Path, mut cmd: Command, http: &str, addr: SocketAddr, hosts: &Hosts) -> Result<Child> {
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n client_body_temp_path {d}/client_body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n{http}}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        crate::hosts::die_with_us(&mut cmd);
        let mut child = cmd
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        // Listening on every address: check it through loopback.
        let probe = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hosts.reachable(probe) {
            if Instant::now() > deadline || child.try_wait().is_ok_and(|s| s.is_some()) {
                crate::launch::signal(child.id(), rustix::process::Signal::TERM);
                let _ = child.wait();
                bail!("nginx did not start; see {d}/error.log");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// The log of proxied requests (`X-Via` and connection number per line), when this is our
    /// own server nginx.
    pub(crate) fn via_log(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.as_ref()?.join(VIA_LOG)).ok()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            crate::launch::signal(child.id(), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
    }
}
