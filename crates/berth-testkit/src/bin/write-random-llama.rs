//! Write a llama-family GGUF of Llama-3.2-1B's shape with pseudo-random Q4_1 weights, for the
//! speed benchmark (scripts/bench-vs-llamacpp): speed does not depend on the weights' values.
//!
//!     write-random-llama OUT.gguf

use std::process::ExitCode;

use berth_testkit::synthetic::{LlamaShape, tiny_llama};

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: write-random-llama OUT.gguf");
        return ExitCode::from(2);
    };
    let bytes = tiny_llama(&LlamaShape::llama_3_2_1b()).build();
    // Written beside the target and renamed, so an interrupted run never leaves a half file.
    let tmp = std::path::PathBuf::from(format!("{}.partial", out.to_string_lossy()));
    if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &out)) {
        eprintln!("write-random-llama: cannot write {}: {e}", out.to_string_lossy());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
