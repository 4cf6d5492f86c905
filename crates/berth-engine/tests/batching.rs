//! The scheduler on the real SmolLM2 model: batching, chunked prefill, preemption and the prefix
//! cache must not change a single token, and every way a sequence can end gives its blocks back.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use berth_engine::sampling::SamplingParams;
use berth_engine::scheduler::{Scheduler, SchedulerConfig, SchedulerStats, TokenSink};
use berth_engine::{Engine, EngineError, FinishReason, GenerationOutput, GenerationRequest, TokenEvent};
use berth_testkit::models;
use serde_json::Value;

fn engine() -> Engine {
    Engine::load(&models::smollm2_gguf(), None).expect("load SmolLM2")
}

fn golden_prompts() -> Vec<Vec<u32>> {
    let path = models::golden_dir().join("smollm2-q4_1.llamacpp.json");
    let golden: Value = serde_json::from_slice(&std::fs::read(path).expect("golden file")).expect("golden JSON");
    golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["prompt_ids"].as_array().expect("ids").iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        logprobs: None,
        ignore_eos: false,
        constraint: None,
    }
}

type Results = Rc<RefCell<Vec<Option<Result<GenerationOutput, EngineError>>>>>;

/// Keeps each sequence's end in a shared list; closes after `hang_up_after` tokens, like a
/// client that goes away.
struct Keep {
    index: usize,
    results: Results,
    tokens: usize,
    hang_up_after: Option<usize>,
}

impl TokenSink for Keep {
    fn token(&mut self, event: &TokenEvent) -> bool {
        self.tokens += usize::from(event.token.is_some());
        true
    }

    fn finish(&mut self, result: Result<GenerationOutput, EngineError>) {
        self.results.borrow_mut()[self.index] = Some(result);
    }

    fn is_closed(&self) -> bool {
        self.hang_up_after.is_some_and(|n| self.tokens >= n)
    }
}

fn config(kv_blocks: usize, max_batch_tokens: usize, prefix_cache: bool) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens,
        max_running: 16,
        kv_blocks,
        prefix_cache,
        kv_type: Default::default(),
        speculation: true,
        draft_cost: None,
        target: Some(Default::default()),
    }
}

/// Run `requests` through one scheduler; request `i` is submitted before step `arrivals[i]`.
fn run_batched(
    engine: &Engine,
    config: SchedulerConfig,
    requests: &[GenerationRequest],
    arrivals: &[usize],
) -> (Vec<Result<GenerationOutput, EngineError>>, std::sync::Arc<SchedulerStats>) {
    let results: Results = Rc::new(RefCell::new((0..requests.len()).map(|_| None).collect()));
    let mut scheduler = Scheduler::new(engine, config).expect("scheduler");
    let mut step = 0;
    loop {
        for (i, req) in requests.iter().enumerate().filter(|&(i, _)| arrivals[i] == step) {
            let sink = Keep { index: i, results: results.clone(), tokens: 0, hang_up_after: None };
            scheduler.submit(req.clone(), Box::new(sink), None);
        }
        let more_to_come = arrivals.iter().any(|&a| a > step);
        if scheduler.is_idle() && !more_to_come {
            break;
        }
        scheduler.step();
        step += 1;
        assert!(step < 100_000, "the scheduler did not finish");
    }
    let stats = scheduler.stats();
    drop(scheduler);
    let out = results.borrow_mut().iter_mut().map(|r| r.take().expect("every request ended")).collect();
    (out, stats)
}

fn tokens_of(results: &[Result<GenerationOutput, EngineError>]) -> Vec<Vec<u32>> {
    results.iter().map(|r| r.as_ref().expect("generation").tokens.clone()).collect()
}

