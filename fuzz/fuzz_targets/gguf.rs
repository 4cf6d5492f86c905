#![no_main]
//! Any bytes through the GGUF reader: an error or a file whose tensors lie inside the input.

use berth_formats::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse(data) {
        for t in &file.tensors {
            let end = t.offset.checked_add(t.size).expect("tensor end overflows");
            assert!(end <= data.len() as u64, "tensor {} ends past the input", t.name);
            assert!(t.dims.len() <= 4);
        }
        let _ = file.quantization();
        let _ = file.parameter_count();
    }
});
