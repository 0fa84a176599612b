//! In-process daemon tests: the library's `server::run` on a private socket with a
//! cancellation token as its shutdown signal (as mini-redis tests its server), spoken to with
//! the `wire` crate over the Unix socket. Protocol-level cases that need no spawned binary.

mod common;

use common::{wait_until, TempDir};
use pool_manager::config::{Config, Policy, PoolSettings};
use pool_manager::server::{self, Shared};
use pool_manager::wire::{self, Dest, Disposition, Msg, MissReason};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A daemon running `server::run` on its own runtime thread. The runtime outlives `run`
/// (as the binary's does: its metrics endpoint keeps running), so a task `run` left behind
/// would keep running.
struct InProc {
    _dir: TempDir,
    sock: std::path::PathBuf,
    shared: Option<Arc<Shared>>,
    cancel: CancellationToken,
    done: mpsc::Receiver<()>,
    keep: Option<std::thread::JoinHandle<()>>,
    release_rt: Option<mpsc::Sender<()>>,
}

impl InProc {
    fn start(cfg: Config) -> InProc {
        let dir = TempDir::new();
        let sock = dir.join("pool.sock");
        let listener = server::bind(&sock, 0o600).expect("bind pool socket");
        // As the binary does: the peer agent when `[peer]` is configured.
        let peer = cfg.peer.clone().map(|p| Arc::new(pool_manager::peer::agent::Agent::new(p)));
        let mut shared = Shared::new(cfg);
        shared.peer = peer;
        let shared = Arc::new(shared);
        let cancel = CancellationToken::new();
        let (done_tx, done) = mpsc::channel();
        let (release_rt, keep_rx) = mpsc::channel::<()>();
        let (s, c) = (shared.clone(), cancel.clone());
        let keep = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(server::run(listener, s, c)).unwrap();
            let _ = done_tx.send(());
            // Keep the runtime alive until the test is done with it.
            let _ = keep_rx.recv_timeout(Duration::from_secs(30));
        });
        InProc { _dir: dir, sock, shared: Some(shared), cancel, done, keep: Some(keep), release_rt: Some(release_rt) }
    }

    fn shared(&self) -> &Arc<Shared> {
        self.shared.as_ref().unwrap()
    }

    /// Cancel and wait (bounded) for `run` to return.
    fn shutdown(&mut self, within: Duration) {
        self.cancel.cancel();
        self.done.recv_timeout(within).expect("run did not return after cancel");
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.cancel.cancel();
        drop(self.release_rt.take());
        if let Some(k) = self.keep.take() {
            let _ = k.join();
        }
    }
}

/// A blocking wire client.
struct Client {
    fd: OwnedFd,
    seq: u32,
}

impl Client {
    fn connect(d: &InProc) -> Client {
        Client { fd: wire::client::Link::connect(&d.sock, None).expect("connect to the daemon").into_fd(), seq: 0 }
    }

    fn send(&mut self, msg: &Msg<'_>) -> u32 {
        self.seq += 1;
        let mut buf = [0u8; 512];
        let n = wire::encode(msg, self.seq, &mut buf);
        self.send_raw(&buf[..n]);
        self.seq
    }

    fn send_raw(&self, bytes: &[u8]) {
        wire::unix::send(self.fd.as_raw_fd(), bytes, None, 0).expect("send");
    }

    /// The next message (bytes, attached fd), or None at EOF; panics after 5 s.
    fn recv(&self) -> Option<(Vec<u8>, Option<OwnedFd>)> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(r, 1, "no answer from the daemon within 5 s");
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let got = wire::unix::recv(self.fd.as_raw_fd(), &mut buf, 0).expect("recv");
        if got.len == 0 && got.fd.is_none() {
            return None;
        }
        buf.truncate(got.len);
        Some((buf, got.fd))
    }
}

fn no_auto() -> Config {
    let mut cfg = Config::default();
    cfg.auto.enabled = false;
    cfg
}

fn echo_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn acquire_configured_pool_grants_a_connected_socket() {
    let (l, addr) = echo_listener();
    let mut cfg = no_auto();
    let mut s = PoolSettings::with_policy(Policy::Warm);
    s.min_idle = 2;
    cfg.add_pool(&addr.to_string(), s).unwrap();
    let d = InProc::start(cfg);
    let mut c = Client::connect(&d);
    let mut granted = None;
    assert!(wait_until(Duration::from_secs(5), || {
        let seq = c.send(&Msg::Acquire(Dest::from_socket_addr(addr)));
        let (b, fd) = c.recv().expect("answer");
        let (m, s) = wire::decode(&b).unwrap();
        assert_eq!(s, seq);
        match m {
            Msg::Grant { lease, .. } => {
                granted = Some((lease, fd.expect("a grant carries the socket")));
                true
            }
            Msg::Miss { reason, .. } => {
                assert!(matches!(reason, MissReason::Empty | MissReason::Pending), "{reason:?}");
                false
            }
            other => panic!("unexpected {other:?}"),
        }
    }));
    let (lease, fd) = granted.unwrap();
    // The socket is connected to our listener.
    let tcp = std::net::TcpStream::from(fd);
    assert_eq!(tcp.peer_addr().unwrap(), addr);
    let _ = c.send(&Msg::Release { lease, disposition: Disposition::Clean });
    drop(l);
}

