//! Configuration: a TOML file (`--config`), quick `--pool HOST:PORT=warm|reuse` flags, and
//! the embedded default (pool every destination on first use as a bounded `warm` pool; reuse
//! nothing unless configured). Everything is validated up front: a bad file is a clear error
//! naming the field, never a daemon that half-starts.

use crate::defaults;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::allow::cgroup_within;
pub(crate) use crate::allow::{parse_allow_cgroups, parse_allow_uids};
pub use crate::peer::settings::PeerSettings;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown or mistyped fields.
    #[error("{path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: Box<toml::de::Error>,
    },
    /// A `--pool` flag is not `HOST:PORT=warm|reuse:PROTOCOL`.
    #[error("--pool {0:?}: expected HOST:PORT=warm or HOST:PORT=reuse:http|redis|unchecked, optionally with +prefetch")]
    PoolFlag(String),
    /// A destination did not resolve.
    #[error("destination {dest:?}: {reason}")]
    Destination {
        /// As written.
        dest: String,
        /// Why.
        reason: String,
    },
    /// A value is out of range.
    #[error("{field}: {reason}")]
    Invalid {
        /// Which setting.
        field: String,
        /// Why.
        reason: String,
    },
}

/// What a destination's pool may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Only sockets that never carried application bytes: safe for any protocol.
    Warm,
    /// Warm, plus clean sockets given back by finished functions.
    Reuse,
}

impl Policy {
    /// Lower-case name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Warm => "warm",
            Self::Reuse => "reuse",
        }
    }
}

/// Check run on a socket right before hand-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// Only the kernel-state checks every socket gets.
    None,
    /// Send `PING`, expect `+PONG` (Redis and compatible servers).
    RedisPing,
}

/// Per-destination settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolSettings {
    /// Warm or reuse.
    pub policy: Policy,
    /// Sockets kept ready.
    pub min_idle: usize,
    /// Ready sockets kept at most.
    pub max_idle: usize,
    /// All sockets (any state) at most.
    pub max_per_destination: usize,
    /// Close sockets idle this long.
    pub idle_timeout: Duration,
    /// Close sockets this old.
    pub max_lifetime: Duration,
    /// Wait before a returned socket is reusable.
    pub quarantine: Duration,
    /// Hand-out probe.
    pub probe: Probe,
    /// Bound on the daemon's connects.
    pub connect_timeout: Duration,
    /// Offer each starting process of a tenant one ready socket at load time (the shim's
    /// `Prefetch`), so that its first `connect()` here needs no round trip to the daemon.
    pub prefetch: bool,
    /// The protocol spoken on a reuse pool's sockets: the end-of-exchange proof a given-back
    /// socket passes before reuse (required for `reuse`; `None` in warm pools).
    pub protocol: Option<crate::proof::Protocol>,
    /// The proof's own settings (HTTP path and host, timeouts).
    pub check: crate::proof::CheckSettings,
}

impl PoolSettings {
    /// The defaults for a policy.
    #[must_use]
    pub fn with_policy(policy: Policy) -> Self {
        Self {
            policy,
            min_idle: defaults::MIN_IDLE,
            max_idle: defaults::MAX_IDLE,
            max_per_destination: defaults::MAX_PER_DESTINATION,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_lifetime: defaults::MAX_LIFETIME,
            quarantine: defaults::QUARANTINE,
            probe: Probe::None,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            prefetch: false,
            protocol: None,
            check: crate::proof::CheckSettings::default(),
        }
    }

    /// Rules every pool's settings obey, whichever way they were written.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `at`.
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let invalid = |reason: &str| Err(ConfigError::Invalid { field: at.into(), reason: reason.into() });
        if self.min_idle > self.max_idle {
            return invalid("min_idle must not exceed max_idle");
        }
        if self.max_idle > self.max_per_destination {
            return invalid("max_idle must not exceed max_per_destination");
        }
        if self.max_per_destination == 0 {
            return invalid("max_per_destination must be at least 1");
        }
        if self.prefetch && self.probe != Probe::None {
            // An offer waits in a process for its first connect; a probe at offer time would
            // say nothing about the socket by then.
            return invalid("prefetch cannot be combined with a probe");
        }
        if self.policy == Policy::Reuse && self.protocol.is_none() {
            return invalid(crate::proof::PROTOCOL_REQUIRED);
        }
        if self.check.timeout.is_zero() || self.check.quiet >= self.check.timeout {
            return invalid("check_timeout must be longer than check_quiet");
        }
        Ok(())
    }
}

