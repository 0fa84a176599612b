//! Every timeout and limit the daemon uses by default, with the reason for its value.

use std::time::Duration;

/// Where functions find the daemon; `/run` is a tmpfs cleared at boot, so no stale socket
/// survives a reboot.
pub const SOCKET: &str = "/run/warmpool/pool.sock";
/// Any local uid may ask: tenants are told apart by the kernel's credentials, not by access
/// to the socket. Tighten with `socket_mode` where only some uids should use the pool.
pub const SOCKET_MODE: u32 = 0o666;
/// Pending connections on the Unix socket: a burst of function start-ups connects at once.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Sockets kept ready per destination: one covers sequential invocations, the common case;
/// raise it for bursts.
pub const MIN_IDLE: usize = 1;
/// Idle sockets kept per destination before returned ones are closed.
pub const MAX_IDLE: usize = 8;
/// All sockets per destination (idle, quarantined, leased, connecting): a bound on what one
/// tenant can make the daemon hold open against a server.
pub const MAX_PER_DESTINATION: usize = 64;
/// Below typical server idle timeouts (nginx 75 s, many load balancers 60 s), so the pool
/// closes first and rarely meets a half-closed socket.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Spreads load across server restarts and DNS changes; no socket is older than this.
pub const MAX_LIFETIME: Duration = Duration::from_secs(600);
/// How long a returned socket waits before reuse: a late byte (a reply to an abandoned
/// request the return check could not see, a server push) arriving within it discards the
/// socket. Several round trips on loopback and within a data centre (RTT well below 0.5 ms).
/// Nobody waits for it: a request that finds only quarantined sockets is a miss and makes
/// the pool grow, so a longer quarantine costs sockets, not latency.
pub const QUARANTINE: Duration = Duration::from_millis(1);
/// Bound on the daemon's own connects to a destination.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A refill triggered by a hand-out starts this much later, so that its connect (and, when
/// the server runs on the same node, the server's accept) does not compete for a CPU with
/// the function that was just handed a socket. Measured on a 2-vCPU node: a warm hand-out
/// took 114 µs with an immediate refill and 47 µs with a deferred one. Only a request within
/// this window that finds `min_idle` exhausted misses because of it.
pub const REFILL_DELAY: Duration = Duration::from_millis(1);
/// Bound on a hand-out probe (e.g. Redis PING).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// How often every pool is swept: idle timeouts, peer closes, quarantine, refills.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// After a failed connect, the pool waits this long before trying the destination again,
/// so a down server is not hammered.
pub const CONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// "Not pooled" answers tell the shim not to ask again for this long: unpooled destinations
/// then cost no round trip, and a config change is seen within seconds.
pub const NOT_POOLED_RETRY_MS: u32 = 5_000;
/// Destinations pooled on first use per tenant (embedded default): bounds the daemon's memory
/// and the sockets it keeps for whatever one tenant's functions happen to contact, without
/// one tenant using up the budget of others.
pub const AUTO_MAX_DESTINATIONS: usize = 64;
/// First-use pools on the daemon, all tenants together: the bound on its fds however many
/// tenants come. An auto pool keeps `min_idle` (1) socket while it is used and at most
/// `max_idle` (8) ready ones, so 1024 pools hold about 1,000 sockets at rest and at most
/// about 8,000 ready, far below the `LimitNOFILE` of the shipped unit (1,048,576) and of a
/// kernel's default `fs.file-max`; it is 16 tenants at their full 64, or a few hundred
/// function tenants with a handful of destinations each, more than one node runs.
pub const AUTO_MAX_POOLS: usize = 1024;
/// An auto pool nobody asked for within this long is removed with its sockets.
pub const AUTO_FORGET_AFTER: Duration = Duration::from_secs(600);
/// Hand-out attempts when checks or probes discard candidates.
pub const HANDOUT_ATTEMPTS: usize = 4;
/// Upper bound for a learned initial window (segments). Large enough for a converged window
/// on a fast intra-datacenter path, small enough that a wrongly learned value cannot flood a
/// path: 256 segments of 1448 bytes is about 370 KB in the first RTT.
pub const MAX_INITIAL_WINDOW: u32 = 256;
/// Connects (seen by the kernel's connect hooks) from one tenant to one destination after
/// which the daemon keeps warm sockets for it: two means "this is not a one-off".
pub const PREWARM_THRESHOLD: u64 = 2;

