//! A two-NAT network-namespace topology for integration tests (root only; std + libc).
//!
//! [`NatTopology::new`] builds five network namespaces: an "internet" with a rendezvous
//! host, and two hosts that each sit behind their own NAT:
//!
//! ```text
//!                        internet namespace  (<base>i)
//!       +--------------------------------------------------------------------+
//!       |   br0  198.18.0.1/24   <- rendezvous address, on the bridge itself |
//!       |   ports: nat1, nat2                                                |
//!       +-----------|-----------------------------------------|--------------+
//!                   | veth                                    | veth
//!       +-----------|-----------------+       +---------------|-------------+
//!       |  pub   198.18.0.11/24       |       |  pub   198.18.0.12/24       |
//!       |  NAT 1 (<base>n1)           |       |  NAT 2 (<base>n2)           |
//!       |  priv  198.19.1.1/24        |       |  priv  198.19.2.1/24        |
//!       +-----------|-----------------+       +---------------|-------------+
//!                   | veth                                    | veth
//!       +-----------|-----------------+       +---------------|-------------+
//!       |  eth0  198.19.1.2/24        |       |  eth0  198.19.2.2/24        |
//!       |  default via 198.19.1.1     |       |  default via 198.19.2.1     |
//!       |  host 1 (<base>h1)          |       |  host 2 (<base>h2)          |
//!       +-----------------------------+       +-----------------------------+
//! ```
//!
//! The internet namespace has no route to 198.19.0.0/16, so hosts are reachable from
//! outside only through their NAT's public address. Each NAT namespace has
//! `net.ipv4.ip_forward=1` and one nftables table (see [`NatTopology::ruleset`]):
//!
//! * `postrouting` (type nat): `oifname "pub" masquerade`, i.e. source NAT to the public
//!   address. Plain masquerade keeps the source port whenever the resulting tuple is unique,
//!   which behaves as an endpoint-*independent* mapping ([`Mapping::Independent`]: the public
//!   endpoint a rendezvous server observes is the one every other peer sees as well).
//!   `masquerade fully-random` picks a fresh random port for every new connection, an
//!   endpoint-*dependent* ("symmetric") mapping ([`Mapping::Dependent`]) that defeats TCP
//!   hole punching.
//! * `forward` (type filter, `policy drop`): accepts `ct state established,related` and
//!   everything arriving from `priv`; unsolicited traffic from the internet is dropped
//!   silently.
//! * `input` (type filter): on `pub`, drops `ct state invalid` and new TCP/UDP flows. Packets
//!   addressed to the NAT's public address that do not belong to a mapping are delivered to
//!   the NAT namespace's *own* stack, which would answer an unsolicited SYN with RST (and UDP
//!   with ICMP port unreachable); a real NAT stays silent. Dropping only `ct state new` is
//!   not enough: a stray SYN-ACK or FIN is `invalid` to conntrack and would still be
//!   answered with RST. Replies to translated connections and the peer's SYN of a TCP
//!   simultaneous open match an existing conntrack entry and are de-NATed in prerouting,
//!   so they take the forward path and are not affected.
//!
//! Every drop rule has a `counter`; [`NatTopology::diagnostics`] dumps the rulesets with
//! their counters, addresses and routes, for assertion messages.
//!
//! Namespace names are `wpn<pid>x<n>` plus `i`, `n1`, `n2`, `h1`, `h2`, with `n` counting
//! instances in this process, so parallel tests and several test binaries never collide.
//! Interfaces are created directly in their target namespaces, so nothing is ever added to
//! the root namespace. `Drop` deletes the namespaces (which removes the veths and the
//! bridge), also after a panic part-way through `new`. Namespaces left behind by a test
//! process that was killed (`wpn<pid>x…` whose process no longer exists) are removed by the
//! first `NatTopology::new` of a later test process.
//!
//! Processes started with [`NatTopology::command`] keep their namespace alive after `Drop`
//! has deleted its name; kill and reap them before the topology is dropped (declare the
//! topology first, so it is dropped last).

use super::{tool_path, TempDir};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Port mapping behaviour of one NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// `masquerade`: the source port is kept when possible, so one private endpoint maps to
    /// the same public endpoint whatever the destination (hole punching works).
    Independent,
    /// `masquerade fully-random`: every new connection gets a random public port, so the
    /// endpoint a rendezvous server observes is useless to other peers (needs a relay).
    Dependent,
}

/// Interface names; they are per namespace, so they are the same in every instance.
const BRIDGE: &str = "br0";
const NAT_PUBLIC_IF: &str = "pub";
const NAT_PRIVATE_IF: &str = "priv";
const HOST_IF: &str = "eth0";

/// Prefix of every namespace name this module creates.
const PREFIX: &str = "wpn";
/// Suffixes of the five namespaces of one instance.
const SUFFIXES: [&str; 5] = ["i", "n1", "n2", "h1", "h2"];

static INSTANCE: AtomicUsize = AtomicUsize::new(0);
static REAP_STALE: Once = Once::new();

