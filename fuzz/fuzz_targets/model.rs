#![no_main]
//! Any bytes as a model file: loading fails with an error or gives a model that runs a token.
//! Seeds are minimal models of every family (write-family-model ARCH - OUT f32 tiny).

use berth_engine::model::{self, KvType, Logits, SeqStep, blocks_for};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loader maps a file, as it maps a store blob.
    let path = std::env::temp_dir().join(format!("berth-fuzz-model-{}.gguf", std::process::id()));
    std::fs::write(&path, data).expect("write the input");
    if let Ok(m) = model::load(&path) {
        let blocks = blocks_for(2).max(1);
        // Both cache types, where the model's heads allow q8_0.
        for kv_type in [KvType::F16, KvType::Q8_0] {
            let Ok(mut pool) = m.new_kv_pool(blocks, kv_type) else {
                assert!(!m.supports_kv_type(kv_type), "a supported cache type is refused");
                continue;
            };
            let table: Vec<u32> = (0..blocks as u32).collect();
            let tokens = [0u32, (m.vocab_size() - 1) as u32];
            let step = SeqStep { blocks: &table, start: 0, tokens: &tokens, prompt_len: 2, logits: Logits::All };
            if let Ok(out) = m.forward(pool.as_mut(), &[step]) {
                assert_eq!(out[0].len(), 2 * m.vocab_size());
            }
        }
    }
});
