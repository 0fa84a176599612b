//! Structured messages (built with `arbitrary`) through `encode` then `decode`.
//!
//! * `encode` never panics for any buffer of at least 32 bytes (its documented minimum) up
//!   to `MAX_MESSAGE`, returns at most the buffer's length and writes nothing past what it
//!   returns.
//! * Fixed-size messages have the lengths the protocol documents.
//! * `decode` gives back the same message and sequence number; text bodies that do not fit
//!   come back cut on a char boundary, as long as fits. Hand-over records are never cut:
//!   their length is exact, and any bytes of a cgroup come back as they were. The only
//!   things `encode` does not check are a `Dest` whose domain is neither 4 nor 6 and an
//!   empty `AcquirePeer` name or `Container` id: `decode` must reject exactly those.
#![no_main]

use std::cell::RefCell;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use warmpool_wire::{
    decode, encode, handover::MAX_CGROUP, ContainerStage, DecodeError, Dest, Disposition, ErrorCode, LeaseId, MissReason, Msg, Record,
    Source, HEADER_LEN, MAX_CONTAINER_ID, MAX_MESSAGE, MAX_PEER_NAME, OFFER_LEN,
};

/// Poison for the bytes `encode` must not write.
const FILL: u8 = 0xA5;
/// How far past the returned length the poison is checked (refilling and scanning up to
/// 64 KiB on every run would cost most of the fuzzing time).
const GUARD: usize = 256;

thread_local! {
    // All `FILL` between runs.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![FILL; MAX_MESSAGE]);
}

#[derive(Debug, Arbitrary)]
struct ADest {
    domain: u8,
    port: u16,
    addr: [u8; 16],
    scope_id: u32,
}

#[derive(Debug, Arbitrary)]
enum AMsg {
    Acquire(ADest),
    Release { lease: u64, disposition: u8 },
    Status,
    Prewarm(ADest),
    AcquirePeer { port: u16, name: String },
    Grant { lease: u64, source: u8 },
    Miss { reason: u8, retry_after_ms: u32 },
    StatusReply(String),
    Takeover,
    Prefetch,
    Delegate,
    DelegateAs { uid: u32 },
    Container { stage: u8, id: String },
    Offer { lease: u64, source: u8, last: bool, dest: ADest },
    Handover(ARecord),
    Error { code: u8, text: String },
}

#[derive(Debug, Arbitrary)]
enum ARecord {
    Done { idle: u32, clients: u32, leases: u32 },
    Listener,
    Idle { uid: u32, cgroup: Vec<u8>, dest: ADest, reuse: bool, age_ms: u64 },
    Client { uid: u32, cgroup: Vec<u8>, pid: i32 },
    Lease { id: u64, dest: ADest, age_ms: u64, reuse: bool, peer: bool, acked: u64, received: u64 },
    Metrics,
    Commit,
    Committed,
    Aborted,
}

/// A cgroup as a record may carry it (longer ones are the caller's error: `encode` panics).
fn cgroup(c: &[u8]) -> &[u8] {
    &c[..c.len().min(MAX_CGROUP)]
}

fn record(r: &ARecord) -> Record<'_> {
    match r {
        ARecord::Done { idle, clients, leases } => Record::Done { idle: *idle, clients: *clients, leases: *leases },
        ARecord::Listener => Record::Listener,
        ARecord::Idle { uid, cgroup: c, dest: d, reuse, age_ms } => {
            Record::Idle { uid: *uid, cgroup: cgroup(c), dest: dest(d), reuse: *reuse, age_ms: *age_ms }
        }
        ARecord::Client { uid, cgroup: c, pid } => Record::Client { uid: *uid, cgroup: cgroup(c), pid: *pid },
        ARecord::Lease { id, dest: d, age_ms, reuse, peer, acked, received } => Record::Lease {
            id: lease_id(*id),
            dest: dest(d),
            age_ms: *age_ms,
            reuse: *reuse,
            peer: *peer,
            acked: *acked,
            received: *received,
        },
        ARecord::Metrics => Record::Metrics,
        ARecord::Commit => Record::Commit,
        ARecord::Committed => Record::Committed,
        ARecord::Aborted => Record::Aborted,
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    msg: AMsg,
    seq: u32,
    /// Buffer size is 32 + this, modulo the largest message.
    extra: u16,
}

fn pick<T: Copy>(all: &[T], i: u8) -> T {
    all[usize::from(i) % all.len()]
}

/// Any `u64` as a valid lease id (1..=2^48 − 1): out-of-range ids are `wire_decode`'s.
fn lease_id(n: u64) -> LeaseId {
    LeaseId::new(n % LeaseId::MAX.get() + 1).expect("in range by construction")
}

fn dest(d: &ADest) -> Dest {
    Dest { domain: d.domain, port: d.port, addr: d.addr, scope_id: d.scope_id }
}