/// How callers are grouped into tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TenantBy {
    /// Uid and cgroup: the default; functions of one user in different cgroups never share.
    #[serde(rename = "uid+cgroup")]
    UidAndCgroup,
    /// Uid only (all cgroups of a uid share its pools).
    #[serde(rename = "uid")]
    Uid,
}

/// Whether to use the eBPF kernel assist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssistMode {
    /// Never.
    Off,
    /// When the build, the kernel and our privileges allow; otherwise say so once and run
    /// without.
    Auto,
    /// Required: the daemon does not start without it.
    On,
}

/// Kernel assist settings (`[kernel]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Off, auto or on.
    pub assist: AssistMode,
    /// Cgroup v2 directories to attach to (default: the daemon's own cgroup).
    pub cgroups: Vec<PathBuf>,
    /// Upper bound for a learned initial window, in segments.
    pub max_initial_window: u32,
    /// Prewarm destinations that demand (connects seen by the kernel) shows to be hot.
    pub prewarm: bool,
    /// Connects from one tenant to one destination that make it hot.
    pub prewarm_threshold: u64,
}

/// The embedded-default behaviour for destinations not configured explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auto {
    /// Pool unconfigured destinations on first use.
    pub enabled: bool,
    /// Settings for those pools.
    pub settings: Arc<PoolSettings>,
    /// At most this many auto pools per tenant (`Prewarm` requests included): one tenant
    /// cannot use up the budget of others.
    pub max_destinations: usize,
    /// At most this many auto pools on the daemon, all tenants together: bounds the fds the
    /// daemon holds however many tenants come.
    pub max_pools: usize,
    /// Remove an auto pool unused for this long.
    pub forget_after: Duration,
}

/// The daemon's whole configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Its permission bits.
    pub socket_mode: u32,
    /// Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// Per-pool series in `/metrics`, labelled with destination, uid and cgroup (tenant data:
    /// off by default, when only sums over all pools are shown).
    pub metrics_tenant_labels: bool,
    /// Tenant grouping.
    pub tenant_by: TenantBy,
    /// Uids allowed to use the pool (`None`: every uid).
    pub allow_uids: Option<Vec<u32>>,
    /// Cgroup v2 paths (as in `/proc/PID/cgroup`) whose members, and members of cgroups below
    /// them, may use the pool (`None`: every cgroup).
    pub allow_cgroups: Option<Vec<String>>,
    /// Set `net.ipv4.tcp_slow_start_after_idle = 0` so idle pooled sockets keep their window.
    pub keep_window_when_idle: bool,
    /// Destinations not listed.
    pub auto: Auto,
    /// Kernel assist.
    pub kernel: Kernel,
    /// Explicit pools, by resolved address (both the address as written and, for IPv4, its
    /// IPv4-mapped IPv6 form).
    pub pools: HashMap<SocketAddr, Arc<PoolSettings>>,
    /// Destinations written as host names: resolved at load (into `pools`) and again every
    /// `resolve_interval` while the daemon runs, so that addresses a name gains later (a
    /// service that moved, DNS that was not up at boot) are pooled too.
    pub names: Vec<(String, Arc<PoolSettings>)>,
    /// Names that did not resolve at load, with the reason: not an error (see `names`).
    pub unresolved: Vec<(String, String)>,
    /// How often `names` are resolved again.
    pub resolve_interval: Duration,
    /// How long a network namespace other than the daemon's keeps its pools (and the thread
    /// that makes its sockets) after its last client went away.
    pub netns_linger: Duration,
    /// How often pools of tenants whose cgroup was removed are looked for (and closed).
    pub tenant_sweep: Duration,
    /// Peer links (`[peer]`), when this node takes part in a job.
    pub peer: Option<PeerSettings>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(defaults::SOCKET),
            socket_mode: defaults::SOCKET_MODE,
            metrics: None,
            metrics_tenant_labels: false,
            tenant_by: TenantBy::UidAndCgroup,
            allow_uids: None,
            allow_cgroups: None,
            keep_window_when_idle: true,
            auto: Auto {
                enabled: true,
                settings: Arc::new(PoolSettings::with_policy(Policy::Warm)),
                max_destinations: defaults::AUTO_MAX_DESTINATIONS,
                max_pools: defaults::AUTO_MAX_POOLS,
                forget_after: defaults::AUTO_FORGET_AFTER,
            },
            pools: HashMap::new(),
            names: Vec::new(),
            unresolved: Vec::new(),
            resolve_interval: defaults::RESOLVE_INTERVAL,
            netns_linger: defaults::NETNS_LINGER,
            tenant_sweep: defaults::TENANT_SWEEP,
            kernel: Kernel {
                assist: AssistMode::Off,
                cgroups: vec![],
                max_initial_window: defaults::MAX_INITIAL_WINDOW,
                prewarm: true,
                prewarm_threshold: defaults::PREWARM_THRESHOLD,
            },
            peer: None,
        }
    }
}

