//! `[peer]` in the configuration file: this node's identity in a job, where the rendezvous
//! server is, the keys derived from the job secret, the declared topology, timeouts, and
//! which local tenants may have links ([`Admission`]). Parsed and checked at load, like the
//! rest of [`crate::config`].

use crate::config::{parse_allow_cgroups, parse_allow_uids, parse_duration, ConfigError, TenantBy};
use crate::defaults;
use crate::peer::Refusal;
use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Peer-link settings (`[peer]`).
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// This node's identity, `JOB/NAME`.
    pub me: crate::peer::PeerName,
    /// The rendezvous server.
    pub rendezvous: SocketAddr,
    /// Keys derived from the job secret (never logged).
    pub keys: crate::peer::Keys,
    /// Addresses that stand for peers.
    pub virtual_range: crate::peer::VirtualRange,
    /// The job's other members this node may link to (the declared topology): their
    /// virtual addresses are recognised. Names that start links to us are learned too.
    pub peers: Vec<crate::peer::PeerName>,
    /// Links to keep ready: (peer, channel).
    pub prewarm: Vec<(crate::peer::PeerName, u16)>,
    /// How many ready links per prewarmed peer and channel.
    pub prewarm_links: usize,
    /// How long a hole-punching attempt may take before the relay is used.
    pub punch_timeout: Duration,
    /// How long a function may wait for a link.
    pub link_timeout: Duration,
    /// Use the rendezvous server as a relay when punching fails.
    pub relay: bool,
    /// Try hole punching at all (off: every link is relayed; for NATs known to map
    /// endpoint-dependently, where punching can only cost its timeout).
    pub punch: bool,
    /// Which local tenants may have links of this job.
    pub admission: Admission,
}

/// Which local tenants may have peer links (`[peer] allow_uids`, `allow_cgroups`).
///
/// A link speaks for this node in the job (the other end trusts it as `job/name`), so it
/// is for the tenants that hold the job's secret, not for every uid that can reach the
/// daemon's socket. The default, without `allow_uids`: root, the daemon's own uid and the
/// owner of `secret_file` (the uids that can read the secret under the usual 0600 or 0400
/// file). `allow_cgroups` narrows further (the caller must be in one of them or below).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Uids admitted.
    pub uids: Vec<u32>,
    /// Cgroup v2 paths whose members (and members of cgroups below) are admitted; `None`:
    /// any cgroup.
    pub cgroups: Option<Vec<String>>,
    /// Whether `uids` is the default (for the refusal's text).
    pub default_uids: bool,
}

impl Admission {
    /// The default: root, `daemon_uid` and the owner of the secret file.
    #[must_use]
    pub fn default_for(daemon_uid: u32, secret_owner: u32) -> Self {
        let mut uids = vec![0, daemon_uid, secret_owner];
        uids.sort_unstable();
        uids.dedup();
        Self { uids, cgroups: None, default_uids: true }
    }

    /// Whether a tenant may have links; `Err` is the refusal as told to the client.
    ///
    /// # Errors
    /// The refusal, [`Refusal`].
    pub fn admits(&self, job: &str, uid: u32, cgroup: &str) -> Result<(), Refusal> {
        if !self.uids.contains(&uid) {
            let hint = if self.default_uids {
                "by default only root, the daemon's uid and the owner of the secret file; see [peer] allow_uids"
            } else {
                "see [peer] allow_uids"
            };
            return Err(Refusal::Uid { uid, job: job.into(), hint });
        }
        if let Some(roots) = &self.cgroups {
            if !roots.iter().any(|r| crate::config::cgroup_within(cgroup, r)) {
                return Err(Refusal::Cgroup { cgroup: cgroup.into(), job: job.into() });
            }
        }
        Ok(())
    }
}


/// `[peer]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilePeer {
    name: String,
    rendezvous: String,
    secret_file: PathBuf,
    virtual_range: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    prewarm: Vec<String>,
    prewarm_links: Option<usize>,
    punch_timeout: Option<String>,
    link_timeout: Option<String>,
    relay: Option<bool>,
    punch: Option<bool>,
    allow_uids: Option<Vec<toml::Value>>,
    allow_cgroups: Option<Vec<toml::Value>>,
}

