//! Where an experiment's client side (functions, pool manager) and server side run: both on
//! this host's loopback, on the two hosts of a [`Topology`], or here and on another machine
//! that runs `experiments server` (two-node: the servers there are not started by us).

use crate::topo::{Topology, SERVER_IP};
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

/// See the module docs.
#[derive(Debug)]
pub(crate) enum Hosts {
    /// Everything on 127.0.0.1.
    Loopback,
    /// Client and server namespaces joined by the delay line.
    Local(Topology),
    /// The client here, the servers on another machine (`experiments server` there).
    Remote(IpAddr),
}

impl Hosts {
    /// The server's address.
    pub(crate) fn server_ip(&self) -> IpAddr {
        match self {
            Self::Loopback => Ipv4Addr::LOCALHOST.into(),
            Self::Local(_) => SERVER_IP.into(),
            Self::Remote(ip) => *ip,
        }
    }

    /// Whether the servers run elsewhere (and must not be started here).
    pub(crate) fn remote(&self) -> bool {
        matches!(self, Self::Remote(_))
    }

    /// A port for a server: any free one on loopback, a fixed one in our own namespace.
    pub(crate) fn server_port(&self, fixed: u16) -> anyhow::Result<u16> {
        Ok(match self {
            Self::Loopback => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
            Self::Local(_) | Self::Remote(_) => fixed,
        })
    }

    /// A port for a server on the client host (a local proxy): a fixed one in our own
    /// namespace, any free one on this host's loopback otherwise.
    pub(crate) fn client_port(&self, fixed: u16) -> anyhow::Result<u16> {
        Ok(match self {
            Self::Local(_) => fixed,
            Self::Loopback | Self::Remote(_) => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        })
    }

    /// Run `f` on a thread of this process that is on the client host: processes it spawns
    /// start there without any step between fork and exec (so `Command` can use
    /// `posix_spawn`, whose cost does not grow with this process's size).
    pub(crate) fn on_client<T: Send + 'static>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
        match self {
            Self::Local(t) => t.client.enter(f),
            Self::Loopback | Self::Remote(_) => f(),
        }
    }

    /// A command on the client host. Environment variables for the program itself are
    /// passed as `env` arguments so that wrappers (`ip netns exec`) never see them.
    pub(crate) fn client(&self, prog: impl AsRef<OsStr>, env: &[(&str, &OsStr)]) -> Command {
        let mut c = match self {
            Self::Loopback | Self::Remote(_) => Command::new("env"),
            Self::Local(t) => {
                let mut c = t.client.command("env");
                c.env_remove("LD_PRELOAD");
                c
            }
        };
        for (k, v) in env {
            let mut kv = std::ffi::OsString::from(k);
            kv.push("=");
            kv.push(v);
            c.arg(kv);
        }
        c.arg(prog);
        c
    }

    /// A command on the server host.
    pub(crate) fn server(&self, prog: impl AsRef<OsStr>) -> Command {
        match self {
            Self::Loopback | Self::Remote(_) => Command::new(prog),
            Self::Local(t) => t.server.command(prog),
        }
    }

    /// Whether `addr` accepts TCP connections from the client host.
    pub(crate) fn reachable(&self, addr: SocketAddr) -> bool {
        let probe = move || Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok());
        match self {
            Self::Loopback | Self::Remote(_) => probe().unwrap_or(false),
            Self::Local(t) => t.client.enter(probe).unwrap_or(false),
        }
    }

    /// A one-line description for summaries.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Loopback => "loopback (no emulated path)".into(),
            Self::Remote(ip) => format!("two-node: servers on {ip} (experiments server)"),
            Self::Local(t) => format!("local: two network namespaces, user-space delay line, RTT {:?}", t.rtt),
        }
    }
}

/// Make `cmd`'s process end (SIGTERM) when the thread that started it ends, even if this
/// process is killed without running destructors.
pub(crate) fn die_with_us(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}
