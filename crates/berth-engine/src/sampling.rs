//! Choosing the next token: logit bias, repetition/presence/frequency penalties, then greedy or
//! temperature sampling truncated by top-k, top-p and min-p. Seeded sampling is reproducible.

use std::collections::HashMap;

use crate::error::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Multiplicative penalty on tokens seen in the last `repeat_last_n` tokens (1 = off).
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's additive penalties, over all generated tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Check ranges; the error names the parameter.
    pub fn validate(&self, vocab_size: usize) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Sampling(m));
        // The ranges OpenAI documents, which every berth API uses (see crate::request).
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature.is_nan() {
            return bad(format!("temperature must be between 0 and 2, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty >= 0.01 && self.repeat_penalty <= 10.0) {
            return bad(format!("repeat_penalty must be between 0.01 and 10, got {}", self.repeat_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        for &(t, b) in &self.logit_bias {
            if t as usize >= vocab_size {
                return bad(format!("logit_bias names token {t}, outside the vocabulary of {vocab_size}"));
            }
            if !(-100.0..=100.0).contains(&b) {
                return bad(format!("logit_bias values must be between -100 and 100, got {b}"));
            }
        }
        Ok(())
    }
}

/// A token's log-probability and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// xoshiro256** — small, fast, and reproducible across platforms.
#[derive(Debug, Clone)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Per-sequence sampling state.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    history: Vec<u32>,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            (t as u64) ^ ((std::process::id() as u64) << 32)
        });
        Self { params, rng: Rng::new(seed), history: Vec::new(), counts: HashMap::new() }
    }

    /// Tokens that count for the repetition penalty before any are generated (the prompt).
    pub fn with_history(mut self, prompt: &[u32]) -> Self {
        let n = self.params.repeat_last_n;
        self.history.extend_from_slice(&prompt[prompt.len().saturating_sub(n)..]);
        self
    }

    /// Pick the next token from `logits` (modified in place by bias and penalties). With
    /// `logprobs = Some(n)`, also report the chosen token's log-probability and the top `n`.
    pub fn sample(&mut self, logits: &mut [f32], logprobs: Option<usize>) -> (u32, Option<TokenLogprob>) {
        self.adjust(logits);
        let token = self.choose(logits);
        (token, logprobs.map(|n| log_probs(logits, token, n)))
    }

    /// Apply the logit bias and the repetition penalties to `logits`.
    pub fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repeat_penalty != 1.0 {
            let window = &self.history[self.history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = window.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Pick a token from adjusted `logits` and remember it for the penalties.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.sample_random(logits) };
        self.history.push(token);
        *self.counts.entry(token).or_default() += 1;
        token
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let likelier = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = if p.top_k == 0 { cand.len() } else { p.top_k.min(cand.len()) };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, likelier);
            cand.truncate(k);
        }
        // Probabilities at temperature 1 over the top-k decide top-p and min-p, as llama.cpp's
        // sampler chain does before the temperature step.
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let weight = |c: &(u32, f32)| ((c.1 - max) as f64).exp();
        let sum: f64 = cand.iter().map(weight).sum();
        if p.min_p > 0.0 {
            // Tokens at least min_p times as likely as the likeliest: a filter that needs no order.
            let floor = (1.0 / sum) * p.min_p as f64;
            cand.retain(|c| weight(c) / sum >= floor);
        }
        if p.top_p < 1.0 {
            // The smallest set of likeliest tokens reaching top_p: sort only as many as it takes,
            // growing the sorted prefix until it does (a whole vocabulary sort costs milliseconds).
            let mut sorted = 256.min(cand.len());
            loop {
                if sorted < cand.len() {
                    cand.select_nth_unstable_by(sorted - 1, likelier);
                }
                cand[..sorted].sort_by(likelier);
                let mut acc = 0.0;
                let cut = cand[..sorted].iter().position(|c| {
                    acc += weight(c) / sum;
                    acc >= p.top_p as f64
                });
                if let Some(i) = cut {
                    cand.truncate(i + 1);
                    break;
                }
                if sorted == cand.len() {
                    break;
                }
                sorted = (sorted * 8).min(cand.len());
            }
        }
        if cand.is_empty() {
            // Only with NaN logits (a broken model): fall back to the first best.
            return argmax(logits);
        }
        let t = p.temperature as f64;
        let weights: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64 / t).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (c, w) in cand.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of the logits: the chosen token's value and the top `n`.
