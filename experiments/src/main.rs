//! `experiments`: reproduce what the pool buys, on this machine, with real programs.
//!
//! `experiments reuse` runs the source study's reuse test locally: every run is a fresh
//! process (a "function") that connects to a real nginx on loopback, sends one request,
//! reads the reply and exits, timed from just before `connect()` to the end of the reply.
//! Configurations run round-robin so that drift affects all alike:
//! - `baseline`: no shim;
//! - `dummy-shim`: the preload library intercepting everything but never asking the daemon;
//! - `warm`: the pool manager on its embedded default (first-use warm pools);
//! - `reuse`: the pool manager with a `reuse` pool for the server.
//! Output: `reuse.csv` (`config,run,latency_us`) and `summary.md` beside the source's numbers.

mod delay;
mod netns;
mod nginx;
mod reuse;
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
        #[arg(long, default_value = "baseline,dummy-shim,warm,reuse", value_delimiter = ',')]
        configs: Vec<reuse::Config>,
        /// Output directory [default: results/reuse/<timestamp>].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One function invocation (used by `reuse`): connect, GET, read, print µs, exit.
    #[command(hide = true)]
    Function {
        /// Server address.
        addr: std::net::SocketAddr,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Reuse { runs, configs, out } => reuse::run(runs, &configs, out),
        Cmd::Function { addr } => reuse::function(addr),
    }
}
