//! Arbitrary bytes into the rendezvous frame codec (`wire::rdv`), which reads frames from a
//! TCP peer on another machine.
//!
//! The input is read as a stream with `read_frame` until it fails, and also handed whole to
//! `Frame::decode` (as a type byte and body). Neither may panic, and every frame they accept
//! must encode (with a valid length prefix, at most `MAX_FRAME`) and decode back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warmpool_wire::rdv::{frame_len, read_frame, Frame, MAX_FRAME};

fn roundtrip(f: &Frame) {
    let bytes = f.encode();
    assert!(bytes.len() >= 5, "{f:?} encoded to {} bytes", bytes.len());
    let n = frame_len(bytes[..4].try_into().unwrap()).unwrap_or_else(|e| panic!("{f:?}: {e}"));
    assert_eq!(n, bytes.len() - 4);
    assert!(n <= MAX_FRAME);
    match Frame::decode(&bytes[4..]) {
        Ok(back) => assert_eq!(&back, f, "round trip changed the frame"),
        Err(e) => panic!("{f:?} encoded as {bytes:02x?} does not decode: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        roundtrip(&f);
    }
    let mut r = data;
    while let Ok(f) = read_frame(&mut r) {
        roundtrip(&f);
    }
});
