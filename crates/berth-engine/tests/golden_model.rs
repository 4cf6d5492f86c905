//! The engine against llama.cpp's reference outputs (../shared/golden): teacher forcing and greedy.

use berth_engine::model::{KvType, SequenceCache};
use berth_engine::sampling::SamplingParams;
use berth_engine::template::Message;
use berth_engine::{Engine, FinishReason, GenerationRequest};
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

/// How a cache type's teacher-forced logprobs compare with llama.cpp's (f16 cache) reference.
struct Agreement {
    steps: usize,
    top1_agree: usize,
    /// Steps whose reference token's logprob is within 0.1 nats of llama.cpp's.
    close: usize,
    /// |Δ logprob| of the reference token, sorted.
    diffs: Vec<f64>,
}

impl Agreement {
    fn quantile(&self, p: f64) -> f64 {
        self.diffs[((self.diffs.len() - 1) as f64 * p) as usize]
    }

    fn report(&self, what: &str) {
        eprintln!(
            "{what}: {} steps, top-1 agreement {:.2}%, |Δlogprob| ≤ 0.1 at {:.2}%; |Δ| p50 {:.4} p90 {:.4} p99 {:.4} max {:.4}",
            self.steps,
            100.0 * self.top1_agree as f64 / self.steps as f64,
            100.0 * self.close as f64 / self.steps as f64,
            self.quantile(0.5),
            self.quantile(0.9),
            self.quantile(0.99),
            self.quantile(1.0)
        );
    }
}

fn teacher_forcing(kv_type: KvType) -> Agreement {
    let model = berth_engine::model::load(&models::smollm2_gguf()).expect("load SmolLM2");
    let model = model.as_ref();
    let vocab = model.vocab_size();
    let golden = golden();
    let (mut steps, mut top1_agree, mut close) = (0usize, 0usize, 0usize);
    let mut diffs = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let greedy = case["greedy"].as_array().unwrap();
        let reference: Vec<u32> = greedy.iter().map(|s| s["id"].as_u64().unwrap() as u32).collect();
        // As llama.cpp produced the reference: the prompt in one step, then one token per step.
        let mut cache = SequenceCache::with_kv_type(model, kv_type).expect("cache");
        let mut logits = cache.forward(model, &prompt, false).expect("forward");
        for &t in &reference[..reference.len().saturating_sub(1)] {
            logits.extend(cache.forward(model, &[t], false).expect("forward"));
        }
        for (i, step) in greedy.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
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
    Agreement { steps, top1_agree, close, diffs }
}

#[test]
fn teacher_forcing_agrees_with_llama_cpp() {
    let a = teacher_forcing(KvType::F16);
    a.report("teacher forcing");
    // berth reproduces llama.cpp's arithmetic operation for operation (ARCHITECTURE.md, "Agreement
    // with llama.cpp"), so on the machine kind the reference was made on the two agree exactly;
    // the bounds are the issue's, loose enough for a CPU where llama.cpp takes other code paths.
    assert!(a.top1_agree as f64 >= 0.99 * a.steps as f64, "top-1 agreement below 99%");
    assert!(a.close as f64 >= 0.95 * a.steps as f64, "logprobs within 0.1 nats at fewer than 95% of steps");
}

/// What a q8_0 cache costs in agreement with llama.cpp's f16 cache (the figure ARCHITECTURE.md
/// reports): keys and values rounded to 8 bits per block of 32 move SmolLM2's logprobs by 0.03
/// nats at the median, 0.12 at p90, and change the top token at about 4% of steps (measured
/// 2026-12-03); the bounds leave room for other CPUs' rounding.
#[test]
fn a_q8_0_cache_stays_close_to_llama_cpp() {
    let a = teacher_forcing(KvType::Q8_0);
    a.report("teacher forcing, q8_0 KV cache");
    assert!(a.top1_agree as f64 >= 0.93 * a.steps as f64, "top-1 agreement below 93%");
    assert!(a.quantile(0.5) <= 0.06 && a.quantile(0.9) <= 0.25, "|Δlogprob| p50 above 0.06 or p90 above 0.25 nats");
    assert!(a.diffs.iter().any(|&d| d > 0.0), "a q8_0 cache that changes nothing was not used");
}

fn engine() -> Engine {
    Engine::load(&models::smollm2_gguf(), None).expect("load SmolLM2")
}

fn greedy_request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        stop_token_ids: vec![],
        logprobs: None,
        ignore_eos: false,
        constraint: None,
    }
}

#[test]
fn free_running_greedy_matches_llama_cpp_for_20_tokens() {
    let engine = engine();
    let mut matching = Vec::new();
    for case in golden()["cases"].as_array().unwrap() {
        let want: Vec<u32> = case["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_u64().unwrap() as u32)
            .take_while(|&id| id != 2)
            .take(20)
            .collect();
        let out = engine.generate(&greedy_request(ids(&case["prompt_ids"]), 20), &mut |_| true).unwrap();
        let same = out.tokens == want;
        eprintln!("{:<18} {}", case["name"].as_str().unwrap(), if same { "same" } else { "differs" });
        if same {
            matching.push(case["name"].clone());
        }
    }
    assert!(matching.len() >= 8, "only {} of 10 cases match llama.cpp's first 20 greedy tokens", matching.len());
}

#[test]
fn seeded_sampling_is_reproducible_and_stop_strings_cut_exactly() {
    let engine = engine();
    let prompt = engine.chat_prompt(&[Message::new("user", "Tell me a short story about a cat.")]).unwrap();
    let sampled = |seed| {
        let req = GenerationRequest {
            sampling: SamplingParams { temperature: 0.9, seed: Some(seed), ..SamplingParams::default() },
            logprobs: Some(5),
            ..greedy_request(prompt.clone(), 24)
        };
        engine.generate(&req, &mut |_| true).unwrap()
    };
    let (a, b, c) = (sampled(7), sampled(7), sampled(8));
    assert_eq!(a.tokens, b.tokens, "same seed, same output");
    assert_ne!(a.tokens, c.tokens, "another seed, another output");
    for lp in &a.logprobs {
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "top logprobs sorted");
        assert!(lp.logprob <= 0.0 && lp.top.iter().all(|t| t.1 <= 0.0));
    }

    let capital = engine.chat_prompt(&[Message::new("user", "What is the capital of France?")]).unwrap();
    let full = engine.generate(&greedy_request(capital.clone(), 30), &mut |_| true).unwrap();
    // Whatever the model says, cutting at a word from its own answer must end the text right there.
    let stop = full.text.split_whitespace().nth(3).expect("a few words").to_string();
    let stop = stop.as_str();
    let mut streamed = String::new();
    let req = GenerationRequest { stop: vec![stop.into()], ..greedy_request(capital, 30) };
    let cut = engine
        .generate(&req, &mut |ev| {
            streamed.push_str(&ev.text);
            true
        })
        .unwrap();
    assert_eq!(cut.finish, FinishReason::Stop);
    assert_eq!(cut.text, full.text[..full.text.find(stop).unwrap()], "the text ends right before the stop string");
    assert_eq!(streamed, cut.text, "the stream carries exactly the final text");
}
