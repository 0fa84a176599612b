//! Configuration: a TOML file (`--config`), quick `--pool HOST:PORT=warm|reuse` flags, and
//! the embedded default (pool every destination on first use as a bounded `warm` pool; reuse
//! nothing unless configured). Everything is validated up front: a bad file is a clear error
//! naming the field, never a daemon that half-starts.

use crate::defaults;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
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
    /// A `--pool` flag is not `HOST:PORT=warm|reuse`.
    #[error("--pool {0:?}: expected HOST:PORT=warm|reuse, optionally with +prefetch")]
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
        }
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
    /// At most this many auto pools (per daemon).
    pub max_destinations: usize,
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
                forget_after: defaults::AUTO_FORGET_AFTER,
            },
            pools: HashMap::new(),
            names: Vec::new(),
            unresolved: Vec::new(),
            resolve_interval: defaults::RESOLVE_INTERVAL,
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

    /// Parse a `--pool HOST:PORT=warm|reuse[+prefetch]` flag and add it.
    ///
    /// # Errors
    /// [`ConfigError::PoolFlag`] or [`ConfigError::Destination`].
    pub fn add_pool_flag(&mut self, flag: &str) -> Result<(), ConfigError> {
        let (dest, policy) = flag.rsplit_once('=').ok_or_else(|| ConfigError::PoolFlag(flag.into()))?;
        let (policy, prefetch) = match policy.strip_suffix("+prefetch") {
            Some(p) => (p, true),
            None => (policy, false),
        };
        let policy = match policy {
            "warm" => Policy::Warm,
            "reuse" => Policy::Reuse,
            _ => return Err(ConfigError::PoolFlag(flag.into())),
        };
        self.add_pool(dest, PoolSettings { prefetch, ..PoolSettings::with_policy(policy) })
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
        if let Some(m) = file.socket_mode {
            c.socket_mode = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|v| *v <= 0o777)
                .ok_or_else(|| ConfigError::Invalid { field: "socket_mode".into(), reason: format!("{m:?} is not octal permission bits like \"0660\"") })?;
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
        let invalid = |reason: &str| Err(ConfigError::Invalid { field: at.into(), reason: reason.into() });
        if s.min_idle > s.max_idle {
            return invalid("min_idle must not exceed max_idle");
        }
        if s.max_idle > s.max_per_destination {
            return invalid("max_idle must not exceed max_per_destination");
        }
        if s.max_per_destination == 0 {
            return invalid("max_per_destination must be at least 1");
        }
        if s.prefetch && s.probe != Probe::None {
            // An offer waits in a process for its first connect; a probe at offer time would
            // say nothing about the socket by then.
            return invalid("prefetch cannot be combined with a probe");
        }
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

[kernel]
assist = "off"              # off | auto | on: eBPF learned initial windows (see README)
max_initial_window = 256
prewarm = "auto"            # with assist: warm pools for destinations demand shows hot
prewarm_threshold = 2

[auto]
enabled = true
policy = "warm"
max_destinations = 64
forget_after = "10m"
min_idle = 1
max_idle = 8
max_per_destination = 64
idle_timeout = "50s"
max_lifetime = "10m"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_matches_the_built_in_one() {
        let c = Config::from_toml(EMBEDDED_DEFAULT).unwrap();
        let d = Config::default();
        assert_eq!(c.auto, d.auto);
        assert_eq!(c.socket, d.socket);
        assert_eq!(c.socket_mode, d.socket_mode);
        assert_eq!(c.kernel, d.kernel);
        assert_eq!((c.allow_uids, c.allow_cgroups), (None, None));
        assert_eq!(c.metrics_tenant_labels, d.metrics_tenant_labels);
    }

    #[test]
    fn allow_lists() {
        let c = Config::from_toml("allow_uids = [0, 1000]\nallow_cgroups = [\"/system.slice/fn.slice/\", \"/a\"]\n").unwrap();
        assert_eq!(c.allow_uids, Some(vec![0, 1000]));
        assert_eq!(c.allow_cgroups, Some(vec!["/system.slice/fn.slice".to_owned(), "/a".to_owned()]));
        assert!(c.admits(1000, "/system.slice/fn.slice").is_ok());
        assert!(c.admits(0, "/system.slice/fn.slice/f1.scope").is_ok());
        assert!(c.admits(0, "/a/b/c").is_ok());
        let e = c.admits(1001, "/a").unwrap_err();
        assert_eq!(e, "uid 1001 is not allowed by this pool manager's allow_uids");
        let e = c.admits(0, "/system.slice/fn.slice2").unwrap_err();
        assert_eq!(e, "cgroup /system.slice/fn.slice2 is not allowed by this pool manager's allow_cgroups");
        assert!(c.admits(0, "/ab").is_err());
        assert!(c.admits(0, "/a/../b").is_err(), "outside the daemon's cgroup namespace");
        assert!(c.admits(0, "").is_err());
        // Absent lists allow everything.
        assert!(Config::default().admits(12345, "/anything").is_ok());
        let only_uids = Config::from_toml("allow_uids = [7]\n").unwrap();
        assert!(only_uids.admits(7, "/x").is_ok() && only_uids.admits(8, "/x").is_err());
        let root = Config::from_toml("allow_cgroups = [\"/\"]\n").unwrap();
        assert!(root.admits(1, "/x/y").is_ok() && root.admits(1, "/").is_ok() && root.admits(1, "/../x").is_err());
    }

    #[test]
    fn bad_allow_lists_name_the_problem() {
        for (text, want) in [
            ("allow_uids = [\"root\"]", "allow_uids: \"root\" is not a uid"),
            ("allow_uids = [-1]", "allow_uids: -1 is not a uid"),
            ("allow_uids = [4294967295]", "allow_uids: 4294967295 is not a uid"),
            ("allow_uids = [1.5]", "allow_uids: 1.5 is not a uid"),
            ("allow_uids = []", "allow_uids: an empty list"),
            ("allow_uids = 0", "allow_uids"),
            ("allow_cgroups = [\"system.slice\"]", "allow_cgroups: \"system.slice\" is not absolute"),
            ("allow_cgroups = [3]", "allow_cgroups: 3 is not a cgroup path"),
            ("allow_cgroups = [\"/a/../b\"]", "\"..\" component"),
            ("allow_cgroups = [\"/a//b\"]", "empty"),
            ("allow_cgroups = [\"/sys/fs/cgroup/fn.slice\"]", "under the cgroup2 mount"),
            ("allow_cgroups = []", "allow_cgroups: an empty list"),
        ] {
            let e = Config::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_toml(
            r#"
            metrics = "127.0.0.1:9464"
            [auto]
            enabled = false
            [kernel]
            assist = "on"
            cgroups = ["/sys/fs/cgroup/functions"]
            [[pool]]
            destination = "127.0.0.1:6379"
            policy = "reuse"
            min_idle = 2
            quarantine = "2ms"
            probe = "redis-ping"
            "#,
        )
        .unwrap();
        assert!(!c.auto.enabled);
        assert_eq!(c.kernel.assist, AssistMode::On);
        assert_eq!(c.kernel.cgroups, vec![PathBuf::from("/sys/fs/cgroup/functions")]);
        let Lookup::Configured(s) = c.lookup(&"127.0.0.1:6379".parse().unwrap()) else { panic!() };
        assert_eq!((s.policy, s.min_idle, s.probe), (Policy::Reuse, 2, Probe::RedisPing));
        assert_eq!(s.quarantine, Duration::from_millis(2));
        assert!(matches!(c.lookup(&"[::ffff:127.0.0.1]:6379".parse().unwrap()), Lookup::Configured(_)));
        assert!(matches!(c.lookup(&"127.0.0.1:1".parse().unwrap()), Lookup::NotPooled));
    }

    #[test]
    fn host_names_are_kept_and_may_resolve_later() {
        // (Only names /etc/hosts answers: a test sends no DNS query. A name that does not
        // resolve is tested with a daemon whose name service is a private /etc/hosts.)
        let c = Config::from_toml(
            "[[pool]]\ndestination = \"localhost:6379\"\npolicy = \"warm\"\n\
             [[pool]]\ndestination = \"127.0.0.1:81\"\npolicy = \"warm\"\n",
        )
        .unwrap();
        assert!(matches!(c.lookup(&"127.0.0.1:6379".parse().unwrap()), Lookup::Configured(_)));
        let names: Vec<&str> = c.names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["localhost:6379"], "IP literals are not names");
        assert!(c.unresolved.is_empty());
        let (now, failed) = c.resolve_names();
        assert!(now.contains_key(&"127.0.0.1:6379".parse().unwrap()) && now.contains_key(&"[::ffff:127.0.0.1]:6379".parse().unwrap()));
        assert!(failed.is_empty());
        for bad in ["nohost", "host:port", ":80", "127.0.0.1:99999"] {
            let e = Config::from_toml(&format!("[[pool]]\ndestination = \"{bad}\"\npolicy = \"warm\"\n")).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        assert!(Config::from_toml("resolve_interval = \"1ms\"\n").is_err());
    }

    #[test]
    fn bad_input_names_the_problem() {
        let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"sometimes\"\n").unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
        let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.to_string().contains("policy is required"), "{e}");
        let e = Config::from_toml("bogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"warm\"\nidle_timeout = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"warm\"\nmin_idle = 9\nmax_idle = 2\n").unwrap_err();
        assert!(e.to_string().contains("min_idle"), "{e}");
        let mut c = Config::default();
        assert!(matches!(c.add_pool_flag("127.0.0.1:80"), Err(ConfigError::PoolFlag(_))));
        assert!(matches!(c.add_pool_flag("127.0.0.1:80=maybe"), Err(ConfigError::PoolFlag(_))));
        assert!(matches!(c.add_pool_flag("127.0.0.1:80=prefetch"), Err(ConfigError::PoolFlag(_))));
        c.add_pool_flag("127.0.0.1:80=reuse").unwrap();
        c.add_pool_flag("127.0.0.1:81=warm+prefetch").unwrap();
        let p81 = c.pools.get(&"127.0.0.1:81".parse().unwrap()).unwrap();
        assert!(p81.prefetch && p81.policy == Policy::Warm);
        assert!(!c.pools.get(&"127.0.0.1:80".parse().unwrap()).unwrap().prefetch);
        let c = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"reuse\"\nprefetch = true\n").unwrap();
        assert!(c.pools.get(&"127.0.0.1:1".parse().unwrap()).unwrap().prefetch);
        let e = Config::from_toml("[[pool]]\ndestination = \"127.0.0.1:1\"\npolicy = \"reuse\"\nprefetch = true\nprobe = \"redis-ping\"\n").unwrap_err();
        assert!(e.to_string().contains("prefetch cannot be combined with a probe"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("x", "1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("x", "10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("x", "100us").unwrap(), Duration::from_micros(100));
        assert!(parse_duration("x", "5 parsecs").is_err());
    }
}
