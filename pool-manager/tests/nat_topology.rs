//! Self-test of the network-namespace NAT topology in `common::nat` (root; must run in CI):
//! masquerade towards the rendezvous host, silent drop of unsolicited inbound connections,
//! and TCP simultaneous open ("hole punching") between the two hosts, which works through
//! two endpoint-independent NATs and never works when one NAT maps endpoint-dependently.
//!
//! The socket work is done by small python3 scripts (written to a temp dir) run inside the
//! namespaces with `NatTopology::command`; every wait has a timeout.

mod common;

use common::nat::{Mapping, NatTopology};
use common::{require_root, require_tool, terminate_child, tool_path, TempDir};
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Accepts connections on ADDR:0 and tells every client the endpoint it came from.
const RENDEZVOUS_PY: &str = r#"
"""usage: rendezvous.py ADDR LIFETIME_S
Listens on ADDR:<ephemeral>, prints "listening PORT"; for every accepted connection prints
"peer IP:PORT" and sends "IP:PORT\n" back (the endpoint it observed). Exits after LIFETIME_S.
"""
import select, socket, sys, time

addr, lifetime = sys.argv[1], float(sys.argv[2])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, 0))
ls.listen(16)
print("listening", ls.getsockname()[1], flush=True)
deadline = time.monotonic() + lifetime
conns = []
while (left := deadline - time.monotonic()) > 0:
    if select.select([ls], [], [], left)[0]:
        c, (ip, port) = ls.accept()
        print(f"peer {ip}:{port}", flush=True)
        c.sendall(f"{ip}:{port}\n".encode())
        conns.append(c)  # the client closes first
"#;

/// One side of a hole punch.
const PUNCH_PY: &str = r#"
"""usage: punch.py NAME LOCAL_PORT RDV_ADDR RDV_PORT CONNECT_TIMEOUT_S
From LOCAL_PORT (SO_REUSEADDR + SO_REUSEPORT) connect to the rendezvous server and print
"observed IP:PORT" (this host's public endpoint). Keep that connection open, read
"peer IP:PORT" from stdin, connect from the same LOCAL_PORT to that endpoint and print
"connected MS LOCAL REMOTE" or "failed MS ERROR". When connected, send "hello from NAME"
and print "received LINE" with the peer's greeting.
"""
import select, signal, socket, sys, time

signal.alarm(60)  # backstop; the test kills us much earlier
name, local_port = sys.argv[1], int(sys.argv[2])
rdv = (sys.argv[3], int(sys.argv[4]))
connect_timeout = float(sys.argv[5])

def bound():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", local_port))
    return s

r = bound()
r.settimeout(5)
r.connect(rdv)
print("observed", r.makefile().readline().strip(), flush=True)

if not select.select([sys.stdin], [], [], 30)[0]:
    print("error: no peer endpoint on stdin", flush=True)
    sys.exit(1)
word, endpoint = sys.stdin.readline().split()
assert word == "peer", word
ip, port = endpoint.rsplit(":", 1)

s = bound()
s.settimeout(connect_timeout)
t0 = time.monotonic()
try:
    s.connect((ip, int(port)))
except OSError as e:
    ms = (time.monotonic() - t0) * 1000
    print(f"failed {ms:.1f} {type(e).__name__}: {e}", flush=True)
    sys.exit(0)
ms = (time.monotonic() - t0) * 1000
local, remote = s.getsockname(), s.getpeername()
print(f"connected {ms:.3f} {local[0]}:{local[1]} {remote[0]}:{remote[1]}", flush=True)
s.settimeout(5)
s.sendall(f"hello from {name}\n".encode())
print("received", s.makefile().readline().strip(), flush=True)
"#;

/// Classifies one TCP connect attempt.
const PROBE_PY: &str = r#"
"""usage: probe.py ADDR PORT TIMEOUT_S -- prints "connected", "refused", "timeout" or "error ..."."""
import socket, sys, time

s = socket.socket()
s.settimeout(float(sys.argv[3]))
t0 = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    result = "connected"
except ConnectionRefusedError:
    result = "refused"