/// Addresses that stand for peers when `[peer] virtual_range` is not set: the upper quarter
/// of 198.19.0.0/16, part of the benchmarking range (RFC 2544) that no real network routes.
pub const PEER_VIRTUAL_RANGE: &str = "198.19.192.0/18";
/// Hole punching gives up (and the relay takes over) after this long. Simultaneous open on a
/// working path completes in about one RTT; three SYN attempts fit in a second on any
/// terrestrial path.
pub const PUNCH_TIMEOUT: Duration = Duration::from_secs(1);
/// A function waits at most this long for a link (punch, relay, proofs).
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Steps of a link's set-up that involve only the rendezvous server or the proofs.
pub const RENDEZVOUS_STEP_TIMEOUT: Duration = wire::rdv::STEP_TIMEOUT;
/// Reconnect to the rendezvous server after this long when the control connection drops.
pub const RENDEZVOUS_RECONNECT: Duration = Duration::from_millis(500);
/// TCP keepalive on peer links: keeps NAT mappings and detects dead peers.
pub const PEER_KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// The rendezvous server forgets an unfinished link after this long.
pub const RENDEZVOUS_LINK_TTL: Duration = wire::rdv::LINK_TTL;
/// Spare link connections a manager keeps at the rendezvous server (authenticated, endpoint
/// and RTT known), so that a new link costs no connection set-up there.
pub const SPARE_LINK_CONNECTIONS: usize = 2;
/// The rendezvous server accepts at most this many spares per member.
pub const MAX_SPARES: usize = wire::rdv::MAX_SPARES;

/// Most sockets offered to one starting process (`Prefetch`): one per prefetching
/// destination, at most this many destinations (the protocol's limit, [`wire::MAX_OFFERS`]).
pub const MAX_PREFETCH: usize = wire::MAX_OFFERS;

/// How often destinations written as host names are resolved again (addresses a name gains
/// are pooled from then on; a name that did not resolve at start is pooled once it does).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// How often the daemon looks for tenants whose cgroup is gone (`tenant_sweep`): one
/// `stat()` of an in-memory file system per cgroup with pools (about a microsecond each), and
/// a gone function's pools close within a second, long before an idle socket's timeout.
pub const TENANT_SWEEP: Duration = Duration::from_secs(1);
/// Tenants closed for good that the daemon remembers, so that a late request of one (a
/// process moved out of its removed cgroup keeps its link) cannot make its pools again.
/// Cgroup ids are never reused, so forgetting the oldest only lets such a straggler's pool
/// live until the next sweep closes it again; 4096 entries are well under a megabyte.
pub const CLOSED_TENANTS_REMEMBERED: usize = 4096;
/// Cgroup paths the daemon remembers by cgroup id, so that identifying a client whose cgroup
/// it has seen takes no `/proc` read. One entry per cgroup with clients (a function instance,
/// a container); emptied when full, which costs one `/proc` read per cgroup again. 4096 short
/// paths are a few hundred KiB at most.
pub const CGROUP_PATHS_REMEMBERED: usize = 4096;

/// How long another network namespace's pools outlive its last client (`netns_linger`).
pub const NETNS_LINGER: Duration = Duration::from_secs(5);
/// How long `Container { Create }` waits for the container's pools to be filled before it
/// answers: the connect timeout, so a reachable destination is always waited for, while
/// the OCI runtime (which waits for the hook) is never held much longer.
pub const CONTAINER_WARM_WAIT: Duration = CONNECT_TIMEOUT;
/// How often that wait looks at the pool table (a pool has no fill notification; 5 ms is
/// small beside a connect and costs nothing measurable).
pub const CONTAINER_WARM_POLL: Duration = Duration::from_millis(5);
/// The OCI hook's timeout on each send and receive to the daemon: above
/// [`CONTAINER_WARM_WAIT`] (the longest answer), well below the 10 s the shipped hook
/// definition gives the whole hook.
pub const HOOK_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on a given-back socket's end-of-exchange proof (send, whole reply, quiet window). A
/// server that has not answered a one-line request within a second is not one to reuse a
/// connection to; a socket under check is only unavailable, nobody waits for it.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP proof: no byte may arrive for this long after the reply to our `HEAD`. HTTP/1.1
/// answers in order, so a reply to an abandoned request arrives *before* ours and fails the
/// framing; the only reply the framing cannot tell from ours is an abandoned identical (or
/// body-less) one, and then our own reply follows it as soon as the server has handled a
/// `HEAD`: well under 10 ms on a node or in a data centre (loopback: tens of µs). Longer only
/// keeps each returned socket out of use a little longer (the pool grows to cover it).
pub const CHECK_QUIET: Duration = Duration::from_millis(10);
/// Walks of `/proc` per batch that may still find a given-back socket in another process
/// before it is discarded: the process that gave it back may still be exiting (its link
/// closes before the rest of its fd table) or close the fd just after its `Release`.
pub const HOLDERS_ATTEMPTS: u32 = 3;
/// Pause before walking `/proc` again for sockets found held.
pub const HOLDERS_RETRY_DELAY: Duration = Duration::from_millis(20);
/// How many processes of a demanding cgroup are examined to find the network namespace its
/// demand came from (each one that is in an unknown namespace costs a thread that enters it).
pub const DISCOVER_PIDS: usize = 16;
