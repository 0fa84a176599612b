//! The daemon's side of peer links: the control connection to the rendezvous server, the
//! links being made, the ready links (the peer pool), and the functions waiting for one.
//!
//! Which link a function gets: both managers hand out a (peer, channel)'s ready links in
//! link-id order, so the n-th function on each side gets the same link when links were made
//! ahead of demand. On demand, the rendezvous server pairs requests: a request from one side
//! is answered with a link the other side asked for and this side has not claimed yet, if
//! there is one; otherwise with a new link. Taking a ready link is reported (`Claimed`) so
//! the server does not answer a later request with it again.
//!
//! Tasks: [`run`] owns the control connection (its reader and writer run inside `run`'s own
//! future, not as tasks of their own). Spare link connections (kept up by `Agent::replenish`) and links
//! the server starts (`LinkStart`) run in the agent's task set ([`Agent::tasks`]); when `run`
//! is cancelled it aborts and awaits them, then closes the ready links, so nothing the agent
//! started outlives `run`.

use super::link::{self, LinkMetrics, LinkPath};
use super::{AcquireError, ControlError, PeerName};
use crate::config::PeerSettings;
use crate::defaults;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::rdv::{Frame, Purpose};

/// A link ready to be handed out.
#[derive(Debug)]
pub struct ReadyLink {
    /// Link id (assigned by the rendezvous server).
    pub link: u64,
    /// The daemon's reference.
    pub fd: OwnedFd,
    /// Direct or relayed.
    pub path: LinkPath,
    /// When it became ready.
    pub since: Instant,
}

type Channel = (String, u16);

#[derive(Debug, Default)]
struct State {
    ready: BTreeMap<Channel, BTreeMap<u64, ReadyLink>>,
    building: HashMap<u64, Channel>,
    waiters: HashMap<u64, oneshot::Sender<Option<ReadyLink>>>,
    requests: HashMap<u32, oneshot::Sender<u64>>,
    /// Prewarm requests sent and not yet answered (`Assigned`), with their channel and when
    /// they were sent: counted as links on their way, so two prewarm turns before the server's
    /// answer do not ask twice.
    prewarm_asked: HashMap<u32, (Channel, Instant)>,
    /// Links recently made or failed (bounded), to tell "not started here yet" from "gone".
    finished: std::collections::VecDeque<u64>,
}

const FINISHED_MEMORY: usize = 1024;

/// The peer-link agent of one daemon.
#[derive(Debug)]
pub struct Agent {
    /// Settings from `[peer]`.
    pub settings: PeerSettings,
    /// Counters.
    pub metrics: LinkMetrics,
    state: Mutex<State>,
    control: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    connected: AtomicBool,
    next_req: AtomicU32,
    known: Mutex<Vec<PeerName>>,
    spares: std::sync::atomic::AtomicUsize,
    /// Spare link connections and links being made; shut down when [`run`] ends.
    tasks: crate::server::Background,
}

/// One line of the status table.
#[derive(Debug)]
pub struct ChannelStatus {
    /// Peer name within the job.
    pub peer: String,
    /// Channel.
    pub port: u16,
    /// Ready links by path: (direct, relayed).
    pub ready: (usize, usize),
    /// Links being made.
    pub building: usize,
}

