//! Encoding and decoding of every message: round trips, prefixes, bad input.

use super::*;

fn roundtrip(m: Msg<'_>) {
    let mut buf = [0u8; 128];
    let n = encode(&m, 77, &mut buf);
    let (back, seq) = decode(&buf[..n]).expect("decodes");
    assert_eq!(seq, 77);
    assert_eq!(back, m);
    // Every strict prefix of a fixed-size message is rejected, never misread.
    for cut in 0..n {
        if let Ok((short, _)) = decode(&buf[..cut]) {
            assert!(
                matches!(
                    short,
                    Msg::StatusReply(_)
                        | Msg::Error { .. }
                        | Msg::Status
                        | Msg::AcquirePeer { .. }
                        | Msg::Takeover
                        | Msg::Prefetch
                        | Msg::Delegate
                        | Msg::Container { .. }
                ),
                "{short:?}"
            );
        }
    }
}

#[test]
fn every_message_roundtrips() {
    let v4 = Dest::from_socket_addr("198.18.0.1:6379".parse().unwrap());
    let v6 = Dest::from_socket_addr("[2001:db8::1]:443".parse().unwrap());
    roundtrip(Msg::Acquire(v4));
    roundtrip(Msg::Acquire(v6));
    roundtrip(Msg::Release { lease: LeaseId::MAX, disposition: Disposition::Shared });
    roundtrip(Msg::Status);
    roundtrip(Msg::AcquirePeer { port: 7000, name: "job/reducer-1" });
    roundtrip(Msg::Takeover);
    roundtrip(Msg::Prefetch);
    roundtrip(Msg::Delegate);
    roundtrip(Msg::DelegateAs { uid: 1000 });
    roundtrip(Msg::Container { stage: ContainerStage::Create, id: "4f1c0a9e" });
    roundtrip(Msg::Container { stage: ContainerStage::Stop, id: "x" });
    roundtrip(Msg::Release { lease: id(1 << 40), disposition: Disposition::Unused });
    roundtrip(Msg::Offer { lease: id(3), source: Source::Warm, last: false, dest: v4 });
    roundtrip(Msg::Offer { lease: LeaseId::MAX, source: Source::Reuse, last: true, dest: v6 });
    roundtrip(Msg::Handover(Record::Lease { id: id(7), dest: v4, age_ms: 5, reuse: true, peer: false, acked: 9, received: 1 }));
    roundtrip(Msg::Handover(Record::Done { idle: 1, clients: 2, leases: 3 }));
    roundtrip(Msg::Miss { reason: MissReason::Pending, retry_after_ms: 10_000 });
    roundtrip(Msg::Prewarm(v6));
    roundtrip(Msg::Grant { lease: id(9), source: Source::Reuse });
    roundtrip(Msg::Miss { reason: MissReason::NotPooled, retry_after_ms: 5000 });
    roundtrip(Msg::StatusReply("a\tb\n"));
    roundtrip(Msg::Error { code: ErrorCode::Denied, text: "no" });
    assert_eq!(v4.socket_addr().to_string(), "198.18.0.1:6379");
    assert_eq!(v6.socket_addr().to_string(), "[2001:db8::1]:443");
}

fn id(n: u64) -> LeaseId {
    LeaseId::new(n).expect("a valid lease id")
}

#[test]
fn lease_ids_out_of_range_do_not_decode() {
    let mut buf = [0u8; 64];
    for m in [
        Msg::Release { lease: id(5), disposition: Disposition::Clean },
        Msg::Grant { lease: id(5), source: Source::Warm },
        Msg::Offer { lease: id(5), source: Source::Warm, last: true, dest: Dest::from_socket_addr("198.18.0.1:80".parse().unwrap()) },
    ] {
        let n = encode(&m, 1, &mut buf);
        for bad in [0, 1 << 48, u64::MAX] {
            buf[8..16].copy_from_slice(&u64::to_le_bytes(bad));
            assert_eq!(decode(&buf[..n]), Err(DecodeError::BadLease), "{m:?} with lease {bad}");
        }
        buf[8..16].copy_from_slice(&LeaseId::MAX.get().to_le_bytes());
        assert!(decode(&buf[..n]).is_ok(), "{m:?} with the largest lease id");
    }
}

#[test]
fn bad_input_is_rejected() {
    assert_eq!(decode(b""), Err(DecodeError::Truncated));
    assert_eq!(decode(b"XXXXXXXX"), Err(DecodeError::BadMagic));
    let mut buf = [0u8; 32];
    let n = encode(&Msg::Status, 1, &mut buf);
    buf[2] = 9;
    assert_eq!(decode(&buf[..n]), Err(DecodeError::Version(9)));
    buf[2] = VERSION;
    buf[3] = 0x55;
    assert_eq!(decode(&buf[..n]), Err(DecodeError::UnknownKind(0x55)));
    let n = encode(&Msg::Acquire(Dest::from_socket_addr("127.0.0.1:1".parse().unwrap())), 1, &mut buf);
    buf[8] = 5;
    assert_eq!(decode(&buf[..n]), Err(DecodeError::BadField));
}

#[test]
fn container_messages_are_checked() {
    let mut buf = [0u8; 300];
    let n = encode(&Msg::Container { stage: ContainerStage::Create, id: "abc" }, 1, &mut buf);
    // No id at all, an unknown stage, an id that is not UTF-8 or too long: all refused.
    assert_eq!(decode(&buf[..9]), Err(DecodeError::Truncated));
    buf[8] = 3;
    assert_eq!(decode(&buf[..n]), Err(DecodeError::BadField));
    buf[8] = 1;
    buf[9] = 0xff;
    assert_eq!(decode(&buf[..n]), Err(DecodeError::BadField));
    let long = "a".repeat(MAX_CONTAINER_ID + 10);
    let n = encode(&Msg::Container { stage: ContainerStage::Stop, id: &long }, 1, &mut buf);
    assert_eq!(n, 9 + MAX_CONTAINER_ID, "the id is cut to the limit when encoded");
    buf[n] = b'a';
    assert_eq!(decode(&buf[..=n]), Err(DecodeError::BadField));
}

#[test]
fn long_text_is_cut_on_a_char_boundary() {
    let mut buf = [0u8; 33];
    let n = encode(&Msg::StatusReply("ééééééééééééééééééééééééééééé"), 1, &mut buf);
    let (m, _) = decode(&buf[..n]).unwrap();
    assert!(matches!(m, Msg::StatusReply(s) if s.chars().all(|c| c == 'é')));
}