/// The five-namespace NAT topology described in the [module documentation](self).
#[derive(Debug)]
pub struct NatTopology {
    /// `ip` binary, resolved once so that `Drop` cannot fail to find it.
    ip: PathBuf,
    internet: String,
    nats: [String; 2],
    hosts: [String; 2],
    mappings: [Mapping; 2],
    /// Namespaces created so far, in creation order; exactly these are deleted in `Drop`.
    created: Vec<String>,
    /// Holds the nftables ruleset files.
    dir: TempDir,
}

impl NatTopology {
    /// Builds everything. Panics with the failing command and its stderr on failure; whatever
    /// was created is removed again in `Drop` (also on a panic part-way). Needs root, `ip`
    /// (iproute2) and `nft` (nftables).
    pub fn new(nat1: Mapping, nat2: Mapping) -> NatTopology {
        let ip = tool_path("ip");
        let nft = tool_path("nft");
        REAP_STALE.call_once(|| reap_stale(&ip));
        let base = format!("{PREFIX}{}x{}", std::process::id(), INSTANCE.fetch_add(1, Ordering::SeqCst));
        // Constructed before anything exists, so that a panic below drops it and cleans up.
        let mut topo = NatTopology {
            ip,
            internet: format!("{base}i"),
            nats: [format!("{base}n1"), format!("{base}n2")],
            hosts: [format!("{base}h1"), format!("{base}h2")],
            mappings: [nat1, nat2],
            created: Vec::with_capacity(SUFFIXES.len()),
            dir: TempDir::new(),
        };
        topo.build(&nft);
        topo
    }

