//! `berth bench --url`: load a running OpenAI-compatible server (berth, llama-server, vLLM, …) with
//! streamed completions, at a fixed concurrency or at a Poisson rate, and report latencies and
//! throughput the way `vllm bench serve` does: time to first token (TTFT), time per output token
//! after the first (TPOT), inter-token latency (ITL), end-to-end latency, request and output-token
//! throughput, and errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::Semaphore;

/// What one run is asked to do.
pub struct Load {
    pub url: String,
    pub model: String,
    pub requests: usize,
    pub concurrency: usize,
    /// Requests per second (Poisson arrivals); `None` sends them as fast as `concurrency` allows.
    pub rate: Option<f64>,
    pub prompt_tokens: usize,
    /// Leading prompt tokens that every request of the run shares (a system prompt, say).
    pub shared_prefix: usize,
    pub gen_tokens: usize,
    pub seed: u64,
    pub timeout: Duration,
    /// Sent as each request's `response_format` (structured output).
    pub response_format: Option<serde_json::Value>,
}

/// One request's timings, as the client saw them.
#[derive(Default)]
struct Sample {
    ttft: Option<f64>,
    itl: Vec<f64>,
    e2e: f64,
    prompt_tokens: usize,
    output_tokens: usize,
}

#[derive(Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub requests: usize,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub completed: usize,
    pub errors: usize,
    /// The first few error messages, for diagnosis.
    pub error_samples: Vec<String>,
    pub duration_s: f64,
    pub mean_prompt_tokens: f64,
    pub mean_output_tokens: f64,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

/// Run the load and collect the report. Fails only if nothing could be sent at all.
pub async fn run(load: Load) -> anyhow::Result<Report> {
    berth_store::registry::install_crypto_provider();
    let client = reqwest::Client::builder().timeout(load.timeout).build().context("cannot create the HTTP client")?;
    let endpoint = format!("{}/v1/completions", load.url.trim_end_matches('/'));
    let prompts = Prompts::new(load.prompt_tokens, load.shared_prefix);
    let load = Arc::new(load);
    let slots = Arc::new(Semaphore::new(load.concurrency.max(1)));
    let mut rng = Lcg(load.seed);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(load.requests);
    let mut next_arrival = 0.0f64;
    for i in 0..load.requests {
        if let Some(rate) = load.rate {
            // Exponential gaps between arrivals: a Poisson process of `rate` requests per second.
            next_arrival += -(1.0 - rng.unit()).ln() / rate;
            let wait = next_arrival - start.elapsed().as_secs_f64();
            if wait > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
        }
        let permit = slots.clone().acquire_owned().await.context("the request slots closed")?;
        let (client, endpoint, load, prompt) = (client.clone(), endpoint.clone(), load.clone(), prompts.get(i));
        tasks.push(tokio::spawn(async move {
            let result = one_request(&client, &endpoint, &load, prompt).await;
            drop(permit);
            result
        }));
    }
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(sample)) => samples.push(sample),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("request task failed: {e}")),
        }
    }
    let duration = start.elapsed().as_secs_f64();
    Ok(summarise(&load, samples, errors, duration))
}

/// Words that byte-level BPE vocabularies keep as one token each (with their leading space).
const WORDS: [&str; 16] = [
    " hello", " world", " the", " and", " of", " to", " in", " is", " you", " that", " it", " for", " on", " with",
    " as", " are",
];

/// The prompts of one run: about `tokens` tokens each, the first `shared` of them the same for every
/// request, then a distinct opening (`Request N:`), then filler words. The words are drawn afresh
/// for every run, so no server can answer from a cache filled by an earlier run.
struct Prompts {
    run: u64,
    tokens: usize,
    shared: usize,
}

impl Prompts {
    fn new(tokens: usize, shared: usize) -> Self {
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self { run: clock.as_nanos() as u64 ^ u64::from(std::process::id()) << 32, tokens, shared }
    }

