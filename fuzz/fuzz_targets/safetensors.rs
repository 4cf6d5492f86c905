#![no_main]
//! Any bytes through the safetensors header reader: an error or contiguous ranges inside the input.

use berth_formats::safetensors::SafetensorsHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = SafetensorsHeader::parse(data) {
        let mut at = h.data_offset;
        for t in &h.tensors {
            assert_eq!(t.begin, at, "ranges are contiguous");
            assert!(t.end <= data.len() as u64);
            at = t.end;
        }
        assert_eq!(at, data.len() as u64);
    }
});
