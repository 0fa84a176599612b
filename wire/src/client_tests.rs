//! The client against a fake daemon: the other end of a socketpair, with its answers queued
//! before the client asks (a datagram socket keeps them in order).

use super::*;
use crate::unix::tests::pair;
use crate::{Dest, ErrorCode};
use std::os::fd::AsRawFd;

fn id(n: u64) -> LeaseId {
    LeaseId::new(n).expect("valid lease id")
}

fn dest() -> Dest {
    Dest::from_socket_addr("198.18.0.1:6379".parse().expect("address"))
}

/// Queue `msg` as `seq` on the daemon's end, with `fd` attached.
fn answer(daemon: &OwnedFd, msg: &Msg<'_>, seq: u32, fd: Option<RawFd>) {
    let mut buf = [0u8; 128];
    let n = encode(msg, seq, &mut buf);
    crate::unix::send(daemon.as_raw_fd(), &buf[..n], fd, 0).expect("send");
}

/// The next message the daemon's end received (none waiting: `None`).
fn heard(daemon: &OwnedFd) -> Option<(Kind, u32, Option<LeaseId>)> {
    let mut buf = [0u8; 512];
    let got = crate::unix::recv(daemon.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT).ok()?;
    let (msg, seq) = decode(&buf[..got.len]).expect("the client sends valid messages");
    let lease = match msg {
        Msg::Release { lease, disposition } => {
            assert_eq!(disposition, Disposition::Implicit);
            Some(lease)
        }
        _ => None,
    };
    Some((msg.kind(), seq, lease))
}

