//! Writes the seed corpora of the `wire_decode` and `rdv_decode` targets: one small valid
//! message or frame of each kind (encoded by the crate itself) and a few malformed ones. The
//! files are committed; re-run this only when a protocol changes:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds -- fuzz/corpus
//!
//! (stable or nightly both do). Every file is named `seed-*`; fuzz/.gitignore keeps whatever
//! else lands in a corpus directory out of git.

use std::path::{Path, PathBuf};

use warmpool_wire::rdv::{read_frame, Frame, Purpose, MAX_FRAME};
use warmpool_wire::{decode, encode, handover::LEGACY_KIND, ContainerStage, DecodeError, Dest, Disposition, ErrorCode, LeaseId, MissReason, Msg, Record, Source};

fn lid(n: u64) -> LeaseId {
    LeaseId::new(n).expect("a valid lease id")
}

fn enc(m: &Msg<'_>, seq: u32) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = encode(m, seq, &mut buf);
    buf[..n].to_vec()
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    wire_seeds(&root.join("wire_decode"));
    rdv_seeds(&root.join("rdv_decode"));
}

fn wire_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create corpus dir");

    let v4 = Dest::from_socket_addr("127.0.0.1:6379".parse().unwrap());
    let v6 = Dest::from_socket_addr("[fe80::1%2]:443".parse().unwrap());
    let mut valid: Vec<(&str, Vec<u8>)> = vec![
        ("acquire-v4", enc(&Msg::Acquire(v4), 1)),
        ("acquire-v6", enc(&Msg::Acquire(v6), 2)),
        ("prewarm-v4", enc(&Msg::Prewarm(v4), 3)),
        ("release", enc(&Msg::Release { lease: lid(42), disposition: Disposition::Implicit }, 4)),
        ("status", enc(&Msg::Status, 5)),
        ("acquire-peer", enc(&Msg::AcquirePeer { port: 7000, name: "job/reducer-1" }, 14)),
        ("miss-pending", enc(&Msg::Miss { reason: MissReason::Pending, retry_after_ms: 10_000 }, 15)),
        ("takeover", enc(&Msg::Takeover, 16)),
        ("prefetch", enc(&Msg::Prefetch, 19)),
        ("delegate", enc(&Msg::Delegate, 22)),
        ("delegate-as", enc(&Msg::DelegateAs { uid: 1000 }, 24)),
        ("container", enc(&Msg::Container { stage: ContainerStage::Create, id: "4f1c0a9e" }, 23)),
        ("release-unused", enc(&Msg::Release { lease: lid(42), disposition: Disposition::Unused }, 20)),
        ("offer-v4", enc(&Msg::Offer { lease: lid(42), source: Source::Reuse, last: true, dest: v4 }, 21)),
        ("offer-v6", enc(&Msg::Offer { lease: lid(43), source: Source::Warm, last: false, dest: v6 }, 21)),
        (
            "handover-lease",
            enc(&Msg::Handover(Record::Lease { id: lid(7), dest: v4, age_ms: 5, reuse: true, peer: false, acked: 1, received: 2 }), 17),
        ),
        ("handover-done", enc(&Msg::Handover(Record::Done { idle: 1, clients: 1, leases: 1 }), 18)),
        (
            "handover-idle-tab",
            enc(&Msg::Handover(Record::Idle { uid: 1000, cgroup: b"/wp/fn\tx y", dest: v6, reuse: false, age_ms: 9 }), 18),
        ),
        ("handover-client", enc(&Msg::Handover(Record::Client { uid: 0, cgroup: b"/a\"b\\c", pid: 4242 }), 18)),
        ("handover-commit", enc(&Msg::Handover(Record::Commit), 18)),
        ("grant", enc(&Msg::Grant { lease: lid(42), source: Source::Warm }, 6)),
        ("miss", enc(&Msg::Miss { reason: MissReason::NotPooled, retry_after_ms: 30_000 }, 7)),
        (
            "status-reply",
            enc(&Msg::StatusReply("tenant\tdest\tidle\tbusy\n1000\t127.0.0.1:6379\t2\t0\n"), 8),
        ),
        ("status-reply-empty", enc(&Msg::StatusReply(""), 9)),
        ("error", enc(&Msg::Error { code: ErrorCode::Denied, text: "not allowed" }, 10)),
        ("error-utf8", enc(&Msg::Error { code: ErrorCode::Internal, text: "pool é ∞ 🦀" }, 11)),
    ];
    // Accepted, but not in canonical form.
    let mut a = enc(&Msg::Acquire(v4), 12);
    a[9] = 0xff; // flags
    a.push(0); // trailing byte
    valid.push(("acquire-flags-trailing", a));
    let mut e = enc(&Msg::Error { code: ErrorCode::Malformed, text: "" }, 13);
    e[8..10].copy_from_slice(&0xbeefu16.to_le_bytes()); // unknown code
    e.extend_from_slice(b"\xff\xfebad");
    valid.push(("error-unknown-code-not-utf8", e));

    let status = enc(&Msg::Status, 0);
    let acquire = enc(&Msg::Acquire(v4), 0);
    let with = |base: &[u8], at: usize, v: u8| {
        let mut b = base.to_vec();
        b[at] = v;
        b
    };
    let mut reply_bad = enc(&Msg::StatusReply("ok"), 0);
    reply_bad.push(0xc3); // a lone UTF-8 lead byte
    let mut peer_long = enc(&Msg::AcquirePeer { port: 2, name: "j/" }, 0);
    peer_long.resize(10 + 257, b'n');
    let bad: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        ("header-short", status[..7].to_vec(), DecodeError::Truncated),
        ("bad-magic", with(&status, 0, b'X'), DecodeError::BadMagic),
        ("bad-version", with(&status, 2, 2), DecodeError::Version(2)),
        ("unknown-kind", with(&status, 3, 0x80), DecodeError::UnknownKind(0x80)),
        ("acquire-short", acquire[..31].to_vec(), DecodeError::Truncated),
        ("acquire-bad-domain", with(&acquire, 8, 2), DecodeError::BadField),
        ("release-bad-disposition", with(&enc(&Msg::Release { lease: lid(1), disposition: Disposition::Clean }, 0), 16, 4), DecodeError::BadField),
        ("grant-bad-source", with(&enc(&Msg::Grant { lease: lid(1), source: Source::Reuse }, 0), 16, 0), DecodeError::BadField),
        ("miss-short", enc(&Msg::Miss { reason: MissReason::Empty, retry_after_ms: 1 }, 0)[..12].to_vec(), DecodeError::Truncated),
        ("error-short", enc(&Msg::Error { code: ErrorCode::Version, text: "" }, 0)[..9].to_vec(), DecodeError::Truncated),
        ("status-reply-not-utf8", reply_bad, DecodeError::BadField),
        ("acquire-peer-empty", enc(&Msg::AcquirePeer { port: 1, name: "x" }, 0)[..10].to_vec(), DecodeError::Truncated),
        ("acquire-peer-too-long", peer_long, DecodeError::BadField),
        ("handover-bad-tag", with(&enc(&Msg::Handover(Record::Listener), 0), 8, 9), DecodeError::BadField),
        ("handover-trailing", [enc(&Msg::Handover(Record::Commit), 0), vec![0]].concat(), DecodeError::BadField),
        (
            "handover-client-short",
            enc(&Msg::Handover(Record::Client { uid: 0, cgroup: b"/abc", pid: 1 }), 0)[..20].to_vec(),
            DecodeError::Truncated,
        ),
        ("handover-legacy-text", with(&status, 3, LEGACY_KIND), DecodeError::UnknownKind(LEGACY_KIND)),
    ];

    for (name, bytes) in &valid {
        assert!(decode(bytes).is_ok(), "seed {name} should decode");
        std::fs::write(dir.join(format!("seed-ok-{name}")), bytes).expect("write seed");
    }
    for (name, bytes, err) in &bad {
        assert_eq!(decode(bytes).err(), Some(*err), "seed {name}");
        std::fs::write(dir.join(format!("seed-bad-{name}")), bytes).expect("write seed");
    }
    println!("wrote {} seeds to {}", valid.len() + bad.len(), dir.display());
}

