//! `experiments`: reproduce what the pool buys, on this machine, with real programs. Each
//! experiment writes its samples as CSV and a `summary.md` (beside the source study's numbers
//! where there are some); `reuse`, `fct` and `burst` also draw SVG charts (and PNGs when
//! `rsvg-convert` is installed).
//!
//! - `reuse`: every run is a fresh process (a "function") that connects to a real nginx,
//!   sends one request, reads the reply and exits, timed inside from just before `connect()`
//!   and whole by the launcher (spawn to exit). Configurations (`--configs`): `baseline`,
//!   `dummy-shim`, `warm`, `reuse`, `prefetch`, `reuse-lazy` (linked at the first `connect()`),
//!   `empty-preload`, the local keep-alive proxies `nginx-keepalive` and `haproxy`, and
//!   processes that connect nowhere (`/bin/true`): `true-baseline`, `true-empty-preload`,
//!   `true-shim`, `true-shim-prefetch` and `true-shim-lazy`; all run round-robin.
//! - `fct`: flow completion times on new versus warmed connections, with and without
//!   competing bulk flows through a bottleneck.
//! - `burst`: N functions start at once, with and without the pool (`--peer`: each also
//!   talks to a peer function over a prewarmed peer link).
//! - `link`: peer links (both pool managers and the rendezvous server started here): time
//!   from `connect()` to a usable link on demand, prewarmed and relayed, and link throughput.
//! - `shuffle`: reduce-by-key between mappers and reducers over peer links, through Redis
//!   and through a local S3-compatible object store.
//!
//! They run on `--topology local` (client and server hosts in network namespaces joined by
//! a user-space delay line; root), `--topology loopback`, or `--topology two-node` (`reuse`,
//! `fct` and `burst` without `--peer`; `experiments server` runs on the other machine). The
//! remaining subcommands, most of them hidden, are the parts those experiments start:
//! servers, clients, launchers, one function invocation.
//!
//! Modules: one per experiment (`reuse` with `reuse_report`, `fct`, `burst`, `link`,
//! `shuffle`, and `peers` for what the peer-link ones share); where the two sides run
//! (`hosts`; `topo` builds the local topology from `netns` and the `delay` line); `launch`
//! (starting and timing function processes); the servers and proxies compared with (`nginx`,
//! `proxy`); `svg` (charts from the CSV's numbers).

