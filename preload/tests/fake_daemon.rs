//! The preload library against a fake pool manager: what the shim does with each answer the
//! daemon may give (a grant, a miss, garbage, silence, a hang-up, ...), and that every
//! bypass leaves the program's own `connect()` working, counted under its name
//! (`warmpool_bypass_count`) and logged (`WARMPOOL_LOG`).

mod common;

use common::{python, FakeDaemon, Got, Link, Run, Server, CLEAN, IMPLICIT, LIMIT, UNUSED};
use std::os::fd::AsRawFd;
use wire::{ErrorCode, MissReason, Msg};

/// The program connects once to the server, sends `x`, prints its local address, the
/// seconds the connect took and the counts of `reason` and of all reasons.
fn one_connect(reason: &str) -> String {
    format!(
        r#"
t = time.monotonic()
s = conn()
out("secs", time.monotonic() - t)
out("local", local(s))
s.sendall(b"x")
out("count", count("{reason}"))
out("total", count())
s.close()
"#
    )
}

/// The program's own connection reached the server and carried its byte.
fn own_connect_worked(r: &Run, server: &Server) {
    assert!(r.status.success(), "{r}");
    assert_eq!(server.bytes_from(r.field("local"), 1), b"x", "the program's own connection\n{r}");
}

#[test]
fn grant_puts_the_daemons_socket_on_the_programs_fd() {
    let server = Server::start();
    let sock = server.connect();
    let made = sock.local_addr().expect("local_addr").to_string();
    let want = wire::Dest::from_socket_addr(server.addr);
    let d = FakeDaemon::start(move |link| {
        let (dest, seq) = link.expect_acquire();
        assert_eq!(dest, want, "Acquire names the program's destination");
        link.grant(seq, 7, &[sock.as_raw_fd()]);
        drop(sock); // the program holds it now
    });
    let r = python(&one_connect("timeout"), Some(&d.path), &server, &[]);
    let got = d.finish();
    assert!(r.status.success(), "{r}");
    assert_eq!(r.field("local"), made, "the program's fd is the socket the daemon connected\n{r}");
    assert_eq!(server.bytes_from(&made, 1), b"x");
    assert_eq!(server.seen().len(), 1, "no connection but the daemon's: {:?}", server.seen());
    assert_eq!(r.field("total"), "0", "a grant is no bypass\n{r}");
    assert!(r.stderr.contains("pooled socket (lease 7)"), "{r}");
    assert!(got.contains(&Got::Release(7, CLEAN)), "close() gave the lease back clean: {got:?}");
}

#[test]
fn a_miss_runs_the_programs_connect_and_not_pooled_is_remembered() {
    let server = Server::start();
    let d = FakeDaemon::start(|link| {
        let (_, seq) = link.expect_acquire();
        link.miss(seq, MissReason::NotPooled, 60_000);
    });
    let script = r#"
a = conn(); out("a", local(a)); a.sendall(b"x")
b = conn(); out("b", local(b)); b.sendall(b"x")
out("not_pooled", count("not_pooled")); out("cached", count("cached_miss"))
"#;
    let r = python(script, Some(&d.path), &server, &[]);
    let got = d.finish();
    assert!(r.status.success(), "{r}");
    for k in ["a", "b"] {
        assert_eq!(server.bytes_from(r.field(k), 1), b"x", "connection {k} is the program's own\n{r}");
    }
    assert_eq!((r.field("not_pooled"), r.field("cached")), ("1", "1"), "{r}");
    assert_eq!(FakeDaemon::acquires(&got), 1, "the second connect did not ask: {got:?}");
    assert_eq!((r.logged("not_pooled"), r.logged("cached_miss")), (1, 1), "{r}");
}

