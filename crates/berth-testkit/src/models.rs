//! Where the test models are. A test that needs one and cannot find it fails, naming the script
//! that fetches it: CI must never skip model tests silently.

use std::path::PathBuf;

/// The cache `scripts/fetch-test-models` fills: `$BERTH_TEST_MODELS`, else `~/.cache/berth/test-models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_TEST_MODELS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/berth/test-models")
}

fn require(rel: &str) -> PathBuf {
    let path = cache_dir().join(rel);
    assert!(
        path.exists(),
        "test model {} is missing: run scripts/fetch-test-models (or set BERTH_TEST_MODELS to where it put them)",
        path.display()
    );
    path
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB).
pub fn smollm2_gguf() -> PathBuf {
    require("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// all-MiniLM-L6-v2 as a safetensors folder (config.json, tokenizer.json, model.safetensors, ...).
pub fn minilm_dir() -> PathBuf {
    require("minilm/model.safetensors");
    require("minilm")
}

/// The golden reference data: `$BERTH_SHARED_DIR/golden`, else `shared/golden` beside the repository.
pub fn golden_dir() -> PathBuf {
    let shared = match std::env::var_os("BERTH_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    let dir = shared.join("golden");
    assert!(
        dir.exists(),
        "golden data {} is missing: it ships beside the repository in shared/ (or set BERTH_SHARED_DIR)",
        dir.display()
    );
    dir
}

/// llama.cpp's own test data (tokenizer vocabularies with expected ids, chat templates, its C++
/// tests) as `scripts/fetch-llamacpp-testdata` extracts it from the llama-cpp-python sdist:
/// `$BERTH_LLAMACPP_TESTDATA`, else `~/.cache/berth/llamacpp-testdata-0.3.36`.
pub fn llamacpp_testdata() -> PathBuf {
    let dir = match std::env::var_os("BERTH_LLAMACPP_TESTDATA") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".cache/berth/llamacpp-testdata-0.3.36")
        }
    };
    assert!(
        dir.join(".complete").exists(),
        "llama.cpp's test data {} is missing: run scripts/fetch-llamacpp-testdata (or set BERTH_LLAMACPP_TESTDATA)",
        dir.display()
    );
    dir
}