except TimeoutError:
    result = "timeout"
except OSError as e:
    result = f"error {type(e).__name__}: {e}"
print(result, f"{(time.monotonic() - t0) * 1000:.0f}ms", flush=True)
"#;

/// Fixed local ports of the two hosts for the rendezvous and the punch.
const LOCAL_PORT: [u16; 2] = [41001, 41002];

fn preconditions(test: &str) -> bool {
    require_root(test) && require_tool("ip") && require_tool("nft") && require_tool("python3")
}

/// A python3 script running in a namespace, with its stdout lines on a channel. Killed (by
/// PID) and reaped on drop.
struct Script {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: PathBuf,
}

impl Script {
    fn spawn(topo: &NatTopology, ns: &str, dir: &TempDir, script: &str, args: &[String]) -> Script {
        let what = format!("{script} {} (in {ns})", args.join(" "));
        let stderr = dir.join(format!("{}.stderr", what.replace([' ', '/', '(', ')'], "_")));
        let err = fs::File::create(&stderr).expect("create stderr file");
        let mut child = topo
            .command(ns, tool_path("python3"))
            .arg("-u")
            .arg(dir.join(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Script { what, child, stdin, lines, seen: Vec::new(), stderr }
    }

    /// Waits for the next line starting with `prefix` and returns the rest of it. Panics with
    /// everything the script printed if it does not come within `timeout`.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_string();
                    }
                }
                Err(e) => {
                    let why = match e {
                        RecvTimeoutError::Timeout => format!("not within {timeout:?}"),
                        RecvTimeoutError::Disconnected => "the script exited".to_string(),
                    };
                    panic!(
                        "{}: expected a line starting with {prefix:?}, {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.what,
                        self.seen.join("\n"),
                        fs::read_to_string(&self.stderr).unwrap_or_default()
                    );
                }
            }
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: write stdin: {e}", self.what));
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        terminate_child(&mut self.child, Duration::from_millis(500));
    }
}

fn write_scripts() -> TempDir {
    let dir = TempDir::new();
    for (name, text) in [("rendezvous.py", RENDEZVOUS_PY), ("punch.py", PUNCH_PY), ("probe.py", PROBE_PY)] {
        fs::write(dir.join(name), text).expect("write script");
    }
    dir
}

fn namespaces(topo: &NatTopology) -> Vec<String> {
    let mut v = vec![topo.internet_ns().to_string()];
    for i in 1..=2 {
        v.push(topo.nat_ns(i).to_string());
        v.push(topo.host_ns(i).to_string());
    }
    v
}

/// Panics if any of `names` is still listed by `ip netns list`.
fn assert_namespaces_gone(names: &[String]) {
    let o = Command::new(tool_path("ip")).args(["netns", "list"]).output().expect("ip netns list");
    assert!(o.status.success(), "ip netns list: {}", String::from_utf8_lossy(&o.stderr));
    let listed: BTreeSet<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let left: Vec<&String> = names.iter().filter(|n| listed.contains(*n)).collect();
    assert!(left.is_empty(), "namespaces left behind after drop: {left:?}");
}

fn endpoint(s: &str) -> SocketAddrV4 {
    s.trim().parse().unwrap_or_else(|e| panic!("not an IPv4 endpoint: {s:?}: {e}"))
}

/// Starts `probe.py` in `ns` against `addr:port`; read its verdict with `verdict`.
fn probe(topo: &NatTopology, dir: &TempDir, ns: &str, addr: Ipv4Addr, port: u16, timeout: Duration) -> Script {
    let args = [addr.to_string(), port.to_string(), format!("{}", timeout.as_secs_f64())];
    Script::spawn(topo, ns, dir, "probe.py", &args)
}

fn verdict(p: &mut Script) -> String {
    p.expect("", Duration::from_secs(10))
}

/// The two hosts after (a): both learned their public endpoint from the rendezvous server
/// and wait for the peer's.
struct Peers {
    /// Kept running until the peers are dropped.
    _rendezvous: Script,
    hosts: [Script; 2],
    observed: [SocketAddrV4; 2],
}

