//! berth's tokenizer against llama.cpp's own tokenizer tests (test-tokenizer-0): every vocabulary
//! `models/ggml-vocab-*.gguf` of the llama-cpp-python sdist that comes with inputs (`.inp`) and
//! the ids llama.cpp expects (`.out`), tokenized without special tokens and without BOS, as that
//! test does. Fetched by `scripts/fetch-llamacpp-testdata`; nothing of it is in the repository.

use std::collections::BTreeMap;
use std::path::Path;

use berth_engine::tokenizer::Tokenizer;
use berth_formats::gguf::GgufFile;
use berth_testkit::models;

/// Vocabularies berth does not read, and why. Every other one must reproduce every case.
const NOT_SUPPORTED: &[(&str, &str)] = &[(
    "bert-bge",
    "GGUF BERT (WordPiece) vocabularies: berth runs embedding models from safetensors with their tokenizer.json",
)];

/// The cases of one vocabulary: (input, expected ids).
fn cases(inp: &Path, out: &Path) -> Vec<(String, Vec<u32>)> {
    let raw = std::fs::read_to_string(inp).unwrap();
    let inputs: Vec<&str> = raw.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<Vec<u32>> = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // The last input ends with the separator's newline and nothing after it.
    let inputs: Vec<&str> = if inputs.len() == outputs.len() + 1 && inputs.last() == Some(&"") {
        inputs[..outputs.len()].to_vec()
    } else {
        inputs
    };
    assert_eq!(inputs.len(), outputs.len(), "{}: inputs and outputs differ in number", inp.display());
    // llama.cpp keys its cases by text: a repeated text is one case.
    let unique: BTreeMap<String, Vec<u32>> = inputs.into_iter().map(str::to_string).zip(outputs).collect();
    unique.into_iter().collect()
}

/// (vocabulary, passed, total, first failure or why none ran)
fn run_all() -> Vec<(String, usize, usize, String)> {
    let dir = models::llamacpp_testdata().join("models");
    let mut vocabs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| p.with_extension("gguf.inp").exists())
        .collect();
    vocabs.sort();
    let mut report = Vec::new();
    for path in vocabs {
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("ggml-vocab-")
            .trim_end_matches(".gguf")
            .to_string();
        let cases = cases(&path.with_extension("gguf.inp"), &path.with_extension("gguf.out"));
        let bytes = std::fs::read(&path).unwrap();
        let tokenizer = GgufFile::parse(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|g| Tokenizer::from_gguf(&g).map_err(|e| e.to_string()));
        let tok = match tokenizer {
            Ok(t) => t,
            Err(e) => {
                let e = format!("{e:?}");
                report.push((name, 0, cases.len(), format!("not supported: {e}")));
                continue;
            }
        };
        let mut passed = 0;
        let mut first_failure = String::new();
        // BERTH_VOCAB_DEBUG=name prints every failing case of that vocabulary.
        let debug = std::env::var("BERTH_VOCAB_DEBUG").is_ok_and(|v| v == name);
        for (text, want) in &cases {
            match tok.encode(text, false) {
                Ok(got) if &got == want => passed += 1,
                got => {
                    if debug {
                        eprintln!("{name}: {text:?}\n  expected {want:?}\n  got      {got:?}");
                    }
                    if first_failure.is_empty() {
                        first_failure = format!("{text:?}: expected {want:?}, got {got:?}");
                    }
                }
            }
        }
        report.push((name, passed, cases.len(), first_failure));
    }
    report
}

#[test]
fn tokenizers_reproduce_llama_cpps_own_tests() {
    let report = run_all();
    assert!(report.len() >= 15, "llama.cpp's vocabularies were not all found: {report:?}");
    eprintln!("| vocabulary | cases passed | first failure |\n|---|---|---|");
    for (name, passed, total, failure) in &report {
        let failure: String = failure.chars().take(160).collect();
        eprintln!("| {name} | {passed} / {total} | {failure} |");
    }
    for (name, passed, total, failure) in &report {
        match NOT_SUPPORTED.iter().find(|(n, _)| n == name) {
            Some((_, why)) => {
                assert!(failure.starts_with("not supported"), "{name} is read now ({why}): take it off NOT_SUPPORTED")
            }
            None => assert_eq!(passed, total, "{name}: {passed} of {total} cases; first failure: {failure}"),
        }
    }
}