#[test]
fn every_miss_and_refusal_is_named() {
    let server = Server::start();
    let d = FakeDaemon::start(|link| {
        let (_, seq) = link.expect_acquire();
        link.miss(seq, MissReason::Empty, 0);
        let (_, seq) = link.expect_acquire();
        link.miss(seq, MissReason::AtLimit, 0);
        let (_, seq) = link.expect_acquire();
        link.send(&Msg::Error { code: ErrorCode::Denied, text: "uid 4242 is not allowed" }, seq);
    });
    let script = r#"
for k in ["empty", "at_limit", "daemon_error"]:
    s = conn(); s.sendall(b"x"); out(k, count(k)); out(k + "_local", local(s)); s.close()
"#;
    let r = python(script, Some(&d.path), &server, &[]);
    let got = d.finish();
    assert_eq!(FakeDaemon::acquires(&got), 3, "{got:?}");
    for k in ["empty", "at_limit", "daemon_error"] {
        assert_eq!(r.field(k), "1", "{r}");
        assert_eq!(r.logged(k), 1, "{r}");
        assert_eq!(server.bytes_from(r.field(&format!("{k}_local")), 1), b"x", "{r}");
    }
    assert!(r.stderr.contains("pool manager refused: uid 4242 is not allowed"), "the daemon's text is logged\n{r}");
}

/// One broken answer: the daemon's script, the reason the shim must name, extra environment.
struct Broken {
    reason: &'static str,
    script: fn(&Link),
    env: &'static [(&'static str, &'static str)],
}

fn answer_garbage(link: &Link) {
    let (_, _) = link.expect_acquire();
    link.send_raw(b"this is no warmpool message", &[]);
}

fn hang_up_after_acquire(link: &Link) {
    let _ = link.expect_acquire();
    link.hang_up();
}

fn answer_other_requests(link: &Link) {
    let (_, seq) = link.expect_acquire();
    for i in 1..=(wire::client::MAX_STALE as u32 + 1) {
        link.miss(seq.wrapping_add(i), MissReason::Empty, 0);
    }
}

fn grant_without_fd(link: &Link) {
    let (_, seq) = link.expect_acquire();
    link.grant(seq, 9, &[]);
}

fn grant_bad_lease(link: &Link) {
    let (dest, seq) = link.expect_acquire();
    let sock = std::net::TcpStream::connect(dest.socket_addr()).expect("connect");
    link.grant(seq, 1 << 50, &[sock.as_raw_fd()]);
}

fn answer_status(link: &Link) {
    let (_, seq) = link.expect_acquire();
    link.send(&Msg::StatusReply("pools: none"), seq);
}

fn grant_too_many_fds(link: &Link) {
    let (dest, seq) = link.expect_acquire();
    let socks: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(dest.socket_addr()).expect("connect")).collect();
    let fds: Vec<_> = socks.iter().map(AsRawFd::as_raw_fd).collect();
    link.grant(seq, 11, &fds);
}

fn stay_silent(link: &Link) {
    let _ = link.expect_acquire();
}

fn pending_forever(link: &Link) {
    let (_, seq) = link.expect_acquire();
    link.miss(seq, MissReason::Pending, 0);
}

#[test]
fn broken_answers_fall_back_to_the_programs_connect() {
    let cases = [
        Broken { reason: "malformed", script: answer_garbage, env: &[] },
        Broken { reason: "daemon_closed", script: hang_up_after_acquire, env: &[] },
        Broken { reason: "wrong_seq", script: answer_other_requests, env: &[] },
        Broken { reason: "no_fd", script: grant_without_fd, env: &[] },
        Broken { reason: "bad_lease", script: grant_bad_lease, env: &[] },
        Broken { reason: "unexpected", script: answer_status, env: &[] },
        Broken { reason: "truncated", script: grant_too_many_fds, env: &[] },
        Broken { reason: "timeout", script: stay_silent, env: &[("WARMPOOL_TIMEOUT_MS", "300")] },
        Broken { reason: "pending_timeout", script: pending_forever, env: &[] },
    ];
    for c in cases {
        let server = Server::start();
        let d = FakeDaemon::start(c.script);
        let r = python(&one_connect(c.reason), Some(&d.path), &server, c.env);
        let got = d.finish();
        own_connect_worked(&r, &server);
        assert_eq!((r.field("count"), r.field("total")), ("1", "1"), "{}: counted once, nothing else\n{r}", c.reason);
        assert_eq!(r.logged(c.reason), 1, "{}\n{r}", c.reason);
        let secs: f64 = r.field("secs").parse().expect("secs");
        match c.reason {
            "no_fd" => assert!(got.contains(&Got::Release(9, IMPLICIT)), "the lease went back: {got:?}"),
            // An id outside LeaseId's range cannot be named in a Release: the shim drops the link
            // instead (the daemon ends a link's leases at its end) and sends nothing for it.
            "bad_lease" => assert!(!got.iter().any(|g| matches!(g, Got::Release(..))), "no Release for an unnameable lease: {got:?}"),
            "timeout" => assert!((0.3..5.0).contains(&secs), "bounded by WARMPOOL_TIMEOUT_MS: {secs} s"),
            "pending_timeout" => assert!((1.0..5.0).contains(&secs), "pending wait is retry_after_ms + 1 s: {secs} s"),
            _ => assert!(secs < 5.0, "{}: {secs} s", c.reason),
        }
    }
}

