//! Allow-lists in the configuration: uids (`allow_uids`, `[peer] allow_uids`) and cgroup v2
//! subtrees (`allow_cgroups`, `[peer] allow_cgroups`) as written, checked at load, and the
//! subtree test the daemon applies to a caller's cgroup.

use crate::config::ConfigError;

/// Whether the cgroup `path` (as read from `/proc/PID/cgroup`) is `root` or below it. A path
/// with a `..` component (a process outside the daemon's cgroup namespace) is within nothing.
#[must_use]
pub fn cgroup_within(path: &str, root: &str) -> bool {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return false;
    }
    let root = root.trim_end_matches('/');
    root.is_empty() || path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

/// A list of uids (`field`, e.g. `allow_uids`); `absent` says what leaving the key out means.
pub(crate) fn parse_allow_uids(field: &str, absent: &str, v: &[toml::Value]) -> Result<Vec<u32>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { field: field.into(), reason };
    if v.is_empty() {
        return Err(invalid(format!("an empty list would refuse every client; remove the key {absent}")));
    }
    v.iter()
        .map(|u| match u {
            // u32::MAX is (uid_t)-1, "no uid".
            toml::Value::Integer(n) => u32::try_from(*n)
                .ok()
                .filter(|n| *n != u32::MAX)
                .ok_or_else(|| invalid(format!("{n} is not a uid (0 to 4294967294)"))),
            other => Err(invalid(format!("{other} is not a uid: write numbers, e.g. allow_uids = [0, 1000]"))),
        })
        .collect()
}

/// A list of cgroup v2 paths (`field`, e.g. `allow_cgroups`); `absent` as for uids.
pub(crate) fn parse_allow_cgroups(field: &str, absent: &str, v: &[toml::Value]) -> Result<Vec<String>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { field: field.into(), reason };
    if v.is_empty() {
        return Err(invalid(format!("an empty list would refuse every client; remove the key {absent}")));
    }
    let example = "write cgroup v2 paths as in /proc/PID/cgroup, e.g. \"/system.slice/fn.slice\"";
    v.iter()
        .map(|p| {
            let toml::Value::String(p) = p else { return Err(invalid(format!("{p} is not a cgroup path: {example}"))) };
            if !p.starts_with('/') {
                return Err(invalid(format!("{p:?} is not absolute: {example}")));
            }
            if p == "/sys/fs/cgroup" || p.starts_with("/sys/fs/cgroup/") {
                return Err(invalid(format!("{p:?} is a path under the cgroup2 mount: {example} (without the mount point)")));
            }
            let trimmed = if p.len() > 1 { p.trim_end_matches('/') } else { p.as_str() };
            if trimmed.len() > 1 && trimmed[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Err(invalid(format!("{p:?} has an empty, \".\" or \"..\" component: {example}")));
            }
            Ok(if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() })
        })
        .collect()
}
