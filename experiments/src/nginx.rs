//! A real nginx on a loopback port, in a directory of its own, stopped by PID on drop.

use crate::hosts::Hosts;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running nginx (ours, or another machine's in two-node mode).
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
}

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
            return Ok(Self { child: None, addr });
        }
        Self::spawn(dir, addr, hosts)
    }

    fn spawn(dir: &Path, addr: SocketAddr, hosts: &Hosts) -> Result<Self> {
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
        let mut cmd = hosts.server(nginx_binary()?);
        // SAFETY: prctl is async-signal-safe; nginx then dies with us even if we are killed
        // without running destructors (e.g. `experiments server` stopped with a signal).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
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
        let n = Self { child: Some(child), addr };
        // Listening on every address: check it through loopback.
        let probe = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hosts.reachable(probe) {
            if Instant::now() > deadline {
                bail!("nginx did not start; see {d}/error.log");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // SAFETY: signalling the child we started, by its PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}
