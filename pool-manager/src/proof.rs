//! The end-of-exchange proof a given-back socket passes before it is reused.
//!
//! Kernel counters cannot see a reply still on its way (a request abandoned at close(), the
//! rest of a body the function stopped reading), nor session state the server keeps (Redis
//! AUTH/SELECT). So the daemon speaks the pool's protocol once, in quarantine and off every
//! function's path: it sends a request whose complete reply it knows and accepts the socket
//! only if exactly that reply is the first and only thing that comes back.
//!
//! - `redis`: `RESET` and `ECHO <nonce>` pipelined. RESET drops AUTH, SELECT, MULTI, client
//!   name, RESP3 and subscriptions (Redis >= 6.2); the reply must be exactly `+RESET\r\n`
//!   then the bulk string of the nonce, and then nothing (a non-blocking read finds no byte).
//! - `http`: `HEAD <path> HTTP/1.1` with `Host`. HTTP/1.1 answers in order, so a reply to an
//!   abandoned request arrives first and is not a HEAD response (a body, `Connection: close`,
//!   1xx, HTTP/1.0: all refused). An abandoned request whose reply looks like ours (an
//!   identical HEAD, an empty 204) is caught by the quiet window: our own reply then follows
//!   within it.
//! - `unchecked`: no proof (the explicit unsafe mode: kernel-state heuristics only).
//!
//! The parsers are pure ([`RedisExpect`], [`http_head_reply`]); [`prove`] is the I/O shell.
//! After success the proof's request and reply are consumed entirely: the socket is as a
//! fresh one for the next function (and for Redis, its session is reset).

use crate::sock::{peek, Discard};
use serde::Deserialize;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// The error text for a reuse pool without a protocol.
pub const PROTOCOL_REQUIRED: &str = "a reuse pool needs protocol = \"http\", \"redis\" or \"unchecked\" (flag form: \
     reuse:http, reuse:redis, reuse:unchecked): the daemon proves each exchange is over before \
     reuse; \"unchecked\" skips that proof (unsafe: see the README)";

/// The protocol spoken on a reuse pool's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1: proved with a `HEAD` request.
    Http,
    /// Redis (RESP): proved with `RESET` + `ECHO nonce`.
    Redis,
    /// No proof: the kernel-state heuristics only (unsafe; logged at start).
    Unchecked,
}

impl Protocol {
    /// Every protocol, for exporting zero counters.
    pub const ALL: [Self; 3] = [Self::Http, Self::Redis, Self::Unchecked];

    /// Lower-case name (config value and metrics label).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Redis => "redis",
            Self::Unchecked => "unchecked",
        }
    }

    /// From the name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// How a pool's proof runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    /// HTTP: the path of the `HEAD` request.
    pub path: String,
    /// HTTP: the `Host` header (`None`: the destination address).
    pub host: Option<String>,
    /// The whole proof (send, reply, quiet window) must finish within this.
    pub timeout: Duration,
    /// HTTP: after the reply, no byte may arrive for this long.
    pub quiet: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self { path: "/".into(), host: None, timeout: crate::defaults::CHECK_TIMEOUT, quiet: crate::defaults::CHECK_QUIET }
    }
}

/// Whether `s` can go into a request line or header unchanged (no CR, LF or other control).
#[must_use]
pub fn header_safe(s: &str) -> bool {
    !s.bytes().any(|b| b.is_ascii_control())
}

/// What a parser made of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// The expected reply is complete and is `n` bytes long.
    Complete(usize),
    /// Correct so far; more bytes needed.
    Partial,
    /// Not the expected reply.
    Wrong,
}

/// The Redis proof: the request and the exact reply it must get.
#[derive(Debug, Clone)]
pub struct RedisExpect {
    /// `RESET` and `ECHO nonce` as RESP arrays.
    pub request: Vec<u8>,
    /// `+RESET\r\n$<len>\r\n<nonce>\r\n`.
    pub reply: Vec<u8>,
}

impl RedisExpect {
    /// For a nonce (hex, so it needs no escaping).
    #[must_use]
    pub fn new(nonce: &str) -> Self {
        let request = format!("*1\r\n$5\r\nRESET\r\n*2\r\n$4\r\nECHO\r\n${}\r\n{nonce}\r\n", nonce.len()).into_bytes();
        let reply = format!("+RESET\r\n${}\r\n{nonce}\r\n", nonce.len()).into_bytes();
        Self { request, reply }
    }

