//! Write the random-weight test model of a decoder family (see `berth_testkit::families`), with a
//! real vocabulary and chat template from llama.cpp's test data, for the agreement check against
//! llama.cpp (scripts/agreement-vs-llamacpp) and the speed benchmark.
//!
//!     write-family-model ARCH TESTDATA_DIR OUT.gguf [f32|f16|q8_0] [test|tiny|qwen2.5-0.5b|small-qwen3-moe]
//!
//! The last argument picks the shape: the small agreement-test one (default), a minimal one (for
//! fuzzing seeds, with TESTDATA_DIR "-" for a synthetic 258-token vocabulary), or, for speed,
//! Qwen2.5-0.5B's or a small Qwen3-30B-A3B-like mixture of experts.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_testkit::families::{FAMILIES, Shape, Storage, family, write_family_model_shaped};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        let names: Vec<&str> = FAMILIES.iter().map(|f| f.arch).collect();
        eprintln!(
            "usage: write-family-model ARCH TESTDATA_DIR OUT.gguf [f32|f16|q8_0] [test|tiny|qwen2.5-0.5b|small-qwen3-moe]  (ARCH: {})",
            names.join(", ")
        );
        ExitCode::from(2)
    };
    let (Some(arch), Some(testdata), Some(out)) = (args.first(), args.get(1), args.get(2)) else {
        return usage();
    };
    let Some(family) = family(arch) else { return usage() };
    let storage = match args.get(3).map(String::as_str) {
        None | Some("f16") => Storage::F16,
        Some("f32") => Storage::F32,
        Some("q8_0") => Storage::Q8_0,
        Some(_) => return usage(),
    };
    let shape = match args.get(4).map(String::as_str) {
        None | Some("test") => Shape::test(arch),
        Some("qwen2.5-0.5b") => Shape::qwen2_5_0_5b(),
        Some("small-qwen3-moe") => Shape::small_qwen3_moe(),
        Some("tiny") => Shape::tiny(),
        Some(_) => return usage(),
    };
    if let Err(e) = write_family_model_shaped(family, &shape, &PathBuf::from(testdata), storage, &PathBuf::from(out)) {
        eprintln!("write-family-model: cannot write {out}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