#[test]
fn batched_greedy_answers_equal_the_answers_alone() {
    let engine = engine();
    let requests: Vec<GenerationRequest> = golden_prompts().into_iter().map(|p| greedy(p, 24)).collect();
    let alone: Vec<Vec<u32>> =
        requests.iter().map(|r| engine.generate(r, &mut |_| true).expect("alone").tokens).collect();
    let n = requests.len();

    // All at once, prompts in chunks of at most 32 tokens mixed with the others' decodes.
    let (all, stats) = run_batched(&engine, config(1024, 32, false), &requests, &vec![0; n]);
    assert_eq!(tokens_of(&all), alone, "all at once");
    assert!(stats.steps.load(Ordering::Relaxed) < (n * 24) as u64, "the sequences shared steps");

    // Staggered: one new request every third step, joining running ones mid-answer.
    let arrivals: Vec<usize> = (0..n).map(|i| i * 3).collect();
    let (staggered, _) = run_batched(&engine, config(1024, 48, false), &requests, &arrivals);
    assert_eq!(tokens_of(&staggered), alone, "staggered arrivals");

    // A pool too small for all of them: sequences are preempted and recomputed, answers unchanged.
    let (tight, stats) = run_batched(&engine, config(12, 64, true), &requests, &vec![0; n]);
    assert_eq!(tokens_of(&tight), alone, "with preemption");
    assert!(stats.preemptions.load(Ordering::Relaxed) > 0, "the small pool forced preemptions");
    assert_eq!(stats.kv_blocks_used.load(Ordering::Relaxed), 0, "every block came back");
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let engine = engine();
    // A 1,000-token "system prompt" shared by two requests with different questions.
    let text = "Berth packages models as OCI artifacts, runs them with a native engine and serves them. ";
    let mut prefix = engine.text_prompt(&text.repeat(60)).expect("tokens");
    prefix.truncate(1000);
    let ask = |q: &str| {
        let mut p = prefix.clone();
        p.extend(engine.tokenizer().encode(q, false).expect("tokens"));
        greedy(p, 16)
    };
    let (first, second) = (ask(" What does berth run?"), ask(" How are models packaged?"));
    let results: Results = Rc::new(RefCell::new(vec![None, None]));
    let mut scheduler = Scheduler::new(&engine, config(512, 256, true)).expect("scheduler");
    let stats = scheduler.stats();
    let mut run = |req: &GenerationRequest, index| {
        let before = stats.prefill_tokens.load(Ordering::Relaxed);
        let sink = Keep { index, results: results.clone(), tokens: 0, hang_up_after: None };
        scheduler.submit(req.clone(), Box::new(sink), None);
        while !scheduler.is_idle() {
            scheduler.step();
        }
        stats.prefill_tokens.load(Ordering::Relaxed) - before
    };
    let cold = run(&first, 0);
    let warm = run(&second, 1);
    let shared_blocks = 1000 / 16;
    assert_eq!(cold as usize, first.prompt.len(), "the first request computes its whole prompt");
    assert_eq!(warm as usize, second.prompt.len() - shared_blocks * 16, "the second computes only its suffix");
    let out = results.borrow_mut()[1].take().expect("ended").expect("generation");
    assert_eq!(out.cached_tokens, shared_blocks * 16);
    assert_eq!(stats.prefix_hit_tokens.load(Ordering::Relaxed) as usize, shared_blocks * 16);
    assert_eq!(stats.prefix_queried_tokens.load(Ordering::Relaxed) as usize, first.prompt.len() + second.prompt.len());
    // The answer from cached blocks is the answer computed from scratch.
    let fresh = engine.generate(&second, &mut |_| true).expect("alone");
    assert_eq!(out.tokens, fresh.tokens);
    eprintln!("prefix cache: cold request computed {cold} prompt tokens, warm request {warm}");
}

#[test]
fn hang_ups_and_time_limits_free_every_block() {
    let engine = engine();
    let prompts = golden_prompts();
    let results: Results = Rc::new(RefCell::new((0..=prompts.len()).map(|_| None).collect()));
    let mut scheduler = Scheduler::new(&engine, config(256, 64, true)).expect("scheduler");
    let stats = scheduler.stats();
    for (i, p) in prompts.iter().enumerate() {
        // Every client hangs up after three tokens of a long answer.
        let sink = Keep { index: i, results: results.clone(), tokens: 0, hang_up_after: Some(3) };
        let req = GenerationRequest { ignore_eos: true, ..greedy(p.clone(), 400) };
        scheduler.submit(req, Box::new(sink), None);
    }
    // One more whose time is already up while it waits.
    let sink = Keep { index: prompts.len(), results: results.clone(), tokens: 0, hang_up_after: None };
    scheduler.submit(greedy(prompts[0].clone(), 8), Box::new(sink), Some(Instant::now()));
    let mut steps = 0;
    while !scheduler.is_idle() {
        scheduler.step();
        steps += 1;
        assert!(steps < 200, "hung-up sequences kept running");
    }
    assert_eq!(stats.kv_blocks_used.load(Ordering::Relaxed), 0, "every block came back");
    assert_eq!(stats.running.load(Ordering::Relaxed), 0);
    let results = results.borrow();
    for r in &results[..prompts.len()] {
        let out = r.as_ref().expect("ended").as_ref().expect("cancelled, not failed");
        assert_eq!(out.finish, FinishReason::Cancelled);
        assert!(out.tokens.len() <= 4, "at most one step after the hang-up: {}", out.tokens.len());
    }
    match results[prompts.len()].as_ref().expect("ended") {
        Err(EngineError::TimedOut(_)) => {}
        other => panic!("expected a time-out, got {other:?}"),
    }
}

#[test]
fn requests_larger_than_the_cache_are_refused_or_cut() {
    let engine = engine();
    let prompt: Vec<u32> = golden_prompts().concat().into_iter().cycle().take(100).collect();
    // 4 blocks hold 64 tokens: a 100-token prompt can never run.
    let (out, _) = run_batched(&engine, config(4, 64, true), &[greedy(prompt.clone(), 8)], &[0]);
    match &out[0] {
        Err(e @ EngineError::KvCacheTooSmall { .. }) => assert!(e.to_string().contains("--kv-cache"), "{e}"),
        other => panic!("expected a clear refusal, got {other:?}"),
    }
    // A 40-token prompt fits, and its answer stops where the pool ends.
    let req = GenerationRequest { ignore_eos: true, ..greedy(prompt[..40].to_vec(), 100) };
    let (out, stats) = run_batched(&engine, config(4, 64, true), &[req], &[0]);
    let out = out[0].as_ref().expect("generation");
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(40 + out.tokens.len(), 64 + 1, "every cached position used, the last token never fed back");
    assert_eq!(stats.kv_blocks_used.load(Ordering::Relaxed), 0);
}
