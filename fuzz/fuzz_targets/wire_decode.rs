//! Arbitrary bytes into `wire::decode`, as a daemon or a shim receives them from its peer.
//!
//! * `decode` never panics.
//! * Whatever it accepts, `encode` can write (into a `MAX_MESSAGE` buffer, without panicking
//!   and without touching bytes past the length it returns), and decoding that again gives
//!   the same message and the same sequence number.
//! * The re-encoded form is canonical: encoding the second decode gives the same bytes.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use warmpool_wire::{decode, encode, Msg, HEADER_LEN, MAX_MESSAGE};

/// Poison for the bytes `encode` must not write.
const FILL: u8 = 0xA5;
/// How far past the returned length the poison is checked (refilling and scanning all
/// 64 KiB on every run would cost most of the fuzzing time).
const GUARD: usize = 256;

thread_local! {
    // Both buffers are all `FILL` between runs.
    static BUFS: RefCell<(Vec<u8>, Vec<u8>)> = RefCell::new((vec![FILL; MAX_MESSAGE], vec![FILL; MAX_MESSAGE]));
}

/// The text body and the offset it starts at, if the message has one.
fn text<'a>(m: &Msg<'a>) -> Option<(usize, &'a str)> {
    match *m {
        Msg::StatusReply(t) => Some((HEADER_LEN, t)),
        Msg::Error { text: t, .. } => Some((HEADER_LEN + 2, t)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((msg, seq)) = decode(data) else { return };

    BUFS.with(|b| {
        let (first, second) = &mut *b.borrow_mut();
        let n = encode(&msg, seq, first);
        assert!((HEADER_LEN..=MAX_MESSAGE).contains(&n), "encode returned {n}");
        let dirty = (n + GUARD).min(MAX_MESSAGE);
        assert!(first[n..dirty].iter().all(|&x| x == FILL), "encode wrote past its length {n}");

        let (again, seq2) = match decode(&first[..n]) {
            Ok(v) => v,
            Err(e) => panic!("{msg:?} re-encoded as {:02x?} does not decode: {e}", &first[..n]),
        };
        assert_eq!(seq2, seq);
        match (text(&msg), text(&again)) {
            // A body longer than a message may be is cut on a char boundary by `encode`
            // (decode itself sets no limit; the socket layer does).
            (Some((at, t)), Some((_, t2))) if at + t.len() > MAX_MESSAGE => {
                assert!(t.starts_with(t2), "cut text is not a prefix");
                assert!(t2.len() + 4 > MAX_MESSAGE - at, "cut too much: {} bytes left", t2.len());
                assert_eq!(core::mem::discriminant(&msg), core::mem::discriminant(&again));
            }
            _ => assert_eq!(again, msg, "round trip changed the message"),
        }

        let n2 = encode(&again, seq, second);
        assert_eq!(&first[..n], &second[..n2], "encoding is not canonical");
        first[..dirty].fill(FILL);
        second[..dirty].fill(FILL);
    });
});