#[test]
fn acquire_unpooled_destination_misses() {
    let d = InProc::start(no_auto());
    let mut c = Client::connect(&d);
    let dest: SocketAddr = "198.18.0.9:80".parse().unwrap();
    let seq = c.send(&Msg::Acquire(Dest::from_socket_addr(dest)));
    let (b, fd) = c.recv().unwrap();
    assert!(fd.is_none());
    match wire::decode(&b).unwrap() {
        (Msg::Miss { reason: MissReason::NotPooled, .. }, s) => assert_eq!(s, seq),
        other => panic!("expected Miss NotPooled, got {other:?}"),
    }
}

#[test]
fn malformed_message_is_answered_with_an_error() {
    let d = InProc::start(no_auto());
    let mut c = Client::connect(&d);
    c.send_raw(b"not a warmpool message");
    let (b, _) = c.recv().expect("an answer, not EOF");
    match wire::decode(&b).unwrap().0 {
        Msg::Error { code, .. } => assert_eq!(code, wire::ErrorCode::Malformed),
        other => panic!("expected Error, got {other:?}"),
    }
    // The daemon answers the refusal and serves on (it does not close the connection).
    let seq = c.send(&Msg::Status);
    let (b, _) = c.recv().expect("the connection still serves");
    assert!(matches!(wire::decode(&b).unwrap(), (Msg::StatusReply(_), s) if s == seq));
}