#[test]
fn a_link_the_daemon_closed_fails_the_send() {
    let server = Server::start();
    let d = FakeDaemon::start(Link::hang_up);
    // Wait until the shim's link (fd 512, opened at load time) sees the hang-up.
    let script = format!("p = select.poll(); p.register(512, select.POLLIN); out('hup', p.poll(10000))\n{}", one_connect("send_failed"));
    let r = python(&script, Some(&d.path), &server, &[]);
    d.finish();
    own_connect_worked(&r, &server);
    assert_eq!((r.field("count"), r.field("total")), ("1", "1"), "{r}");
}

#[test]
fn no_daemon_then_backoff_and_the_totals_at_exit() {
    let server = Server::start();
    let script = r#"
a = conn(); a.sendall(b"x"); out("local", local(a))
b = conn(); b.sendall(b"x"); out("b", local(b))
out("unreachable", count("unreachable")); out("backoff", count("backoff")); out("bogus", count("bogus"))
"#;
    let r = python(script, None, &server, &[("WARMPOOL_LOG", "totals")]);
    own_connect_worked(&r, &server);
    assert_eq!((r.field("unreachable"), r.field("backoff"), r.field("bogus")), ("1", "1", "-1"), "{r}");
    assert_eq!(r.logged("unreachable"), 0, "WARMPOOL_LOG=totals prints no line per bypass\n{r}");
    assert!(r.stderr.contains("bypass totals: backoff=1 unreachable=1 (total 2)"), "{r}");
    let all = python(script, None, &server, &[("WARMPOOL_LOG", "all")]);
    assert_eq!((all.logged("unreachable"), all.logged("backoff")), (1, 1), "{all}");
    assert!(all.stderr.contains("bypass totals: backoff=1 unreachable=1 (total 2)"), "{all}");
}

#[test]
fn the_shim_off_or_in_passthrough_never_asks() {
    let server = Server::start();
    for (env, reason) in [("WARMPOOL_DISABLE", "off"), ("WARMPOOL_PASSTHROUGH", "passthrough")] {
        let d = FakeDaemon::start(|_| {});
        let r = python(&one_connect(reason), Some(&d.path), &server, &[(env, "1"), ("WARMPOOL_LOG", "all")]);
        own_connect_worked(&r, &server);
        assert!(d.got().is_empty(), "{reason}: the daemon heard nothing: {:?}", d.got());
        assert_eq!((r.field("count"), r.field("total")), ("1", "1"), "{reason}\n{r}");
        assert!(r.stderr.contains(&format!("bypass totals: {reason}=1 (total 1)")), "{r}");
        drop(d); // never joined: with the shim off nothing connects to it
    }
}

/// The congestion control check comes after the grant: the socket goes back `Unused`.
#[test]
fn another_congestion_control_gives_the_socket_back_unused() {
    let algos = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap_or_default();
    let Some(other) = algos.split_whitespace().find(|a| *a != "reno").map(str::to_owned) else {
        eprintln!("SKIP: only reno is available");
        return;
    };
    let server = Server::start();
    let sock = server.connect();
    set_congestion(&sock, "reno");
    let d = FakeDaemon::start(move |link| {
        let (_, seq) = link.expect_acquire();
        link.grant(seq, 21, &[sock.as_raw_fd()]);
    });
    let script = format!(
        "s = socket.socket(); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b'{other}'); s.connect(ADDR)\n\
         s.sendall(b'x'); out('local', local(s)); out('count', count('congestion')); out('total', count())"
    );
    let r = python(&script, Some(&d.path), &server, &[]);
    let got = d.finish();
    own_connect_worked(&r, &server);
    assert_eq!((r.field("count"), r.field("total")), ("1", "1"), "{r}");
    assert!(got.contains(&Got::Release(21, UNUSED)), "the program never had it: {got:?}");
}

