//! `pool-manager status`: the pool table as text. Root and the daemon's own uid see every
//! pool; any other caller sees only its own uid's pools (destinations are tenant data).

use crate::server::Shared;
use crate::sock;
use crate::tenant::Peer;
use std::fmt::Write as _;

/// Column headings.
pub const HEADER: [&str; 12] =
    ["TENANT", "DESTINATION", "POLICY", "IDLE", "QUAR", "LEASED", "CONNECTING", "WARM", "REUSE", "MISS", "DISCARDED", "CWND"];

/// Tab-separated rows, one per visible pool, header first.
pub fn render(shared: &Shared, caller: &Peer) -> String {
    let all = caller.tenant.uid == 0 || caller.tenant.uid == shared.daemon_uid();
    let pools = shared.lock();
    let mut keys: Vec<_> = pools.keys().filter(|k| all || k.tenant.uid == caller.tenant.uid).cloned().collect();
    keys.sort();
    let mut out = HEADER.join("\t");
    out.push('\n');
    for k in keys {
        let Some(p) = pools.get(&k) else { continue };
        let (idle, quar, leased, connecting) = p.counts();
        // Quarantined and under check: both on their way back, neither ready.
        let quar = quar + p.checking();
        let proto = p.settings.protocol.map_or(String::new(), |x| format!(":{}", x.name()));
        let cwnds: Vec<u32> = p.idle_sockets().map(|s| sock::cwnd(&s.fd)).collect();
        let cwnd = if cwnds.is_empty() { "-".to_owned() } else { format!("{}", cwnds.iter().sum::<u32>() / cwnds.len() as u32) };
        let cg = if k.tenant.cgroup.is_empty() { "" } else { &k.tenant.cgroup };
        let _ = writeln!(
            out,
            "{}:{}\t{}\t{}{proto}{}\t{idle}\t{quar}\t{leased}\t{connecting}\t{}\t{}\t{}\t{}\t{cwnd}",
            k.tenant.uid,
            cg,
            k.dest,
            p.settings.policy.name(),
            if p.auto { "(auto)" } else { "" },
            p.stats().warm,
            p.stats().reuse,
            p.stats().miss,
            p.stats().discarded,
        );
    }
    let learned = shared.learned();
    if all && !learned.is_empty() {
        out.push_str("\nLEARNED (kernel assist)\tNETNS\tCWND\tSRTT_US\tSAMPLES\n");
        for (d, ns, cwnd, srtt, n) in learned {
            let _ = writeln!(out, "{d}\t{ns}\t{cwnd}\t{srtt}\t{n}");
        }
    }
    let mut demand: std::collections::BTreeMap<(String, u32), u64> = std::collections::BTreeMap::new();
    for d in shared.demand() {
        if all || d.uid == caller.tenant.uid {
            *demand.entry((d.dest.to_string(), d.uid)).or_default() += d.connects;
        }
    }
    if !demand.is_empty() {
        out.push_str("\nDEMAND (kernel connect hooks)\tUID\tCONNECTS\n");
        for ((d, uid), n) in demand {
            let _ = writeln!(out, "{d}\t{uid}\t{n}");
        }
    }
    if let Some(agent) = &shared.peer {
        let s = &agent.settings;
        let state = if agent.connected() { "connected" } else { "not connected" };
        let _ = writeln!(out, "\nPEER {} (rendezvous {}, {state})\tPORT\tADDR\tREADY_DIRECT\tREADY_RELAYED\tBUILDING", s.me, s.rendezvous);
        for c in agent.status() {
            let addr = s.virtual_range.addr_of(&crate::peer::PeerName { job: s.me.job.clone(), name: c.peer.clone() });
            let _ = writeln!(out, "{}/{}\t{}\t{addr}\t{}\t{}\t{}", s.me.job, c.peer, c.port, c.ready.0, c.ready.1, c.building);
        }
    }
    out
}

/// Align tab-separated rows into a table for a terminal.
#[must_use]
pub fn align(text: &str) -> String {
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
