//! Making one end of one link: endpoint discovery on a link connection to the rendezvous
//! server, TCP simultaneous open from the same local port, the relay when that fails, and
//! the end-to-end proof before the link is usable.
//!
//! Every read here takes exactly the bytes of one frame or proof (`read_exact`, no buffered
//! reader): the same byte stream becomes the function's the moment the proof is checked.

use super::{mac, nonce, verify, Keys, PeerName};
use crate::config::PeerSettings;
use crate::defaults;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use wire::rdv::auth::{link_proof_input, Transcript};
use wire::rdv::{Frame, Purpose, MAC_LEN, NONCE_LEN};

/// How a link reaches the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPath {
    /// A hole-punched TCP connection between the two hosts.
    Direct,
    /// Through the rendezvous server.
    Relayed,
}

impl LinkPath {
    /// `direct` or `relayed`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
        }
    }
}

/// Counters of link set-up.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    /// Links made, direct.
    pub direct: AtomicU64,
    /// Links made, relayed.
    pub relayed: AtomicU64,
    /// Links that could not be made.
    pub failed: AtomicU64,
    /// Simultaneous-open attempts.
    pub punch_attempts: AtomicU64,
    /// Punches that connected.
    pub punch_ok: AtomicU64,
    /// Sum of set-up times (from `LinkStart` to a proven link), µs.
    pub setup_us_sum: AtomicU64,
    /// Peer links handed to functions.
    pub handouts: AtomicU64,
    /// Requests for a link refused because the caller is not admitted (`[peer] allow_uids`,
    /// `allow_cgroups`).
    pub denied: AtomicU64,
}

/// Why a link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Talking to the rendezvous server failed.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// The rendezvous server refused.
    #[error("rendezvous refused: {0}")]
    Refused(String),
    /// No direct path and the relay is off or failed.
    #[error("no path to the peer: {0}")]
    NoPath(String),
    /// The other end did not prove it belongs to the job.
    #[error("peer failed authentication: {0}")]
    Auth(String),
}

pub use wire::rdv::auth::{read_frame_async as read_frame, write_frame_async as write_frame};

/// Authenticate to the rendezvous server on a fresh connection; returns the address it saw.
///
/// # Errors
/// I/O, refusal, or a server that cannot prove it knows the key.
pub async fn handshake(s: &mut TcpStream, me: &PeerName, keys: &Keys, purpose: Purpose, link: u64) -> Result<SocketAddr, LinkError> {
    let io = |e: std::io::Error| LinkError::Rendezvous(e.to_string());
    let nm: [u8; NONCE_LEN] = nonce();
    let hello = Frame::Hello { job: me.job.clone(), name: me.name.clone(), purpose, link, nonce: nm };
    write_frame(s, &hello).await.map_err(io)?;
    let nr = match read_frame(s).await.map_err(io)? {
        Frame::Challenge { nonce } => nonce,
        Frame::Refused { reason } => return Err(LinkError::Refused(reason)),
        other => return Err(LinkError::Rendezvous(format!("expected Challenge, got {other:?}"))),
    };
    let t = Transcript::new(&me.job, &me.name, purpose, link, &nm, &nr);
    let m = mac(&keys.rendezvous, &t.member_input());
    write_frame(s, &Frame::Auth { mac: m }).await.map_err(io)?;
    match read_frame(s).await.map_err(io)? {
        Frame::Welcome { observed, mac: mr } => {
            if !verify(&keys.rendezvous, &t.server_input(&observed.to_string()), &mr) {
                return Err(LinkError::Rendezvous("the server could not prove it knows the job key".into()));
            }
            Ok(observed)
        }
        Frame::Refused { reason } => Err(LinkError::Refused(reason)),
        other => Err(LinkError::Rendezvous(format!("expected Welcome, got {other:?}"))),
    }
}

/// A socket bound to `local` with address and port reuse, so that the link connection to the
/// rendezvous server and the punch share one local port (and one NAT mapping).
fn reusable_socket(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let s = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(local)?;
    Ok(s)
}

