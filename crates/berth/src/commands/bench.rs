use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use berth_engine::model::{Logits, SeqStep, SequenceCache};

use super::{Context, bench_serve};

/// Measure the engine on a local model (prefill and decode speed), or, with `--url`, load a running
/// OpenAI-compatible server with streamed completions and report latencies and throughput.
#[derive(clap::Args)]
pub struct Args {
    /// A local model (e.g. ai/smollm2) or a path to a .gguf file; with --url, the model's name on
    /// the server.
    model: String,
    /// Prompt length for the prefill measurement (llama-bench's pp); with --url, the synthetic
    /// prompts' length in tokens (approximately; the server's count is reported).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one at a time for the decode measurement (llama-bench's tg); with --url,
    /// each request's max_tokens (sent with ignore_eos).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Benchmark the server at this base URL (e.g. http://127.0.0.1:12480) instead of the engine.
    #[arg(long)]
    url: Option<String>,
    /// With --url: leading prompt tokens shared by every request of the run (to measure a server's
    /// prefix cache); the rest of each prompt is its own.
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// With --url: how many requests to send.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    requests: u32,
    /// With --url: requests in flight at most.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// With --url: send requests as a Poisson process of this many per second (default: as fast
    /// as --concurrency allows).
    #[arg(long)]
    rate: Option<f64>,
    /// With --url: seed of the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --url: the `response_format` every request sends (JSON, e.g. a `json_schema`), to measure
    /// structured output.
    #[arg(long, value_name = "JSON")]
    response_format: Option<String>,
    /// With --url: give up on a request after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Decode this many sequences at once (one batched forward pass per token), as a server does
    /// under load; decode speed is then the sum over the sequences.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// How the KV cache stores keys and values: f16 or q8_0 (llama-bench's -ctk/-ctv).
    #[arg(long, default_value = "f16")]
    kv_type: berth_engine::model::KvType,
    /// Measurements of each kind; the median is reported.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Worker threads (default: the physical cores available).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    /// Sequences decoded at once.
    batch: usize,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
}

/// Deterministic token ids spread over the vocabulary, skipping the first ids (control tokens).
fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (256 + (s >> 33) as usize % (vocab - 256)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    if let Some(url) = args.url.clone() {
        return run_against_server(url, args);
    }
    if let Some(n) = args.threads {
        berth_engine::set_threads(n.into())?;
    }
    let engine = super::load_engine(ctx, &args.model)?;
    let model = engine.model();
    let vocab = model.vocab_size();
    anyhow::ensure!(vocab > 512, "the model's vocabulary is too small to benchmark");
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= model.context_length() && args.repetitions > 0,
        "prompt and generated tokens must fit the context of {} tokens",
        model.context_length()
    );
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..args.repetitions {
        let prompt = tokens(args.prompt_tokens, vocab, rep as u64);
        let mut cache = SequenceCache::with_kv_type(model, args.kv_type)?;
        let t = Instant::now();
        for chunk in prompt.chunks(512) {
            cache.forward(model, chunk, false)?;
        }
        prefill.push(args.prompt_tokens as f64 / t.elapsed().as_secs_f64());

        let batch = args.batch as usize;
        let generated: Vec<Vec<u32>> =
            (0..batch).map(|b| tokens(args.gen_tokens, vocab, 1000 + (rep * batch + b) as u64)).collect();
        // Each sequence with its own blocks in one shared store, as the scheduler lays them out.
        let per_seq = engine.kv_blocks_for(args.gen_tokens);
        let mut pool = model.new_kv_pool(per_seq * batch, args.kv_type)?;
        let tables: Vec<Vec<u32>> =
            (0..batch).map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect()).collect();
        let t = Instant::now();
        for pos in 0..args.gen_tokens {
            let steps: Vec<SeqStep<'_>> = (0..batch)
                .map(|b| SeqStep {
                    blocks: &tables[b],
                    start: pos,
                    tokens: &generated[b][pos..pos + 1],
                    prompt_len: 0,
                    logits: Logits::Last,
                })
                .collect();
            model.forward(pool.as_mut(), &steps)?;
        }
        decode.push((args.gen_tokens * batch) as f64 / t.elapsed().as_secs_f64());
    }
    let report = Report {
        model: args.model,
        threads: berth_engine::threads(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        batch: args.batch as usize,
        prefill_tokens_per_second: median(prefill),
        decode_tokens_per_second: median(decode),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).context("report")?);
    } else {
        println!(
            "{}: {} threads, prefill pp{} {:.1} tokens/s, decode tg{}{} {:.1} tokens/s (median of {})",
            report.model,
            report.threads,
            report.prompt_tokens,
            report.prefill_tokens_per_second,
            report.gen_tokens,
            if report.batch > 1 { format!(" × {} sequences", report.batch) } else { String::new() },
            report.decode_tokens_per_second,
            args.repetitions
        );
    }
    Ok(())
}

fn run_against_server(url: String, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        url.starts_with("http://") || url.starts_with("https://"),
        "--url must start with http:// or https://, got {url:?}"
    );
    anyhow::ensure!(
        args.shared_prefix < args.prompt_tokens,
        "--shared-prefix ({}) must be smaller than --prompt-tokens ({})",
        args.shared_prefix,
        args.prompt_tokens
    );
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate.is_finite() && rate > 0.0, "--rate must be a positive number of requests per second");
    }
    let response_format = match &args.response_format {
        None => None,
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .context("--response-format must be JSON, e.g. '{\"type\": \"json_object\"}'")?,
        ),
    };
    let load = bench_serve::Load {
        url,
        model: args.model,
        requests: args.requests as usize,
        concurrency: args.concurrency as usize,
        rate: args.rate,
        prompt_tokens: args.prompt_tokens,
        shared_prefix: args.shared_prefix,
        gen_tokens: args.gen_tokens,
        seed: args.seed,
        timeout: std::time::Duration::from_secs(args.timeout.max(1)),
        response_format,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(bench_serve::run(load))?;
    if args.json {
        println!("{}", serde_json::to_string(&report).context("report")?);
    } else {
        report.print();
    }
    anyhow::ensure!(
        report.completed > 0,
        "no request completed: {}",
        report.error_samples.first().map(String::as_str).unwrap_or("no error recorded")
    );
    Ok(())
}