    fn words(&self, salt: u64, n: usize) -> String {
        let mut rng = Lcg(self.run ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        (0..n).map(|_| WORDS[(rng.unit() * WORDS.len() as f64) as usize % WORDS.len()]).collect()
    }

    fn get(&self, index: usize) -> String {
        let shared = self.words(u64::MAX, self.shared);
        let distinct = self.words(index as u64, self.tokens.saturating_sub(self.shared).saturating_sub(4));
        format!("{shared}Request {index}:{distinct}")
    }
}

async fn one_request(client: &reqwest::Client, endpoint: &str, load: &Load, prompt: String) -> anyhow::Result<Sample> {
    let mut body = serde_json::json!({
        "model": load.model,
        "prompt": prompt,
        "max_tokens": load.gen_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if let Some(format) = &load.response_format {
        // llama-server's /v1/completions takes a schema as `json_schema` (it reads `response_format`
        // on chat only), and berth reads that field too (and refuses a body that constrains twice):
        // a schema goes as `json_schema`, any other format as `response_format`.
        match format.pointer("/json_schema/schema") {
            Some(schema) => body["json_schema"] = schema.clone(),
            None => body["response_format"] = format.clone(),
        }
    }
    let start = Instant::now();
    let mut response = client
        .post(endpoint)
        .header("content-type", "application/json")
        // One connection per request, closed by both sides when it is done: llama-server closes
        // reused keep-alive connections after a stream, which failed the next request sent on one.
        .header("connection", "close")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("cannot reach {endpoint}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("HTTP {status}: {}", text.chars().take(300).collect::<String>());
    }
    let mut sample = Sample::default();
    let mut last_token_at = None;
    let mut pending = Vec::new();
    let mut done = false;
    while let Some(chunk) = response.chunk().await.context("the stream broke")? {
        pending.extend_from_slice(&chunk);
        // Server-sent events: one `data: …` line per event, separated by blank lines.
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let event: serde_json::Value = serde_json::from_str(data).context("an event is not JSON")?;
            if let Some(error) = event.get("error") {
                anyhow::bail!("the server reported an error mid-stream: {error}");
            }
            let text = event["choices"][0]["text"].as_str().unwrap_or("");
            if !text.is_empty() {
                let now = start.elapsed().as_secs_f64();
                match last_token_at {
                    None => sample.ttft = Some(now),
                    Some(prev) => sample.itl.push(now - prev),
                }
                last_token_at = Some(now);
            }
            if let Some(usage) = event.get("usage").filter(|u| !u.is_null()) {
                sample.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                sample.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
        }
    }
    anyhow::ensure!(done, "the stream ended without [DONE]");
    sample.e2e = start.elapsed().as_secs_f64();
    if sample.output_tokens == 0 {
        // Servers that do not report usage: count the streamed pieces instead.
        sample.output_tokens = sample.itl.len() + usize::from(sample.ttft.is_some());
    }
    Ok(sample)
}

fn summarise(load: &Load, samples: Vec<Sample>, errors: Vec<String>, duration: f64) -> Report {
    let ms = |v: Vec<f64>| percentiles(v.into_iter().map(|s| s * 1000.0).collect());
    let completed = samples.len();
    let output: usize = samples.iter().map(|s| s.output_tokens).sum();
    let prompt: usize = samples.iter().map(|s| s.prompt_tokens).sum();
    let per = |total: usize| if completed == 0 { 0.0 } else { total as f64 / completed as f64 };
    let tpot = samples
        .iter()
        .filter(|s| s.output_tokens > 1)
        .filter_map(|s| s.ttft.map(|t| (s.e2e - t) / (s.output_tokens - 1) as f64))
        .collect();
    Report {
        url: load.url.clone(),
        model: load.model.clone(),
        requests: load.requests,
        concurrency: load.concurrency,
        rate: load.rate,
        completed,
        errors: errors.len(),
        error_samples: errors.into_iter().take(5).collect(),
        duration_s: duration,
        mean_prompt_tokens: per(prompt),
        mean_output_tokens: per(output),
        request_throughput: completed as f64 / duration,
        output_token_throughput: output as f64 / duration,
        ttft_ms: ms(samples.iter().filter_map(|s| s.ttft).collect()),
        tpot_ms: ms(tpot),
        itl_ms: ms(samples.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        e2e_ms: ms(samples.iter().map(|s| s.e2e).collect()),
    }
}

/// Mean and nearest-rank percentiles (zeros for no data).
fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles { mean: 0.0, p50: 0.0, p90: 0.0, p99: 0.0 };
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles { mean: v.iter().sum::<f64>() / v.len() as f64, p50: at(50.0), p90: at(90.0), p99: at(99.0) }
}

impl Report {
    /// The human-readable table.
    pub fn print(&self) {
        println!("{} at {}", self.model, self.url);
        let mode = match self.rate {
            Some(r) => format!("Poisson arrivals at {r} requests/s, at most {} at once", self.concurrency),
            None => format!("concurrency {}", self.concurrency),
        };
        println!(
            "{} requests, {mode}: {} completed, {} failed, {:.2} s",
            self.requests, self.completed, self.errors, self.duration_s
        );
        for e in &self.error_samples {
            println!("  error: {e}");
        }
        println!(
            "mean prompt tokens {:.1}, mean output tokens {:.1}",
            self.mean_prompt_tokens, self.mean_output_tokens
        );
        println!(
            "throughput: {:.2} requests/s, {:.1} output tokens/s",
            self.request_throughput, self.output_token_throughput
        );
        println!("{:<10} {:>10} {:>10} {:>10} {:>10}", "ms", "mean", "p50", "p90", "p99");
        for (name, p) in
            [("TTFT", &self.ttft_ms), ("TPOT", &self.tpot_ms), ("ITL", &self.itl_ms), ("E2E", &self.e2e_ms)]
        {
            println!("{name:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1}", p.mean, p.p50, p.p90, p.p99);
        }
    }
}

/// A small deterministic generator for arrival times (reproducible with `--seed`).
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(p.mean, 50.5);
        let one = percentiles(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn prompts_differ_from_the_first_token_and_between_runs() {
        let run = Prompts::new(64, 0);
        assert!(run.get(1).starts_with("Request 1:") && run.get(2).starts_with("Request 2:"));
        assert_eq!(run.get(3).matches(' ').count(), 61);
        let again = Prompts { run: run.run + 1, ..Prompts::new(64, 0) };
        assert_ne!(run.get(1), again.get(1), "another run, other words");
        let shared = Prompts::new(64, 20);
        let (a, b) = (shared.get(1), shared.get(2));
        assert_eq!(a[..a.find("Request").unwrap()], b[..b.find("Request").unwrap()]);
        assert_eq!(a.find("Request"), Some(a[..a.find("Request").unwrap()].len()));
        assert_eq!(a[..a.find("Request").unwrap()].matches(' ').count(), 20);
    }
}