/// What the pool manager should do for a destination.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Configured explicitly.
    Configured(Arc<PoolSettings>),
    /// Pooled on first use under the auto settings.
    Auto(Arc<PoolSettings>),
    /// Not pooled.
    NotPooled,
}

impl Config {
    /// Whether any pool (configured, named, or `[auto]`) offers sockets to starting processes:
    /// published next to the socket ([`prefetch_hint_path`]) so that the shim opens its link at
    /// load time only when something can be offered.
    #[must_use]
    pub fn prefetches(&self) -> bool {
        self.pools.values().any(|s| s.prefetch)
            || self.names.iter().any(|(_, s)| s.prefetch)
            || (self.auto.enabled && self.auto.settings.prefetch)
    }

    /// Whether a client may use the pool under `allow_uids` and `allow_cgroups`; `Err` is the
    /// reason it may not, as told to the client.
    ///
    /// # Errors
    /// The text of the refusal.
    pub fn admits(&self, uid: u32, cgroup: &str) -> Result<(), String> {
        if let Some(uids) = &self.allow_uids {
            if !uids.contains(&uid) {
                return Err(format!("uid {uid} is not allowed by this pool manager's allow_uids"));
            }
        }
        if let Some(roots) = &self.allow_cgroups {
            if !roots.iter().any(|r| cgroup_within(cgroup, r)) {
                return Err(format!("cgroup {cgroup} is not allowed by this pool manager's allow_cgroups"));
            }
        }
        Ok(())
    }

    /// Settings for a destination.
    #[must_use]
    pub fn lookup(&self, dest: &SocketAddr) -> Lookup {
        if let Some(s) = self.pools.get(dest) {
            return Lookup::Configured(s.clone());
        }
        let unspecified_scope = match dest {
            SocketAddr::V6(v6) if v6.scope_id() != 0 => {
                let mut d = *v6;
                d.set_scope_id(0);
                self.pools.get(&SocketAddr::V6(d))
            }
            _ => None,
        };
        if let Some(s) = unspecified_scope {
            return Lookup::Configured(s.clone());
        }
        if self.auto.enabled {
            Lookup::Auto(self.auto.settings.clone())
        } else {
            Lookup::NotPooled
        }
    }

