//! `pool-manager`: serve, status, prewarm, config.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pool_manager::config::{self, Config};
use pool_manager::server::{self, Shared};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(name = "pool-manager", version, about = "warmpool: warm and reused TCP connections for serverless functions")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon.
    Serve {
        /// Unix socket to listen on [default: $WARMPOOL_SOCKET, else the config's `socket`,
        /// else /run/warmpool/pool.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// TOML configuration file (see `pool-manager config` for the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Pool a destination: HOST:PORT=warm|reuse (repeatable). Only these are pooled.
        #[arg(long = "pool", value_name = "HOST:PORT=POLICY")]
        pools: Vec<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Per-pool series in /metrics, labelled with destination, uid and cgroup (tenant
        /// data; as `metrics_tenant_labels = true`). Without it, sums over all pools.
        #[arg(long)]
        metrics_tenant_labels: bool,
        /// Log format.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
        /// Take over from the pool manager running on the socket: its listening socket,
        /// pooled sockets, clients and leases move to this process (an upgrade without
        /// losing a warm connection). Starts fresh when none is running.
        #[arg(long)]
        takeover: bool,
    },
    /// Print the pools of a running daemon as a table.
    Status {
        /// The daemon's socket [default: $WARMPOOL_SOCKET, else /run/warmpool/pool.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Ask a running daemon to fill the caller's pools for these destinations now.
    Prewarm {
        /// The daemon's socket [default: $WARMPOOL_SOCKET, else /run/warmpool/pool.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Destinations, HOST:PORT.
        #[arg(required = true)]
        destinations: Vec<String>,
    },
    /// Run a program (static binaries too) with its connects served from the pool, through
    /// a seccomp user-notification supervisor. Exits with the program's status.
    Exec {
        /// The daemon's socket [default: $WARMPOOL_SOCKET, else /run/warmpool/pool.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// OCI runtime hook (podman, CRI-O hooks directory): reads the container's state on
    /// stdin; at createRuntime/poststart warms its pools in its network namespace, at
    /// poststop closes them. Never fails the container: errors go to stderr, exit 0.
    OciHook {
        /// createRuntime, poststart or poststop.
        stage: String,
        /// The daemon's socket [default: $WARMPOOL_SOCKET, else /run/warmpool/pool.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// The OCI seccomp `listenerPath` receiver: serve the connects of every container whose
    /// seccomp profile names PATH (see deploy/seccomp/warmpool-connect.json). Runs until killed.
    SeccompAgent {
        /// Unix socket the OCI runtime hands notification fds to (the profile's `listenerPath`).
        #[arg(long, value_name = "PATH")]
        listen: PathBuf,
        /// The daemon's socket [default: $WARMPOOL_SOCKET, else /run/warmpool/pool.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    Config,
    /// Run the public rendezvous server for peer links (hole punching, relay).
    Rendezvous {
        /// Address to listen on, e.g. 0.0.0.0:7700.
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// A job it serves and the file holding that job's secret: JOB=FILE (repeatable).
        /// Only a key derived from the secret is kept in memory.
        #[arg(long = "job", value_name = "JOB=FILE", required = true)]
        jobs: Vec<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Log format.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Print the virtual address that stands for a peer (connect() to it, through the
    /// preload library, to get a link to that peer).
    PeerAddr {
        /// The peer, JOB/NAME.
        peer: String,
        /// The virtual range (the `[peer] virtual_range` of the config).
        #[arg(long, default_value = pool_manager::defaults::PEER_VIRTUAL_RANGE)]
        range: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { socket, config, pools, metrics, metrics_tenant_labels, log_format, takeover } => {
            init_tracing(&log_format);
            let mut cfg = match &config {
                Some(path) => Config::from_file(path)?,
                None if pools.is_empty() => Config::default(),
                None => {
                    let mut c = Config::default();
                    c.auto.enabled = false;
                    c
                }
            };
            for p in &pools {
                cfg.add_pool_flag(p)?;
            }
            cfg.socket = socket_path(socket, cfg.socket);
            if metrics.is_some() {
                cfg.metrics = metrics;
            }
            cfg.metrics_tenant_labels |= metrics_tenant_labels;
            serve(cfg, takeover)
        }
        Cmd::Status { socket } => {
            let text = request(&socket_path(socket, default_socket()), &pool_manager::wire::Msg::Status)?;
            print!("{}", pool_manager::status::align(&text));
            Ok(())
        }
        Cmd::Prewarm { socket, destinations } => {
            use std::net::ToSocketAddrs;
            let socket = socket_path(socket, default_socket());
            for d in destinations {
                let addrs = d.to_socket_addrs().with_context(|| format!("resolving {d}"))?;
                for a in addrs {
                    let text = request(&socket, &pool_manager::wire::Msg::Prewarm(pool_manager::wire::Dest::from_socket_addr(a)))?;
                    println!("{text}");
                }
            }
            Ok(())
        }
        Cmd::Exec { socket, command } => {
            let code = exec::run(&socket_path(socket, default_socket()), &command)?;
            std::process::exit(code);
        }
        Cmd::OciHook { stage, socket } => {
            oci_hook(&stage, &socket_path(socket, default_socket()));
            Ok(())
        }
        Cmd::SeccompAgent { listen, socket } => Ok(exec::agent::run(&listen, &socket_path(socket, default_socket()))?),
        Cmd::Config => {
            print!("{}", config::EMBEDDED_DEFAULT);
            Ok(())
        }
        Cmd::Rendezvous { listen, jobs, metrics, log_format } => {
            init_tracing(&log_format);
            rendezvous(listen, &jobs, metrics)
        }
        Cmd::PeerAddr { peer, range } => {
            use pool_manager::peer::{PeerName, VirtualRange};
            let range = VirtualRange::parse(&range)?;
            let peer = PeerName::parse(&peer)?;
            println!("{}", range.addr_of(&peer));
            Ok(())
        }
    }
}

/// The daemon's socket, from the same places for every subcommand and for the preload
/// library: `--socket`, else `WARMPOOL_SOCKET` (as the shim reads it), else `otherwise` (for
/// `serve` the config file's `socket`, for the clients [`default_socket`]).
fn socket_path(flag: Option<PathBuf>, otherwise: PathBuf) -> PathBuf {
    flag.or_else(|| std::env::var_os("WARMPOOL_SOCKET").filter(|v| !v.is_empty()).map(PathBuf::from)).unwrap_or(otherwise)
}

fn default_socket() -> PathBuf {
    PathBuf::from(pool_manager::defaults::SOCKET)
}

fn rendezvous(listen: std::net::SocketAddr, jobs: &[String], metrics: Option<std::net::SocketAddr>) -> Result<()> {
    use pool_manager::peer::{self, Keys, PeerName};
    use rendezvous::Server;
    let mut keys = std::collections::HashMap::new();
    for j in jobs {
        let (job, file) = j.split_once('=').with_context(|| format!("--job {j:?}: expected JOB=FILE"))?;
        PeerName::parse(&format!("{job}/x")).map_err(|_| anyhow::anyhow!("--job {j:?}: {job:?} is not a valid job name"))?;
        let secret = peer::read_secret(std::path::Path::new(file))?;
        keys.insert(job.to_owned(), Keys::derive(&secret).rendezvous);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let signals = stop_signals();
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        let server = Arc::new(Server::new(keys));
        let cancel = CancellationToken::new();
        info!(%listen, jobs = jobs.len(), "rendezvous server listening");
        // The metrics endpoint and the signal watch: both end on `cancel`, awaited below.
        let mut side = tokio::task::JoinSet::new();
        if let Some(addr) = metrics {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics endpoint {addr}"))?;
            let s = server.clone();
            side.spawn(pool_manager::metrics::serve_with(l, Arc::new(move || s.render_metrics()), cancel.clone()));
        }
        side.spawn(cancel_on_signal(signals, cancel.clone()));
        server.run(listener, cancel.clone()).await;
        cancel.cancel();
        while side.join_next().await.is_some() {}
        Ok(())
    })
}

/// The OCI hook. It never fails: any error is one line on stderr and exit status 0, because
/// a pooling helper must not stop functions from starting (a container whose pools are cold
/// still works; one that does not start does not). The runtime bounds the hook with the
/// definition's `timeout`, and every daemon call here has its own.
fn oci_hook(stage: &str, socket: &std::path::Path) {
    use std::io::Read;
    let mut state = String::new();
    let r = std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut state)
        .map_err(|source| pool_manager::ocihook::HookError::Io { what: "reading the container state on stdin", source })
        .and_then(|_| stage.parse())
        .and_then(|stage| pool_manager::ocihook::run(stage, socket, &state));
    match r {
        Ok(said) => eprintln!("warmpool oci-hook {stage}: {said}"),
        Err(e) => eprintln!("warmpool oci-hook {stage}: {e} (the container starts without warm pools)"),
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// One request/answer with a running daemon (for the CLI).
/// `protocol = "unchecked"` reuses sockets on kernel-state heuristics alone: say so at start.
fn warn_unchecked(cfg: &Config) {
    use pool_manager::config::Policy;
    use pool_manager::proof::Protocol;
    let unchecked = |s: &pool_manager::config::PoolSettings| s.policy == Policy::Reuse && s.protocol == Some(Protocol::Unchecked);
    let mut dests: Vec<String> = cfg.pools.iter().filter(|(_, s)| unchecked(s)).map(|(a, _)| a.to_string()).collect();
    dests.sort();
    if cfg.auto.enabled && unchecked(&cfg.auto.settings) {
        dests.push("[auto]".into());
    }
    if !dests.is_empty() {
        warn!(
            destinations = %dests.join(", "),
            "protocol = \"unchecked\": given-back sockets are reused without an end-of-exchange proof; \
             a reply to an abandoned request or a session's state (AUTH, SELECT) can reach the next function"
        );
    }
}

fn request(socket: &std::path::Path, msg: &pool_manager::wire::Msg<'_>) -> Result<String> {
    use pool_manager::wire::{self, client::Link, Msg};
    let mut link = Link::connect(socket, None).with_context(|| format!("connecting to the pool manager at {}", socket.display()))?;
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    match link.request(msg, None, &mut buf).context("bad answer from the pool manager")?.msg {
        Msg::StatusReply(t) => Ok(t.to_owned()),
        Msg::Error { text, .. } => bail!("the pool manager refused: {text}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// SIGTERM and SIGINT handlers, installed before the daemon binds anything: a signal sent as
/// soon as the socket (or a log line) shows the daemon up stops it cleanly instead of killing
/// it with the default action. Call within the runtime.
fn stop_signals() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => Some((term, int)),
        (Err(e), _) | (_, Err(e)) => {
            warn!("cannot handle SIGTERM/SIGINT ({e}): they stop the process without clean-up");
            None
        }
    }
}

/// Fire `cancel` on SIGTERM or SIGINT; return when `cancel` fires for any reason.
async fn cancel_on_signal(signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>, cancel: CancellationToken) {
    let Some((mut term, mut int)) = signals else { return };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
        () = cancel.cancelled() => return,
    }
    cancel.cancel();
}

/// The metrics endpoint: the predecessor's listener when it listens where we are told to
/// (no moment without it, and no race for the port), else a new one.
async fn metrics_listener(addr: Option<std::net::SocketAddr>, handed: Option<std::os::fd::OwnedFd>) -> Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let handed = handed.map(std::net::TcpListener::from).filter(|l| l.local_addr().is_ok_and(|a| a == addr));
    let l = match handed {
        Some(l) => {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)?
        }
        None => tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics endpoint {addr}"))?,
    };
    info!(%addr, "metrics at http://{addr}/metrics");
    Ok(Some(l))
}

/// Wait (bounded) until no daemon answers on `path` any more.
fn wait_gone(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pool_manager::wire::client::Link::connect(path, None).is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn keep_window_when_idle() {
    const KNOB: &str = "/proc/sys/net/ipv4/tcp_slow_start_after_idle";
    match std::fs::read_to_string(KNOB) {
        Ok(v) if v.trim() == "0" => info!("{KNOB} is 0: idle pooled sockets keep their congestion window"),
        Ok(_) => match std::fs::write(KNOB, "0") {
            Ok(()) => info!("set {KNOB} = 0 in this network namespace so idle pooled sockets keep their congestion window"),
            Err(e) => warn!("cannot set {KNOB} = 0 ({e}): pooled sockets idle longer than one RTO restart from the initial window"),
        },
        Err(e) => warn!("cannot read {KNOB}: {e}"),
    }
}

/// Attach the eBPF kernel assist as configured. `auto` runs without it (said once, here)
/// when the build, kernel or privileges do not allow it; `on` refuses to start.
fn kernel_assist(k: &config::Kernel) -> Result<Option<std::sync::Mutex<shim::assist::KernelAssist>>> {
    use config::AssistMode;
    if k.assist == AssistMode::Off {
        return Ok(None);
    }
    let cgroups = if k.cgroups.is_empty() { vec![tenancy::cgroup::own_cgroup_dir()?] } else { k.cgroups.clone() };
    match shim::assist::KernelAssist::attach(&cgroups, k.max_initial_window) {
        Ok(a) => {
            info!(cgroups = ?cgroups, max_initial_window = k.max_initial_window, "kernel assist attached: learned initial windows on");
            Ok(Some(std::sync::Mutex::new(a)))
        }
        Err(e) if k.assist == AssistMode::Auto => {
            warn!("kernel assist unavailable, running without it: {e}");
            Ok(None)
        }
        Err(e) => Err(e).context("kernel assist = \"on\""),
    }
}

fn serve(cfg: Config, takeover: bool) -> Result<()> {
    use pool_manager::handover::{self, TakeoverError};
    // Before anything else: the running daemon hands everything over and waits for our
    // commit, which comes once nothing that can fail is left (see `handover`). Any error
    // before it drops `pending`, and the running daemon serves on.
    let mut pending = if takeover {
        match handover::take(&cfg.socket) {
            Ok(p) => Some(p),
            Err(e @ TakeoverError::NotRunning(..)) => {
                warn!("{e}; starting fresh");
                None
            }
            Err(e @ TakeoverError::Legacy) => {
                warn!("{e}");
                wait_gone(&cfg.socket);
                None
            }
            Err(e) => return Err(e).context("--takeover"),
        }
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let signals = stop_signals();
        if cfg.keep_window_when_idle {
            keep_window_when_idle();
        }
        // Before binding: a daemon that cannot start leaves no socket file behind.
        let assist = kernel_assist(&cfg.kernel)?;
        let handed_metrics = pending.as_mut().and_then(|p| p.received.metrics.take());
        let metrics_listener = metrics_listener(cfg.metrics, handed_metrics).await?;
        let received = match pending {
            Some(p) => {
                let r = p.commit().context("--takeover")?;
                info!(from = %cfg.socket.display(), "took over: {}", r.summary);
                Some(r)
            }
            None => None,
        };
        let path = cfg.socket.clone();
        let (listener, idle, clients) = match received {
            Some(r) => r.into_parts(),
            None => (server::bind(&path, cfg.socket_mode)?, Vec::new(), Vec::new()),
        };
        publish_prefetch_hint(&path, cfg.prefetches());
        // Load the holders check's BPF iterator now (it logs which method is used), not in
        // the first give-back's return path.
        let _ = pool_manager::holders::by_kernel();
        let cancel = CancellationToken::new();
        for (name, reason) in &cfg.unresolved {
            warn!(destination = %name, %reason, every = ?cfg.resolve_interval, "destination does not resolve yet; pooled once it does");
        }
        warn_unchecked(&cfg);
        info!(
            socket = %path.display(),
            pools = cfg.pools.len(),
            auto = cfg.auto.enabled,
            "pool manager listening"
        );
        let peer = cfg.peer.clone().map(|p| Arc::new(pool_manager::peer::agent::Agent::new(p)));
        let mut shared = Shared::new(cfg);
        shared.assist = assist;
        shared.peer = peer;
        let adopted = pool_manager::handover::adopt(&shared, idle, clients);
        let shared = Arc::new(shared);
        // The metrics endpoint and the signal watch: both end on `cancel`, awaited below.
        let mut side = tokio::task::JoinSet::new();
        if let Some(l) = metrics_listener {
            shared.metrics_fd.store(l.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
            side.spawn(pool_manager::metrics::serve(l, shared.clone(), cancel.clone()));
        }
        side.spawn(cancel_on_signal(signals, cancel.clone()));
        // On a worker thread, not in `block_on`: a listener event then accepts and starts the
        // client's task where it was seen, with no hop through the main thread.
        let result = tokio::spawn(server::run_with(listener, shared.clone(), cancel.clone(), adopted))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        cancel.cancel();
        while side.join_next().await.is_some() {}
        if shared.handed_over.load(std::sync::atomic::Ordering::Relaxed) {
            info!("handed over to a successor; the socket file stays");
        } else {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(error = %e, "removing {}", path.display());
            }
            publish_prefetch_hint(&path, false);
        }
        result.context("serving")
    })
}

/// Create or remove the prefetch hint next to the socket (see
/// [`pool_manager::config::prefetch_hint_path`]). Best effort: without the hint, shims link
/// at their first `connect()` and simply take no offers at load time.
fn publish_prefetch_hint(socket: &std::path::Path, on: bool) {
    let hint = pool_manager::config::prefetch_hint_path(socket);
    let r = if on {
        std::fs::File::create(&hint).map(drop)
    } else {
        std::fs::remove_file(&hint).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
    };
    if let Err(e) = r {
        warn!(error = %e, "prefetch hint {}", hint.display());
    }
}
