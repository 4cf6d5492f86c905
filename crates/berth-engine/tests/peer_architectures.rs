//! berth against llama.cpp on every decoder family, on the files and tokens
//! `scripts/agreement-vs-llamacpp` prepares (random-weight models with real vocabularies, quantised
//! by llama.cpp's own tool, and llama.cpp's outputs on them). Prints the agreement table and holds
//! each model to the bars: teacher-forced top-1 agreement ≥ 99.5% and the first 20 greedy tokens
//! identical for ≥ 9 of 10 prompts.
//!
//! Building llama.cpp takes 10-20 minutes on 2 cores, so the test suite runs this only where the
//! script has run (`BERTH_AGREEMENT_DIR`, or its default cache folder, holds the outputs); the script
//! always runs it. Without them the test says so and checks nothing.

use std::path::PathBuf;

use berth_engine::model::{self, SequenceCache};
use serde_json::Value;

const GREEDY_TOKENS: usize = 20;

fn agreement_dir() -> PathBuf {
    match std::env::var_os("BERTH_AGREEMENT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/berth/agreement-0.3.36"),
    }
}

fn argmax(logits: &[f32]) -> (u32, f64) {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    let sum: f64 = logits.iter().map(|&l| ((l - logits[best]) as f64).exp()).sum();
    (best as u32, -sum.ln())
}

struct Row {
    model: String,
    positions: usize,
    top1_agree: usize,
    max_logprob_diff: f64,
    greedy_identical: usize,
    prompts: usize,
}

fn compare(model_path: &std::path::Path, prompts: &[Vec<u32>], golden: &[Value]) -> Row {
    let model = model::load(model_path).unwrap_or_else(|e| panic!("{}: {e}", model_path.display()));
    let mut row = Row {
        model: model_path.file_name().unwrap().to_string_lossy().trim_end_matches(".gguf").to_string(),
        positions: 0,
        top1_agree: 0,
        max_logprob_diff: 0.0,
        greedy_identical: 0,
        prompts: prompts.len(),
    };
    let vocab = model.vocab_size();
    for (prompt, want) in prompts.iter().zip(golden) {
        let top1: Vec<u64> = want["top1"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let logprob: Vec<f64> = want["logprob"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let greedy: Vec<u64> = want["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        // Teacher forcing: the prompt as one step, every position's logits.
        let mut cache = SequenceCache::new(model.as_ref()).expect("cache");
        let logits = cache.forward(model.as_ref(), prompt, true).expect("forward");
        for (i, row_logits) in logits.chunks_exact(vocab).enumerate() {
            let (id, lp) = argmax(row_logits);
            row.positions += 1;
            if id as u64 == top1[i] {
                row.top1_agree += 1;
                row.max_logprob_diff = row.max_logprob_diff.max((lp - logprob[i]).abs());
            }
        }
        // Greedy: the prompt, then one token at a time.
        let mut cache = SequenceCache::new(model.as_ref()).expect("cache");
        let mut logits = cache.forward(model.as_ref(), prompt, false).expect("forward");
        let mut ours = Vec::new();
        for _ in 0..GREEDY_TOKENS {
            let (id, _) = argmax(&logits);
            ours.push(id as u64);
            logits = cache.forward(model.as_ref(), &[id], false).expect("forward");
        }
        if ours == greedy {
            row.greedy_identical += 1;
        } else if std::env::var_os("BERTH_AGREEMENT_DEBUG").is_some() {
            eprintln!("{}: prompt of {} tokens\n  berth     {ours:?}\n  llama.cpp {greedy:?}", row.model, prompt.len());
        }
    }
    row
}

#[test]
fn every_family_agrees_with_llama_cpp() {
    let dir = agreement_dir();
    let archs: Vec<String> = match std::env::var("BERTH_AGREEMENT_ARCHS") {
        Ok(list) => list.split_whitespace().map(String::from).collect(),
        Err(_) => ["llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3"].map(String::from).to_vec(),
    };
    let mut rows = Vec::new();
    for arch in &archs {
        let Ok(prompt_text) = std::fs::read_to_string(dir.join(format!("{arch}.prompts.txt"))) else { continue };
        let prompts: Vec<Vec<u32>> = prompt_text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        let quants = std::env::var("BERTH_AGREEMENT_QUANTS").unwrap_or_else(|_| "Q8_0 Q4_0 Q4_K_M".into());
        for quant in quants.split_whitespace() {
            let model = dir.join(format!("{arch}.{quant}.gguf"));
            let Ok(golden) = std::fs::read_to_string(dir.join(format!("{arch}.{quant}.gguf.golden.jsonl"))) else {
                continue;
            };
            let golden: Vec<Value> = golden.lines().map(|l| serde_json::from_str(l).expect("golden JSON")).collect();
            assert_eq!(golden.len(), prompts.len(), "{}: one golden line per prompt", model.display());
            rows.push(compare(&model, &prompts, &golden));
        }
    }
    if rows.is_empty() {
        eprintln!(
            "peer_architectures: no llama.cpp outputs in {}; run scripts/agreement-vs-llamacpp to check agreement",
            dir.display()
        );
        return;
    }
    println!("\n| model | teacher-forced top-1 | max |Δ logprob| of agreeing top-1 | greedy 20 identical |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {}/{} ({:.2}%) | {:.1e} | {}/{} |",
            r.model,
            r.top1_agree,
            r.positions,
            100.0 * r.top1_agree as f64 / r.positions as f64,
            r.max_logprob_diff,
            r.greedy_identical,
            r.prompts
        );
    }
    for r in &rows {
        assert!(
            r.top1_agree as f64 >= 0.995 * r.positions as f64,
            "{}: top-1 agreement {}/{} is below 99.5%",
            r.model,
            r.top1_agree,
            r.positions
        );
        assert!(r.greedy_identical >= 9, "{}: greedy identical for {}/10 prompts", r.model, r.greedy_identical);
    }
}
