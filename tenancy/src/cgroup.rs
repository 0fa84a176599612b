//! Cgroup v2 discovery: where the hierarchy is mounted (read from `/proc/self/mountinfo`,
//! never hard-coded: it is `/sys/fs/cgroup` on most hosts and `/sys/fs/cgroup/unified` on
//! hybrid ones), which cgroup a process is in, and the directory of a cgroup id.

use std::path::{Path, PathBuf};

/// Errors from cgroup discovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// A proc file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No cgroup2 mount in mountinfo.
    #[error("no cgroup2 file system is mounted")]
    NotMounted,
    /// The process has no cgroup v2 entry (`0::`).
    #[error("process {0} has no cgroup v2 membership")]
    NoV2Entry(i32),
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
///
/// # Errors
/// [`CgroupError::Read`] or [`CgroupError::NotMounted`].
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NotMounted)
}

/// Find the cgroup2 mount point in mountinfo text.
#[must_use]
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mountpoint options [optional...] - fstype source super
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(unescape_octal))?
    })
}

fn unescape_octal(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// The cgroup v2 path (relative to the hierarchy root, e.g. `/system.slice/x.service`) of `pid`.
///
/// One `read` into a stack buffer where the file fits (it always does but on hosts with very
/// deep paths): no allocation but the returned path, no `fstat` for a size hint.
///
/// # Errors
/// [`CgroupError::Read`] if the process is gone (or its cgroup path is not UTF-8),
/// [`CgroupError::NoV2Entry`] on a v1-only host.
pub fn cgroup_of(pid: i32) -> Result<String, CgroupError> {
    use std::io::Write as _;
    let mut name = [0u8; 32];
    let mut w = &mut name[..];
    // "/proc/" + at most 11 characters of an i32 + "/cgroup" + NUL fits in 32 bytes.
    let _ = write!(w, "/proc/{pid}/cgroup\0");
    let path = std::ffi::CStr::from_bytes_until_nul(&name).unwrap_or(c"/proc/self/cgroup");
    let err = |source: std::io::Error| CgroupError::Read { path: path.to_string_lossy().into_owned(), source };
    let fd = rustix::fs::open(path, rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
        .map_err(|e| err(e.into()))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    let line = loop {
        if let Some(line) = v2_line(&buf[..len]) {
            break line;
        }
        if len == buf.len() {
            // Longer than the stack buffer and no complete `0::` line yet: read the rest.
            use std::io::Read as _;
            let mut all = buf.to_vec();
            std::fs::File::from(fd).read_to_end(&mut all).map_err(err)?;
            let line = v2_line(&all).ok_or(CgroupError::NoV2Entry(pid))?;
            return owned_path(line).map_err(err);
        }
        match rustix::io::read(&fd, &mut buf[len..]) {
            Ok(0) => return Err(CgroupError::NoV2Entry(pid)),
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(err(e.into())),
        }
    };
    owned_path(line).map_err(err)
}

fn owned_path(line: &[u8]) -> Result<String, std::io::Error> {
    // Never lossy: two cgroups whose names differ only in invalid bytes must not become one tenant.
    std::str::from_utf8(line).map(str::to_owned).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The path of the `0::` line of (the start of) a `/proc/PID/cgroup` file, only once that
/// line is complete (ends with a newline): `None` means "not there, or not read yet".
#[must_use]
pub fn v2_line(text: &[u8]) -> Option<&[u8]> {
    let mut rest = text;
    while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
        if let Some(path) = rest[..nl].strip_prefix(b"0::") {
            return Some(path);
        }
        rest = &rest[nl + 1..];
    }
    None
}

/// The path of the `0::` line of a `/proc/PID/cgroup` file.
#[must_use]
pub fn parse_v2_entry(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The cgroup v2 directory this process is in (the default attach point).
///
/// # Errors
/// If cgroup2 is not mounted or the process has no v2 membership.
pub fn own_cgroup_dir() -> Result<PathBuf, CgroupError> {
    let root = cgroup2_mount()?;
    let rel = cgroup_of(std::process::id() as i32)?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Find the cgroup directory with inode number `id` (a cgroup id) under `roots`, returning
/// its path relative to the cgroup2 mount (as `/proc/PID/cgroup` shows it).
#[must_use]
pub fn cgroup_path_of_id(id: u64, roots: &[PathBuf]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mount = cgroup2_mount().ok()?;
    let mut stack: Vec<PathBuf> = roots.to_vec();
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            return None;
        }
        if std::fs::metadata(&dir).ok()?.ino() == id {
            let rel = dir.strip_prefix(&mount).ok()?;
            return Some(format!("/{}", rel.display()).replace("//", "/"));
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            stack.extend(rd.filter_map(Result::ok).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    None
}

/// Whether `path` is a cgroup v2 directory.
#[must_use]
pub fn is_cgroup_dir(path: &Path) -> bool {
    path.join("cgroup.procs").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mi = "25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro\n\
                  26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n\
                  27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("1 2 0:1 / /x\\040y rw - cgroup2 none rw\n"), Some(PathBuf::from("/x y")));
        assert_eq!(parse_cgroup2_mount("1 2 0:1 / /x rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn reads_the_v2_entry() {
        assert_eq!(parse_v2_entry("12:cpu:/a\n0::/user.slice/x.scope\n"), Some("/user.slice/x.scope"));
        assert_eq!(parse_v2_entry("12:cpu:/a\n"), None);
        let own = cgroup_of(std::process::id() as i32);
        assert!(own.is_ok() || matches!(own, Err(CgroupError::NoV2Entry(_))));
        if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") {
            assert_eq!(own.ok().as_deref(), parse_v2_entry(&text), "the stack-buffer read agrees with the plain one");
        }
        assert!(matches!(cgroup_of(i32::MAX), Err(CgroupError::Read { .. })), "no such process");
    }

    #[test]
    fn the_v2_line_from_bytes() {
        // cgroup v2 only.
        assert_eq!(v2_line(b"0::/user.slice/x.scope\n"), Some(&b"/user.slice/x.scope"[..]));
        assert_eq!(v2_line(b"0::/\n"), Some(&b"/"[..]));
        // Hybrid: v1 controllers first, the v2 line anywhere.
        let hybrid = b"12:cpu,cpuacct:/a\n4:memory:/process_api/53\n1:name=systemd:/\n0::/fn/b\n";
        assert_eq!(v2_line(hybrid), Some(&b"/fn/b"[..]));
        assert_eq!(v2_line(b"0::/fn/c\n9:pids:/x\n"), Some(&b"/fn/c"[..]));
        // A v1 line that only ends in "0::" is not the v2 line.
        assert_eq!(v2_line(b"10::/not-v2\n"), None);
        // Spaces are part of the path.
        assert_eq!(v2_line(b"0::/my fn/with  spaces \n"), Some(&b"/my fn/with  spaces "[..]));
        // Truncated: the line is not complete yet (read more), or the file has no v2 line.
        assert_eq!(v2_line(b"12:cpu:/a\n0::/fn/trunc"), None);
        assert_eq!(v2_line(b"0::"), None);
        assert_eq!(v2_line(b""), None);
        assert_eq!(v2_line(b"12:cpu:/a\n"), None);
        assert_eq!(owned_path(b"/ok").ok().as_deref(), Some("/ok"));
        assert!(owned_path(b"/bad\xff").is_err(), "never lossy");
        assert!(cgroup2_mount().is_ok(), "this machine mounts cgroup2");
    }
}