    /// Add a pool for every address `dest` (`HOST:PORT`) resolves to. A host name is also
    /// kept in `names`, and one that does not resolve now is not an error: it is listed in
    /// `unresolved` and pooled once it resolves.
    ///
    /// # Errors
    /// [`ConfigError::Destination`] if `dest` is not `HOST:PORT`.
    pub fn add_pool(&mut self, dest: &str, settings: PoolSettings) -> Result<(), ConfigError> {
        let bad = |reason: &str| ConfigError::Destination { dest: dest.into(), reason: reason.into() };
        let (host, port) = dest.rsplit_once(':').ok_or_else(|| bad("expected HOST:PORT"))?;
        port.parse::<u16>().map_err(|_| bad("the port is not a number from 0 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("expected HOST:PORT"));
        }
        settings.validate(dest)?;
        let settings = Arc::new(settings);
        if host.parse::<std::net::IpAddr>().is_err() {
            self.names.push((dest.to_owned(), settings.clone()));
        }
        match resolve(dest) {
            Ok(addrs) => {
                for a in addrs {
                    insert_addr(&mut self.pools, a, &settings);
                }
            }
            Err(reason) if host.parse::<std::net::IpAddr>().is_err() => self.unresolved.push((dest.to_owned(), reason)),
            Err(reason) => return Err(bad(&reason)),
        }
        Ok(())
    }

    /// Resolve `names` now (blocking): every address with its settings (IPv4 ones also
    /// IPv4-mapped), and the names that failed with the reason.
    #[must_use]
    pub fn resolve_names(&self) -> (AddrSettings, Vec<(String, String)>) {
        let mut out = HashMap::new();
        let mut failed = Vec::new();
        for (name, settings) in &self.names {
            match resolve(name) {
                Ok(addrs) => {
                    for a in addrs {
                        insert_addr(&mut out, a, settings);
                    }
                }
                Err(reason) => failed.push((name.clone(), reason)),
            }
        }
        (out, failed)
    }

    /// Parse a `--pool HOST:PORT=warm|reuse:PROTOCOL[+prefetch]` flag and add it.
    ///
    /// # Errors
    /// [`ConfigError::PoolFlag`], [`ConfigError::Invalid`] (a reuse pool without a protocol)
    /// or [`ConfigError::Destination`].
    pub fn add_pool_flag(&mut self, flag: &str) -> Result<(), ConfigError> {
        let (dest, policy) = flag.rsplit_once('=').ok_or_else(|| ConfigError::PoolFlag(flag.into()))?;
        let (policy, prefetch) = match policy.strip_suffix("+prefetch") {
            Some(p) => (p, true),
            None => (policy, false),
        };
        let (policy, protocol) = match policy.split_once(':') {
            Some((p, proto)) => (p, Some(crate::proof::Protocol::parse(proto).ok_or_else(|| ConfigError::PoolFlag(flag.into()))?)),
            None => (policy, None),
        };
        let policy = match policy {
            "warm" if protocol.is_none() => Policy::Warm,
            "reuse" => Policy::Reuse,
            _ => return Err(ConfigError::PoolFlag(flag.into())),
        };
        if policy == Policy::Reuse && protocol.is_none() {
            return Err(ConfigError::Invalid { field: format!("--pool {flag}"), reason: crate::proof::PROTOCOL_REQUIRED.into() });
        }
        self.add_pool(dest, PoolSettings { prefetch, protocol, ..PoolSettings::with_policy(policy) })
    }

    /// Load a TOML file on top of the defaults.
    ///
    /// # Errors
    /// Any [`ConfigError`].
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.into(), source },
            other => other,
        })
    }

    /// Parse TOML text on top of the defaults.
    ///
    /// # Errors
    /// Any [`ConfigError`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::from("config"), source: Box::new(e) })?;
        let mut c = Self::default();
        if let Some(s) = file.socket {
            c.socket = s;
        }
        if let Some(r) = file.resolve_interval {
            c.resolve_interval = parse_duration("resolve_interval", &r)?;
            if c.resolve_interval < Duration::from_millis(10) {
                return Err(ConfigError::Invalid { field: "resolve_interval".into(), reason: "must be at least 10ms".into() });
            }
        }
        if let Some(l) = file.netns_linger {
            c.netns_linger = parse_duration("netns_linger", &l)?;
        }
        if let Some(t) = file.tenant_sweep {
            c.tenant_sweep = parse_duration("tenant_sweep", &t)?;
            if c.tenant_sweep < Duration::from_millis(10) {
                return Err(ConfigError::Invalid { field: "tenant_sweep".into(), reason: "must be at least 10ms".into() });
            }
        }
        if let Some(m) = file.socket_mode {
            c.socket_mode = u32::from_str_radix(m.trim_start_matches("0o"), 8).ok().filter(|v| *v <= 0o777).ok_or_else(|| {
                ConfigError::Invalid { field: "socket_mode".into(), reason: format!("{m:?} is not octal permission bits like \"0660\"") }
            })?;
        }
        if let Some(m) = file.metrics {
            c.metrics = Some(m.parse().map_err(|_| ConfigError::Invalid { field: "metrics".into(), reason: format!("{m:?} is not ADDR:PORT") })?);
        }
        if let Some(l) = file.metrics_tenant_labels {
            c.metrics_tenant_labels = l;
        }
        if let Some(t) = file.tenant {
            c.tenant_by = t;
        }
        if let Some(k) = file.keep_window_when_idle {
            c.keep_window_when_idle = k;
        }
        if let Some(v) = file.allow_uids {
            c.allow_uids = Some(parse_allow_uids("allow_uids", "to allow every uid", &v)?);
        }
        if let Some(v) = file.allow_cgroups {
            c.allow_cgroups = Some(parse_allow_cgroups("allow_cgroups", "to allow every cgroup", &v)?);
        }
        // Configuring anything means "pool what I configured": first-use pooling stays on
        // only where the file says so with an [auto] section.
        c.auto.enabled = false;
        if let Some(a) = file.auto {
            let policy = a.pool.policy.unwrap_or(Policy::Warm);
            c.auto.enabled = a.enabled.unwrap_or(true);
            c.auto.settings = Arc::new(a.pool.apply(PoolSettings::with_policy(policy), "auto")?);
            c.auto.max_destinations = a.max_destinations.unwrap_or(c.auto.max_destinations);
            c.auto.max_pools = a.max_pools.unwrap_or(c.auto.max_pools);
            if let Some(f) = a.forget_after {
                c.auto.forget_after = parse_duration("auto.forget_after", &f)?;
            }
        }
        if let Some(k) = file.kernel {
            c.kernel.assist = k.assist.unwrap_or(AssistMode::Auto);
            c.kernel.cgroups = k.cgroups;
            c.kernel.max_initial_window = k.max_initial_window.unwrap_or(c.kernel.max_initial_window);
            c.kernel.prewarm = match k.prewarm.as_deref() {
                None | Some("auto") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(ConfigError::Invalid { field: "kernel.prewarm".into(), reason: format!("{other:?}: expected \"auto\" or \"off\"") })
                }
            };
            c.kernel.prewarm_threshold = k.prewarm_threshold.unwrap_or(c.kernel.prewarm_threshold).max(1);
            if c.kernel.max_initial_window < 10 {
                return Err(ConfigError::Invalid { field: "kernel.max_initial_window".into(), reason: "must be at least 10 (the default initial window)".into() });
            }
        }
        if let Some(p) = file.peer {
            c.peer = Some(p.resolve(c.tenant_by)?);
        }
        for (i, p) in file.pool.into_iter().enumerate() {
            let dest = p.destination.clone();
            let policy = p.pool.policy.ok_or_else(|| ConfigError::Invalid {
                field: format!("pool[{i}] ({dest})"),
                reason: "policy is required: \"warm\" or \"reuse\"".into(),
            })?;
            let s = p.pool.apply(PoolSettings::with_policy(policy), &format!("pool[{i}] ({dest})"))?;
            c.add_pool(&dest, s)?;
        }
        Ok(c)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    resolve_interval: Option<String>,
    netns_linger: Option<String>,
    tenant_sweep: Option<String>,
    metrics: Option<String>,
    metrics_tenant_labels: Option<bool>,
    tenant: Option<TenantBy>,
    allow_uids: Option<Vec<toml::Value>>,
    allow_cgroups: Option<Vec<toml::Value>>,
    keep_window_when_idle: Option<bool>,
    auto: Option<FileAuto>,
    kernel: Option<FileKernel>,
    peer: Option<crate::peer::settings::FilePeer>,
    #[serde(default)]
    pool: Vec<FilePool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKernel {
    assist: Option<AssistMode>,
    #[serde(default)]
    cgroups: Vec<PathBuf>,
    max_initial_window: Option<u32>,
    prewarm: Option<String>,
    prewarm_threshold: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuto {
    enabled: Option<bool>,
    max_destinations: Option<usize>,
    max_pools: Option<usize>,
    forget_after: Option<String>,
    #[serde(flatten)]
    pool: FileSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePool {
    destination: String,
    #[serde(flatten)]
    pool: FileSettings,
}

#[derive(Debug, Deserialize, Default)]
struct FileSettings {
    policy: Option<Policy>,
    min_idle: Option<usize>,
    max_idle: Option<usize>,
    max_per_destination: Option<usize>,
    idle_timeout: Option<String>,
    max_lifetime: Option<String>,
    quarantine: Option<String>,
    probe: Option<Probe>,
    connect_timeout: Option<String>,
    prefetch: Option<bool>,
    protocol: Option<crate::proof::Protocol>,
    check_path: Option<String>,
    check_host: Option<String>,
    check_timeout: Option<String>,
    check_quiet: Option<String>,
}

impl FileSettings {
    fn apply(self, mut s: PoolSettings, at: &str) -> Result<PoolSettings, ConfigError> {
        let dur = |name: &str, v: Option<String>, d: Duration| -> Result<Duration, ConfigError> {
            v.map_or(Ok(d), |v| parse_duration(&format!("{at}.{name}"), &v))
        };
        s.min_idle = self.min_idle.unwrap_or(s.min_idle);
        s.max_idle = self.max_idle.unwrap_or(s.max_idle);
        s.max_per_destination = self.max_per_destination.unwrap_or(s.max_per_destination);
        s.idle_timeout = dur("idle_timeout", self.idle_timeout, s.idle_timeout)?;
        s.max_lifetime = dur("max_lifetime", self.max_lifetime, s.max_lifetime)?;
        s.quarantine = dur("quarantine", self.quarantine, s.quarantine)?;
        s.connect_timeout = dur("connect_timeout", self.connect_timeout, s.connect_timeout)?;
        s.probe = self.probe.unwrap_or(s.probe);
        s.prefetch = self.prefetch.unwrap_or(s.prefetch);
        s.protocol = self.protocol.or(s.protocol);
        s.check.path = self.check_path.unwrap_or(s.check.path);
        s.check.host = self.check_host.or(s.check.host);
        s.check.timeout = dur("check_timeout", self.check_timeout, s.check.timeout)?;
        s.check.quiet = dur("check_quiet", self.check_quiet, s.check.quiet)?;
        if !s.check.path.starts_with('/') || !crate::proof::header_safe(&s.check.path) || s.check.path.contains(' ') {
            return Err(ConfigError::Invalid {
                field: format!("{at}.check_path"),
                reason: "must start with / and hold no space or control character".into(),
            });
        }
        if s.check.host.as_deref().is_some_and(|h| h.is_empty() || !crate::proof::header_safe(h)) {
            return Err(ConfigError::Invalid { field: format!("{at}.check_host"), reason: "must be a non-empty header value".into() });
        }
        s.validate(at)?;
        Ok(s)
    }
}

/// Pool settings by destination address.
pub type AddrSettings = HashMap<SocketAddr, Arc<PoolSettings>>;

fn resolve(dest: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = dest.to_socket_addrs().map_err(|e| e.to_string())?.collect();
    if addrs.is_empty() {
        return Err("resolves to no address".into());
    }
    Ok(addrs)
}

/// `a` and, for IPv4, its IPv4-mapped IPv6 form (what an `AF_INET6` socket asks for).
fn insert_addr(map: &mut HashMap<SocketAddr, Arc<PoolSettings>>, a: SocketAddr, settings: &Arc<PoolSettings>) {
    map.insert(a, settings.clone());
    if let SocketAddr::V4(v4) = a {
        map.insert(SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()), settings.clone());
    }
}

/// Parse `"250ms"`, `"5s"`, `"10m"`, `"1h"`, `"100us"`.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `field`.
pub fn parse_duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| ConfigError::Invalid { field: field.into(), reason: format!("{s:?} is not a duration like \"250ms\" or \"30s\"") })?;
    let secs = match unit.trim() {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(ConfigError::Invalid { field: field.into(), reason: format!("{s:?}: unit must be us, ms, s, m or h") }),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The embedded default configuration, as a file (shown by `pool-manager config`).
pub const EMBEDDED_DEFAULT: &str = r#"# warmpool embedded default: every destination a function connects to becomes a small
# warm pool on first use (pre-connected sockets, never reused: safe for any protocol).
socket = "/run/warmpool/pool.sock"
socket_mode = "0666"          # who may connect at all (e.g. "0660": owner and group)
tenant = "uid+cgroup"
# allow_uids = [0, 1000]      # serve only these uids (absent: every uid)
# allow_cgroups = ["/system.slice/fn.slice"]   # only these cgroups and those below them
keep_window_when_idle = true
# metrics = "127.0.0.1:9464"  # Prometheus /metrics and /ready (off unless set or --metrics)
metrics_tenant_labels = false # true: per-pool series labelled with destination, uid, cgroup
netns_linger = "5s"           # pools of another network namespace close this long after its last client
tenant_sweep = "1s"           # pools of tenants whose cgroup was removed close within this

[kernel]
assist = "off"              # off | auto | on: eBPF learned initial windows (see README)
max_initial_window = 256
prewarm = "auto"            # with assist: warm pools for destinations demand shows hot
prewarm_threshold = 2

[auto]
enabled = true
policy = "warm"
max_destinations = 64        # auto pools per tenant (uid, cgroup, network namespace)
max_pools = 1024             # auto pools on the daemon, all tenants together
forget_after = "10m"
min_idle = 1
max_idle = 8
max_per_destination = 64
idle_timeout = "50s"
max_lifetime = "10m"
"#;

#[cfg(test)]
mod tests;

/// The prefetch hint: a file next to the socket (`<socket>.prefetch`) that exists while the
/// daemon behind the socket has a prefetching pool. The shim checks it with one `access()` at
/// load: a process starts its link (and takes offers) early only when that can pay off, and
/// every other process links at its first `connect()` to a pooled destination, or never.
#[must_use]
pub fn prefetch_hint_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".prefetch");
    PathBuf::from(p)
}
