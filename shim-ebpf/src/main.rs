//! warmpool's kernel side: one sockops program and two cgroup connect programs, sharing the
//! map types of the common crate (`shim_ebpf`). User space attaches all three to the
//! cgroups it serves and writes [`CONFIG`].
//!
//! `warmpool_sockops`:
//! - When an established connection closes, record the congestion window and smoothed RTT
//!   it reached in [`LEARNED`] (an LRU hash keyed by the socket's network namespace cookie
//!   and the peer: the same address can be another host, on another path, in another
//!   namespace), as an EWMA (new = (3 * old + sample) / 4). Every window is learned twice:
//!   under (address, port) and under (address, port 0).
//! - A new passive connection is looked up by the peer's address alone (its port is
//!   ephemeral), so on our own servers (experiments, peer links) connections from a known
//!   client start converged.
//! - When an active connection to a known peer starts (`TCP_CONNECT_CB`), give it a receive
//!   buffer large enough for the configured maximum window, and when it picks its initial
//!   receive window (`RWND_INIT`) advertise that maximum instead of Linux's 10 segments, so
//!   a converged sender is not held back by us.
//! - When a new connection to a known peer is established (before it sent any data: the
//!   kernel sets the initial window just before this callback, and `TCP_BPF_IW` is refused
//!   once data went out), set `TCP_BPF_IW` to the learned window, clamped to [`CONFIG`]'s
//!   maximum (nothing below 11 segments is set), so new and pre-warmed connections start
//!   converged.
//!
//! While [`CONFIG`] is not `enabled`, the sockops program only learns.
//!
//! `warmpool_connect4` / `warmpool_connect6` (cgroup sock_addr): count TCP connects per
//! (cgroup, netns, uid, destination) in [`DEMAND`] (LRU), so the pool manager sees demand
//! from programs the preload shim does not cover and can prewarm what is hot. They never
//! change or refuse a connect.
//!
//! Entry points are thin: the sockops one calls `try_sockops` (a `Result`; errors only skip
//! the setting) and always returns 1; the connect ones call `count_connect` and always allow
//! the connect.

#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RWND_INIT, BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_setsockopt};
use core::ptr::read_volatile;
use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid};
use aya_ebpf::macros::{cgroup_sock_addr, map, sock_ops};
use aya_ebpf::programs::SockAddrContext;
use aya_ebpf::maps::{Array, LruHashMap};
use aya_ebpf::programs::SockOpsContext;
use shim_common::{DemandKey, DestKey, KernelConfig, LearnedKey, LearnedWindow};

/// (network namespace, destination) → what connections to it converged to.
#[map(name = "WARMPOOL_LEARNED")]
static LEARNED: LruHashMap<LearnedKey, LearnedWindow> = LruHashMap::with_max_entries(4096, 0);

/// (cgroup, netns, uid, destination) → TCP connects seen.
#[map(name = "WARMPOOL_DEMAND")]
static DEMAND: LruHashMap<DemandKey, u64> = LruHashMap::with_max_entries(8192, 0);

/// Index 0: settings written by user space.
#[map(name = "WARMPOOL_CONFIG")]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_TCP: i32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_RCVBUF: i32 = 8;
const TCP_BPF_IW: i32 = 1001;
const TCP_ESTABLISHED: u32 = 1;

#[sock_ops]
pub fn warmpool_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

fn dest_of(ctx: &SockOpsContext) -> Option<DestKey> {
    // Every context field is read with its own volatile load at its own offset: the verifier
    // rejects "dereference of modified ctx ptr" when LLVM shares one pointer between fields.
    // SAFETY: the context pointer is valid for the program's run and these fields are
    // readable in sock_ops programs.
    let ops = ctx.ops;
    let (family, rp) = unsafe { (read_volatile(&(*ops).family), read_volatile(&(*ops).remote_port)) };
    // remote_port holds the port in network byte order in the upper 16 bits on older
    // kernels and the lower 16 on newer ones; keep the 16 bits that are set.
    let port_be = if rp >> 16 != 0 { (rp >> 16) as u16 } else { rp as u16 };
    let mut key = DestKey { family: 0, port_be, _pad: 0, addr: [0; 16] };
    if family == AF_INET {
        key.family = 2;
        // SAFETY: as above.
        let ip = unsafe { read_volatile(&(*ops).remote_ip4) };
        key.addr[..4].copy_from_slice(&ip.to_ne_bytes());
    } else if family == AF_INET6 {
        key.family = 10;
        // SAFETY: as above.
        key.addr = unsafe { ip6(&(*ops).remote_ip6) };
    } else {
        return None;
    }
    Some(key)
}

/// The [`LEARNED`] key of this connection's peer in its network namespace (`any_port`: the
/// peer's address alone).
fn learned_key(ctx: &SockOpsContext, any_port: bool) -> Option<LearnedKey> {
    let mut dest = dest_of(ctx)?;
    if any_port {
        dest.port_be = 0;
    }
    // SAFETY: sock_ops programs may call this helper with their context (Linux 5.15+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    Some(LearnedKey { netns, dest })
}

