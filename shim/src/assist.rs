//! Kernel assist: load warmpool's sockops program (built from `shim-ebpf` and
//! embedded in this library), attach it to cgroups, and read what it learned.
//!
//! The program learns, per (network namespace, destination), the congestion window
//! connections converged to and sets `TCP_BPF_IW` on new connections to known destinations
//! of the same namespace (see the program's docs); the connect hooks count demand per
//! (cgroup, namespace, uid, destination). Namespaces are named by cookie: [`netns_cookie`]
//! reads one from a socket made in the namespace. Dropping [`KernelAssist`] detaches
//! everything.

use shim_common::{names, DemandKey, DestKey, KernelConfig, LearnedKey, LearnedWindow};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

/// The object built by build.rs (empty when the eBPF toolchain was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warmpool-shim.o"));

/// Why kernel assist is unavailable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssistError {
    /// This build has no eBPF object.
    #[error("this build has no eBPF programs (built without the nightly toolchain and bpf-linker)")]
    NotBuilt,
    /// Loading the object or a program failed (no privileges, old kernel, verifier).
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    /// Attaching to a cgroup failed.
    #[error("attaching to cgroup {path}: {reason}")]
    Attach {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Connects the kernel's connect hooks counted for one (cgroup, namespace, uid, destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// The connecting processes' cgroup id (inode of the cgroup v2 directory).
    pub cgroup_id: u64,
    /// The cookie of the network namespace the connects were made in.
    pub netns: u64,
    /// The connecting processes' uid.
    pub uid: u32,
    /// The destination.
    pub dest: SocketAddr,
    /// Connects counted.
    pub connects: u64,
}

/// What the sockops program learned for one destination in one network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// The network namespace's cookie.
    pub netns: u64,
    /// The destination (port 0: the address, any port).
    pub dest: SocketAddr,
    /// The window.
    pub window: LearnedWindow,
}

/// `SO_NETNS_COOKIE` (linux/socket.h, 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace `sock` was made in (what the programs' keys hold).
///
/// # Errors
/// The `getsockopt` error (kernels before 5.14 have no `SO_NETNS_COOKIE`).
pub fn netns_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_NETNS_COOKIE writes one u64 into our buffer of that size.
    let r = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Loaded and attached programs; detached on drop.
pub struct KernelAssist {
    ebpf: aya::Ebpf,
    cgroups: Vec<PathBuf>,
}

impl std::fmt::Debug for KernelAssist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelAssist").field("cgroups", &self.cgroups).finish_non_exhaustive()
    }
}

impl KernelAssist {
    /// Whether this build carries the programs at all.
    #[must_use]
    pub fn built() -> bool {
        !OBJECT.is_empty()
    }

    /// Load the programs and attach them to each cgroup directory; new connections to known
    /// destinations start with at most `max_iw` segments.
    ///
    /// # Errors
    /// See [`AssistError`].
    pub fn attach(cgroups: &[PathBuf], max_iw: u32) -> Result<Self, AssistError> {
        if !Self::built() {
            return Err(AssistError::NotBuilt);
        }
        let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|e| AssistError::Load(e.to_string()))?;
        {
            let map = ebpf.map_mut(names::CONFIG).ok_or_else(|| AssistError::Load(format!("map {} missing", names::CONFIG)))?;
            let mut cfg: aya::maps::Array<_, KernelConfig> = aya::maps::Array::try_from(map).map_err(|e| AssistError::Load(e.to_string()))?;
            cfg.set(0, KernelConfig { enabled: 1, max_iw }, 0).map_err(|e| AssistError::Load(e.to_string()))?;
        }
        let prog: &mut aya::programs::SockOps = ebpf
            .program_mut(names::SOCKOPS)
            .ok_or_else(|| AssistError::Load(format!("program {} missing", names::SOCKOPS)))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| AssistError::Load(e.to_string()))?;
        prog.load().map_err(|e| AssistError::Load(format!("{e}: {:?}", std::error::Error::source(&e))))?;
        let attach_err = |cg: &PathBuf, e: &dyn std::error::Error| AssistError::Attach {
            path: cg.clone(),
            reason: format!("{e}: {:?}", e.source()),
        };
        let dirs = cgroups
            .iter()
            .map(|cg| std::fs::File::open(cg).map_err(|e| AssistError::Attach { path: cg.clone(), reason: e.to_string() }))
            .collect::<Result<Vec<_>, _>>()?;
        // With bpf_link (kernel 5.7+) an attachment coexists with others whatever the mode;
        // `Single` is the mode link creation accepts.
        let mode = aya::programs::CgroupAttachMode::Single;
        for (cg, dir) in cgroups.iter().zip(&dirs) {
            prog.attach(dir, mode).map_err(|e| attach_err(cg, &e))?;
        }
        for name in [names::CONNECT4, names::CONNECT6] {
            let p: &mut aya::programs::CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| AssistError::Load(format!("program {name} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| AssistError::Load(e.to_string()))?;
            p.load().map_err(|e| AssistError::Load(format!("{name}: {e}: {:?}", std::error::Error::source(&e))))?;
            for (cg, dir) in cgroups.iter().zip(&dirs) {
                p.attach(dir, mode).map_err(|e| attach_err(cg, &e))?;
            }
        }
        Ok(Self { ebpf, cgroups: cgroups.to_vec() })
    }

    /// The cgroups the programs are attached to.
    #[must_use]
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    /// Everything learned so far, in every namespace.
    #[must_use]
    pub fn learned(&self) -> Vec<Learned> {
        let Some(map) = self.ebpf.map(names::LEARNED) else { return vec![] };
        let Ok(m) = aya::maps::HashMap::<_, LearnedKey, LearnedWindow>::try_from(map) else { return vec![] };
        m.iter().filter_map(Result::ok).filter_map(|(k, window)| Some(Learned { netns: k.netns, dest: addr_of(&k.dest)?, window })).collect()
    }

    /// Connect counts so far.
    #[must_use]
    pub fn demand(&self) -> Vec<Demand> {
        let Some(map) = self.ebpf.map(names::DEMAND) else { return vec![] };
        let Ok(m) = aya::maps::HashMap::<_, DemandKey, u64>::try_from(map) else { return vec![] };
        m.iter()
            .filter_map(Result::ok)
            .filter_map(|(k, connects)| Some(Demand { cgroup_id: k.cgroup_id, netns: k.netns, uid: k.uid, dest: addr_of(&k.dest)?, connects }))
            .collect()
    }

    /// What was learned for one destination in the namespace with cookie `netns`.
    #[must_use]
    pub fn learned_for(&self, netns: u64, dest: SocketAddr) -> Option<LearnedWindow> {
        self.learned().into_iter().find(|l| l.netns == netns && l.dest == dest).map(|l| l.window)
    }
}

fn addr_of(k: &DestKey) -> Option<SocketAddr> {
    let port = u16::from_be(k.port_be);
    let ip: IpAddr = match k.family {
        2 => Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]).into(),
        10 => Ipv6Addr::from(k.addr).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

pub use tenancy::cgroup::{cgroup_path_of_id, is_cgroup_dir, own_cgroup_dir};

