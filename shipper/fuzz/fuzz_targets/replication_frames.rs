//! Arbitrary bytes as a stream of replication frames: the decoder must refuse or decode,
//! never panic or allocate past its limits; decoded batches are unpacked too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redun_shipper::proto::{self, Frame};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(f) = proto::read_frame(&mut r) {
        if let Frame::Batch(b) = &f {
            let _ = proto::decode_batch(b);
        }
        // Whatever decodes encodes back to the same frame.
        let again = proto::encode(&f);
        assert_eq!(proto::read_frame(&mut &again[..]).unwrap(), f);
    }
});
