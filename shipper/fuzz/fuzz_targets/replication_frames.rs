//! Arbitrary bytes as a stream of replication frames: the decoder must refuse or decode,
//! never panic or allocate past its limits; decoded batches are unpacked too, and their
//! records read as sync slots.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redun_shipper::proto::{self, Frame};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(f) = proto::read_frame(&mut r) {
        if let Frame::Batch(b) = &f {
            // Sync slots inside are unpacked as the target does.
            for r in proto::decode_batch(b).unwrap_or_default() {
                let end = r.offset.saturating_add(u64::from(r.length));
                let _ = proto::decode_slot(&r.payload, r.offset, end);
            }
        }
        // Whatever decodes encodes back to the same frame.
        let again = proto::encode(&f);
        assert_eq!(proto::read_frame(&mut &again[..]).unwrap(), f);
    }
});
