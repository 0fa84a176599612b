//! Types shared between warmpool's eBPF programs and user space: the `#[repr(C)]` keys and
//! values of the programs' maps, and the map and program names ([`names`]).
//!
//! Three crates make up the kernel assist, named as aya's template names them: this one,
//! `shim-common` (`no_std`, shared by both sides); `shim-ebpf`, the eBPF programs (built for `bpfel-unknown-none` on nightly: a sockops program that learns
//! converged congestion windows per (network namespace, destination) and starts new
//! connections with them, and cgroup connect4/connect6 programs that count demand per cgroup,
//! network namespace, uid and destination); and `shim`, the user-space crate, whose build script
//! compiles the programs and embeds the object, and whose `assist` module loads and attaches
//! them and reads their maps. This crate stays buildable on stable, with one optional
//! dependency (`aya`, for the `user` feature: `aya::Pod` on every map type), so that the rest
//! of the workspace never needs the eBPF toolchain.
//!
//! Every type is `#[repr(C)]` with explicit padding, so its layout is the same on both sides
//! (the unit test pins the sizes).
//!
//! Network namespaces are named by their cookie (`bpf_get_netns_cookie()` in the programs,
//! `SO_NETNS_COOKIE` on a socket made in the namespace in user space): the same address can
//! be another host in another namespace, so nothing learned or counted in one is used for or
//! attributed to another.

#![no_std]

/// Map and program names, kept in one place so user space never spells them twice.
pub mod names {
    /// LRU hash: [`LearnedKey`](super::LearnedKey) → [`LearnedWindow`](super::LearnedWindow).
    pub const LEARNED: &str = "WARMPOOL_LEARNED";
    /// LRU hash: [`DemandKey`](super::DemandKey) → `u64` connect count (the least recently counted entry
    /// makes room).
    pub const DEMAND: &str = "WARMPOOL_DEMAND";
    /// Array (1 entry): [`KernelConfig`](super::KernelConfig).
    pub const CONFIG: &str = "WARMPOOL_CONFIG";
    /// The sockops program.
    pub const SOCKOPS: &str = "warmpool_sockops";
    /// The cgroup connect4 program (demand).
    pub const CONNECT4: &str = "warmpool_connect4";
    /// The cgroup connect6 program (demand).
    pub const CONNECT6: &str = "warmpool_connect6";
}

/// A destination: IPv4 in the first 4 bytes of `addr` when `family == 2` (`AF_INET`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DestKey {
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// Port in network byte order, as the kernel stores it.
    pub port_be: u16,
    /// Explicit padding (always zero) so the key hashes the same on both sides.
    pub _pad: u32,
    /// Address bytes in network order.
    pub addr: [u8; 16],
}

/// A destination as seen from one network namespace: the key of what sockops learned.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LearnedKey {
    /// The network namespace's cookie.
    pub netns: u64,
    /// The destination (port 0: any port of that address, learned on both sides).
    pub dest: DestKey,
}

/// What sockops learned about a destination.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LearnedWindow {
    /// EWMA of the congestion window connections converged to, in segments.
    pub cwnd: u32,
    /// EWMA of the smoothed RTT, in microseconds.
    pub srtt_us: u32,
    /// How many connections contributed.
    pub samples: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Settings user space writes for the kernel programs (array map, index 0).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelConfig {
    /// Non-zero: set `TCP_BPF_IW` on new connections to known destinations.
    pub enabled: u32,
    /// Upper bound for the initial window, in segments.
    pub max_iw: u32,
}

/// Demand counter key: a destination as seen from one uid in one cgroup and one network
/// namespace.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DemandKey {
    /// The connecting process's cgroup id (`bpf_get_current_cgroup_id`: the inode number
    /// of its cgroup v2 directory).
    pub cgroup_id: u64,
    /// The cookie of the connecting socket's network namespace.
    pub netns: u64,
    /// The connecting process's uid.
    pub uid: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The destination.
    pub dest: DestKey,
}

/// `aya::Pod` for the map types: each is `#[repr(C)]`, `Copy`, made only of integers with
/// explicit padding, so every bit pattern is a valid value, as `Pod` requires.
#[cfg(feature = "user")]
mod user {
    // SAFETY: see the module docs.
    unsafe impl aya::Pod for super::DestKey {}
    // SAFETY: see the module docs.
    unsafe impl aya::Pod for super::LearnedKey {}
    // SAFETY: see the module docs.
    unsafe impl aya::Pod for super::LearnedWindow {}
    // SAFETY: see the module docs.
    unsafe impl aya::Pod for super::DemandKey {}
    // SAFETY: see the module docs.
    unsafe impl aya::Pod for super::KernelConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<DestKey>(), 24);
        assert_eq!(core::mem::size_of::<LearnedWindow>(), 16);
        assert_eq!(core::mem::size_of::<LearnedKey>(), 32);
        assert_eq!(core::mem::size_of::<DemandKey>(), 48);
        assert_eq!(core::mem::size_of::<KernelConfig>(), 8);
    }
}
