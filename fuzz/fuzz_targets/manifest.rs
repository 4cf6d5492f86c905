#![no_main]
//! Any bytes as an OCI manifest and as a model config: an error, or a manifest whose every check
//! holds (one size per blob, bounded small documents, safe paths) and that survives a round trip.

use berth_store::config::ModelConfigFile;
use berth_store::manifest::{MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, Manifest, is_safe_relative_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        assert!(data.len() <= MAX_MANIFEST_BYTES);
        assert!(m.config.size <= MAX_MANIFEST_BYTES as u64);
        for l in &m.layers {
            assert!(l.size <= MAX_BLOB_BYTES);
            if let Some(p) = l.file_path() {
                assert!(is_safe_relative_path(p), "{p:?}");
            }
        }
        let unique = m.unique_blobs();
        for (i, a) in unique.iter().enumerate() {
            assert!(unique[i + 1..].iter().all(|b| b.digest != a.digest));
            assert!(m.blobs().filter(|b| b.digest == a.digest).all(|b| b.size == a.size));
        }
        let again = Manifest::parse(&m.to_bytes()).expect("what berth writes, it reads");
        assert_eq!(again, m);
    }
    let _ = serde_json::from_slice::<ModelConfigFile>(data);
});
