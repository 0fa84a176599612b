//! A python3 HTTP/1.1 server that records the peer address of every connection and request
//! (what a server's `$remote_addr` log shows), for tests about where connections come from.

use super::{terminate_child, wait_until, TempDir, SYSTEM_PYTHON};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A python3 HTTP/1.1 keep-alive server on `addr:port` that logs `conn <peer ip> <peer port>`
/// per accepted connection, `req <peer ip> <peer port>` per request and `head ...` per HEAD
/// request (a reuse pool's end-of-exchange proof; answered without a body, as HTTP says).
pub struct PyServer {
    child: std::process::Child,
    log: PathBuf,
    _dir: TempDir,
}

const PY_SERVER: &str = r#"
import socket, sys, threading
addr, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
def note(s):
    with lock, open(log, "a") as f:
        f.write(s + "\n")
def serve(c, peer):
    note("conn %s %d" % peer[:2])
    buf = b""
    try:
        while True:
            d = c.recv(4096)
            if not d:
                return
            buf += d
            while b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                if head.startswith(b"HEAD "):
                    note("head %s %d" % peer[:2])
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
                else:
                    note("req %s %d" % peer[:2])
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(128)
open(log + ".ready", "w").close()
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

impl PyServer {
    pub fn start(addr: &str, port: u16) -> PyServer {
        let dir = TempDir::new();
        let script = dir.join("server.py");
        std::fs::write(&script, PY_SERVER).expect("write server.py");
        let log = dir.join("server.log");
        let child = Command::new(SYSTEM_PYTHON)
            .arg(&script)
            .args([addr, &port.to_string()])
            .arg(&log)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn python3 server");
        let ready = PathBuf::from(format!("{}.ready", log.display()));
        assert!(wait_until(Duration::from_secs(10), || ready.exists()), "python3 server did not start");
        PyServer { child, log, _dir: dir }
    }

    /// (kind, peer address, peer port) lines.
    pub fn lines(&self) -> Vec<(String, String, u16)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                Some((it.next()?.to_owned(), it.next()?.to_owned(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Peer addresses of the requests served (HEAD requests not counted).
    pub fn request_peers(&self) -> Vec<(String, u16)> {
        self.lines().into_iter().filter(|(k, _, _)| k == "req").map(|(_, a, p)| (a, p)).collect()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        terminate_child(&mut self.child, Duration::from_secs(2));
    }
}