fn build(m: &AMsg) -> Msg<'_> {
    match m {
        AMsg::Acquire(d) => Msg::Acquire(dest(d)),
        AMsg::Prewarm(d) => Msg::Prewarm(dest(d)),
        AMsg::Release { lease, disposition } => Msg::Release {
            lease: lease_id(*lease),
            disposition: pick(&[Disposition::Clean, Disposition::Shared, Disposition::Implicit, Disposition::Unused], *disposition),
        },
        AMsg::Status => Msg::Status,
        AMsg::AcquirePeer { port, name } => Msg::AcquirePeer { port: *port, name },
        AMsg::Grant { lease, source } => {
            Msg::Grant { lease: lease_id(*lease), source: pick(&[Source::Warm, Source::Reuse], *source) }
        }
        AMsg::Miss { reason, retry_after_ms } => Msg::Miss {
            reason: pick(&[MissReason::Empty, MissReason::NotPooled, MissReason::AtLimit, MissReason::Pending], *reason),
            retry_after_ms: *retry_after_ms,
        },
        AMsg::StatusReply(t) => Msg::StatusReply(t),
        AMsg::Takeover => Msg::Takeover,
        AMsg::Prefetch => Msg::Prefetch,
        AMsg::Delegate => Msg::Delegate,
        AMsg::DelegateAs { uid } => Msg::DelegateAs { uid: *uid },
        AMsg::Container { stage, id } => Msg::Container { stage: pick(&[ContainerStage::Create, ContainerStage::Stop], *stage), id },
        AMsg::Offer { lease, source, last, dest: d } => {
            Msg::Offer { lease: lease_id(*lease), source: pick(&[Source::Warm, Source::Reuse], *source), last: *last, dest: dest(d) }
        }
        AMsg::Handover(r) => Msg::Handover(record(r)),
        AMsg::Error { code, text } => Msg::Error {
            code: pick(
                &[ErrorCode::Malformed, ErrorCode::Version, ErrorCode::UnexpectedFd, ErrorCode::Denied, ErrorCode::Internal],
                *code,
            ),
            text,
        },
    }
}

fuzz_target!(|input: Input| {
    BUF.with(|b| {
        let buf = &mut *b.borrow_mut();
        // The smallest buffer `encode` accepts: 32 bytes, an Offer's length, or a record's.
        let min = match &input.msg {
            AMsg::Offer { .. } => OFFER_LEN,
            AMsg::Handover(r) => (HEADER_LEN + record(r).len()).max(32),
            _ => 32,
        };
        let len = min + usize::from(input.extra) % (MAX_MESSAGE - min + 1);
        // (Nothing can be written past `len`: `encode` is safe code and gets a slice.)
        let n = encode(&build(&input.msg), input.seq, &mut buf[..len]);
        assert!((HEADER_LEN..=len).contains(&n), "encode returned {n} for a {len}-byte buffer");
        let dirty = (n + GUARD).min(len);
        assert!(buf[n..dirty].iter().all(|&x| x == FILL), "encode wrote past its length {n}");
        check(&input, &buf[..n], len);
        buf[..dirty].fill(FILL);
    });
});

/// `bytes` is what `encode` wrote for `input` into a `len`-byte buffer.
fn check(input: &Input, bytes: &[u8], len: usize) {
    let msg = build(&input.msg);
    let n = bytes.len();

    let fixed = match msg {
        Msg::Acquire(_) | Msg::Prewarm(_) => Some(32),
        Msg::Release { .. } | Msg::Grant { .. } => Some(17),
        Msg::Miss { .. } => Some(13),
        Msg::DelegateAs { .. } => Some(12),
        Msg::Status | Msg::Takeover | Msg::Prefetch | Msg::Delegate => Some(HEADER_LEN),
        Msg::Offer { .. } => Some(OFFER_LEN),
        Msg::Handover(r) => Some(HEADER_LEN + r.len()),
        // (Exhaustive on purpose: a new message kind must be added to this target.)
        Msg::AcquirePeer { .. } | Msg::Container { .. } | Msg::StatusReply(_) | Msg::Error { .. } => None,
    };
    if let Some(f) = fixed {
        assert_eq!(n, f, "{msg:?}");
    }

    let got = decode(bytes);
    if let Msg::Acquire(d)
    | Msg::Prewarm(d)
    | Msg::Offer { dest: d, .. }
    | Msg::Handover(Record::Idle { dest: d, .. } | Record::Lease { dest: d, .. }) = msg
    {
        if d.domain != 4 && d.domain != 6 {
            assert_eq!(got, Err(DecodeError::BadField), "domain {} accepted", d.domain);
            return;
        }
    }
    if let Msg::AcquirePeer { name: "", .. } = msg {
        assert_eq!(got, Err(DecodeError::Truncated), "empty peer name accepted");
        return;
    }
    if let Msg::Container { id: "", .. } = msg {
        assert_eq!(got, Err(DecodeError::Truncated), "empty container id accepted");
        return;
    }
    let (back, seq) = match got {
        Ok(v) => v,
        Err(e) => panic!("{msg:?} encoded as {bytes:02x?} does not decode: {e}"),
    };
    assert_eq!(seq, input.seq);
    match (msg, back) {
        (Msg::StatusReply(t), Msg::StatusReply(t2)) => check_text(t, t2, len - HEADER_LEN),
        (Msg::AcquirePeer { port, name }, Msg::AcquirePeer { port: p2, name: n2 }) => {
            assert_eq!(port, p2);
            check_text(name, n2, (len - HEADER_LEN - 2).min(MAX_PEER_NAME));
        }
        (Msg::Container { stage, id }, Msg::Container { stage: s2, id: i2 }) => {
            assert_eq!(stage, s2);
            check_text(id, i2, (len - HEADER_LEN - 1).min(MAX_CONTAINER_ID));
        }
        (Msg::Error { code, text }, Msg::Error { code: c2, text: t2 }) => {
            assert_eq!(code, c2);
            check_text(text, t2, len - HEADER_LEN - 2);
        }
        (m, b) => assert_eq!(m, b),
    }
}

/// `got` is `sent`, or, if that did not fit in `room` bytes, its longest prefix that does and
/// ends on a char boundary.
fn check_text(sent: &str, got: &str, room: usize) {
    if sent.len() <= room {
        assert_eq!(sent, got);
    } else {
        assert!(sent.starts_with(got), "cut text is not a prefix");
        let mut n = room;
        while !sent.is_char_boundary(n) {
            n -= 1;
        }
        assert_eq!(got.len(), n, "text cut at {} instead of {n} (room {room})", got.len());
    }
}
