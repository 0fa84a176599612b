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
//! reach the next function), [`tenant`] (who is asking, from the kernel), [`netns`] (sockets made in the client's
//! network namespace), [`server`]
//! (listener, clients, leases, maintenance; connections delegated by a node helper), [`ocihook`] (the OCI
//! runtime hook that warms a container's pools before it starts), the return path's checks ([`holders`]: no other
//! process holds a given-back socket; [`proof`]: the protocol's end-of-exchange proof; run by
//! the checker task), [`handover`] (restart by take-over), [`peer`] (links between
//! functions), [`metrics`] and [`status`].

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
