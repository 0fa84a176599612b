//! warmpool's pool manager: the per-node daemon that owns warm and reusable TCP
//! connections and hands them to functions over a Unix socket.
//!
//! The shim ⇄ daemon wire protocol (version 1) is specified in the `warmpool-wire` crate,
//! re-exported here as [`wire`]. The daemon is a library with a thin `main`: tests and
//! benchmarks bind their own socket ([`server::bind`]) and call [`server::run`] with a
//! cancellation token as the shutdown signal. Every task the daemon starts has an owner that
//! ends it before `run` returns: `run`'s own set (clients, maintenance, checker, resolver,
//! tenant sweep, peer agent), [`server::Background`] (refills and other side tasks) and the
//! peer agent's set (link connections). The binary's other subcommands (`exec`,
//! `seccomp-agent`, `rendezvous`) are other crates; this library does not use them.
//!
//! Modules:
//! - configuration: [`config`] (TOML, flags, embedded default; [`allow`] its allow-lists),
//!   [`defaults`] (every limit with its reason);
//! - the pools: [`pool`] (one pool's sans-IO state machine and `PoolTable`, the table of all pools; both tested in virtual time), [`sizing`] (pools sized to
//!   demand), [`server`] (listener, one session per client, acquire/grant/release, refills
//!   and maintenance, connections delegated by a node helper), [`netns`] (sockets made in the
//!   client's network namespace), [`tenant`] (who is asking, from the kernel);
//! - the return path, before a given-back socket is reused: [`sock`] (kernel-state checks),
//!   [`sockstate`] (a function's socket options and peer never reach the next function), and
//!   the checker task, which runs [`holders`] (no other process holds it; [`filerefs`], a BPF
//!   iterator over the daemon's file table, built for the running kernel with [`btf`]) and
//!   [`proof`] (the protocol's end-of-exchange proof);
//! - around the daemon: [`handover`] (restart by take-over), [`ocihook`] (the OCI runtime
//!   hook that warms a container's pools before it starts), [`peer`] (links between
//!   functions on different hosts), [`metrics`] (Prometheus endpoint) and [`status`].

pub mod allow;
pub(crate) mod checker;
pub mod config;
pub mod defaults;
pub mod btf;
pub mod filerefs;
pub mod handover;
pub mod holders;
pub mod metrics;
pub mod netns;
pub mod ocihook;
pub mod peer;
pub mod pool;
pub mod proof;
pub mod server;
pub mod sizing;
pub mod sock;
pub mod sockstate;
pub mod status;
pub mod tenant;

pub use wire;
