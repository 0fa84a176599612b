//! The public coordination server for peer links (run as `pool-manager rendezvous`). It
//! shares only the protocol, `wire::rdv`, with the daemon's peer agent.
//!
//! It authenticates members (per-job key, challenge–response both ways), tells each the
//! address it sees (the NAT's mapping), pairs link requests, times the punch so both SYNs
//! leave together (each side's start is delayed by half the difference of the two RTTs, as
//! libp2p's DCUtR does), and, when both ends report that punching failed, splices their link
//! connections. It holds no job secret, only the derived rendezvous key, and it carries no
//! bytes for a direct link.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::rdv::auth::{mac, nonce, read_frame_async as read_frame, valid_name_part, verify, write_frame_async as write_frame, Key, Transcript};
use wire::rdv::{Frame, Purpose, LINK_TTL, MAX_SPARES, NONCE_LEN, STEP_TIMEOUT};

/// Counters.
#[derive(Debug, Default)]
pub struct RdvMetrics {
    /// Links started (LinkStart sent to both ends).
    pub links_started: AtomicU64,
    /// Links whose ends reported a direct connection.
    pub links_direct: AtomicU64,
    /// Links spliced through this server.
    pub links_relayed: AtomicU64,
    /// Bytes carried for relayed links (both directions).
    pub relay_bytes: AtomicU64,
    /// Connections that failed authentication.
    pub auth_failures: AtomicU64,
    /// `Auth` MACs checked (one per connection that got as far as `Auth`, known job or not).
    pub mac_checks: AtomicU64,
}

/// A member failed authentication: one answer for an unknown job, a wrong key, a missing
/// proof and a bad name, so that nobody learns which jobs exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct AuthFailed;