    /// Judge the bytes received so far.
    #[must_use]
    pub fn parse(&self, got: &[u8]) -> Parse {
        let n = got.len().min(self.reply.len());
        if got[..n] != self.reply[..n] {
            Parse::Wrong
        } else if n == self.reply.len() {
            Parse::Complete(n)
        } else {
            Parse::Partial
        }
    }
}

/// The HTTP proof's request.
#[must_use]
pub fn http_head_request(path: &str, host: &str) -> Vec<u8> {
    format!("HEAD {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// Longest header block accepted in a reply to the proof.
const MAX_HEAD: usize = 16 * 1024;

/// Judge `got` as the start of one complete HTTP/1.1 response to a `HEAD`: a status line
/// `HTTP/1.1 NNN ...` with a final (non-1xx) status, well-formed header lines, no
/// `Connection: close`, ended by an empty line. The body a HEAD response never has is not
/// awaited: any byte after the header block is someone else's.
#[must_use]
pub fn http_head_reply(got: &[u8]) -> Parse {
    const PREFIX: &[u8] = b"HTTP/1.1 ";
    let n = got.len().min(PREFIX.len());
    if got[..n] != PREFIX[..n] {
        return Parse::Wrong;
    }
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if got.len() > MAX_HEAD { Parse::Wrong } else { Parse::Partial };
    };
    let head = &got[..end];
    let Ok(head) = std::str::from_utf8(head) else {
        return Parse::Wrong;
    };
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.get(9..12).unwrap_or("");
    let after = status.as_bytes().get(12).copied();
    if !code.bytes().all(|b| b.is_ascii_digit()) || code.len() != 3 || !matches!(after, None | Some(b' ')) {
        return Parse::Wrong;
    }
    if !matches!(code.as_bytes()[0], b'2'..=b'5') {
        return Parse::Wrong; // 1xx: an interim answer to someone's request; 0xx, 6xx+: nonsense
    }
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Wrong;
        };
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f) || value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Parse::Wrong;
        }
        if name.eq_ignore_ascii_case("connection") && value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
            return Parse::Wrong;
        }
    }
    Parse::Complete(end + 4)
}

/// A fresh random nonce (hex).
fn nonce() -> String {
    let mut b = [0u8; 16];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()) != Ok(b.len()) {
        // Never: getrandom on 16 bytes does not fail once the pool is initialised. The
        // time is still unpredictable to a function that cannot see the daemon.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How the proof ended, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The exact reply and nothing else.
    Passed,
    /// Other bytes, or more bytes than the reply.
    WrongReply,
    /// No complete reply within `check_timeout`.
    Timeout,
    /// The peer closed.
    Closed,
    /// A socket error.
    Error,
}

impl Outcome {
    /// Every outcome, for exporting zero counters.
    pub const ALL: [Self; 5] = [Self::Passed, Self::WrongReply, Self::Timeout, Self::Closed, Self::Error];

    /// Label value.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::WrongReply => "wrong_reply",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Error => "error",
        }
    }

    /// The discard reason for a failed proof.
    #[must_use]
    pub fn discard(self) -> Option<Discard> {
        match self {
            Self::Passed => None,
            Self::WrongReply => Some(Discard::CheckFailed),
            Self::Timeout => Some(Discard::CheckTimeout),
            Self::Closed => Some(Discard::PeerClosed),
            Self::Error => Some(Discard::Error),
        }
    }
}

/// Run the proof of `protocol` on `fd` (which nobody else holds). `host` is the HTTP Host
/// when the settings name none. Returns the socket with the outcome.
pub async fn prove(fd: OwnedFd, protocol: Protocol, check: &CheckSettings, host: &str) -> (OwnedFd, Outcome) {
    let (request, redis) = match protocol {
        Protocol::Unchecked => return (fd, Outcome::Passed),
        Protocol::Redis => {
            let r = RedisExpect::new(&nonce());
            (r.request.clone(), Some(r))
        }
        Protocol::Http => (http_head_request(&check.path, check.host.as_deref().unwrap_or(host)), None),
    };
    // SAFETY: AsyncFd owns the OwnedFd while registered, so the fd stays open exactly as long
    // as it is; `into_inner` deregisters it before the socket goes back to the pool (pooled
    // sockets are never left registered).
    let afd = match unsafe { AsyncFd::register(fd) } {
        Ok(a) => a,
        Err(e) => return (e.into_parts().0, Outcome::Error),
    };
    let outcome =
        tokio::time::timeout(check.timeout, exchange(&afd, &request, redis.as_ref(), check.quiet)).await.unwrap_or(Outcome::Timeout);
    (afd.into_inner(), outcome)
}

