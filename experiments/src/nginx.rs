//! A real nginx on a loopback port, in a directory of its own, stopped by PID on drop.

use crate::hosts::Hosts;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running nginx.
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Child,
    pub(crate) addr: SocketAddr,
}

fn nginx_binary() -> Result<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("nginx not found: run scripts/setup.sh (Debian package nginx-light)")
}

impl Nginx {
    /// Start nginx on the server host, files in `dir`, keep-alive on; `/` answers a short body.
    pub(crate) fn start(dir: &Path, hosts: &Hosts) -> Result<Self> {
        let port = hosts.server_port(8080)?;
        let addr = SocketAddr::new(hosts.server_ip(), port);
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/client_body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             keepalive_timeout 75s;\n keepalive_requests 100000;\n\
             server {{ listen {addr}; location / {{ return 200 \"hello from nginx\\n\"; }} }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = hosts
            .server(nginx_binary()?)
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
        let n = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hosts.reachable(addr) {
            if Instant::now() > deadline {
                bail!("nginx did not start; see {}/error.log", d);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started, by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
