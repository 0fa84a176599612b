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
