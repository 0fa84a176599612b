//! The listening socket: binding it, accepting clients (one task each, in a `JoinSet`),
//! and the daemon's run loop with its background tasks.

use crate::defaults;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use super::{Shared, ServeError};
use super::session::*;
use super::tasks::*;

/// A non-blocking, close-on-exec Unix `SOCK_SEQPACKET` socket (the daemon's listener).
pub(super) fn seqpacket() -> std::io::Result<OwnedFd> {
    use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
    Ok(socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?)
}

/// Bind the listening socket: creates the directory, refuses to steal a live daemon's socket,
/// replaces a stale one, applies `mode`.
///
/// # Errors
/// See [`ServeError`].
pub fn bind(path: &Path, mode: u32) -> Result<OwnedFd, ServeError> {
    let io = |what, source| ServeError::Io { what, path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    if path.exists() {
        if wire::client::Link::connect(path, None).is_ok() {
            return Err(ServeError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(|e| io("removing stale socket", e))?;
    }
    let addr = rustix::net::SocketAddrUnix::new(path).map_err(|e| io("socket path", e.into()))?;
    let sock = seqpacket().map_err(|e| io("creating socket for", e))?;
    rustix::net::bind(&sock, &addr).map_err(|e| io("binding", e.into()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io("setting permissions of", e))?;
    rustix::net::listen(&sock, defaults::LISTEN_BACKLOG).map_err(|e| io("listening on", e.into()))?;
    Ok(sock)
}

/// Run the daemon on a bound listener until `cancel` fires; then close every pooled and
/// leased socket and return. The caller removes the socket file.
///
/// # Errors
/// If the listener cannot be registered with the reactor.
pub async fn run(listener: OwnedFd, shared: Arc<Shared>, cancel: CancellationToken) -> std::io::Result<()> {
    run_with(listener, shared, cancel, Vec::new()).await
}

/// [`run`], serving also client connections (with their leases) adopted from a predecessor.
///
/// # Errors
/// If the listener cannot be registered with the reactor.
pub async fn run_with(
    listener: OwnedFd,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    adopted: Vec<crate::handover::HandedClient>,
) -> std::io::Result<()> {
    shared.listener_fd.store(listener.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: AsyncFd owns the OwnedFd, so the fd stays open exactly as long as it is registered.
    let listener = unsafe { AsyncFd::register(listener) }.map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tasks = JoinSet::new();
    serve_handed(&shared, &mut tasks, adopted, &cancel);
    tasks.spawn(maintain(shared.clone(), cancel.clone()));
    tasks.spawn(crate::checker::run_on_own_thread(shared.clone(), cancel.clone()));
    tasks.spawn(resolver(shared.clone(), cancel.clone()));
    tasks.spawn(super::tenants::sweep(shared.clone(), cancel.clone()));
    if let Some(agent) = &shared.peer {
        tasks.spawn(crate::peer::agent::run(agent.clone(), cancel.clone()));
    }
    loop {
        accept_until(&listener, &shared, &mut tasks, &cancel).await?;
        if cancel.is_cancelled() {
            break;
        }
        // A successor is taking over: wait until it committed (stop) or failed (serve on).
        tokio::select! {
            () = shared.handover_done.notified() => {}
            () = cancel.cancelled() => break,
        }
        if shared.handed_over.load(Ordering::Relaxed) {
            break;
        }
        let back = std::mem::take(&mut *shared.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        info!(clients = back.len(), "serving on after the failed take-over");
        serve_handed(&shared, &mut tasks, back, &cancel);
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    // After the client tasks: none of them can start a refill any more.
    let aborted = shared.background.shutdown().await;
    let mut acts = crate::pool::Actions::default();
    shared.lock().close_all(&mut acts);
    let n = acts.close.len();
    drop(acts);
    info!(closed = n, aborted, "pool manager stopped; pooled sockets closed, background tasks ended");
    Ok(())
}

/// Serve client connections (with their leases) taken over from a predecessor, or back from
/// a take-over that failed.
pub(super) fn serve_handed(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, handed: Vec<crate::handover::HandedClient>, cancel: &CancellationToken) {
    for h in handed {
        shared.active_clients.fetch_add(1, Ordering::Relaxed);
        let leases: HashMap<u64, Lease> = h.leases.into_iter().collect();
        // Judge the client by this daemon's configuration (it may differ from the
        // predecessor's); the tenant stays the one its leases were made for.
        let refusal = match identify(shared, &h.conn) {
            Ok((_, refusal)) => refusal,
            Err(_) => shared.config.admits(h.peer.tenant.uid, &h.peer.tenant.cgroup).err(),
        };
        tasks.spawn(client_with(shared.clone(), h.conn, Ok((h.peer, refusal)), leases, cancel.clone()));
    }
}

/// Accept client connections until `cancel` fires or a successor takes over.
pub(super) async fn accept_until(listener: &AsyncFd<OwnedFd>, shared: &Arc<Shared>, tasks: &mut JoinSet<()>, cancel: &CancellationToken) -> std::io::Result<()> {
    let handover = shared.handover_token();
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = handover.cancelled() => return Ok(()),
            g = listener.readable() => g?,
        };
        let accepted = guard.try_io(|l| Ok(rustix::net::accept_with(l.get_ref(), rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK)?));
        match accepted {
            Ok(Ok(conn)) => {
                shared.metrics.clients.fetch_add(1, Ordering::Relaxed);
                if crate::tenant::link_hung_up(&conn) {
                    // The process linked and ended before it was accepted (a program under
                    // the shim that never asked for anything): no task, nothing to read.
                    shared.metrics.clients_gone.fetch_add(1, Ordering::Relaxed);
                } else {
                    shared.active_clients.fetch_add(1, Ordering::Relaxed);
                    tasks.spawn(client(shared.clone(), conn, cancel.clone()));
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "accept failed");
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            Err(_would_block) => {}
        }
        // Reap finished client tasks so the set does not grow with every client ever seen.
        while tasks.try_join_next().is_some() {}
    }
}
