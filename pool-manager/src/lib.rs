//! warmpool's pool manager: the per-node daemon that owns warm and reusable TCP
//! connections and hands them to functions over a Unix socket.
//!
//! The shim ⇄ daemon wire protocol (version 1) is specified in the `warmpool-wire` crate,
//! re-exported here as [`wire`]. The daemon is a library with a thin `main`: tests and
//! benchmarks bind their own socket and call [`server::run`].
//!
//! Modules: [`config`] (TOML, flags, embedded default; [`allow`] its allow-lists),
//! [`defaults`] (every limit with its reason), [`pool`] (the sans-IO pool state machine),
//! [`sock`] (kernel-state checks), [`sockstate`] (a function's socket options and peer never
//! reach the next function), [`tenant`] (who is asking, from the kernel), [`server`]
//! (listener, clients, leases, maintenance), [`handover`] (restart by take-over), [`peer`]
//! (links between functions), [`metrics`] and [`status`].

pub mod allow;
pub mod config;
pub mod defaults;
pub mod exec;
pub mod handover;
pub mod peer;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod sock;
pub mod sockstate;
pub mod status;
pub mod tenant;

pub use wire;