impl FilePeer {
    /// Check and resolve; `tenant_by` is the daemon's tenant grouping (`allow_cgroups` needs
    /// the caller's cgroup).
    pub(crate) fn resolve(self, tenant_by: TenantBy) -> Result<PeerSettings, ConfigError> {
        use crate::peer::{Keys, PeerName, VirtualRange};
        let invalid = |field: &str, reason: String| ConfigError::Invalid { field: format!("peer.{field}"), reason };
        let me = PeerName::parse(&self.name).map_err(|e| invalid("name", e.to_string()))?;
        let rendezvous = self
            .rendezvous
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| invalid("rendezvous", format!("{:?} is not HOST:PORT", self.rendezvous)))?;
        let secret = crate::peer::read_secret(&self.secret_file).map_err(|e| invalid("secret_file", e.to_string()))?;
        let admission = self.admission(tenant_by)?;
        let virtual_range = match self.virtual_range {
            Some(r) => VirtualRange::parse(&r).map_err(|e| invalid("virtual_range", e.to_string()))?,
            None => VirtualRange::default(),
        };
        let mut peers = Vec::new();
        for p in &self.peers {
            let n = PeerName::parse(p).map_err(|e| invalid("peers", e.to_string()))?;
            if n.job != me.job {
                return Err(invalid("peers", format!("{n} is not in job {}", me.job)));
            }
            peers.push(n);
        }
        let mut prewarm = Vec::new();
        for p in &self.prewarm {
            let (n, port) = PeerName::parse_with_port(p).map_err(|e| invalid("prewarm", e.to_string()))?;
            if n.job != me.job {
                return Err(invalid("prewarm", format!("{n} is not in job {}", me.job)));
            }
            if n == me {
                return Err(invalid("prewarm", format!("{n} is this node itself")));
            }
            if !peers.contains(&n) {
                peers.push(n.clone());
            }
            prewarm.push((n, port));
        }
        for (i, a) in peers.iter().enumerate() {
            for b in &peers[..i] {
                if virtual_range.addr_of(a) == virtual_range.addr_of(b) {
                    return Err(invalid(
                        "virtual_range",
                        format!("{a} and {b} map to the same address {}; use a larger range", virtual_range.addr_of(a)),
                    ));
                }
            }
        }
        let punch_timeout = match self.punch_timeout {
            Some(d) => parse_duration("peer.punch_timeout", &d)?,
            None => defaults::PUNCH_TIMEOUT,
        };
        let link_timeout = match self.link_timeout {
            Some(d) => parse_duration("peer.link_timeout", &d)?,
            None => defaults::LINK_TIMEOUT,
        };
        if self.punch == Some(false) && self.relay == Some(false) {
            return Err(invalid("punch", "with punch = false and relay = false no link can be made".into()));
        }
        if punch_timeout.is_zero() || link_timeout <= punch_timeout {
            return Err(invalid("link_timeout", "must be longer than punch_timeout (which must not be 0)".into()));
        }
        Ok(PeerSettings {
            me,
            rendezvous,
            keys: Keys::derive(&secret),
            virtual_range,
            peers,
            prewarm,
            prewarm_links: self.prewarm_links.unwrap_or(1).min(1024),
            punch_timeout,
            link_timeout,
            relay: self.relay.unwrap_or(true),
            punch: self.punch.unwrap_or(true),
            admission,
        })
    }

    fn admission(&self, tenant_by: TenantBy) -> Result<Admission, ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&self.secret_file)
            .map_err(|e| ConfigError::Invalid { field: "peer.secret_file".into(), reason: format!("{}: {e}", self.secret_file.display()) })?
            .uid();
        let mut a = Admission::default_for(rustix::process::geteuid().as_raw(), owner);
        if let Some(v) = &self.allow_uids {
            a.uids = parse_allow_uids("peer.allow_uids", "for the default (root, the daemon's uid, the secret file's owner)", v)?;
            a.default_uids = false;
        }
        if let Some(v) = &self.allow_cgroups {
            if tenant_by == TenantBy::Uid {
                return Err(ConfigError::Invalid {
                    field: "peer.allow_cgroups".into(),
                    reason: "needs tenant = \"uid+cgroup\" (with tenant = \"uid\" the daemon does not read callers' cgroups)".into(),
                });
            }
            a.cgroups = Some(parse_allow_cgroups("peer.allow_cgroups", "to admit every cgroup", v)?);
        }
        Ok(a)
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn with_secret(extra: &str, top: &str) -> Result<crate::config::Config, ConfigError> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("warmpool-peer-settings-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("job.secret");
        std::fs::write(&secret, "the-job-secret-0123456789\n").unwrap();
        let text = format!(
            "{top}\n[peer]\nname = \"job/a\"\nrendezvous = \"127.0.0.1:7700\"\nsecret_file = \"{}\"\n{extra}\n",
            secret.display()
        );
        let c = Config::from_toml(&text);
        let _ = std::fs::remove_dir_all(&dir);
        c
    }

    #[test]
    fn admission_defaults_to_root_the_daemon_and_the_secret_owner() {
        let c = with_secret("", "").unwrap();
        let a = c.peer.unwrap().admission;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert!(a.uids.contains(&0) && a.uids.contains(&me), "{a:?}");
        assert!(a.default_uids && a.cgroups.is_none());
        assert!(a.admits("job", 0, "/x").is_ok());
        let e = a.admits("job", 65534, "/x").unwrap_err().to_string();
        assert!(e.contains("uid 65534 may not have peer links of job job") && e.contains("owner of the secret file"), "{e}");
        assert_eq!(Admission::default_for(1000, 1000).uids, vec![0, 1000]);
    }

    #[test]
    fn admission_lists() {
        let c = with_secret("allow_uids = [1000]\nallow_cgroups = [\"/fn.slice\"]", "").unwrap();
        let a = c.peer.unwrap().admission;
        assert_eq!(a.uids, vec![1000], "an explicit list replaces the default (root too)");
        assert!(a.admits("job", 1000, "/fn.slice/f1").is_ok());
        assert!(a.admits("job", 0, "/fn.slice").unwrap_err().to_string().contains("see [peer] allow_uids"));
        assert!(a.admits("job", 1000, "/other").unwrap_err().to_string().contains("cgroup /other may not have peer links"));
        for (extra, top, want) in [
            ("allow_uids = []", "", "peer.allow_uids: an empty list"),
            ("allow_uids = [\"nobody\"]", "", "peer.allow_uids: \"nobody\" is not a uid"),
            ("allow_cgroups = [\"fn\"]", "", "peer.allow_cgroups: \"fn\" is not absolute"),
            ("allow_cgroups = [\"/fn\"]", "tenant = \"uid\"", "peer.allow_cgroups: needs tenant = \"uid+cgroup\""),
        ] {
            let e = with_secret(extra, top).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }
}