/// An IPv6 address from a context's four 32-bit words (network order), each read with its
/// own load.
///
/// # Safety
/// `words` must point into a live BPF context.
#[inline(always)]
unsafe fn ip6(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        // SAFETY: per the function's contract.
        out[i * 4..i * 4 + 4].copy_from_slice(&unsafe { read_volatile(w) }.to_ne_bytes());
    }
    out
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Ask for state changes so we see the connection close.
            let flags = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            set_initial_window(ctx, false)?;
            flags
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let flags = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            set_initial_window(ctx, true)?;
            flags
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let cfg = config();
            if cfg.enabled != 0 && known(ctx) {
                // Room for a window of max_iw full segments (the kernel doubles the value for
                // bookkeeping overhead and advertises about half of the buffer).
                let mut bytes: i32 = (cfg.max_iw.min(4096) * 4096) as i32;
                // SAFETY: bpf_setsockopt on this context's socket with a 4-byte value.
                let r = unsafe { bpf_setsockopt(ctx.ops as *mut _, SOL_SOCKET, SO_RCVBUF, (&mut bytes as *mut i32).cast(), 4) };
                if r < 0 {
                    return Err(r);
                }
            }
            Ok(())
        }
        BPF_SOCK_OPS_RWND_INIT => {
            let cfg = config();
            if cfg.enabled != 0 && known(ctx) {
                // SAFETY: `reply` is the writable result of this callback.
                unsafe { (*ctx.ops).__bindgen_anon_1.reply = cfg.max_iw };
            }
            Ok(())
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[0] = old state, args[1] = new state.
            if ctx.arg(0) == TCP_ESTABLISHED {
                learn(ctx);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether something was learned about this connection's peer (any port), in its namespace.
fn known(ctx: &SockOpsContext) -> bool {
    let (Some(key), Some(any)) = (learned_key(ctx, false), learned_key(ctx, true)) else { return false };
    // SAFETY: map lookups return pointers valid for this program run.
    unsafe { LEARNED.get(&key).is_some() || LEARNED.get(&any).is_some() }
}

fn config() -> KernelConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

fn learn(ctx: &SockOpsContext) {
    let Some(key) = learned_key(ctx, false) else { return };
    learn_key(ctx, key);
    learn_key(ctx, LearnedKey { dest: DestKey { port_be: 0, ..key.dest }, ..key });
}

fn learn_key(ctx: &SockOpsContext, key: LearnedKey) {
    // SAFETY: the context pointer is valid for the program's run; these fields are readable
    // in sock_ops programs.
    let (cwnd, srtt_us) = unsafe { (read_volatile(&(*ctx.ops).snd_cwnd), read_volatile(&(*ctx.ops).srtt_us) >> 3) };
    if cwnd == 0 {
        return;
    }
    let next = match LEARNED.get_ptr_mut(&key) {
        // SAFETY: the map owns the value; we update it in place.
        Some(v) => unsafe {
            let old = *v;
            LearnedWindow {
                cwnd: (old.cwnd * 3 + cwnd) / 4,
                srtt_us: (old.srtt_us * 3 + srtt_us) / 4,
                samples: old.samples.saturating_add(1),
                _pad: 0,
            }
        },
        None => LearnedWindow { cwnd, srtt_us, samples: 1, _pad: 0 },
    };
    let _ = LEARNED.insert(&key, &next, 0);
}

fn set_initial_window(ctx: &SockOpsContext, any_port: bool) -> Result<(), i64> {
    let cfg = config();
    if cfg.enabled == 0 {
        return Ok(());
    }
    let Some(key) = learned_key(ctx, any_port) else { return Ok(()) };
    // SAFETY: a map lookup returns a pointer valid for this program run.
    let Some(learned) = (unsafe { LEARNED.get(&key) }) else { return Ok(()) };
    let mut iw = learned.cwnd.min(cfg.max_iw);
    if iw <= 10 {
        return Ok(());
    }
    // SAFETY: bpf_setsockopt on the socket of this sock_ops context with a 4-byte value.
    let r = unsafe { bpf_setsockopt(ctx.ops as *mut _, SOL_TCP, TCP_BPF_IW, (&mut iw as *mut u32).cast(), 4) };
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn warmpool_connect4(ctx: SockAddrContext) -> i32 {
    count_connect(&ctx, false);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn warmpool_connect6(ctx: SockAddrContext) -> i32 {
    count_connect(&ctx, true);
    1
}

fn count_connect(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for this run; each field gets its own load (see dest_of).
    let (ty, port) = unsafe { (read_volatile(&(*sa).type_), read_volatile(&(*sa).user_port)) };
    if ty != SOCK_STREAM {
        return;
    }
    let mut dest = DestKey { family: if v6 { 10 } else { 2 }, port_be: port as u16, _pad: 0, addr: [0; 16] };
    if v6 {
        // SAFETY: as above.
        dest.addr = unsafe { ip6(&(*sa).user_ip6) };
    } else {
        // SAFETY: as above.
        let ip = unsafe { read_volatile(&(*sa).user_ip4) };
        dest.addr[..4].copy_from_slice(&ip.to_ne_bytes());
    }
    // SAFETY: plain helpers without arguments, and the netns cookie helper with this
    // program's own context (cgroup sock_addr programs, Linux 5.7+).
    let (cgroup_id, uid, netns) =
        unsafe { (bpf_get_current_cgroup_id(), bpf_get_current_uid_gid() as u32, bpf_get_netns_cookie(ctx.sock_addr.cast())) };
    let key = DemandKey { cgroup_id, netns, uid, _pad: 0, dest };
    match DEMAND.get_ptr_mut(&key) {
        // SAFETY: the map owns the value; a racing update may lose one count, which is fine
        // for a demand signal.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = DEMAND.insert(&key, &1, 0);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