/// (a): both hosts connect from their fixed local port to the rendezvous server in the
/// internet namespace; checks that the server saw each one as its NAT's public address.
fn rendezvous(topo: &NatTopology, dir: &TempDir, connect_timeout: Duration) -> Peers {
    let t = Instant::now();
    let mut rdv = Script::spawn(
        topo,
        topo.internet_ns(),
        dir,
        "rendezvous.py",
        &[topo.rendezvous_addr().to_string(), "60".into()],
    );
    let port = rdv.expect("listening ", Duration::from_secs(10));
    let host = |i: usize| {
        let args = [
            format!("h{i}"),
            LOCAL_PORT[i - 1].to_string(),
            topo.rendezvous_addr().to_string(),
            port.clone(),
            format!("{}", connect_timeout.as_secs_f64()),
        ];
        Script::spawn(topo, topo.host_ns(i), dir, "punch.py", &args)
    };
    let mut hosts = [host(1), host(2)];
    let observed = [1, 2].map(|i| endpoint(&hosts[i - 1].expect("observed ", Duration::from_secs(10))));
    let seen_by_rdv: BTreeSet<SocketAddrV4> =
        (0..2).map(|_| endpoint(&rdv.expect("peer ", Duration::from_secs(5)))).collect();
    eprintln!(
        "rendezvous: host1 {}:{} seen as {}, host2 {}:{} seen as {} ({:?})",
        topo.host_addr(1),
        LOCAL_PORT[0],
        observed[0],
        topo.host_addr(2),
        LOCAL_PORT[1],
        observed[1],
        t.elapsed()
    );
    for i in 1..=2 {
        assert_eq!(
            *observed[i - 1].ip(),
            topo.nat_public_addr(i),
            "host{i} not masqueraded to NAT{i}'s public address\n{}",
            topo.diagnostics()
        );
    }
    assert_eq!(seen_by_rdv, observed.into_iter().collect(), "the rendezvous server and the hosts disagree");
    Peers { _rendezvous: rdv, hosts, observed }
}

/// (c): tells both hosts the other's observed endpoint at (nearly) the same time; they
/// connect from the same local port. Returns each host's "connected …"/"failed …" line.
fn punch(peers: &mut Peers, timeout: Duration) -> [String; 2] {
    let [h1, h2] = &mut peers.hosts;
    h1.send_line(&format!("peer {}", peers.observed[1]));
    h2.send_line(&format!("peer {}", peers.observed[0]));
    let outcome = |h: &mut Script| {
        let line = h.expect("", timeout);
        assert!(line.starts_with("connected ") || line.starts_with("failed "), "{}: unexpected {line:?}", h.what);
        line
    };
    [outcome(h1), outcome(h2)]
}

#[test]
fn nat_ruleset_text() {
    for m in [Mapping::Independent, Mapping::Dependent] {
        let r = NatTopology::ruleset(m);
        assert_eq!(r.contains("fully-random"), m == Mapping::Dependent, "{r}");
        assert!(!r.contains("chain fwd"), "`fwd` is an nft keyword:\n{r}");
        assert!(r.contains("policy drop"), "{r}");
        assert!(!r.contains(';'), "one statement per line, no `;`:\n{r}");
    }
}

