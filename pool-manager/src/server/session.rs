//! One client process's connection: identifying it, reading its requests, dispatching
//! them, answering, and putting what it still holds through the return path when it ends.

use crate::config::Policy;
use crate::sock::{self, Discard};
use crate::tenant::{self, Peer, Tenant};
use crate::status;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::{Disposition, ErrorCode, Msg, MissReason, Source};
use super::{PoolKey, PooledSock, Shared};
use super::grant::*;

/// A socket handed out, as the daemon remembers it.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) sock: PooledSock,
    pub(crate) key: PoolKey,
    pub(crate) created: Instant,
    pub(crate) at_handout: sock::Counters,
    pub(crate) policy: Policy,
    /// A peer link: never pooled again (the other end's function may still be using it).
    pub(crate) peer: bool,
    /// Offered at load time (`Prefetch`): where it came from, so that an offer the process
    /// releases as `Unused` goes back to its pool as it was.
    pub(crate) offered: Option<Source>,
}

/// Identify a client and check it against `allow_uids` / `allow_cgroups`: the peer, and the
/// refusal its requests get when it is not allowed.
pub(super) fn identify(shared: &Shared, conn: &OwnedFd) -> Result<(Peer, Option<String>), tenant::TenantError> {
    use crate::config::TenantBy;
    // The cgroup allow-list needs the cgroup even where tenants are told apart by uid only.
    let read_cgroup = if shared.config.allow_cgroups.is_some() { TenantBy::UidAndCgroup } else { shared.config.tenant_by };
    Ok(admit(shared, tenant::identify(conn, read_cgroup, &shared.netns)?))
}

/// Check an identified peer against the allow-lists (its refusal, if any), and drop the
/// cgroup where tenants are told apart by uid only.
pub(super) fn admit(shared: &Shared, mut peer: Peer) -> (Peer, Option<String>) {
    let refusal = shared.config.admits(peer.tenant.uid, &peer.tenant.cgroup).err();
    if shared.config.tenant_by == crate::config::TenantBy::Uid {
        peer.tenant.cgroup = Arc::from("");
    }
    (peer, refusal)
}