pub fn log_probs(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |l: f32| ((l as f64 - lse) as f32).min(0.0);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    }
    idx.truncate(n);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    TokenLogprob {
        token,
        logprob: lp(logits[token as usize]),
        top: idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_takes_the_largest() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let mut l = logits();
        let best = argmax(&l);
        assert_eq!(s.sample(&mut l, None).0, best);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params =
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(42), ..Default::default() };
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&mut logits(), None).0).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 3, "sampling varies: {a:?}");
        let other = Sampler::new(SamplingParams { seed: Some(43), ..params.clone() });
        let mut other = other;
        let b: Vec<u32> = (0..50).map(|_| other.sample(&mut logits(), None).0).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn top_k_one_is_greedy_and_bias_steers() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.5, top_k: 1, seed: Some(1), ..Default::default() });
        let mut l = logits();
        assert_eq!(s.sample(&mut l, None).0, argmax(&logits()));
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(5, 100.0)], ..SamplingParams::greedy() });
        assert_eq!(s.sample(&mut logits(), None).0, 5);
    }

    /// top-p and min-p keep exactly the likeliest tokens they should, over a vocabulary large
    /// enough that the sorted prefix has to grow.
    #[test]
    fn top_p_and_min_p_keep_the_likeliest_tokens() {
        // Token i has logit -i/1000: probabilities fall slowly, so top-p 0.5 needs ~700 tokens.
        let vocab = 50_000;
        let logits: Vec<f32> = (0..vocab).map(|i| -(i as f32) / 1000.0).collect();
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let nucleus = weights.iter().position(|w| {
            acc += w / total;
            acc >= 0.5
        });
        let nucleus = nucleus.unwrap() as u32;
        assert!(nucleus > 256, "the nucleus is larger than the first sorted prefix");
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: Some(3),
            ..Default::default()
        });
        let mut highest = 0;
        for _ in 0..400 {
            let (t, _) = s.sample(&mut logits.clone(), None);
            assert!(t <= nucleus, "token {t} is outside the top-p set (last {nucleus})");
            highest = highest.max(t);
        }
        assert!(highest > nucleus / 2, "samples spread over the set");
        // min-p 0.5: only tokens with logit within ln 2 of the best (i/1000 <= 0.693, so i <= 693).
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: Some(4),
            ..Default::default()
        });
        for _ in 0..200 {
            let (t, _) = s.sample(&mut logits.clone(), None);
            assert!(t <= 693, "token {t} is below min-p");
        }
    }

    #[test]
    fn penalties_discourage_repeats() {
        let mut s =
            Sampler::new(SamplingParams { frequency_penalty: 2.0, presence_penalty: 2.0, ..SamplingParams::greedy() });
        let flat = vec![1.0f32; 4];
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(s.sample(&mut flat.clone(), None).0);
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3], "each token once before any repeats");
    }

    #[test]
    fn logprobs_are_sorted_and_not_positive() {
        let l = logits();
        let lp = log_probs(&l, 3, 5);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.top.iter().all(|&(_, v)| v <= 0.0) && lp.logprob <= 0.0);
        let total: f64 = l.iter().map(|&x| (log_probs(&l, 0, 0).logprob as f64 + (x - l[0]) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4);
    }

    #[test]
    fn parameters_are_checked() {
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate(10).is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate(10).is_err());
        assert!(SamplingParams { logit_bias: vec![(10, 1.0)], ..Default::default() }.validate(10).is_err());
        assert!(SamplingParams::default().validate(10).is_ok());
    }
}
