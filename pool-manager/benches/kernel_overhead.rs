//! Kernel-side overhead of the eBPF assist (root; a bench binary):
//!
//! `cargo bench -p pool-manager --bench kernel_overhead [-- --iters N]`
//!
//! Moves itself into a fresh child cgroup, then times loopback `connect()` (socket, connect,
//! close) to a local listener in alternating blocks with and without the sockops and
//! connect4/6 programs attached to that cgroup. The destination has a learned window, so the
//! attached case runs the full path (demand count, learned lookup, receive buffer, initial
//! window). Prints medians and their difference.

use hdrhistogram::Histogram;
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("kernel_overhead: needs root (cgroups, eBPF); skipped");
        return;
    }
    if !shim::assist::KernelAssist::built() {
        eprintln!("kernel_overhead: built without the eBPF programs (scripts/setup-ebpf.sh); skipped");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args.iter().position(|a| a == "--iters").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(20_000);
    let cg = tenancy::cgroup::own_cgroup_dir().expect("own cgroup").join(format!("warmpool-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("create cgroup");
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).expect("join cgroup");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let l2 = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    let assist = shim::assist::KernelAssist::attach(std::slice::from_ref(&cg), 256).expect("attach");
    // Give the destination a learned window: one transfer that closes.
    {
        use std::io::Write;
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&vec![0u8; 4 << 20]);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let netns = shim::assist::netns_cookie(std::os::fd::AsFd::as_fd(&l2)).expect("SO_NETNS_COOKIE");
    assert!(assist.learned_for(netns, addr).is_some(), "nothing learned for {addr}");
    drop(assist);

    let (mut off, mut on) = (Histogram::<u64>::new(3).unwrap(), Histogram::<u64>::new(3).unwrap());
    let block = 1000;
    let mut attached: Option<shim::assist::KernelAssist> = None;
    for round in 0..(iters / block) * 2 {
        let with = round % 2 == 1;
        if with {
            let a = shim::assist::KernelAssist::attach(std::slice::from_ref(&cg), 256).expect("attach");
            // Re-teach the fresh map the destination.
            use std::io::Write;
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&vec![0u8; 1 << 20]);
            drop(s);
            attached = Some(a);
        } else {
            attached = None;
        }
        for _ in 0..block {
            let t = Instant::now();
            let s = TcpStream::connect(addr).unwrap();
            let e = t.elapsed().as_nanos() as u64;
            drop(s);
            if with { &mut on } else { &mut off }.record(e).unwrap();
        }
    }
    drop(attached);
    let m = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!("loopback connect(), {} samples each (µs)   p50      p90      p99", off.len());
    println!("without the eBPF programs            {:8.2} {:8.2} {:8.2}", m(&off, 0.5), m(&off, 0.9), m(&off, 0.99));
    println!("with sockops + connect4/6 attached   {:8.2} {:8.2} {:8.2}", m(&on, 0.5), m(&on, 0.9), m(&on, 0.99));
    println!("median overhead: {:.2} µs", m(&on, 0.5) - m(&off, 0.5));
    // Leave the cgroup before removing it.
    let parent = cg.parent().unwrap().join("cgroup.procs");
    let _ = std::fs::write(parent, std::process::id().to_string());
    let _ = std::fs::remove_dir(&cg);
}