fn set_congestion(s: &std::net::TcpStream, algo: &str) {
    // SAFETY: setsockopt with a buffer of the given length.
    let r = unsafe { libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, algo.as_ptr().cast(), algo.len() as u32) };
    assert_eq!(r, 0, "TCP_CONGESTION {algo}: {}", std::io::Error::last_os_error());
}

/// A connect() on a pooled fd: to its own peer (EISCONN) the lease stays, to any other
/// address it ends first, not reusable.
#[test]
fn connect_on_a_pooled_socket_is_the_programs() {
    let server = Server::start();
    let other = Server::start();
    let sock = server.connect();
    let d = FakeDaemon::start(move |link| {
        let (_, seq) = link.expect_acquire();
        link.grant(seq, 31, &[sock.as_raw_fd()]);
    });
    let script = format!(
        r#"
s = conn(); out("local", local(s)); s.sendall(b"x")
out("same", s.connect_ex(ADDR)); out("after_same", count("leased"))
out("other", s.connect_ex(("127.0.0.1", {}))); out("after_other", count("leased"))
"#,
        other.addr.port()
    );
    let r = python(&script, Some(&d.path), &server, &[]);
    let got = d.finish();
    own_connect_worked(&r, &server);
    let eisconn = libc::EISCONN.to_string();
    assert_eq!((r.field("same"), r.field("after_same")), (eisconn.as_str(), "1"), "{r}");
    assert_eq!((r.field("other"), r.field("after_other")), (eisconn.as_str(), "2"), "{r}");
    assert!(got.contains(&Got::Release(31, IMPLICIT)), "a connect elsewhere ended the lease: {got:?}");
    assert!(!got.iter().any(|g| matches!(g, Got::Release(31, CLEAN))), "and only once: {got:?}");
}

/// The answer to `Prefetch` (sent at load time when the daemon's hint says it prefetches) is
/// read before the first request: a broken one is named like a broken answer.
#[test]
fn a_broken_answer_to_prefetch_is_named() {
    for (reason, status) in [("wrong_seq", false), ("unexpected", true)] {
        let server = Server::start();
        let d = FakeDaemon::start(move |link| {
            assert_eq!(link.recv(LIMIT), Some(Got::Other(wire::Kind::Prefetch as u8)), "Prefetch comes first");
            if status {
                link.send(&Msg::StatusReply("no offers"), 1); // the right seq, the wrong kind
            } else {
                link.miss(99, MissReason::Empty, 0); // the right kind, another request's seq
            }
        });
        d.hint_prefetch();
        let r = python(&one_connect(reason), Some(&d.path), &server, &[]);
        let got = d.finish();
        own_connect_worked(&r, &server);
        assert_eq!((r.field("count"), r.field("total")), ("1", "1"), "{reason}\n{r}");
        assert_eq!(FakeDaemon::acquires(&got), 0, "the link was given up before asking: {got:?}");
    }
}

/// Leases on fd numbers on both sides of the table's first page (fds below 255 live in the page
/// the load has already written, the others in their own pages) are recorded and given back:
/// one by close(), one at exit.
#[test]
fn grants_on_low_and_high_fd_numbers_are_given_back() {
    let server = Server::start();
    let socks = [server.connect(), server.connect()];
    let d = FakeDaemon::start(move |link| {
        for (lease, sock) in [11u64, 12].iter().zip(&socks) {
            let (_, seq) = link.expect_acquire();
            link.grant(seq, *lease, &[sock.as_raw_fd()]);
        }
    });
    let script = r#"
def conn_on(fd):
    s0 = socket.socket(); os.dup2(s0.fileno(), fd); s0.close()
    s = socket.socket(fileno=fd); s.connect(ADDR); return s
low = conn_on(254); high = conn_on(4000)
out("total", count())
low.close()
# `high` is still open when the program exits: given back at exit.
"#;
    let r = python(script, Some(&d.path), &server, &[]);
    let got = d.finish();
    assert!(r.status.success(), "{r}");
    assert_eq!(r.field("total"), "0", "both granted\n{r}");
    assert!(got.contains(&Got::Release(11, CLEAN)), "fd 254 given back by close(): {got:?}");
    assert!(got.contains(&Got::Release(12, CLEAN)), "fd 4000 given back at exit: {got:?}");
}