    fn build(&mut self, nft: &Path) {
        let all = [&self.internet, &self.nats[0], &self.nats[1], &self.hosts[0], &self.hosts[1]].map(String::clone);
        for ns in &all {
            self.ip(&["netns", "add", ns]);
            self.created.push(ns.clone());
            self.up(ns, "lo");
        }

        let inet = self.internet.clone();
        self.ip(&["-n", &inet, "link", "add", BRIDGE, "type", "bridge"]);
        self.addr(&inet, BRIDGE, self.rendezvous_addr());
        self.up(&inet, BRIDGE);

        for i in 1..=2 {
            let nat = self.nat_ns(i).to_owned();
            let host = self.host_ns(i).to_owned();
            let port = format!("nat{i}");
            let nat_private = Ipv4Addr::new(198, 19, i as u8, 1);

            // Public side: NAT `pub` <-> bridge port `nat<i>` in the internet namespace.
            self.veth((NAT_PUBLIC_IF, &nat), (&port, &inet));
            self.ip(&["-n", &inet, "link", "set", &port, "master", BRIDGE]);
            self.up(&inet, &port);
            self.addr(&nat, NAT_PUBLIC_IF, self.nat_public_addr(i));
            self.up(&nat, NAT_PUBLIC_IF);

            // Private side: NAT `priv` <-> host `eth0`, the host's default route via the NAT.
            self.veth((NAT_PRIVATE_IF, &nat), (HOST_IF, &host));
            self.addr(&nat, NAT_PRIVATE_IF, nat_private);
            self.up(&nat, NAT_PRIVATE_IF);
            self.addr(&host, HOST_IF, self.host_addr(i));
            self.up(&host, HOST_IF);
            self.ip(&["-n", &host, "route", "add", "default", "via", &nat_private.to_string()]);

            // Forwarding and the ruleset. The sysctl is written through /proc from inside the
            // namespace (net sysctls follow the opener's namespace), which needs no procps.
            self.run(self.command(&nat, "/bin/sh").args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]));
            let rules = self.dir.join(format!("nat{i}.nft"));
            fs::write(&rules, Self::ruleset(self.mappings[i - 1]))
                .unwrap_or_else(|e| panic!("NatTopology: write {}: {e}", rules.display()));
            self.run(self.command(&nat, nft).arg("-f").arg(&rules));
        }
    }

    /// The nftables ruleset loaded into a NAT namespace with the given mapping (one table,
    /// `ip wpnat`; every statement on its own line; no chain is called `fwd`, a keyword).
    pub fn ruleset(mapping: Mapping) -> String {
        let masquerade = match mapping {
            Mapping::Independent => "masquerade",
            Mapping::Dependent => "masquerade fully-random",
        };
        format!(
            r#"table ip wpnat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat
        policy accept
        oifname "{NAT_PUBLIC_IF}" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter
        policy drop
        ct state established,related accept
        iifname "{NAT_PRIVATE_IF}" accept
        counter
    }}
    chain input {{
        type filter hook input priority filter
        policy accept
        iifname "{NAT_PUBLIC_IF}" ct state invalid counter drop
        iifname "{NAT_PUBLIC_IF}" meta l4proto {{ tcp, udp }} ct state new counter drop
    }}
}}
"#
        )
    }

    /// The internet namespace (bridge, rendezvous address).
    pub fn internet_ns(&self) -> &str {
        &self.internet
    }

    /// The namespace of host `i` (1 or 2), behind NAT `i`.
    pub fn host_ns(&self, i: usize) -> &str {
        &self.hosts[index(i)]
    }

    /// The namespace of NAT `i` (1 or 2).
    pub fn nat_ns(&self, i: usize) -> &str {
        &self.nats[index(i)]
    }

    /// The mapping behaviour NAT `i` (1 or 2) was built with.
    pub fn mapping(&self, i: usize) -> Mapping {
        self.mappings[index(i)]
    }

    /// 198.18.0.1: the bridge address in the internet namespace.
    pub fn rendezvous_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 1)
    }

    /// 198.19.`i`.2: host `i`'s private address.
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, index(i) as u8 + 1, 2)
    }

    /// 198.18.0.1`i`: NAT `i`'s public address, the source of everything host `i` sends out.
    pub fn nat_public_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 11 + index(i) as u8)
    }

    /// `ip netns exec <ns> <program>` as a [`Command`], ready for args, env and spawn.
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Addresses, routes and (for the NATs) the nftables rulesets with their counters of
    /// every namespace; for assertion messages. Never panics.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for ns in &self.created {
            let _ = writeln!(out, "=== {ns}");
            let mut cmds = vec![
                Command::new(&self.ip).args(["-n", ns, "-br", "addr"]).output(),
                Command::new(&self.ip).args(["-n", ns, "route"]).output(),
            ];
            if self.nats.contains(ns) {
                if let Some(nft) = super::find_tool("nft") {
                    cmds.push(self.command(ns, nft).args(["list", "ruleset"]).output());
                }
            }
            for o in cmds {
                match o {
                    Ok(o) => {
                        out.push_str(&String::from_utf8_lossy(&o.stdout));
                        out.push_str(&String::from_utf8_lossy(&o.stderr));
                    }
                    Err(e) => {
                        let _ = writeln!(out, "<{e}>");
                    }
                }
            }
        }
        out
    }

    /// `ip -n <ns> link set <dev> up`
    fn up(&self, ns: &str, dev: &str) {
        self.ip(&["-n", ns, "link", "set", dev, "up"]);
    }

    /// `ip -n <ns> addr add <addr>/24 dev <dev>`
    fn addr(&self, ns: &str, dev: &str, addr: Ipv4Addr) {
        self.ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
    }

    /// A veth pair `a.0` in namespace `a.1` <-> `b.0` in namespace `b.1`, created directly in
    /// its namespaces (never visible in the root namespace).
    fn veth(&self, a: (&str, &str), b: (&str, &str)) {
        self.ip(&["link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1]);
    }

    /// Runs `ip <args>`; panics with the command line and its stderr on failure.
    fn ip(&self, args: &[&str]) {
        let mut c = Command::new(&self.ip);
        c.args(args);
        self.run(&mut c);
    }

    fn run(&self, cmd: &mut Command) {
        let o = output(cmd);
        if !o.status.success() {
            panic!(
                "NatTopology: `{}` failed ({}): {}",
                command_line(cmd),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
}

impl Drop for NatTopology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            delete_netns(&self.ip, ns);
        }
    }
}

/// 1 or 2 -> 0 or 1; panics on anything else.
fn index(i: usize) -> usize {
    assert!(i == 1 || i == 2, "NatTopology: index must be 1 or 2, got {i}");
    i - 1
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("NatTopology: cannot run `{}`: {e}", command_line(cmd)))
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `ip netns delete <ns>`; reports a failure on stderr. Never panics.
fn delete_netns(ip: &Path, ns: &str) {
    match Command::new(ip).args(["netns", "delete", ns]).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "NatTopology: `ip netns delete {ns}` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("NatTopology: cannot run `ip netns delete {ns}`: {e}"),
    }
}

/// Deletes namespaces named by this module for a process that no longer exists, and for
/// this very PID (this runs before this process creates any: they belong to an earlier
/// process that had the same PID).
fn reap_stale(ip: &Path) {
    let Ok(o) = Command::new(ip).args(["netns", "list"]).stdin(Stdio::null()).output() else {
        return;
    };
    let own = std::process::id();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = stale_pid(name) else { continue };
        if pid == own || !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("NatTopology: removing stale namespace {name} (process {pid} is gone)");
            delete_netns(ip, name);
        }
    }
}

/// The PID in a name of the form `wpn<pid>x<n><suffix>`, if `name` has that form.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let n_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let valid =
        !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && n_len > 0 && SUFFIXES.contains(&&rest[n_len..]);
    if valid {
        pid.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_stale_name_parsing() {
        assert_eq!(stale_pid("wpn1234x0i"), Some(1234));
        assert_eq!(stale_pid("wpn1234x17h2"), Some(1234));
        assert_eq!(stale_pid("wpn1234x17h3"), None);
        assert_eq!(stale_pid("wpn1234xi"), None);
        assert_eq!(stale_pid("wpnx0i"), None);
        assert_eq!(stale_pid("wpn12a4x0i"), None);
        assert_eq!(stale_pid("other"), None);
    }
}