/// Serves one client process (one connection) until it goes away.
pub(super) async fn client(shared: Arc<Shared>, conn: OwnedFd, cancel: CancellationToken) {
    let peer = identify(&shared, &conn);
    match &peer {
        Ok((p, _)) => debug!(pid = p.pid, uid = p.tenant.uid, cgroup = %p.tenant.cgroup, "client connected"),
        Err(e) => {
            let hung_up = tenant::link_hung_up(&conn);
            if !hung_up && !e.is_gone() {
                warn!(error = %e, "cannot identify client; it will get no sockets");
            } else {
                // Normal: the process ended (`/bin/true`, a shell helper) before the daemon
                // got to it. Counted, never logged above debug.
                shared.metrics.clients_gone.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "client gone before it was identified");
                if hung_up {
                    // Nobody reads answers on a link that is hung up, and it holds no lease.
                    shared.active_clients.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
    client_with(shared, conn, peer, HashMap::new(), cancel).await;
}

/// Decrements the live-client count when a client task ends, however it ends.
pub(super) struct ActiveClient(Arc<Shared>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.active_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn client_with(
    shared: Arc<Shared>,
    conn: OwnedFd,
    mut peer: Result<(Peer, Option<String>), tenant::TenantError>,
    mut leases: HashMap<u64, Lease>,
    cancel: CancellationToken,
) {
    let _active = ActiveClient(shared.clone());
    let mut refusal_logged = false;
    // Readable only: registered for writability too, the daemon's epoll would be woken every
    // time the client reads an answer (the socket's write space grows), an interrupt to another
    // CPU inside the client's recvmsg() and a wake-up for nothing here. A full buffer is rare
    // (one answer per request) and `send_within` retries it on a timer.
    // SAFETY: AsyncFd owns the OwnedFd, so the fd stays open exactly as long as it is registered.
    let Ok(conn) = (unsafe { AsyncFd::register_with_interest(conn, tokio::io::Interest::READABLE) }) else { return };
    let mut buf = vec![0u8; 512];
    let mut handing_over = false;
    // Made once: a fresh `cancelled()` future per request would register a waiter with the
    // token (a lock) every time round.
    let stop = cancel.cancelled();
    let handover_token = shared.handover_token();
    let handover = handover_token.cancelled();
    tokio::pin!(stop, handover);
    // A new client has usually sent its first request already (the shim's `Prefetch` right
    // after connecting): read it now rather than after the reactor's next turn reports the
    // fresh registration readable.
    let mut first = true;
    let mut link = super::delegate::Link::new(&peer);
    loop {
        let got = if std::mem::take(&mut first) {
            match wire::unix::recv(conn.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        } else {
            let mut guard = tokio::select! {
                () = &mut stop => break,
                () = &mut handover => {
                    handing_over = true;
                    break;
                }
                g = conn.readable() => match g { Ok(g) => g, Err(_) => break },
            };
            match guard.try_io(|c| wire::unix::recv(c.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT)) {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            }
        };
        if got.len == 0 && got.fd.is_none() {
            break; // EOF: the process is gone (or closed its link)
        }
        let got = match super::delegate::intercept(&shared, &conn, &mut link, got, &buf, &mut peer).await {
            super::delegate::Step::Pass(got) => got,
            super::delegate::Step::Done { close: false } => continue,
            super::delegate::Step::Done { close: true } => break,
        };
        let reply = match dispatch(&shared, &conn, got, &buf, &peer, &mut leases, &mut refusal_logged).await {
            Next::Answer(r) => r,
            Next::Close => break,
            Next::HandedOver => return,
        };
        if let Some(r) = reply {
            if !send_reply(&conn, r).await {
                break;
            }
        }
    }
    if handing_over {
        if let Ok((p, _)) = peer {
            let conn = conn.into_inner();
            let leases = leases.drain().collect();
            shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(crate::handover::HandedClient { conn, peer: p, leases });
        }
        return;
    }
    // Whatever is still leased, the process never gave back: it ended (or closed its link)
    // without close(). Judge each as a give-back, from what the daemon can verify.
    for (_, l) in leases.drain() {
        orphaned(&shared, l);
    }
}

/// What the client loop does after one request.
pub(super) enum Next {
    /// Send this (if anything) and read the next request.
    Answer(Option<Reply>),
    /// The connection is done (a reply could not be sent).
    Close,
    /// The connection went to a successor with everything it held.
    HandedOver,
}

/// One request: check what arrived, decode it once, and answer it (or refuse it).
pub(super) async fn dispatch(
    shared: &Arc<Shared>,
    conn: &AsyncFd<OwnedFd>,
    got: wire::unix::Received,
    buf: &[u8],
    peer: &Result<(Peer, Option<String>), tenant::TenantError>,
    leases: &mut HashMap<u64, Lease>,
    refusal_logged: &mut bool,
) -> Next {
let reply = if got.fd.is_some() || got.extra_fds > 0 || got.ctrunc {
        // No request carries an fd: close what arrived at once, before answering.
        drop(got.fd);
        Some(Reply::error(0, ErrorCode::UnexpectedFd, "no request carries a file descriptor".into()))
    } else if got.truncated {
        Some(Reply::error(0, ErrorCode::Malformed, "message too long".into()))
    } else {
        // Decoded once; every path below works on the decoded message.
        match (wire::decode(&buf[..got.len]), &peer) {
            (Err(e), _) => {
                shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
                Some(Reply::error(0, e.code(), e.to_string()))
            }
            (Ok((Msg::Takeover, _)), Ok((p, _))) if p.tenant.uid == 0 || p.tenant.uid == shared.daemon_uid => {
                crate::handover::give(shared, conn, p).await;
                // Whatever this connection held stays with this (stopping) daemon.
                return Next::HandedOver;
            }
            (Ok((Msg::Takeover, seq)), _) => {
                Some(Reply::error(seq, ErrorCode::Denied, "only the daemon's own uid or root may take over".into()))
            }
            (Ok((Msg::Prefetch, seq)), Ok((p, None))) => {
                let mut sent = true;
                for r in prefetch(shared, &p.tenant, seq, leases) {
                    sent = sent && send_reply(conn, r).await;
                }
                if !sent {
                    return Next::Close;
                }
                None
            }
            (Ok((msg, seq)), Ok((p, None))) => handle(shared, p, conn, msg, seq, leases).await,
            (Ok((msg, seq)), Ok((p, Some(why)))) => {
                if !*refusal_logged && !matches!(msg, Msg::Prefetch) {
                    // Once per client connection, at its first request (not at connect
                    // or its load-time `Prefetch`: the shim links every process at load
                    // time, asking or not).
                    *refusal_logged = true;
                    info!(pid = p.pid, uid = p.tenant.uid, reason = %why, "client not allowed: its requests are refused");
                }
                refuse(shared, &msg, seq, why)
            }
            (Ok((_, seq)), Err(e)) => Some(Reply::error(seq, ErrorCode::Denied, format!("client not identified: {e}"))),
        }
    };
    Next::Answer(reply)
}

/// A lease whose process ended without giving it back (keep-alive clients that hold their
/// connections until exit, `_exit`, a fatal signal). Nothing the process said can be
/// trusted, so the socket goes through every check a clean `Release` gets (return check,
/// quarantine, holders walk, proof); peer links are closed (the other function may still use
/// the link) and `warm` pools never reuse.
pub(super) fn orphaned(shared: &Shared, l: Lease) {
    if l.peer {
        shared.lock().lease_ended(&l.key);
        shared.metrics.discard(Discard::LeaseLost);
        return;
    }
    shared.metrics.orphans.fetch_add(1, Ordering::Relaxed);
    if l.offered.is_some() && sock::untouched(&l.sock.fd, l.at_handout).is_ok() {
        unoffer(shared, l, Instant::now());
    } else {
        release(shared, l, Disposition::Clean);
    }
}

/// The answer to a request from a client that is not allowed: never a socket.
pub(super) fn refuse(shared: &Shared, msg: &Msg<'_>, seq: u32, why: &str) -> Option<Reply> {
    if matches!(msg, Msg::Release { .. }) {
        // No lease can exist, and a give-back gets no answer from anyone.
        return None;
    }
    if matches!(msg, Msg::Prefetch) {
        // Every shimmed process asks at load time, wanting a socket or not: no offers, but
        // no refusal to count either (as for the connection itself).
        return Some(Reply::miss(seq, MissReason::Empty, 0));
    }
    shared.metrics.denied.fetch_add(1, Ordering::Relaxed);
    Some(Reply::error(seq, ErrorCode::Denied, why.to_owned()))
}

/// A reply and the fd to attach.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) bytes: Vec<u8>,
    pub(super) fd: Option<i32>,
}

impl Reply {
    pub(super) fn msg(m: &Msg<'_>, seq: u32) -> Self {
        // Fixed-size messages fit in 64 bytes; only text bodies need more (a zeroed 64 KiB
        // buffer per grant was measurable on the hand-out path).
        let cap = match m {
            Msg::StatusReply(t) | Msg::Error { text: t, .. } => (16 + t.len()).min(wire::MAX_MESSAGE),
            _ => 64,
        };
        let mut bytes = vec![0u8; cap];
        let n = wire::encode(m, seq, &mut bytes);
        bytes.truncate(n);
        Self { bytes, fd: None }
    }
    pub(super) fn error(seq: u32, code: ErrorCode, text: String) -> Self {
        Self::msg(&Msg::Error { code, text: &text }, seq)
    }
    pub(super) fn miss(seq: u32, reason: MissReason, retry_after_ms: u32) -> Self {
        Self::msg(&Msg::Miss { reason, retry_after_ms }, seq)
    }
}

pub(super) async fn send_reply(conn: &AsyncFd<OwnedFd>, r: Reply) -> bool {
    send_within(conn, &r.bytes, r.fd, std::time::Duration::from_secs(1)).await
}

/// How often a send into a full client socket is tried again (tokio's timer resolution).
const FULL_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// Send one message (and fd), waiting up to `wait` for room in the socket buffer. Client links
/// are registered for readability only (see `client_with`), so a full buffer is tried again
/// every [`FULL_RETRY`] rather than awaited.
pub(crate) async fn send_within(conn: &AsyncFd<OwnedFd>, bytes: &[u8], fd: Option<i32>, wait: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match wire::unix::send(conn.as_raw_fd(), bytes, fd, libc::MSG_DONTWAIT) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(FULL_RETRY).await;
            }
            Err(_) => return false,
        }
    }
}

pub(super) async fn handle(
    shared: &Arc<Shared>,
    peer: &Peer,
    conn: &AsyncFd<OwnedFd>,
    msg: Msg<'_>,
    seq: u32,
    leases: &mut HashMap<u64, Lease>,
) -> Option<Reply> {
    match msg {
        Msg::Acquire(d) if shared.peer.as_ref().is_some_and(|a| is_virtual(a, d.socket_addr())) => {
            let agent = shared.peer.as_ref().expect("checked");
            if let Some(refusal) = peer_refusal(agent, &peer.tenant, conn, seq).await {
                return Some(refusal);
            }
            let dest = d.socket_addr();
            let v4 = match dest.ip() {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().expect("is_virtual checked"),
            };
            let Some(name) = agent.peer_for_addr(v4) else {
                return Some(Reply::error(seq, ErrorCode::Denied, format!("{dest} is a peer address, but of no peer this node knows")));
            };
            Some(acquire_peer(shared, &peer.tenant, conn, name, dest, seq, leases).await)
        }
        Msg::AcquirePeer { port, name } => {
            let Some(agent) = &shared.peer else {
                return Some(Reply::error(seq, ErrorCode::Denied, "this pool manager has no [peer] configuration".into()));
            };
            if let Some(refusal) = peer_refusal(agent, &peer.tenant, conn, seq).await {
                return Some(refusal);
            }
            let name = match crate::peer::PeerName::parse(name) {
                Ok(n) => n,
                Err(e) => return Some(Reply::error(seq, ErrorCode::Malformed, e.to_string())),
            };
            let dest = SocketAddr::new(agent.settings.virtual_range.addr_of(&name).into(), port);
            Some(acquire_peer(shared, &peer.tenant, conn, name, dest, seq, leases).await)
        }
        Msg::Acquire(d) => {
            let started = Instant::now();
            let (reply, lease) = acquire(shared, &peer.tenant, d.socket_addr(), seq, started).await;
            if let Some((id, l)) = lease {
                let mut r = reply;
                r.fd = Some(l.sock.fd.as_raw_fd());
                leases.insert(id, l);
                // The fd stays open in `leases` while it is sent.
                Some(r)
            } else {
                Some(reply)
            }
        }
        Msg::Release { lease, disposition } => {
            match leases.remove(&lease.get()) {
                Some(l) if l.offered.is_some() && disposition == Disposition::Unused => unoffer(shared, l, Instant::now()),
                Some(mut l) => {
                    if let Some(source) = l.offered.take() {
                        // An offer the program connected with: a hand-out after all.
                        shared.metrics.prefetch_taken.fetch_add(1, Ordering::Relaxed);
                        match source {
                            Source::Warm => shared.metrics.handout_warm.fetch_add(1, Ordering::Relaxed),
                            Source::Reuse => shared.metrics.handout_reuse.fetch_add(1, Ordering::Relaxed),
                        };
                        shared.lock().count_handout(&l.key, source);
                    }
                    release(shared, l, disposition);
                }
                None => {}
            }
            None
        }
        // Answered in `client_with` (several replies).
        Msg::Prefetch => None,
        Msg::Status => {
            let text = status::render(shared, peer);
            Some(Reply::msg(&Msg::StatusReply(&text), seq))
        }
        Msg::Prewarm(d) => Some(prewarm(shared, &peer.tenant, d.socket_addr(), seq)),
        Msg::Grant { .. }
        | Msg::Offer { .. }
        | Msg::Miss { .. }
        | Msg::StatusReply(_)
        | Msg::Error { .. }
        | Msg::Handover(_)
        | Msg::Delegate
        | Msg::DelegateAs { .. }
        | Msg::Container { .. }
        | Msg::Takeover => {
            shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            Some(Reply::error(seq, ErrorCode::Malformed, "that is a reply, not a request".into()))
        }
    }
}

/// The refusal for a tenant that `[peer]` does not admit (counted), checked before anything
/// else about the request, so that a refused caller learns nothing of the job's members. It
/// follows a `Miss(Pending)`, as for a link that could not be made: the shim then fails the
/// program's `connect()` with `ECONNREFUSED` rather than letting it go out to a virtual
/// address, which stands for a peer and is nobody's real address.
pub(super) async fn peer_refusal(agent: &crate::peer::agent::Agent, tenant: &Tenant, conn: &AsyncFd<OwnedFd>, seq: u32) -> Option<Reply> {
    // No peer link crosses network namespaces.
    let why = if tenant.netns.is_some() {
        "peer links are not served to other network namespaces".to_owned()
    } else {
        agent.settings.admission.admits(&agent.settings.me.job, tenant.uid, &tenant.cgroup).err()?.to_string()
    };
    agent.metrics.denied.fetch_add(1, Ordering::Relaxed);
    debug!(uid = tenant.uid, cgroup = %tenant.cgroup, reason = %why, "peer link refused");
    // (If this send fails, the connection is gone and the reply below goes nowhere either.)
    let _ = send_reply(conn, Reply::miss(seq, MissReason::Pending, 0)).await;
    Some(Reply::error(seq, ErrorCode::Denied, why))
}

pub(super) fn is_virtual(agent: &crate::peer::agent::Agent, dest: SocketAddr) -> bool {
    let v4 = match dest.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => return false,
        },
    };
    agent.settings.virtual_range.contains(v4)
}