/// Why one connection to the server ended early (logged at debug level, never sent).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    /// Reading or writing the connection failed, or a frame was malformed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The member did not send the frame a step needs in time.
    #[error("no {0} in time")]
    Timeout(&'static str),
    /// A frame other than the one the step needs.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// See [`AuthFailed`].
    #[error(transparent)]
    Auth(#[from] AuthFailed),
    /// The link it names is unknown, expired or dropped, or the member holds too many spares.
    #[error("{0}")]
    Link(&'static str),
}

struct Member {
    id: u64,
    tx: mpsc::UnboundedSender<Frame>,
}

struct Side {
    observed: SocketAddr,
    rtt: Duration,
    punch: Option<oneshot::Sender<Frame>>,
}

struct Spare {
    id: u64,
    observed: SocketAddr,
    rtt: Duration,
    assign: oneshot::Sender<(u64, usize, Frame)>,
}

struct LinkRec {
    job: String,
    ends: [String; 2],
    port: u16,
    created: Instant,
    sides: [Option<Side>; 2],
    punched: bool,
    direct_counted: bool,
    parked: Option<(usize, TcpStream)>,
}

type PairKey = (String, String, String, u16);

#[derive(Default)]
struct State {
    members: HashMap<(String, String), Member>,
    spares: HashMap<(String, String), VecDeque<Spare>>,
    links: HashMap<u64, LinkRec>,
    pending: HashMap<PairKey, VecDeque<(u64, String)>>,
}

/// The rendezvous server.
pub struct Server {
    jobs: HashMap<String, Key>,
    /// Stands in for the key of a job this server does not serve, so that an unknown job
    /// costs the same MAC check as a known one (random per process: no MAC can match it
    /// by design, and it is never used for anything else).
    dummy_key: Key,
    state: Mutex<State>,
    /// Counters.
    pub metrics: RdvMetrics,
    next_link: AtomicU64,
    next_member: AtomicU64,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("jobs", &self.jobs.len()).finish_non_exhaustive()
    }
}

/// The punch orders for both ends: the nearer end waits half the RTT difference so that
/// both SYNs leave at about the same moment.
fn orders(link: u64, rec: &LinkRec, a: (SocketAddr, Duration), b: (SocketAddr, Duration)) -> [Frame; 2] {
    let far = a.1.max(b.1);
    let rtt_hint_us = (a.1 + b.1).as_micros().min(u128::from(u32::MAX)) as u32;
    [
        Frame::Punch { peer: b.0, delay_us: ((far - a.1) / 2).as_micros() as u32, rtt_hint_us, link, name: rec.ends[1].clone(), port: rec.port },
        Frame::Punch { peer: a.0, delay_us: ((far - b.1) / 2).as_micros() as u32, rtt_hint_us, link, name: rec.ends[0].clone(), port: rec.port },
    ]
}

fn pop_spare(q: Option<&mut VecDeque<Spare>>) -> Option<Spare> {
    let q = q?;
    while let Some(s) = q.pop_front() {
        if !s.assign.is_closed() {
            return Some(s);
        }
    }
    None
}

fn pair_key(job: &str, a: &str, b: &str, port: u16) -> PairKey {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    (job.into(), lo.into(), hi.into(), port)
}

impl Server {
    /// A server for these jobs (job → rendezvous key).
    #[must_use]
    pub fn new(jobs: HashMap<String, Key>) -> Self {
        // Link ids start from the clock so that a restarted server does not reuse the ids
        // of links that managers still hold.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        Self {
            jobs,
            dummy_key: nonce(),
            state: Mutex::new(State::default()),
            metrics: RdvMetrics::default(),
            next_link: AtomicU64::new(t),
            next_member: AtomicU64::new(1),
        }
    }

    /// Check a member's `Auth` (`mac_m`, `None` if it sent another frame) against the
    /// handshake `t`; the key of its job when it passes.
    ///
    /// Known and unknown jobs take the same path: an unknown job is checked against
    /// `dummy_key`, every condition is evaluated (no short circuit), the comparison is
    /// constant-time, and every failure is the same [`AuthFailed`]. So neither the answer
    /// nor the time it takes tells whether a job exists here.
    ///
    /// # Errors
    /// [`AuthFailed`], whatever failed.
    pub fn authenticate(&self, job: &str, name: &str, t: &Transcript<'_>, mac_m: Option<&[u8; wire::rdv::MAC_LEN]>) -> Result<&Key, AuthFailed> {
        let known = self.jobs.get(job);
        let key = known.unwrap_or(&self.dummy_key);
        // A missing Auth is checked against an all-zero tag: the same work, and it fails.
        let tag = mac_m.copied().unwrap_or([0; wire::rdv::MAC_LEN]);
        self.metrics.mac_checks.fetch_add(1, Ordering::Relaxed);
        let mac_ok = verify(key, &t.member_input(), &tag);
        let name_ok = valid_name_part(job) & valid_name_part(name);
        // `&`, not `&&`: every condition is evaluated whatever the others say.
        if mac_ok & name_ok & mac_m.is_some() & known.is_some() {
            Ok(key)
        } else {
            Err(AuthFailed)
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Members currently registered.
    #[must_use]
    pub fn members(&self) -> usize {
        self.lock().members.len()
    }

    /// Prometheus text.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let mut o = String::new();
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        for (name, help, kind, v) in [
            ("warmpool_rendezvous_members", "Pool managers registered.", "gauge", self.members() as u64),
            ("warmpool_rendezvous_links_started_total", "Links started.", "counter", c(&m.links_started)),
            ("warmpool_rendezvous_links_direct_total", "Links reported direct (hole punched).", "counter", c(&m.links_direct)),
            ("warmpool_rendezvous_links_relayed_total", "Links relayed through this server.", "counter", c(&m.links_relayed)),
            ("warmpool_rendezvous_relay_bytes_total", "Bytes relayed, both directions.", "counter", c(&m.relay_bytes)),
            ("warmpool_rendezvous_auth_failures_total", "Connections that failed authentication.", "counter", c(&m.auth_failures)),
            ("warmpool_rendezvous_mac_checks_total", "Authentication MACs checked, known job or not.", "counter", c(&m.mac_checks)),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        o
    }

    /// Serve on `listener` until `cancel`.
    pub async fn run(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken) {
        let gc = {
            let s = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = t.tick() => s.gc(),
                    }
                }
            })
        };
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (stream, addr) = tokio::select! {
                () = cancel.cancelled() => break,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let s = self.clone();
            let cancel = cancel.clone();
            conns.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    r = s.connection(stream, addr) => if let Err(e) = r {
                        debug!(peer = %addr, error = %e, "rendezvous connection ended");
                    },
                }
            });
            while conns.try_join_next().is_some() {}
        }
        // The gc loop ends with `cancel` too: awaited, not left running.
        let _ = gc.await;
        conns.shutdown().await;
    }

    fn gc(&self) {
        let mut st = self.lock();
        st.links.retain(|_, l| l.created.elapsed() < LINK_TTL);
        let State { links, pending, .. } = &mut *st;
        for q in pending.values_mut() {
            q.retain(|(id, _)| links.contains_key(id));
        }
        pending.retain(|_, q| !q.is_empty());
    }

    async fn connection(self: Arc<Self>, mut s: TcpStream, observed: SocketAddr) -> Result<(), ConnError> {
        let _ = s.set_nodelay(true);
        let step = STEP_TIMEOUT;
        let hello = timeout(step, read_frame(&mut s)).await.map_err(|_| ConnError::Timeout("Hello"))??;
        let Frame::Hello { job, name, purpose, link, nonce: nm } = hello else {
            return Err(ConnError::Unexpected(format!("{hello:?} instead of Hello")));
        };
        let nr: [u8; NONCE_LEN] = nonce();
        write_frame(&mut s, &Frame::Challenge { nonce: nr }).await?;
        let auth = timeout(step, read_frame(&mut s)).await.map_err(|_| ConnError::Timeout("Auth"))??;
        let t = Transcript::new(&job, &name, purpose, link, &nm, &nr);
        let mac_m = match &auth {
            Frame::Auth { mac: m } => Some(m),
            _ => None,
        };
        let Ok(k) = self.authenticate(&job, &name, &t, mac_m) else {
            self.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            warn!(peer = %observed, "rendezvous authentication failed");
            let _ = write_frame(&mut s, &Frame::Refused { reason: AuthFailed.to_string() }).await;
            return Err(AuthFailed.into());
        };
        let mr = mac(k, &t.server_input(&observed.to_string()));
        write_frame(&mut s, &Frame::Welcome { observed, mac: mr }).await?;
        match purpose {
            Purpose::Control => self.control(s, job, name, observed).await,
            Purpose::Link => self.link_end(s, job, name, link, observed).await,
        }
    }

    async fn control(self: Arc<Self>, s: TcpStream, job: String, name: String, observed: SocketAddr) -> Result<(), ConnError> {
        let (mut rd, mut wr) = s.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        // A newer registration of the same name replaces the older one (a restarted manager).
        self.lock().members.insert((job.clone(), name.clone()), Member { id, tx: tx.clone() });
        info!(job = %job, name = %name, observed = %observed, "member registered");
        // The writer runs inside this connection's own future (no task of its own): a failed
        // write ends the connection as a failed read does.
        let writer = async {
            while let Some(f) = rx.recv().await {
                if wr.write_all(&f.encode()).await.is_err() {
                    break;
                }
            }
        };
        let reader = async {
            loop {
                match read_frame(&mut rd).await? {
                    Frame::LinkRequest { req, peer, port, prewarm } => self.link_request(&job, &name, &tx, req, &peer, port, prewarm),
                    Frame::Claimed { link } => self.claimed(&job, &name, link),
                    other => return Err(ConnError::Unexpected(format!("{other:?} on a control connection"))),
                }
            }
        };
        let r = tokio::select! {
            r = reader => r,
            () = writer => Ok(()),
        };
        let mut st = self.lock();
        if st.members.get(&(job.clone(), name.clone())).is_some_and(|m| m.id == id) {
            st.members.remove(&(job.clone(), name.clone()));
            info!(job = %job, name = %name, "member left");
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn link_request(&self, job: &str, me: &str, tx: &mpsc::UnboundedSender<Frame>, req: u32, peer: &str, port: u16, prewarm: bool) {
        let mut st = self.lock();
        let Some(other) = st.members.get(&(job.to_owned(), peer.to_owned())).map(|m| m.tx.clone()).filter(|_| peer != me) else {
            let _ = tx.send(Frame::Assigned { req, link: 0 });
            return;
        };
        let key = pair_key(job, me, peer, port);
        if !prewarm {
            if let Some(q) = st.pending.get_mut(&key) {
                if let Some(i) = q.iter().position(|(_, by)| by == peer) {
                    let (link, _) = q.remove(i).expect("index from position");
                    let _ = tx.send(Frame::Assigned { req, link });
                    return;
                }
            }
        }
        let link = self.next_link.fetch_add(1, Ordering::Relaxed);
        let mut rec = LinkRec {
            job: job.into(),
            ends: [me.into(), peer.into()],
            port,
            created: Instant::now(),
            sides: [None, None],
            punched: false,
            direct_counted: false,
            parked: None,
        };
        // Both ends have a spare link connection waiting: punch at once.
        let (jm, jp) = ((job.to_owned(), me.to_owned()), (job.to_owned(), peer.to_owned()));
        let mine = pop_spare(st.spares.get_mut(&jm));
        let theirs = if mine.is_some() { pop_spare(st.spares.get_mut(&jp)) } else { None };
        let spare = match (mine, theirs) {
            (Some(a), Some(b)) => {
                let [oa, ob] = orders(link, &rec, (a.observed, a.rtt), (b.observed, b.rtt));
                rec.sides = [Some(Side { observed: a.observed, rtt: a.rtt, punch: None }), Some(Side { observed: b.observed, rtt: b.rtt, punch: None })];
                rec.punched = true;
                let _ = a.assign.send((link, 0, oa));
                let _ = b.assign.send((link, 1, ob));
                true
            }
            (Some(a), None) => {
                st.spares.entry(jm).or_default().push_front(a);
                false
            }
            _ => false,
        };
        st.links.insert(link, rec);
        if !prewarm {
            st.pending.entry(key).or_default().push_back((link, me.into()));
        }
        self.metrics.links_started.fetch_add(1, Ordering::Relaxed);
        let _ = tx.send(Frame::LinkStart { link, peer: peer.into(), port, spare });
        let _ = other.send(Frame::LinkStart { link, peer: me.into(), port, spare });
        let _ = tx.send(Frame::Assigned { req, link });
    }

    fn claimed(&self, job: &str, me: &str, link: u64) {
        let mut st = self.lock();
        for (key, q) in &mut st.pending {
            if key.0 == job && (key.1 == me || key.2 == me) {
                q.retain(|(id, by)| !(*id == link && by != me));
            }
        }
    }

    async fn probe_rtt(s: &mut TcpStream) -> Result<Duration, ConnError> {
        let t0 = Instant::now();
        let token = u64::from_le_bytes(nonce());
        write_frame(s, &Frame::Ping { token }).await?;
        match timeout(STEP_TIMEOUT, read_frame(s)).await {
            Ok(Ok(Frame::Pong { token: t })) if t == token => Ok(t0.elapsed()),
            _ => Err(ConnError::Timeout("Pong")),
        }
    }

    async fn link_end(self: Arc<Self>, mut s: TcpStream, job: String, name: String, link: u64, observed: SocketAddr) -> Result<(), ConnError> {
        if link == 0 {
            return self.spare(s, job, name, observed).await;
        }
        let side = {
            let st = self.lock();
            st.links.get(&link).filter(|l| l.job == job).and_then(|l| l.ends.iter().position(|e| *e == name))
        };
        let Some(side) = side else {
            let _ = write_frame(&mut s, &Frame::Refused { reason: format!("no link {link} for {job}/{name}") }).await;
            return Err(ConnError::Link("unknown link"));
        };
        let rtt = Self::probe_rtt(&mut s).await?;
        let (ptx, prx) = oneshot::channel();
        {
            let mut st = self.lock();
            let Some(rec) = st.links.get_mut(&link) else {
                return Err(ConnError::Link("link expired"));
            };
            rec.sides[side] = Some(Side { observed, rtt, punch: Some(ptx) });
            if let (Some(a), Some(b)) = (&rec.sides[0], &rec.sides[1]) {
                if !rec.punched {
                    rec.punched = true;
                    let orders = orders(link, rec, (a.observed, a.rtt), (b.observed, b.rtt));
                    for (i, order) in orders.into_iter().enumerate() {
                        if let Some(tx) = rec.sides[i].as_mut().and_then(|s| s.punch.take()) {
                            let _ = tx.send(order);
                        }
                    }
                }
            }
        }
        let order =
            timeout(LINK_TTL, prx).await.map_err(|_| ConnError::Link("the other end never came"))?.map_err(|_| ConnError::Link("link dropped"))?;
        self.after_order(s, job, link, side, order).await
    }

    /// A spare link connection: measured, then parked until a link needs it (or it closes).
    async fn spare(self: Arc<Self>, mut s: TcpStream, job: String, name: String, observed: SocketAddr) -> Result<(), ConnError> {
        let rtt = Self::probe_rtt(&mut s).await?;
        let (tx, rx) = oneshot::channel();
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        let full = {
            let mut st = self.lock();
            let q = st.spares.entry((job.clone(), name.clone())).or_default();
            let full = q.len() >= MAX_SPARES;
            if !full {
                q.push_back(Spare { id, observed, rtt, assign: tx });
            }
            full
        };
        if full {
            let _ = write_frame(&mut s, &Frame::Refused { reason: "too many spare link connections".into() }).await;
            return Err(ConnError::Link("too many spares"));
        }
        let mut probe = [0u8; 1];
        let assigned = tokio::select! {
            a = rx => a.ok(),
            // The manager sends nothing on a spare before its punch order: any byte or EOF
            // means it is gone (or broken).
            _ = s.read(&mut probe) => None,
        };
        let Some((link, side, order)) = assigned else {
            let mut st = self.lock();
            if let Some(q) = st.spares.get_mut(&(job.clone(), name.clone())) {
                q.retain(|sp| sp.id != id);
            }
            return Ok(());
        };
        self.after_order(s, job, link, side, order).await
    }

    /// Send the punch order, then act on the end's verdict: forget a direct link, splice a
    /// relayed one once both ends ask.
    async fn after_order(self: Arc<Self>, mut s: TcpStream, job: String, link: u64, side: usize, order: Frame) -> Result<(), ConnError> {
        write_frame(&mut s, &order).await?;
        let verdict = timeout(LINK_TTL, read_frame(&mut s)).await.map_err(|_| ConnError::Timeout("Verdict"))??;
        let Frame::Verdict { relay } = verdict else {
            return Err(ConnError::Unexpected(format!("{verdict:?} instead of Verdict")));
        };
        if !relay {
            let mut st = self.lock();
            if let Some(rec) = st.links.get_mut(&link) {
                if !rec.direct_counted {
                    rec.direct_counted = true;
                    self.metrics.links_direct.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        let other = {
            let mut st = self.lock();
            let Some(rec) = st.links.get_mut(&link) else {
                return Err(ConnError::Link("link expired"));
            };
            match rec.parked.take() {
                Some((i, other)) if i != side => {
                    st.links.remove(&link);
                    other
                }
                _ => {
                    // First to ask: park until the other end asks too (or the link expires).
                    rec.parked = Some((side, s));
                    return Ok(());
                }
            }
        };
        self.metrics.links_relayed.fetch_add(1, Ordering::Relaxed);
        info!(link, job = %job, "relaying");
        splice(s, other, &self.metrics.relay_bytes).await;
        Ok(())
    }
}

/// Tell both ends the relay starts, then copy both ways until both are done.
async fn splice(mut a: TcpStream, mut b: TcpStream, bytes: &AtomicU64) {
    if write_frame(&mut a, &Frame::Relaying).await.is_err() || write_frame(&mut b, &Frame::Relaying).await.is_err() {
        return;
    }
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    tokio::join!(pump(ar, bw, bytes), pump(br, aw, bytes));
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, bytes: &AtomicU64) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::rdv::auth::Keys;

    fn parts_for<'a>(job: &'a str, name: &'a str, nm: &'a [u8; NONCE_LEN], nr: &'a [u8; NONCE_LEN]) -> Transcript<'a> {
        Transcript::new(job, name, Purpose::Control, 0, nm, nr)
    }

    /// An unknown job costs the same MAC check as a known one and gets the same answer, even
    /// with a MAC made under the dummy key (structure, not timing: the check runs on both
    /// paths and every failure is one value).
    #[test]
    fn unknown_and_known_jobs_take_the_same_path() {
        let key = Keys::derive(b"the-job-secret-0123456789").rendezvous;
        let server = Server::new(HashMap::from([("job".to_owned(), key)]));
        let (nm, nr) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let mac_for = |k: &Key, job: &str| mac(k, &parts_for(job, "a", &nm, &nr).member_input());
        let checks = || server.metrics.mac_checks.load(Ordering::Relaxed);
        let known = parts_for("job", "a", &nm, &nr);
        let unknown = parts_for("nojob", "a", &nm, &nr);

        // The right MAC for a known job passes, with that job's key.
        let good = mac_for(&key, "job");
        assert_eq!(server.authenticate("job", "a", &known, Some(&good)).copied(), Ok(key));
        assert_eq!(checks(), 1);

        // Failures, one MAC check each, all the same error.
        let mut errors = Vec::new();
        for (job, parts, tag) in [
            ("job", &known, Some([7u8; 32])),                               // known job, wrong MAC
            ("nojob", &unknown, Some([7u8; 32])),                           // unknown job
            ("nojob", &unknown, Some(mac_for(&key, "nojob"))),              // another job's key
            ("nojob", &unknown, Some(mac_for(&server.dummy_key, "nojob"))), // the dummy key itself
            ("job", &known, None),                                          // no Auth frame
        ] {
            let before = checks();
            errors.push(server.authenticate(job, "a", parts, tag.as_ref()).map(|_| ()));
            assert_eq!(checks(), before + 1, "{job}: the MAC was checked");
        }
        assert!(errors.iter().all(|e| *e == Err(AuthFailed)), "{errors:?}");
        assert_eq!(AuthFailed.to_string(), "authentication failed");
        // A valid MAC on a name that is not a valid peer name fails too (after the check).
        let bad = parts_for("job", "a b", &nm, &nr);
        let tag = mac(&key, &bad.member_input());
        assert_eq!(server.authenticate("job", "a b", &bad, Some(&tag)).map(|_| ()), Err(AuthFailed));
    }
}