/// Connect to the rendezvous server from a fresh local port that can be reused for punching.
///
/// # Errors
/// I/O.
pub async fn connect_rendezvous(server: SocketAddr) -> std::io::Result<TcpStream> {
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse().expect("literal") } else { "[::]:0".parse().expect("literal") };
    let s = reusable_socket(any)?;
    let c = timeout(defaults::RENDEZVOUS_STEP_TIMEOUT, s.connect(server))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect to the rendezvous server timed out"))??;
    c.set_nodelay(true)?;
    Ok(c)
}

/// Prove to each other that both ends hold the job's link key and agree on the link.
async fn prove(s: &mut TcpStream, keys: &Keys, me: &PeerName, peer: &PeerName, link: u64) -> Result<(), LinkError> {
    let io = |e: std::io::Error| LinkError::Auth(e.to_string());
    let mine: [u8; NONCE_LEN] = nonce();
    let me_s = me.to_string();
    let mut hello = Vec::with_capacity(64);
    hello.extend_from_slice(b"WPL1");
    hello.extend_from_slice(&link.to_le_bytes());
    hello.extend_from_slice(&mine);
    hello.push(me_s.len() as u8);
    hello.extend_from_slice(me_s.as_bytes());
    s.write_all(&hello).await.map_err(io)?;
    let mut head = [0u8; 4 + 8 + NONCE_LEN + 1];
    s.read_exact(&mut head).await.map_err(io)?;
    if &head[..4] != b"WPL1" {
        return Err(LinkError::Auth("not a warmpool link".into()));
    }
    let their_link = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
    let theirs = &head[12..12 + NONCE_LEN];
    let mut name = vec![0u8; head[28] as usize];
    s.read_exact(&mut name).await.map_err(io)?;
    let peer_s = peer.to_string();
    if their_link != link || name != peer_s.as_bytes() {
        return Err(LinkError::Auth(format!("expected {peer_s} on link {link}, got {} on link {their_link}", String::from_utf8_lossy(&name))));
    }
    let l = link.to_le_bytes();
    let tag = mac(&keys.link, &link_proof_input(&l, &me_s, &peer_s, &mine, theirs));
    s.write_all(&tag).await.map_err(io)?;
    let mut got = [0u8; MAC_LEN];
    s.read_exact(&mut got).await.map_err(io)?;
    if !verify(&keys.link, &link_proof_input(&l, &peer_s, &me_s, theirs, &mine), &got) {
        return Err(LinkError::Auth(format!("{peer_s} does not hold the job secret")));
    }
    Ok(())
}