async fn exchange(afd: &AsyncFd<OwnedFd>, request: &[u8], redis: Option<&RedisExpect>, quiet: Duration) -> Outcome {
    use rustix::net::SendFlags;
    if rustix::net::send(afd.get_ref(), request, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) != Ok(request.len()) {
        return Outcome::Error;
    }
    let mut got = Vec::with_capacity(256);
    let mut buf = [0u8; 4096];
    loop {
        match recv(afd, &mut buf).await {
            Ok(0) => return Outcome::Closed,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Outcome::Error,
        }
        let verdict = match redis {
            Some(r) => r.parse(&got),
            None => http_head_reply(&got),
        };
        match verdict {
            Parse::Wrong => return Outcome::WrongReply,
            Parse::Partial => {}
            Parse::Complete(n) if n < got.len() => return Outcome::WrongReply,
            Parse::Complete(_) => break,
        }
    }
    // Then nothing: Redis answers in one go, so one non-blocking look suffices; HTTP waits
    // out the quiet window (see the module docs).
    let wait = if redis.is_some() { Duration::ZERO } else { quiet };
    let _ = tokio::time::timeout(wait, quiet_until_byte(afd)).await;
    match peek(afd.get_ref()) {
        Ok(0) => Outcome::Closed,
        Ok(_) => Outcome::WrongReply,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => match crate::sock::idle_check(afd.get_ref()) {
            Ok(()) => Outcome::Passed,
            Err(Discard::PeerClosed) => Outcome::Closed,
            Err(_) => Outcome::Error,
        },
        Err(_) => Outcome::Error,
    }
}

/// Returns once a byte (or EOF, or an error) is waiting; readiness left over from the reply
/// is cleared first, so this really waits.
async fn quiet_until_byte(afd: &AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut guard) = afd.readable().await else { return };
        match peek(afd.get_ref()) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
            _ => return,
        }
    }
}

async fn recv(afd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = afd.readable().await?;
        let r = guard.try_io(|a| Ok(rustix::net::recv(a.get_ref(), &mut *buf, rustix::net::RecvFlags::DONTWAIT).map(|(n, _)| n)?));
        match r {
            Ok(r) => return r,
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_reply_must_be_exact() {
        let r = RedisExpect::new("abc");
        assert_eq!(r.request, b"*1\r\n$5\r\nRESET\r\n*2\r\n$4\r\nECHO\r\n$3\r\nabc\r\n");
        assert_eq!(r.parse(b"+RES"), Parse::Partial);
        assert_eq!(r.parse(b"+RESET\r\n$3\r\nabc\r\n"), Parse::Complete(17));
        assert_eq!(r.parse(b"+RESET\r\n$3\r\nabc\r\n*-1\r\n"), Parse::Complete(17), "the caller refuses what follows");
        assert_eq!(r.parse(b"*-1\r\n+RESET\r\n"), Parse::Wrong, "an abandoned BLPOP's reply comes first");
        assert_eq!(r.parse(b"+RESET\r\n$3\r\nabd\r\n"), Parse::Wrong, "another nonce");
        assert_eq!(r.parse(b"-NOAUTH\r\n"), Parse::Wrong);
    }

    #[test]
    fn http_head_reply_framing() {
        let ok = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(http_head_reply(ok), Parse::Complete(ok.len()));
        assert_eq!(http_head_reply(&ok[..20]), Parse::Partial);
        assert_eq!(http_head_reply(b"HTTP/1.1 404 Not Found\r\n\r\n"), Parse::Complete(26));
        for bad in [
            &b"HTTP/1.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"BBBBBBBBBBBBBBBBBB",
            b"hello\n",
        ] {
            assert_eq!(http_head_reply(bad), Parse::Wrong, "{}", String::from_utf8_lossy(bad));
        }
        // The tail of an abandoned body, then our reply: wrong from the first byte.
        assert_eq!(http_head_reply(b"BBBHTTP/1.1 200 OK\r\n\r\n"), Parse::Wrong);
        assert_eq!(http_head_request("/", "127.0.0.1:80"), b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n");
        assert!(header_safe("a b") && !header_safe("a\r\nX: y"));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 32);
    }
}