impl Agent {
    /// A new agent (not connected yet: see [`run`]).
    #[must_use]
    pub fn new(settings: PeerSettings) -> Self {
        Self {
            metrics: LinkMetrics::default(),
            state: Mutex::new(State::default()),
            control: Mutex::new(None),
            connected: AtomicBool::new(false),
            next_req: AtomicU32::new(1),
            known: Mutex::new(settings.peers.clone()),
            spares: std::sync::atomic::AtomicUsize::new(0),
            tasks: crate::server::Background::default(),
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the control connection is up.
    #[must_use]
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn send(&self, f: Frame) -> bool {
        let c = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.as_ref().is_some_and(|tx| tx.send(f).is_ok())
    }

    /// The peer behind a virtual address: one of the configured `peers` (and `prewarm`) or
    /// a name that started a link to this node.
    #[must_use]
    pub fn peer_for_addr(&self, ip: std::net::Ipv4Addr) -> Option<PeerName> {
        let known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        known.iter().find(|p| self.settings.virtual_range.addr_of(p) == ip).cloned()
    }

    fn learn(&self, peer: &PeerName) {
        let mut known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !known.contains(peer) && known.len() < 4096 {
            known.push(peer.clone());
        }
    }

    /// Status of every channel.
    #[must_use]
    pub fn status(&self) -> Vec<ChannelStatus> {
        let st = self.lock();
        let mut out: BTreeMap<Channel, ChannelStatus> = BTreeMap::new();
        for (ch, links) in &st.ready {
            let e = out.entry(ch.clone()).or_insert_with(|| ChannelStatus { peer: ch.0.clone(), port: ch.1, ready: (0, 0), building: 0 });
            for l in links.values() {
                match l.path {
                    LinkPath::Direct => e.ready.0 += 1,
                    LinkPath::Relayed => e.ready.1 += 1,
                }
            }
        }
        for ch in st.building.values() {
            out.entry(ch.clone()).or_insert_with(|| ChannelStatus { peer: ch.0.clone(), port: ch.1, ready: (0, 0), building: 0 }).building += 1;
        }
        out.into_values().collect()
    }

    /// Take the lowest-numbered healthy ready link of a channel.
    fn take_ready(&self, ch: &Channel) -> Option<ReadyLink> {
        let mut st = self.lock();
        let links = st.ready.get_mut(ch)?;
        while let Some((_, l)) = links.pop_first() {
            if alive(&l.fd) {
                return Some(l);
            }
            debug!(link = l.link, "dropping a dead ready link");
        }
        None
    }

    /// This side's end of a link to `peer` on channel `port`, waiting up to the link timeout.
    ///
    /// # Errors
    /// Why there is no link (the caller answers the function with a miss).
    pub async fn acquire(&self, peer: &PeerName, port: u16) -> Result<ReadyLink, AcquireError> {
        let me = &self.settings.me;
        if peer.job != me.job {
            return Err(AcquireError::OtherJob { peer: peer.clone(), job: me.job.clone() });
        }
        if peer == me {
            return Err(AcquireError::Itself(peer.clone()));
        }
        let ch: Channel = (peer.name.clone(), port);
        let deadline = tokio::time::Instant::now() + self.settings.link_timeout;
        for _ in 0..3 {
            if let Some(l) = self.take_ready(&ch) {
                self.send(Frame::Claimed { link: l.link });
                self.metrics.handouts.fetch_add(1, Ordering::Relaxed);
                return Ok(l);
            }
            let (tx, rx) = oneshot::channel();
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            self.lock().requests.insert(req, tx);
            if !self.send(Frame::LinkRequest { req, peer: peer.name.clone(), port, prewarm: false }) {
                self.lock().requests.remove(&req);
                return Err(AcquireError::NotConnected);
            }
            let link = match tokio::time::timeout(defaults::RENDEZVOUS_STEP_TIMEOUT, rx).await {
                Ok(Ok(0)) => return Err(AcquireError::NotRegistered(peer.clone())),
                Ok(Ok(l)) => l,
                Ok(Err(_)) => return Err(AcquireError::LostServer),
                Err(_) => {
                    self.lock().requests.remove(&req);
                    return Err(AcquireError::NoAnswer);
                }
            };
            let (wtx, wrx) = oneshot::channel();
            {
                let mut st = self.lock();
                if let Some(l) = st.ready.get_mut(&ch).and_then(|m| m.remove(&link)) {
                    drop(st);
                    self.metrics.handouts.fetch_add(1, Ordering::Relaxed);
                    return Ok(l);
                }
                if st.finished.contains(&link) {
                    continue; // taken by another function meanwhile, or failed: ask again
                }
                // Being made, or its punch order has not reached us yet.
                st.waiters.insert(link, wtx);
            }
            match tokio::time::timeout_at(deadline, wrx).await {
                Ok(Ok(Some(l))) => {
                    self.metrics.handouts.fetch_add(1, Ordering::Relaxed);
                    return Ok(l);
                }
                Ok(_) => return Err(AcquireError::NotMade(peer.clone())),
                Err(_) => {
                    self.lock().waiters.remove(&link);
                    return Err(AcquireError::Timeout(peer.clone(), self.settings.link_timeout));
                }
            }
        }
        Err(AcquireError::Contended(peer.clone()))
    }

    /// A link was made (or not): give it to its waiter or to the pool.
    fn made(&self, link: u64, ch: Channel, result: Option<ReadyLink>) {
        let mut st = self.lock();
        st.building.remove(&link);
        if st.finished.len() >= FINISHED_MEMORY {
            st.finished.pop_front();
        }
        st.finished.push_back(link);
        let waiter = st.waiters.remove(&link);
        match (result, waiter) {
            (Some(l), Some(w)) => {
                if let Err(Some(l)) = w.send(Some(l)) {
                    // The function gave up waiting: keep the link for the next one.
                    st.ready.entry(ch).or_default().insert(link, l);
                }
            }
            (Some(l), None) => {
                st.ready.entry(ch).or_default().insert(link, l);
            }
            (None, Some(w)) => {
                let _ = w.send(None);
            }
            (None, None) => {}
        }
    }

    /// Close ready links that died, and drop empty channels.
    fn sweep(&self) {
        let mut st = self.lock();
        for links in st.ready.values_mut() {
            links.retain(|_, l| alive(&l.fd));
        }
        st.ready.retain(|_, l| !l.is_empty());
    }

    /// Ask for prewarmed links where fewer are ready or being made than configured. Only the
    /// side with the smaller name asks, so a pair of prewarming nodes does not make twice as
    /// many links.
    fn prewarm(&self) {
        let want = self.settings.prewarm_links;
        for (peer, port) in &self.settings.prewarm {
            if self.settings.me.name >= peer.name {
                continue;
            }
            let ch: Channel = (peer.name.clone(), *port);
            let mut st = self.lock();
            let timeout = self.settings.link_timeout;
            st.prewarm_asked.retain(|_, (_, at)| at.elapsed() < timeout);
            let have = st.ready.get(&ch).map_or(0, BTreeMap::len)
                + st.building.values().filter(|c| **c == ch).count()
                + st.prewarm_asked.values().filter(|(c, _)| *c == ch).count();
            for _ in have..want {
                let req = self.next_req.fetch_add(1, Ordering::Relaxed);
                if self.send(Frame::LinkRequest { req, peer: peer.name.clone(), port: *port, prewarm: true }) {
                    st.prewarm_asked.insert(req, (ch.clone(), Instant::now()));
                }
            }
        }
    }
}

impl Agent {
    /// Count a link's outcome and hand it on.
    fn record(&self, link: u64, ch: Channel, peer: &PeerName, r: Result<Result<link::Made, link::LinkError>, tokio::time::error::Elapsed>) {
        let made = match r {
            Ok(Ok(m)) => {
                let c = if m.path == LinkPath::Direct { &self.metrics.direct } else { &self.metrics.relayed };
                c.fetch_add(1, Ordering::Relaxed);
                self.metrics.setup_us_sum.fetch_add(m.took.as_micros() as u64, Ordering::Relaxed);
                info!(link, peer = %peer, port = ch.1, path = m.path.name(), took_us = m.took.as_micros() as u64, "peer link ready");
                Some(ReadyLink { link, fd: m.fd, path: m.path, since: Instant::now() })
            }
            Ok(Err(e)) => {
                self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                warn!(link, peer = %peer, error = %e, "peer link failed");
                None
            }
            Err(_) => {
                self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                warn!(link, peer = %peer, "peer link timed out");
                None
            }
        };
        self.made(link, ch, made);
    }

    /// Keep [`defaults::SPARE_LINK_CONNECTIONS`] spare link connections at the rendezvous
    /// server while the control connection is up.
    fn replenish(self: &Arc<Self>) {
        while self.connected() && self.spares.load(Ordering::Relaxed) < defaults::SPARE_LINK_CONNECTIONS {
            self.spares.fetch_add(1, Ordering::Relaxed);
            let agent = self.clone();
            let started = self.tasks.spawn(async move {
                let cfg = &agent.settings;
                let r = link::spare(cfg, || {}).await;
                agent.spares.fetch_sub(1, Ordering::Relaxed);
                let (rdv, order) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "spare link connection ended");
                        return;
                    }
                };
                let started = Instant::now();
                agent.replenish();
                let Ok(peer) = PeerName::parse(&format!("{}/{}", cfg.me.job, order.name)) else { return };
                agent.learn(&peer);
                let (link, ch) = (order.link, (order.name.clone(), order.port));
                agent.lock().building.insert(link, ch.clone());
                let r = tokio::time::timeout(cfg.link_timeout, link::complete(cfg, rdv, order, &peer, &agent.metrics, started)).await;
                agent.record(link, ch, &peer, r);
            });
            if !started {
                // Shut down: `run` has ended.
                self.spares.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Spare link connections and links being made, still in the task set (finished ones
    /// not yet reaped included; 0 once [`run`] has returned).
    #[must_use]
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// At the end of [`run`], after the task set is shut down: close the ready links, and
    /// answer every function still waiting (with no link).
    fn close_all(&self) -> usize {
        let mut st = self.lock();
        let closed = st.ready.values().map(BTreeMap::len).sum();
        st.ready.clear();
        st.building.clear();
        st.waiters.clear();
        st.requests.clear();
        st.prewarm_asked.clear();
        closed
    }
}

/// Still connected, as far as the kernel knows: ESTABLISHED, or CLOSE_WAIT with data the
/// function has yet to read (the peer sent its last bytes and closed before we handed out).
fn alive(fd: &OwnedFd) -> bool {
    let (state, unread) = crate::sock::state_and_unread(fd);
    state == crate::sock::TCP_ESTABLISHED || (state == crate::sock::TCP_CLOSE_WAIT && unread > 0)
}

/// Run the agent until `cancel`: keep the control connection up, make links the rendezvous
/// server asks for, keep prewarmed links ready. When cancelled, it aborts and awaits every
/// task the agent started and closes the ready links before it returns.
pub async fn run(agent: Arc<Agent>, cancel: CancellationToken) {
    let s = &agent.settings;
    info!(peer = %s.me, rendezvous = %s.rendezvous, virtual_range = %s.virtual_range, "peer links enabled");
    stay_connected(&agent, &cancel).await;
    agent.connected.store(false, Ordering::Relaxed);
    *agent.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    let aborted = agent.tasks.shutdown().await;
    let closed = agent.close_all();
    info!(aborted, closed, "peer agent stopped; its tasks ended, ready links closed");
}

/// The control connection, reconnected after [`defaults::RENDEZVOUS_RECONNECT`] whenever it
/// is lost, until `cancel`.
async fn stay_connected(agent: &Arc<Agent>, cancel: &CancellationToken) {
    loop {
        let r = tokio::select! {
            () = cancel.cancelled() => return,
            r = control(agent, cancel) => r,
        };
        agent.connected.store(false, Ordering::Relaxed);
        *agent.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        // Requests waiting for an answer on the lost connection fail now (their senders drop).
        agent.lock().requests.clear();
        agent.lock().prewarm_asked.clear();
        if let Err(e) = r {
            warn!(error = %e, "rendezvous control connection lost; reconnecting");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(defaults::RENDEZVOUS_RECONNECT) => {}
        }
    }
}

async fn control(agent: &Arc<Agent>, cancel: &CancellationToken) -> Result<(), ControlError> {
    let s = &agent.settings;
    let mut conn = tokio::net::TcpStream::connect(s.rendezvous).await?;
    let _ = conn.set_nodelay(true);
    let observed = tokio::time::timeout(defaults::RENDEZVOUS_STEP_TIMEOUT, link::handshake(&mut conn, &s.me, &s.keys, Purpose::Control, 0))
        .await
        .map_err(|_| ControlError::HandshakeTimeout)??;
    info!(observed = %observed, "registered with the rendezvous server");
    let (rd, mut wr) = conn.into_split();
    // Frames to send (`Agent::send`, from any task) flow through `control_tx` to the writer.
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Frame>();
    *agent.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(control_tx);
    agent.connected.store(true, Ordering::Relaxed);
    // The writer runs beside the reader in this future (not as a task of its own), so both
    // halves of the connection are dropped with it. It ends only when a write fails.
    let writer = async {
        use tokio::io::AsyncWriteExt;
        while let Some(f) = control_rx.recv().await {
            wr.write_all(&f.encode()).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        r = read_control(agent, rd, cancel) => r,
        r = writer => r.map_err(ControlError::from),
    }
}

/// Read and act on the control connection's frames until `cancel`, with a tick each second
/// that sweeps, prewarms and replenishes spare link connections.
async fn read_control(agent: &Arc<Agent>, mut rd: tokio::net::tcp::OwnedReadHalf, cancel: &CancellationToken) -> Result<(), ControlError> {
    let s = &agent.settings;
    agent.prewarm();
    agent.replenish();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                agent.sweep();
                agent.prewarm();
                agent.replenish();
                continue;
            }
            f = link::read_frame(&mut rd) => f?,
        };
        match frame {
            Frame::Assigned { req, link } => {
                // A prewarm request's link is `building` from its `LinkStart`, which the server
                // sends before `Assigned`.
                agent.lock().prewarm_asked.remove(&req);
                if let Some(tx) = agent.lock().requests.remove(&req) {
                    let _ = tx.send(link);
                }
            }
            Frame::LinkStart { link, peer, port, spare } => {
                let Ok(peer) = PeerName::parse(&format!("{}/{peer}", s.me.job)) else { continue };
                agent.learn(&peer);
                if spare {
                    continue; // a spare link connection got the punch order and makes it
                }
                let ch: Channel = (peer.name.clone(), port);
                agent.lock().building.insert(link, ch.clone());
                let a = agent.clone();
                let started = agent.tasks.spawn(async move {
                    let cfg = &a.settings;
                    let r = tokio::time::timeout(cfg.link_timeout, link::make(cfg, link, &peer, &a.metrics)).await;
                    a.record(link, ch, &peer, r);
                });
                if !started {
                    agent.lock().building.remove(&link);
                }
            }
            Frame::Refused { reason } => return Err(ControlError::Refused(reason)),
            other => debug!(?other, "ignoring unexpected control frame"),
        }
    }
}