#[test]
fn release_of_an_unknown_lease_is_ignored_and_status_answers() {
    let d = InProc::start(no_auto());
    let mut c = Client::connect(&d);
    let _ = c.send(&Msg::Release { lease: wire::LeaseId::new(0xdead_beef).unwrap(), disposition: Disposition::Clean });
    let seq = c.send(&Msg::Status);
    // No answer to the Release: the first message back is the Status reply.
    let (b, fd) = c.recv().expect("status reply");
    assert!(fd.is_none());
    match wire::decode(&b).unwrap() {
        (Msg::StatusReply(text), s) => {
            assert_eq!(s, seq);
            assert!(!text.is_empty());
        }
        other => panic!("expected StatusReply, got {other:?}"),
    }
    assert_eq!(d.shared().metrics.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn shutdown_with_clients_connected_returns_promptly() {
    let mut d = InProc::start(no_auto());
    let clients: Vec<Client> = (0..4).map(|_| Client::connect(&d)).collect();
    let mut c = Client::connect(&d);
    let _ = c.send(&Msg::Status);
    assert!(c.recv().is_some());
    d.shutdown(Duration::from_secs(3));
    // Every client sees its connection closed.
    for c in clients.iter().chain(std::iter::once(&c)) {
        assert!(c.recv().is_none(), "the daemon closed the client connection");
    }
}

/// A TCP listener whose accept queue is full (backlog 0, one connection queued): the
/// daemon's connects to it hang in SYN retransmission until the queue has room.
fn stalled_listener() -> (OwnedFd, SocketAddr, std::net::TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // SAFETY: listen on our own bound socket, backlog 0.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("the one queued connection");
    // Non-blocking, so that `accept_all` takes what is queued and returns.
    l.set_nonblocking(true).unwrap();
    (OwnedFd::from(l), addr, filler)
}

/// Connections waiting in `l`'s accept queue, taken (non-blocking).
fn accept_all(l: &OwnedFd, n: &AtomicUsize) {
    loop {
        // SAFETY: accept4 on our listener; a returned fd goes straight into an OwnedFd.
        let fd = unsafe { libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK) };
        if fd < 0 {
            return;
        }
        // SAFETY: fresh fd we own.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        n.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn no_refill_outlives_run() {
    let (l, addr, filler) = stalled_listener();
    let mut cfg = no_auto();
    let mut s = PoolSettings::with_policy(Policy::Warm);
    s.min_idle = 4;
    s.connect_timeout = Duration::from_secs(30);
    cfg.add_pool(&addr.to_string(), s).unwrap();
    let mut d = InProc::start(cfg);
    let mut c = Client::connect(&d);
    let _ = c.send(&Msg::Acquire(Dest::from_socket_addr(addr)));
    assert!(c.recv().is_some());
    // Refills are under way and cannot finish (the accept queue is full).
    assert!(wait_until(Duration::from_secs(5), || !d.shared().background.is_empty()), "no refill started");
    d.shutdown(Duration::from_secs(3));
    assert!(d.shared().background.is_empty(), "background tasks left after run returned");
    let shared = d.shared.take().unwrap();
    assert_eq!(Arc::strong_count(&shared), 1, "a task the daemon started still holds its state");
    // Make room in the queue: a refill still running would connect at its next SYN
    // retransmission (1 s, then 3 s).
    drop(filler);
    let accepted = AtomicUsize::new(0);
    accept_all(&l, &accepted);
    let base = accepted.load(Ordering::Relaxed);
    let late = wait_until(Duration::from_millis(3500), || {
        accept_all(&l, &accepted);
        accepted.load(Ordering::Relaxed) > base
    });
    assert!(!late, "a refill connected after run returned");
}

/// The rendezvous server in-process on a loopback port, on a runtime thread of its own.
struct Rendezvous {
    addr: SocketAddr,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rendezvous {
    /// Serve job `job` whose secret is in `secret`.
    fn start(job: &str, secret: &std::path::Path) -> Rendezvous {
        let key = pool_manager::peer::Keys::derive(&pool_manager::peer::read_secret(secret).unwrap()).rendezvous;
        let server = Arc::new(rendezvous::Server::new(std::iter::once((job.to_owned(), key)).collect()));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move { server.run(tokio::net::TcpListener::from_std(l).unwrap(), c).await });
        });
        Rendezvous { addr, cancel, thread: Some(thread) }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP connections in this network namespace that are ESTABLISHED towards `to` (IPv4), from
/// the kernel's table: the client ends only (the server ends have `to` as local address).
fn established_to(to: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = to else { panic!("IPv4 only") };
    // /proc/net/tcp prints the address as the in-memory (network order) u32 in hex.
    let want = format!("{:08X}:{:04X}", u32::from_ne_bytes(v4.ip().octets()), v4.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).filter(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[2] == want && f[3] == "01"
    }).count()
}

/// The peer agent's tasks (its spare link connections, parked at the rendezvous server until
/// a link needs them) end with `run`: none holds the agent, and no connection it made to the
/// rendezvous server is still open once `run` has returned.
#[test]
fn peer_agent_tasks_end_with_run() {
    let dir = TempDir::new();
    let secret = dir.join("job.secret");
    std::fs::write(&secret, "the-job-secret-0123456789\n").unwrap();
    let rdv = Rendezvous::start("job", &secret);
    let mut cfg = Config::from_toml(&format!(
        "[peer]\nname = \"job/a\"\nrendezvous = \"{}\"\nsecret_file = \"{}\"\npeers = [\"job/b\"]\n",
        rdv.addr,
        secret.display()
    ))
    .unwrap();
    cfg.auto.enabled = false;
    let mut d = InProc::start(cfg);
    let agent = d.shared().peer.clone().expect("the peer agent");
    // The control connection and the spare link connections are up.
    let want = 1 + pool_manager::defaults::SPARE_LINK_CONNECTIONS;
    assert!(
        wait_until(Duration::from_secs(5), || agent.connected() && established_to(rdv.addr) == want),
        "expected {want} connections to the rendezvous server, have {}",
        established_to(rdv.addr)
    );
    assert!(Arc::strong_count(&agent) > 2, "the spare link connections' tasks hold the agent");
    d.shutdown(Duration::from_secs(3));
    assert_eq!(agent.tasks(), 0, "peer agent tasks left after run returned");
    let shared = d.shared.take().unwrap();
    assert_eq!(Arc::strong_count(&shared), 1, "a task the daemon started still holds its state");
    drop(shared);
    assert_eq!(Arc::strong_count(&agent), 1, "a task the peer agent started still holds it");
    // Closed when `run` returned, not later: a close moves the socket out of ESTABLISHED at once.
    assert_eq!(established_to(rdv.addr), 0, "connections to the rendezvous server left open after run returned");
}

/// A request the metrics endpoint is still reading ends with the endpoint: when `serve`
/// returns, the connection of a client that never sent its request is closed at once, not
/// when the endpoint's 2 s read timeout would have ended it.
#[test]
fn metrics_requests_in_flight_end_with_the_endpoint() {
    let shared = Arc::new(Shared::new(no_auto()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let l = {
        let _rt = rt.enter();
        tokio::net::TcpListener::from_std(l).unwrap()
    };
    let cancel = CancellationToken::new();
    let endpoint = rt.spawn(pool_manager::metrics::serve(l, shared, cancel.clone()));
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    // Answered after the silent connection was accepted (one accept loop, in queue order).
    let (status, body) = common::http_get(addr, "/metrics", Duration::from_secs(2)).unwrap();
    assert!(status == 200 && body.contains("warmpool_"), "{status} {body}");
    cancel.cancel();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), endpoint).await }).expect("serve returned").unwrap();
    use std::io::Read;
    silent.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 16];
    let r = silent.read(&mut b);
    assert!(matches!(r, Ok(0)), "the silent client's connection is closed when serve returns (got {r:?})");
}
