//! The wire crate's client (`wire::client::Link`) against a real pool manager process and a
//! real nginx: what every client (preload, exec, CLI, OCI hook, take-over) relies on.

mod common;

use common::*;
use pool_manager::wire::client::{Answer, Link};
use pool_manager::wire::{self, Dest, Disposition, ErrorCode, LeaseId, Msg};
use std::time::Duration;

/// One column of the destination's row in `pool-manager status` (columns aligned with
/// spaces; `None`: no row yet).
fn column(d: &Daemon, dest: &str, name: &str) -> Option<u64> {
    let text = d.status();
    let mut lines = text.lines();
    let at = lines.next()?.split_whitespace().position(|h| h == name)?;
    let row = lines.find(|l| l.split_whitespace().nth(1) == Some(dest))?;
    row.split_whitespace().nth(at)?.parse().ok()
}

#[test]
fn a_grant_to_an_abandoned_request_is_closed_and_released() {
    let nginx = Nginx::start();
    let dest = nginx.addr().to_string();
    let d = Daemon::with_config(&format!("[[pool]]\ndestination = \"{dest}\"\npolicy = \"warm\"\nmin_idle = 4\n"));
    let mut link = Link::connect(&d.socket, Some(Duration::from_secs(5))).expect("connect");
    // Pools are per tenant: fill ours first.
    let mut buf = [0u8; 512];
    let r = link.request(&Msg::Prewarm(Dest::from_socket_addr(nginx.addr())), None, &mut buf).expect("prewarm");
    assert!(matches!(r.msg, Msg::StatusReply(_)), "{:?}", r.msg);
    assert!(wait_until(Duration::from_secs(10), || column(&d, &dest, "IDLE").is_some_and(|n| n >= 2)), "{}", d.status());
    let ask = Msg::Acquire(Dest::from_socket_addr(nginx.addr()));
    // A request the client gives up on (as a shim whose receive timed out): its grant comes
    // first, then the answer to the next request.
    let abandoned = link.next_seq();
    link.send(&ask, abandoned, None, 0).expect("send");
    let (fd, lease) = match link.acquire(&ask, &mut buf).expect("an answer") {
        Answer::Grant { fd, lease, .. } => (fd, lease),
        other => panic!("expected a grant, got {other:?}"),
    };
    assert_eq!(link.seq(), abandoned + 1);
    // The abandoned grant was released: one lease is out, not two.
    assert!(wait_until(Duration::from_secs(5), || column(&d, &dest, "LEASED") == Some(1)), "{}", d.status());
    let tcp = std::net::TcpStream::from(fd);
    assert_eq!(tcp.peer_addr().expect("connected"), nginx.addr());
    drop(tcp);
    link.release(lease, Disposition::Clean, 0).expect("release");
    assert!(wait_until(Duration::from_secs(5), || column(&d, &dest, "LEASED") == Some(0)), "{}", d.status());
}

#[test]
fn the_daemon_refuses_lease_ids_out_of_range() {
    let d = Daemon::start(&[]);
    let mut link = Link::connect(&d.socket, Some(Duration::from_secs(3))).expect("connect");
    let mut buf = [0u8; 512];
    for bad in [0u64, 1 << 48, u64::MAX] {
        // Encoded with a valid id, then the id replaced: no `LeaseId` holds these.
        let mut raw = [0u8; 32];
        let n = wire::encode(&Msg::Release { lease: LeaseId::MAX, disposition: Disposition::Clean }, 0, &mut raw);
        raw[8..16].copy_from_slice(&bad.to_le_bytes());
        wire::unix::send(std::os::fd::AsRawFd::as_raw_fd(&link.fd()), &raw[..n], None, 0).expect("send");
        let r = link.recv(&mut buf).expect("the daemon answers a malformed release");
        assert!(matches!(r.msg, Msg::Error { code: ErrorCode::Malformed, .. }), "lease {bad}: {:?}", r.msg);
    }
    // A release of a valid id nobody holds has no answer; the link serves on.
    link.release(LeaseId::MAX, Disposition::Clean, 0).expect("release");
    let r = link.request(&Msg::Status, None, &mut buf).expect("status");
    assert!(matches!(r.msg, Msg::StatusReply(t) if t.starts_with("TENANT")), "{:?}", r.msg);
}