fn rdv_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create corpus dir");
    let v4 = "198.18.0.11:40000".parse().unwrap();
    let v6 = "[2001:db8::7]:1".parse().unwrap();
    let frames: Vec<(&str, Frame)> = vec![
        ("hello", Frame::Hello { job: "j".into(), name: "mapper-1".into(), purpose: Purpose::Link, link: 9, nonce: [7; 16] }),
        ("challenge", Frame::Challenge { nonce: [1; 16] }),
        ("auth", Frame::Auth { mac: [2; 32] }),
        ("welcome-v4", Frame::Welcome { observed: v4, mac: [3; 32] }),
        ("welcome-v6", Frame::Welcome { observed: v6, mac: [3; 32] }),
        ("link-request", Frame::LinkRequest { req: 5, peer: "reducer-1".into(), port: 7000, prewarm: true }),
        ("assigned", Frame::Assigned { req: 5, link: 77 }),
        ("link-start", Frame::LinkStart { link: 77, peer: "mapper-1".into(), port: 7000, spare: true }),
        ("claimed", Frame::Claimed { link: 77 }),
        ("ping", Frame::Ping { token: 42 }),
        ("pong", Frame::Pong { token: 42 }),
        ("punch", Frame::Punch { peer: v4, delay_us: 1500, rtt_hint_us: 3000, link: 77, name: "reducer-1".into(), port: 7000 }),
        ("verdict", Frame::Verdict { relay: true }),
        ("relaying", Frame::Relaying),
        ("refused", Frame::Refused { reason: "bad mac".into() }),
    ];
    let mut stream = Vec::new();
    let mut n = 0;
    for (name, f) in &frames {
        let bytes = f.encode();
        assert_eq!(read_frame(&mut &bytes[..]).expect(name), *f);
        // Each single frame also covers its length-prefix-less reading (the target tries both).
        if matches!(*name, "hello" | "welcome-v6" | "link-request" | "link-start" | "punch" | "refused") {
            std::fs::write(dir.join(format!("seed-ok-{name}")), &bytes).expect("write seed");
            n += 1;
        }
        stream.extend_from_slice(&bytes);
    }
    // The whole handshake and control exchange as one stream.
    std::fs::write(dir.join("seed-ok-stream-all"), &stream).expect("write seed");
    let body_only = frames[0].1.encode()[4..].to_vec();
    std::fs::write(dir.join("seed-ok-hello-body-only"), body_only).expect("write seed");
    let mut bad_family = Frame::Punch { peer: v4, delay_us: 1, rtt_hint_us: 2, link: 1, name: "n".into(), port: 1 }.encode();
    bad_family[5] = 5;
    std::fs::write(dir.join("seed-bad-punch-family"), bad_family).expect("write seed");
    let mut too_big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    too_big.push(0x87);
    std::fs::write(dir.join("seed-bad-length-too-big"), too_big).expect("write seed");
    n += 4;
    println!("wrote {n} seeds to {}", dir.display());
}
