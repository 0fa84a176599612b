//! The socket checks of `pool_manager::sock` (`idle_check`, `return_check`, `untouched`,
//! `state_and_unread`) on real TCP connections over loopback: to a Redis for request and
//! reply, to a listener of our own for a peer that never answers, closes, or resets. Each
//! check is called with a borrowed fd (`impl AsFd`), as the daemon calls it.

mod common;

use common::*;
use pool_manager::sock::{self, Discard};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

/// A connection to a peer of our own: (our end, the peer's end).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ours = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
    let (theirs, _) = l.accept().expect("accept");
    (ours, theirs)
}

/// Everything we sent has been acknowledged.
fn all_acked(s: &TcpStream) -> bool {
    sock::tcp_info(s).is_some_and(|i| i.unacked == 0)
}

#[test]
fn a_quiet_connection_passes_and_unread_bytes_fail() {
    let (ours, mut theirs) = pair();
    assert_eq!(sock::idle_check(&ours), Ok(()));
    assert_eq!(sock::state_and_unread(&ours), (sock::TCP_ESTABLISHED, 0));
    theirs.write_all(b"hello").unwrap();
    assert!(wait_until(WAIT, || sock::state_and_unread(&ours).1 == 5), "{:?}", sock::state_and_unread(&ours));
    assert_eq!(sock::idle_check(&ours), Err(Discard::UnreadData));
    assert_eq!(sock::return_check(&ours, sock::Counters::default()), Err(Discard::UnreadData));
    // The checks only peek: the bytes are still there to read.
    let mut buf = [0u8; 5];
    (&ours).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(sock::idle_check(&ours), Ok(()));
}

#[test]
fn a_closed_peer_is_seen_closing_and_a_reset_is_an_error() {
    let (ours, theirs) = pair();
    drop(theirs);
    assert!(wait_until(WAIT, || sock::state_and_unread(&ours).0 == sock::TCP_CLOSE_WAIT), "{:?}", sock::state_and_unread(&ours));
    assert_eq!(sock::idle_check(&ours), Err(Discard::PeerClosed));

    let (ours, theirs) = pair();
    // SO_LINGER 0: the peer's close sends RST; SO_ERROR (or the peek) then reports it.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a linger struct of the right size on our own socket.
    let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(), 8) };
    assert_eq!(r, 0);
    drop(theirs);
    assert!(wait_until(WAIT, || sock::state_and_unread(&ours).0 != sock::TCP_ESTABLISHED), "no reset seen");
    assert_eq!(sock::idle_check(&ours), Err(Discard::Error));
}

#[test]
fn a_request_without_its_reply_is_pending_and_a_finished_exchange_passes() {
    let (ours, _theirs) = pair();
    let at_handout = sock::counters(&ours);
    (&ours).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(wait_until(WAIT, || all_acked(&ours)), "request never acknowledged");
    assert_eq!(sock::return_check(&ours, at_handout), Err(Discard::PendingReply));

    let redis = Redis::start();
    let s = TcpStream::connect(redis.addr()).expect("connect to redis");
    let at_handout = sock::counters(&s);
    assert_eq!(sock::untouched(&s, at_handout), Ok(()));
    (&s).write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut reply = [0u8; 7];
    (&s).read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+PONG\r\n");
    assert!(wait_until(WAIT, || all_acked(&s)), "request never acknowledged");
    assert_eq!(sock::return_check(&s, at_handout), Ok(()));
    assert_eq!(sock::idle_check(&s), Ok(()));
    // Used, so not an untouched offer.
    assert_eq!(sock::untouched(&s, at_handout), Err(Discard::Shared));
}
