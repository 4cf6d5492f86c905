//! The engine against llama.cpp's reference outputs (../shared/golden): teacher forcing and greedy.

use berth_engine::model::{LlamaModel, SeqStep};
use berth_testkit::models;
use serde_json::Value;

fn golden() -> Value {
    let path = models::golden_dir().join("smollm2-q4_1.llamacpp.json");
    serde_json::from_slice(&std::fs::read(path).expect("golden file")).expect("golden JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

#[test]
fn teacher_forcing_agrees_with_llama_cpp() {
    let model = LlamaModel::load(&models::smollm2_gguf()).expect("load SmolLM2");
    let vocab = model.config.vocab_size;
    let golden = golden();
    let (mut steps, mut top1_agree, mut close) = (0usize, 0usize, 0usize);
    let mut diffs = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let greedy = case["greedy"].as_array().unwrap();
        let reference: Vec<u32> = greedy.iter().map(|s| s["id"].as_u64().unwrap() as u32).collect();
        let mut input = prompt.clone();
        input.extend_from_slice(&reference[..reference.len().saturating_sub(1)]);
        let mut cache = model.new_cache();
        let logits = model
            .forward(&mut [SeqStep { cache: &mut cache, tokens: &input, all_logits: true }])
            .expect("forward")
            .remove(0);
        for (i, step) in greedy.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + i) * vocab..(prompt.len() + i) * vocab];
            let lp = log_softmax(row);
            let ours = lp.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
            let want = step["id"].as_u64().unwrap() as u32;
            let ref_lp = step["top5"][0][1].as_f64().unwrap();
            steps += 1;
            top1_agree += usize::from(ours == want);
            let diff = (lp[want as usize] - ref_lp).abs();
            close += usize::from(diff <= 0.1);
            diffs.push(diff);
        }
    }
    diffs.sort_by(f64::total_cmp);
    let q = |p: f64| diffs[((diffs.len() - 1) as f64 * p) as usize];
    eprintln!(
        "teacher forcing: {steps} steps, top-1 agreement {:.2}%, |Δlogprob| ≤ 0.1 at {:.2}%; |Δ| p50 {:.4} p90 {:.4} p99 {:.4} max {:.4}",
        100.0 * top1_agree as f64 / steps as f64,
        100.0 * close as f64 / steps as f64,
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );
    assert!(top1_agree as f64 >= 0.99 * steps as f64, "top-1 agreement below 99%");
    assert!(close as f64 >= 0.95 * steps as f64, "logprobs within 0.1 nats at fewer than 95% of steps");
}