mod burst;
mod delay;
mod fct;
mod hosts;
mod launch;
mod link;
mod netns;
mod nginx;
mod peers;
mod proxy;
mod reuse;
mod reuse_report;
mod shuffle;
mod svg;
mod topo;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "experiments", version, about = "warmpool experiments")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Reuse-latency test: fresh processes, connect → request → reply, per configuration.
    Reuse {
        /// Runs per configuration.
        #[arg(long, default_value_t = 2000)]
        runs: usize,
        /// Configurations, comma-separated.
        #[arg(
            long,
            default_value = "baseline,dummy-shim,warm,reuse,prefetch,reuse-lazy,empty-preload,nginx-keepalive,haproxy,true-baseline,true-empty-preload,true-shim,true-shim-prefetch,true-shim-lazy",
            value_delimiter = ','
        )]
        configs: Vec<reuse::Config>,
        /// Output directory [default: results/reuse/TIMESTAMP].
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        path: PathArgs,
    },
    /// Flow completion time, new vs warmed connections, without and with congestion.
    Fct {
        /// Flow sizes in bytes, comma-separated [default: 1 KB to 16 MB, powers of 4].
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        /// Repetitions per size and configuration.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Which cases: both, off, on.
        #[arg(long, default_value = "both", value_parser = ["both", "off", "on"])]
        congestion: String,
        /// Bottleneck rate, server → client (local topology).
        #[arg(long, default_value = "1gbit")]
        rate: String,
        /// Output directory [default: results/fct/TIMESTAMP].
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        path: PathArgs,
    },
    /// Burst start: N functions at once, with and without the pool.
    Burst {
        /// Burst sizes, comma-separated [default: 1,4,16,64,256].
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Repetitions per size and configuration.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Output directory [default: results/burst/TIMESTAMP].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Every function also exchanges a line with a peer function on the server host
        /// (with the pool: over a prewarmed peer link). Local and loopback topologies.
        #[arg(long)]
        peer: bool,
        #[command(flatten)]
        path: PathArgs,
    },
    /// Launcher for `burst` (runs on the client host).
    #[command(hide = true)]
    BurstClient {
        /// Server address.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// How many functions.
        #[arg(long)]
        n: usize,
        /// Peer address.
        #[arg(long)]
        peer: Option<std::net::SocketAddr>,
    },
    /// Peers of a burst without the pool.
    #[command(hide = true)]
    PeerEchoServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Peers of a burst with the pool.
    #[command(hide = true)]
    PeerEcho {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        n: usize,
    },
    /// The server side of `--topology two-node`: nginx on port 8080 and the FCT byte server
    /// on port 9000 of this machine, until interrupted.
    Server {
        /// Address to listen on (this node's address on the experiment network).
        #[arg(long, default_value = "0.0.0.0")]
        listen: std::net::IpAddr,
    },
    /// Server for `fct` (runs on the server host).
    #[command(hide = true)]
    ServeBytes {
        /// Listen address.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Client for `fct` (runs on the client host, under the shim for warmed connections).
    #[command(hide = true)]
    FctClient {
        /// Server address.
        #[arg(long)]
        server: std::net::SocketAddr,
        /// Sizes.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        /// Repetitions.
        #[arg(long)]
        reps: usize,
        /// Unrecorded 1 MB flows first.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// Peer links: time from connect() to a usable link (on demand, prewarmed, relayed) and
    /// link throughput (direct, relayed).
    Link {
        /// Connects per case.
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// Bytes for the throughput runs.
        #[arg(long, default_value_t = 1_000_000_000)]
        bytes: u64,
        /// Output directory [default: results/link/TIMESTAMP].
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        path: PathArgs,
    },
    /// Shuffle: reduce-by-key among mappers (client host) and reducers (server host) over
    /// peer links, through Redis, and through a local S3-compatible object store.
    Shuffle {
        /// Mappers.
        #[arg(long, default_value_t = 4)]
        mappers: usize,
        /// Reducers.
        #[arg(long, default_value_t = 4)]
        reducers: usize,
        /// Bytes each mapper produces.
        #[arg(long, default_value_t = 16_000_000)]
        bytes: u64,
        /// Exchanges, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "peer,peer-prewarmed,redis,s3")]
        via: Vec<shuffle::Via>,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Output directory [default: results/shuffle/TIMESTAMP].
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        path: PathArgs,
    },
    /// A shuffle mapper.
    #[command(hide = true)]
    ShuffleMap {
        #[arg(long)]
        id: usize,
        #[arg(long)]
        reducers: usize,
        #[arg(long)]
        bytes: u64,
        #[arg(long, value_enum)]
        via: shuffle::Via,
        #[arg(long)]
        target: std::net::SocketAddr,
    },
    /// A shuffle reducer.
    #[command(hide = true)]
    ShuffleReduce {
        #[arg(long)]
        id: usize,
        #[arg(long)]
        mappers: usize,
        #[arg(long, value_enum)]
        via: shuffle::Via,
        #[arg(long)]
        target: std::net::SocketAddr,
    },
    /// Client for `link`: sequential connects through the shim, µs each.
    #[command(hide = true)]
    PeerClient {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        rounds: usize,
    },
    /// Sender for `link`'s throughput runs.
    #[command(hide = true)]
    PeerSend {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Receiver for `link`'s throughput runs.
    #[command(hide = true)]
    PeerRecv {
        #[arg(long)]
        target: std::net::SocketAddr,
    },
    /// One function invocation (used by `reuse`): connect, GET, read, print µs, exit.
    #[command(hide = true)]
    Function {
        /// Server address.
        addr: std::net::SocketAddr,
        /// Then exchange a line with a peer here.
        #[arg(long)]
        peer: Option<std::net::SocketAddr>,
    },
}

/// Where the experiment runs and the emulated path.
#[derive(clap::Args, Debug)]
struct PathArgs {
    /// `local`: client and server hosts in network namespaces joined by an emulated path
    /// (root); `loopback`: both on 127.0.0.1, no emulated path; `two-node`: the servers run
    /// on another machine (`experiments server` there, `--server` names it).
    #[arg(long, default_value = "local", value_parser = ["local", "loopback", "two-node"])]
    topology: String,
    /// The other node's address (two-node).
    #[arg(long, required_if_eq("topology", "two-node"))]
    server: Option<std::net::IpAddr>,
    /// Round-trip time of the emulated path (local topology) [default: 200us for reuse,
    /// 10ms for fct].
    #[arg(long)]
    rtt: Option<String>,
    /// On a virtual machine with the haltpoll cpuidle driver: the guest halt polling window
    /// for this run (restored afterwards; root). 0 makes every wake-up of an idle vCPU cost
    /// tens of microseconds; the kernel's default is 200000.
    #[arg(long, value_name = "NS")]
    halt_poll_ns: Option<u64>,
}

impl PathArgs {
    fn hosts(&self, default_rtt: &str, rate_bps: Option<u64>) -> Result<hosts::Hosts> {
        if self.topology == "loopback" {
            return Ok(hosts::Hosts::Loopback);
        }
        if let (true, Some(ip)) = (self.topology == "two-node", self.server) {
            return Ok(hosts::Hosts::Remote(ip));
        }
        let rtt = topo::parse_duration(self.rtt.as_deref().unwrap_or(default_rtt))?;
        netns::reap_stale();
        let t = topo::Topology::local(&format!("wp{}", std::process::id()), rtt, rate_bps)?;
        let measured = t.calibrate()?;
        eprintln!("topology local: configured RTT {rtt:?}, measured {measured:?} (TCP handshake median)");
        if measured.abs_diff(rtt) * 20 > rtt {
            eprintln!("warning: the emulated path is more than 5 % off its configured RTT; is the machine busy?");
        }
        Ok(hosts::Hosts::Local(t))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let halt = match &cli.cmd {
        Cmd::Reuse { path, .. } | Cmd::Fct { path, .. } | Cmd::Burst { path, .. } | Cmd::Link { path, .. } | Cmd::Shuffle { path, .. } => {
            path.halt_poll_ns
        }
        _ => None,
    };
    let _halt = reuse::HaltPoll::set(halt)?;
    match cli.cmd {
        Cmd::Reuse { runs, configs, out, path } => reuse::run(runs, &configs, out, &path.hosts("200us", None)?),
        Cmd::Fct { sizes, reps, congestion, rate, out, path } => {
            let sizes = if sizes.is_empty() { fct::SIZES.to_vec() } else { sizes };
            let cases: &[bool] = match congestion.as_str() {
                "off" => &[false],
                "on" => &[true],
                _ => &[false, true],
            };
            let hosts = path.hosts("10ms", Some(topo::parse_rate(&rate)?))?;
            fct::run(&hosts, &sizes, reps, cases, out, &rate)
        }
        Cmd::ServeBytes { listen } => fct::serve(listen),
        Cmd::Burst { sizes, reps, out, peer, path } => {
            let sizes = if sizes.is_empty() { burst::SIZES.to_vec() } else { sizes };
            if peer && path.topology == "two-node" {
                anyhow::bail!("burst --peer runs on --topology local or loopback");
            }
            burst::run(&path.hosts("1ms", None)?, &sizes, reps, out, peer)
        }
        Cmd::BurstClient { addr, n, peer } => burst::client(addr, n, peer),
        Cmd::PeerEchoServer { listen } => burst::echo_server(listen),
        Cmd::PeerEcho { target, n } => burst::echo_links(target, n),
        Cmd::Server { listen } => server(listen),
        Cmd::FctClient { server, sizes, reps, warmup } => fct::client(server, &sizes, reps, warmup),
        Cmd::Function { addr, peer } => reuse::function(addr, peer),
        Cmd::Link { reps, bytes, out, path } => {
            if path.topology == "two-node" {
                anyhow::bail!("link runs on --topology local or loopback (both pool managers are started here)");
            }
            link::run(&path.hosts("10ms", None)?, reps, bytes, out)
        }
        Cmd::PeerClient { target, rounds } => link::client(target, rounds),
        Cmd::Shuffle { mappers, reducers, bytes, via, reps, out, path } => {
            if path.topology == "two-node" {
                anyhow::bail!("shuffle runs on --topology local or loopback");
            }
            shuffle::run(&path.hosts("1ms", None)?, mappers, reducers, bytes, &via, reps, out)
        }
        Cmd::ShuffleMap { id, reducers, bytes, via, target } => shuffle::map(id, reducers, bytes, via, target),
        Cmd::ShuffleReduce { id, mappers, via, target } => shuffle::reduce(id, mappers, via, target),
        Cmd::PeerSend { target, bytes } => link::send(target, bytes),
        Cmd::PeerRecv { target } => link::recv(target),
    }
}

/// `experiments server`: the server node of a two-node run.
fn server(listen: std::net::IpAddr) -> Result<()> {
    use std::net::SocketAddr;
    // Our own server: idle connections keep their window, as on the local topology.
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_slow_start_after_idle", "0") {
        eprintln!("warning: cannot set net.ipv4.tcp_slow_start_after_idle = 0: {e}");
    }
    let work = reuse::Scratch::new("server")?;
    let web = nginx::Nginx::start_at(&work.0.join("nginx"), SocketAddr::new(listen, nginx::HTTP_PORT))?;
    let bytes = SocketAddr::new(listen, fct::SERVER_PORT);
    println!("serving: nginx on {}, FCT byte server on {bytes}; on the client node run", web.addr);
    println!("  experiments reuse --topology two-node --server <this node's address>");
    println!("  experiments fct --topology two-node --server <this node's address>");
    println!("Ctrl-C stops.");
    fct::serve(bytes)
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, ~{eta} left)") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}
