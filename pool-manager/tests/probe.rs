//! The hand-out probe (`probe = "redis-ping"`, `sock::redis_ping`) against real servers: a
//! Redis answers and the socket is left as it was, an HTTP server's answer fails the probe, a
//! server that never answers fails it within the timeout, one that closes is seen closing.
//! Also `sock::local_port` (a metrics label), read through `wire::sockaddr`.

mod common;

use common::*;
use pool_manager::sock::{redis_ping, Discard};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

fn connect(addr: std::net::SocketAddr) -> OwnedFd {
    TcpStream::connect(addr).expect("connect").into()
}

#[test]
fn redis_ping_passes_on_redis_and_fails_on_anything_else() {
    let redis = Redis::start();
    let fd = connect(redis.addr());
    for _ in 0..3 {
        assert_eq!(redis_ping(&fd, Duration::from_secs(2)), Ok(()), "the probe leaves the socket as it was");
    }

    let nginx = Nginx::start();
    let fd = connect(format!("127.0.0.1:{}", nginx.port).parse().unwrap());
    let r = redis_ping(&fd, Duration::from_secs(2));
    assert!(matches!(r, Err(Discard::ProbeFailed | Discard::PeerClosed)), "{r:?}");

    // Accepts, never answers: the probe gives up at its timeout, not before and not long after.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = connect(silent.local_addr().unwrap());
    let _held = silent.accept().unwrap();
    let t = Instant::now();
    assert_eq!(redis_ping(&fd, Duration::from_millis(300)), Err(Discard::ProbeFailed));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "{took:?}");

    // The server closes: seen as closed (or the probe's send fails).
    let closing = TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = connect(closing.local_addr().unwrap());
    drop(closing.accept().unwrap());
    assert!(wait_until(Duration::from_secs(2), || matches!(redis_ping(&fd, Duration::from_millis(200)), Err(Discard::PeerClosed | Discard::ProbeFailed))));
}

/// The `local_port` label of `warmpool_pooled_socket_cwnd` is the socket's own port, both
/// families.
#[test]
fn local_port_is_the_sockets_own_port() {
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let Ok(l) = TcpListener::bind(bind) else {
            eprintln!("SKIP {bind}: no such loopback address here");
            continue;
        };
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(pool_manager::sock::local_port(&s), s.local_addr().unwrap().port(), "{bind}");
    }
    // Not a socket: no port.
    assert_eq!(pool_manager::sock::local_port(std::fs::File::open("/dev/null").unwrap()), 0);
}