#[test]
fn nat_independent_independent_masquerade_silent_drop_and_simultaneous_open() {
    if !preconditions("nat_independent_independent_masquerade_silent_drop_and_simultaneous_open") {
        return;
    }
    let t0 = Instant::now();
    let topo = NatTopology::new(Mapping::Independent, Mapping::Independent);
    let names = namespaces(&topo);
    eprintln!("topology {names:?} built in {:?}", t0.elapsed());
    let dir = write_scripts();

    // (a) masquerade: the rendezvous server sees NAT i's public address.
    let mut peers = rendezvous(&topo, &dir, Duration::from_secs(5));

    // (b) unsolicited connects from the internet to NAT1 time out instead of being refused:
    // to an unused port and to the port that is mapped for host1 (whose filter only admits
    // the endpoint host1 talked to). A connect to a closed port on the rendezvous address
    // is the control: the probe does report refusals.
    let t = Instant::now();
    let probe_timeout = Duration::from_millis(1500);
    let inet = topo.internet_ns();
    let mut unused = probe(&topo, &dir, inet, topo.nat_public_addr(1), 9, probe_timeout);
    let mut mapped = probe(&topo, &dir, inet, topo.nat_public_addr(1), peers.observed[0].port(), probe_timeout);
    let mut control = probe(&topo, &dir, inet, topo.rendezvous_addr(), 9, probe_timeout);
    let (unused, mapped, control) = (verdict(&mut unused), verdict(&mut mapped), verdict(&mut control));
    eprintln!("probes: unused port {unused}, mapped port {mapped}, control {control} ({:?})", t.elapsed());
    assert!(control.starts_with("refused"), "control probe: {control}");
    assert!(
        unused.starts_with("timeout"),
        "connect to NAT1:9 must time out (silent drop), got {unused}\n{}",
        topo.diagnostics()
    );
    assert!(
        mapped.starts_with("timeout"),
        "connect to NAT1's mapped port must time out, got {mapped}\n{}",
        topo.diagnostics()
    );

    // (c) TCP simultaneous open through both NATs.
    let t = Instant::now();
    let [o1, o2] = punch(&mut peers, Duration::from_secs(10));
    eprintln!("simultaneous open: host1 {o1}; host2 {o2} ({:?})", t.elapsed());
    assert!(
        o1.starts_with("connected ") && o2.starts_with("connected "),
        "hole punch failed: {o1} / {o2}\n{}",
        topo.diagnostics()
    );
    // host1 sees host2 at host2's observed public endpoint and vice versa.
    assert!(o1.ends_with(&format!(" {}", peers.observed[1])), "host1's peer: {o1}");
    assert!(o2.ends_with(&format!(" {}", peers.observed[0])), "host2's peer: {o2}");
    let [h1, h2] = &mut peers.hosts;
    assert_eq!(h1.expect("received ", Duration::from_secs(5)), "hello from h2");
    assert_eq!(h2.expect("received ", Duration::from_secs(5)), "hello from h1");

    drop(peers);
    drop(topo);
    assert_namespaces_gone(&names);
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn nat_independent_dependent_simultaneous_open_fails() {
    if !preconditions("nat_independent_dependent_simultaneous_open_fails") {
        return;
    }
    let t0 = Instant::now();
    let topo = NatTopology::new(Mapping::Independent, Mapping::Dependent);
    let names = namespaces(&topo);
    eprintln!("topology {names:?} built in {:?}", t0.elapsed());
    let dir = write_scripts();

    let mut peers = rendezvous(&topo, &dir, Duration::from_secs(3));

    // The endpoint-dependent NAT is just as silent to unsolicited connects (checked while
    // the punch runs).
    let mut silent = probe(&topo, &dir, topo.internet_ns(), topo.nat_public_addr(2), 9, Duration::from_millis(1500));

    // host2's punch leaves NAT2 from a fresh random port, host1's SYN goes to the port NAT2
    // chose for the rendezvous: neither NAT has a matching conntrack entry, both drop. (It
    // could only connect if fully-random drew the same port twice, about 1 in 64 000.)
    let t = Instant::now();
    let [o1, o2] = punch(&mut peers, Duration::from_secs(10));
    eprintln!("simultaneous open: host1 {o1}; host2 {o2} ({:?})", t.elapsed());
    assert!(
        o1.starts_with("failed ") && o2.starts_with("failed "),
        "simultaneous open through an endpoint-dependent NAT must not connect: {o1} / {o2}\n{}",
        topo.diagnostics()
    );
    let silent = verdict(&mut silent);
    assert!(silent.starts_with("timeout"), "connect to NAT2:9 must time out, got {silent}");

    drop(peers);
    drop(topo);
    assert_namespaces_gone(&names);
    eprintln!("total {:?}", t0.elapsed());
}