/// Whether the other end of `peer`'s pair was closed everywhere (EOF seen).
fn closed_everywhere(peer: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv into a one-byte buffer on our fd.
    let n = unsafe { libc::recv(peer.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
    n == 0
}

#[test]
fn a_grant_comes_after_stale_answers_which_are_released() {
    let (client, daemon) = pair();
    let (sock, _far) = pair();
    let (stale_sock, stale_far) = pair();
    let mut link = Link::with_seq(client, 41);
    // An answer to request 41, given up on earlier: its socket must be closed, its lease ended.
    answer(&daemon, &Msg::Grant { lease: id(7), source: Source::Warm }, 41, Some(stale_sock.as_raw_fd()));
    drop(stale_sock);
    answer(&daemon, &Msg::Grant { lease: id(8), source: Source::Reuse }, 42, Some(sock.as_raw_fd()));
    let mut buf = [0u8; 512];
    let got = link.acquire(&Msg::Acquire(dest()), &mut buf).expect("an answer");
    assert!(matches!(got, Answer::Grant { lease, source: Source::Reuse, .. } if lease == id(8)), "{got:?}");
    assert_eq!(heard(&daemon), Some((Kind::Acquire, 42, None)));
    assert_eq!(heard(&daemon), Some((Kind::Release, 0, Some(id(7)))));
    assert!(closed_everywhere(&stale_far), "the stale grant's socket was closed");
    assert_eq!(link.seq(), 42);
}

#[test]
fn pending_then_grant_or_refusal() {
    let (client, daemon) = pair();
    let mut link = Link::new(client);
    let (sock, _far) = pair();
    answer(&daemon, &Msg::Miss { reason: MissReason::Pending, retry_after_ms: 100 }, 1, None);
    answer(&daemon, &Msg::Grant { lease: id(3), source: Source::Warm }, 1, Some(sock.as_raw_fd()));
    let mut buf = [0u8; 512];
    let got = link.acquire(&Msg::AcquirePeer { port: 7000, name: "job/b" }, &mut buf).expect("answer");
    assert!(matches!(got, Answer::Grant { .. }), "{got:?}");
    answer(&daemon, &Msg::Miss { reason: MissReason::Pending, retry_after_ms: 100 }, 2, None);
    answer(&daemon, &Msg::Error { code: ErrorCode::Internal, text: "peer gone" }, 2, None);
    let got = link.acquire(&Msg::AcquirePeer { port: 7000, name: "job/b" }, &mut buf).expect("answer");
    assert!(matches!(got, Answer::Refused { text: Some("peer gone") }), "{got:?}");
    // Not pending: a miss is a miss and an error only a refusal to serve.
    answer(&daemon, &Msg::Miss { reason: MissReason::NotPooled, retry_after_ms: 5000 }, 3, None);
    let got = link.acquire(&Msg::Acquire(dest()), &mut buf).expect("answer");
    assert!(matches!(got, Answer::Miss { reason: MissReason::NotPooled, retry_after_ms: 5000 }), "{got:?}");
}

#[test]
fn pending_without_a_final_answer_times_out() {
    let (client, daemon) = pair();
    let mut link = Link::new(client);
    answer(&daemon, &Msg::Miss { reason: MissReason::Pending, retry_after_ms: 0 }, 1, None);
    let t = Instant::now();
    let mut buf = [0u8; 512];
    let got = link.acquire(&Msg::Acquire(dest()), &mut buf);
    assert!(matches!(got, Err(ClientError::PendingTimeout)), "{got:?}");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_grant_without_its_fd_is_released() {
    let (client, daemon) = pair();
    let mut link = Link::new(client);
    answer(&daemon, &Msg::Grant { lease: id(9), source: Source::Warm }, 1, None);
    let mut buf = [0u8; 512];
    let got = link.acquire(&Msg::Acquire(dest()), &mut buf).expect("answer");
    assert!(matches!(got, Answer::NoFd), "{got:?}");
    assert_eq!(heard(&daemon), Some((Kind::Acquire, 1, None)));
    assert_eq!(heard(&daemon), Some((Kind::Release, 0, Some(id(9)))));
}

#[test]
fn an_fd_with_a_message_that_carries_none_is_closed() {
    let (client, daemon) = pair();
    let mut link = Link::new(client);
    let (sock, far) = pair();
    answer(&daemon, &Msg::StatusReply("ok"), 1, Some(sock.as_raw_fd()));
    drop(sock);
    let mut buf = [0u8; 512];
    let r = link.request(&Msg::Status, None, &mut buf).expect("answer");
    assert!(matches!(r.msg, Msg::StatusReply("ok")) && r.fd.is_none() && r.seq == 1, "{r:?}");
    assert!(closed_everywhere(&far), "the fd that came with a status reply was closed, not leaked");
}

#[test]
fn truncated_garbage_and_eof_are_errors_and_close_their_fds() {
    let (client, daemon) = pair();
    let link = Link::new(client);
    // Longer than the buffer, with an fd.
    let (sock, far) = pair();
    answer(&daemon, &Msg::StatusReply("a status reply longer than sixteen bytes"), 1, Some(sock.as_raw_fd()));
    drop(sock);
    let mut small = [0u8; 16];
    assert!(matches!(link.recv(&mut small), Err(ClientError::Truncated)));
    assert!(closed_everywhere(&far));
    // Not a warmpool message, with an fd.
    let (sock, far) = pair();
    crate::unix::send(daemon.as_raw_fd(), b"GET / HTTP/1.1\r\n", Some(sock.as_raw_fd()), 0).expect("send");
    drop(sock);
    let mut buf = [0u8; 512];
    assert!(matches!(link.recv(&mut buf), Err(ClientError::Decode(DecodeError::BadMagic))));
    assert!(closed_everywhere(&far));
    // A grant whose lease id is out of range.
    let mut raw = [0u8; 64];
    let n = encode(&Msg::Grant { lease: id(1), source: Source::Warm }, 1, &mut raw);
    raw[8..16].copy_from_slice(&0u64.to_le_bytes());
    crate::unix::send(daemon.as_raw_fd(), &raw[..n], None, 0).expect("send");
    assert!(matches!(link.recv(&mut buf), Err(ClientError::Decode(DecodeError::BadLease))));
    drop(daemon);
    assert!(matches!(link.recv(&mut buf), Err(ClientError::Closed)));
}

#[test]
fn only_stale_answers_give_up() {
    let (client, daemon) = pair();
    let mut link = Link::with_seq(client, 10);
    for _ in 0..=MAX_STALE {
        answer(&daemon, &Msg::Miss { reason: MissReason::Empty, retry_after_ms: 0 }, 3, None);
    }
    let mut buf = [0u8; 512];
    assert!(matches!(link.request(&Msg::Status, None, &mut buf), Err(ClientError::Stale { seq: 11 })));
}

#[test]
fn an_answer_of_the_wrong_kind_is_unexpected() {
    let (client, daemon) = pair();
    let mut link = Link::new(client);
    answer(&daemon, &Msg::StatusReply("?"), 1, None);
    let mut buf = [0u8; 512];
    assert!(matches!(link.acquire(&Msg::Acquire(dest()), &mut buf), Err(ClientError::Unexpected(Kind::StatusReply))));
}

/// A listening `SOCK_SEQPACKET` socket at a fresh path.
fn listener(name: &str) -> (std::path::PathBuf, OwnedFd) {
    use std::os::unix::ffi::OsStrExt;
    let path = std::env::temp_dir().join(format!("wire-client-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    // SAFETY: plain socket creation; owned at once.
    let fd = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)) };
    // SAFETY: plain old data.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sun.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: a valid address of `len` bytes; listen on our bound socket.
    unsafe {
        assert_eq!(libc::bind(fd.as_raw_fd(), (&sun as *const libc::sockaddr_un).cast(), len), 0);
        assert_eq!(libc::listen(fd.as_raw_fd(), 4), 0);
    }
    (path, fd)
}

#[test]
fn connect_sets_cloexec_timeout_and_high_fd() {
    use std::os::unix::ffi::OsStrExt;
    let (path, _l) = listener("connect");
    let opts = Options { timeout: Some(Duration::from_millis(50)), min_fd: Some(300) };
    let fd = connect(path.as_os_str().as_bytes(), &opts).expect("connects");
    assert!(fd.as_raw_fd() >= 300, "moved to {}", fd.as_raw_fd());
    // SAFETY: fcntl on our fd.
    assert_ne!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC, 0);
    // Nobody accepts or answers: the receive times out.
    let t = Instant::now();
    let mut buf = [0u8; 64];
    match Link::new(fd).recv(&mut buf) {
        Err(ClientError::Recv(e)) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    let _ = std::fs::remove_file(&path);
    assert!(matches!(Link::connect(&path, None), Err(ClientError::Connect(_))));
    let long = vec![b'x'; 200];
    assert!(matches!(connect(&long, &Options::default()), Err(ClientError::PathTooLong { max: 107 })));
}