/// Keepalive on a link: holds NAT mappings open and finds dead peers.
fn keepalive(fd: &impl AsRawFd) {
    let idle = defaults::PEER_KEEPALIVE_IDLE.as_secs() as libc::c_int;
    for (level, opt, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        // SAFETY: setsockopt with an int option on a socket we own.
        unsafe {
            libc::setsockopt(fd.as_raw_fd(), level, opt, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
        };
    }
}

/// One made link.
#[derive(Debug)]
pub struct Made {
    /// The daemon's reference to the link socket (non-blocking).
    pub fd: OwnedFd,
    /// Direct or relayed.
    pub path: LinkPath,
    /// Time from the start of set-up to a proven link.
    pub took: Duration,
}

/// Try to connect `local` ⇄ `peer` until `deadline`: TCP simultaneous open, plus a listener
/// on the same local port. Behind NATs that drop unsolicited SYNs, the two SYNs cross and
/// simultaneous open connects. Where the peer's host answers a SYN that arrives before its
/// own connect() with RST (no NAT, or a NAT that rejects), the listener accepts the peer's
/// next SYN instead; retries are jittered so the two sides do not stay in lockstep. Only a
/// connection from `peer` itself is taken.
async fn punch(local: SocketAddr, peer: SocketAddr, rtt_hint: Duration, deadline: tokio::time::Instant, attempts: &AtomicU64) -> Option<TcpStream> {
    // One attempt waits a few RTTs (never less than 30 ms, at most a third of the budget):
    // a lost SYN is sent again much sooner than the kernel's 1 s SYN timeout, and an
    // attempt is never given up before the answer to it can arrive.
    let per_try = (rtt_hint * 3).max(Duration::from_millis(30)).min((deadline - tokio::time::Instant::now()) / 3);
    let listener = match reusable_socket(local).and_then(|s| s.listen(16)) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(%local, error = %e, "no listener on the punch port; simultaneous open only");
            None
        }
    };
    let accept = async {
        match &listener {
            Some(l) => loop {
                match l.accept().await {
                    Ok((s, from)) if from == peer => return s,
                    Ok((_, from)) => tracing::debug!(%from, "ignoring a connection that is not the peer"),
                    Err(e) => {
                        tracing::debug!(error = %e, "accept on the punch port failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            },
            None => std::future::pending().await,
        }
    };
    let connect = async {
        loop {
            let now = tokio::time::Instant::now();
            attempts.fetch_add(1, Ordering::Relaxed);
            let s = match reusable_socket(local) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%local, error = %e, "cannot bind the punch socket");
                    return std::future::pending().await;
                }
            };
            let until = (now + per_try).min(deadline);
            match tokio::time::timeout_at(until, s.connect(peer)).await {
                Ok(Ok(c)) => return c,
                Ok(Err(e)) => {
                    tracing::debug!(%local, %peer, error = %e, "punch attempt failed");
                    let jitter = u64::from(nonce::<1>()[0] % 20) + 2;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(_timeout) => tracing::debug!(%local, %peer, "punch attempt timed out"),
            }
        }
    };
    tokio::select! {
        s = accept => Some(s),
        s = connect => Some(s),
        () = tokio::time::sleep_until(deadline) => None,
    }
}

/// A punch order, as received on a link connection.
#[derive(Debug)]
pub struct Order {
    /// Link id.
    pub link: u64,
    /// Peer name within the job.
    pub name: String,
    /// Channel.
    pub port: u16,
    peer_ep: SocketAddr,
    delay: Duration,
    rtt_hint: Duration,
}

/// Answer pings on a link connection until the punch order comes (`wait`: how long).
async fn wait_order(rdv: &mut TcpStream, wait: Option<Duration>) -> Result<Order, LinkError> {
    let rdv_io = |e: std::io::Error| LinkError::Rendezvous(e.to_string());
    loop {
        let f = match wait {
            Some(w) => timeout(w, read_frame(rdv)).await.map_err(|_| LinkError::Rendezvous("no punch order".into()))?,
            None => read_frame(rdv).await,
        };
        match f.map_err(rdv_io)? {
            Frame::Ping { token } => write_frame(rdv, &Frame::Pong { token }).await.map_err(rdv_io)?,
            Frame::Punch { peer, delay_us, rtt_hint_us, link, name, port } => {
                return Ok(Order {
                    link,
                    name,
                    port,
                    peer_ep: peer,
                    delay: Duration::from_micros(u64::from(delay_us)),
                    rtt_hint: Duration::from_micros(u64::from(rtt_hint_us)),
                });
            }
            Frame::Refused { reason } => return Err(LinkError::Refused(reason)),
            other => return Err(LinkError::Rendezvous(format!("unexpected {other:?}"))),
        }
    }
}

/// Make this side's end of `link` to `peer` on a new link connection.
///
/// # Errors
/// See [`LinkError`].
pub async fn make(cfg: &PeerSettings, link: u64, peer: &PeerName, m: &LinkMetrics) -> Result<Made, LinkError> {
    let started = Instant::now();
    let rdv_io = |e: std::io::Error| LinkError::Rendezvous(e.to_string());
    let mut rdv = connect_rendezvous(cfg.rendezvous).await.map_err(rdv_io)?;
    timeout(defaults::RENDEZVOUS_STEP_TIMEOUT, handshake(&mut rdv, &cfg.me, &cfg.keys, Purpose::Link, link))
        .await
        .map_err(|_| LinkError::Rendezvous("handshake timed out".into()))??;
    let order = wait_order(&mut rdv, Some(cfg.link_timeout)).await?;
    if order.link != link || order.name != peer.name {
        return Err(LinkError::Rendezvous(format!("punch order for link {} to {}, expected {link} to {peer}", order.link, order.name)));
    }
    complete(cfg, rdv, order, peer, m, started).await
}

/// A spare link connection: made, authenticated and measured now, waiting (without a time
/// limit) for the punch order that names its link. `ready` fires once it is registered.
///
/// # Errors
/// See [`LinkError`]; the order comes with the error-free result.
pub async fn spare(cfg: &PeerSettings, ready: impl FnOnce()) -> Result<(TcpStream, Order), LinkError> {
    let rdv_io = |e: std::io::Error| LinkError::Rendezvous(e.to_string());
    let mut rdv = connect_rendezvous(cfg.rendezvous).await.map_err(rdv_io)?;
    timeout(defaults::RENDEZVOUS_STEP_TIMEOUT, handshake(&mut rdv, &cfg.me, &cfg.keys, Purpose::Link, 0))
        .await
        .map_err(|_| LinkError::Rendezvous("handshake timed out".into()))??;
    ready();
    let order = wait_order(&mut rdv, None).await?;
    Ok((rdv, order))
}

/// Punch (then, if needed, relay) and prove, on a link connection that got its order.
///
/// # Errors
/// See [`LinkError`].
pub async fn complete(cfg: &PeerSettings, mut rdv: TcpStream, order: Order, peer: &PeerName, m: &LinkMetrics, started: Instant) -> Result<Made, LinkError> {
    let step = defaults::RENDEZVOUS_STEP_TIMEOUT;
    let rdv_io = |e: std::io::Error| LinkError::Rendezvous(e.to_string());
    let local = rdv.local_addr().map_err(rdv_io)?;
    let link = order.link;
    tokio::time::sleep(order.delay).await;
    let deadline = tokio::time::Instant::now() + cfg.punch_timeout;
    let direct = if cfg.punch { punch(local, order.peer_ep, order.rtt_hint, deadline, &m.punch_attempts).await } else { None };
    if let Some(mut direct) = direct {
        m.punch_ok.fetch_add(1, Ordering::Relaxed);
        // The proof is two small writes in a row: without NODELAY, Nagle holds the second
        // until the first is acknowledged, which costs half an RTT. `finish` restores it.
        let _ = direct.set_nodelay(true);
        match timeout(step, prove(&mut direct, &cfg.keys, &cfg.me, peer, link)).await {
            Ok(Ok(())) => {
                let _ = write_frame(&mut rdv, &Frame::Verdict { relay: false }).await;
                return finish(direct, LinkPath::Direct, started);
            }
            Ok(Err(e @ LinkError::Auth(_))) => {
                tracing::warn!(link, peer = %peer, error = %e, "direct link failed the end-to-end proof");
            }
            _ => {}
        }
    }
    if !cfg.relay {
        let _ = write_frame(&mut rdv, &Frame::Verdict { relay: false }).await;
        return Err(LinkError::NoPath("hole punching failed and the relay is off".into()));
    }
    write_frame(&mut rdv, &Frame::Verdict { relay: true }).await.map_err(rdv_io)?;
    match timeout(step, read_frame(&mut rdv)).await {
        Ok(Ok(Frame::Relaying)) => {}
        Ok(Ok(Frame::Refused { reason })) => return Err(LinkError::NoPath(reason)),
        Ok(Ok(other)) => return Err(LinkError::Rendezvous(format!("expected Relaying, got {other:?}"))),
        Ok(Err(e)) => return Err(rdv_io(e)),
        Err(_) => return Err(LinkError::NoPath("the relay did not start".into())),
    }
    timeout(step, prove(&mut rdv, &cfg.keys, &cfg.me, peer, link)).await.map_err(|_| LinkError::Auth("proof timed out".into()))??;
    finish(rdv, LinkPath::Relayed, started)
}

fn finish(s: TcpStream, path: LinkPath, started: Instant) -> Result<Made, LinkError> {
    // A function gets the socket as a fresh connect() would have made it: Nagle on.
    let _ = s.set_nodelay(false);
    let std = s.into_std().map_err(|e| LinkError::Rendezvous(e.to_string()))?;
    let fd = OwnedFd::from(std);
    keepalive(&fd);
    Ok(Made { fd, path, took: started.elapsed() })
}
