//! Prompt-lookup speculation on the real SmolLM2 model: answers with guessing on are the answers
//! with it off, token for token and logprob for logprob — greedy, and sampled with a seed and
//! penalties — alone and batched, while guesses are really made and kept.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use berth_engine::sampling::SamplingParams;
use berth_engine::scheduler::{Scheduler, SchedulerConfig, SchedulerStats, TokenSink};
use berth_engine::{Engine, EngineError, GenerationOutput, GenerationRequest, TokenEvent};
use berth_testkit::models;

/// Passages a small model continues by copying what it read: the work prompt lookup is for.
const PASSAGES: [&str; 3] = [
    "The lighthouse keeper climbed the narrow stairs every evening at dusk, lit the great lamp, \
     and wrote the weather in his logbook before the ships came past the rocks.",
    "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\nfn sub(a: i32, b: i32) -> i32 {\n    a - b\n}\n",
    "Monday: buy milk, eggs and bread. Tuesday: call the plumber about the kitchen sink. \
     Wednesday: return the library books.",
];

fn prompts(engine: &Engine) -> Vec<Vec<u32>> {
    PASSAGES
        .iter()
        .map(|p| {
            let head: String = p.chars().take(30).collect();
            let text = format!("Text:\n{p}\n\nThe same text again:\n{p}\n\nAnd once more:\n{head}");
            engine.tokenizer().encode(&text, false).expect("tokenize")
        })
        .collect()
}

fn request(prompt: Vec<u32>, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens: 40,
        sampling,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        logprobs: Some(3),
        ignore_eos: false,
        constraint: None,
    }
}

fn config(speculation: bool) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: 256,
        max_running: 8,
        kv_blocks: 512,
        prefix_cache: true,
        kv_type: Default::default(),
        speculation,
        draft_cost: None,
        target: Some(Default::default()),
    }
}

type Results = Rc<RefCell<Vec<Option<Result<GenerationOutput, EngineError>>>>>;

struct Keep {
    index: usize,
    results: Results,
}

impl TokenSink for Keep {
    fn token(&mut self, _: &TokenEvent) -> bool {
        true
    }

    fn finish(&mut self, result: Result<GenerationOutput, EngineError>) {
        self.results.borrow_mut()[self.index] = Some(result);
    }
}

/// Run the requests through one scheduler, together (`together`) or one after another.
fn run(
    engine: &Engine,
    speculation: bool,
    requests: &[GenerationRequest],
    together: bool,
) -> (Vec<GenerationOutput>, Arc<SchedulerStats>) {
    let results: Results = Rc::new(RefCell::new((0..requests.len()).map(|_| None).collect()));
    let mut scheduler = Scheduler::new(engine, config(speculation)).expect("scheduler");
    let submit = |scheduler: &mut Scheduler<'_, '_>, i: usize| {
        scheduler.submit(requests[i].clone(), Box::new(Keep { index: i, results: results.clone() }), None);
    };
    let drain = |scheduler: &mut Scheduler<'_, '_>| {
        let mut steps = 0;
        while !scheduler.is_idle() {
            scheduler.step();
            steps += 1;
            assert!(steps < 10_000, "the scheduler did not finish");
        }
    };
    if together {
        (0..requests.len()).for_each(|i| submit(&mut scheduler, i));
        drain(&mut scheduler);
    } else {
        for i in 0..requests.len() {
            submit(&mut scheduler, i);
            drain(&mut scheduler);
        }
    }
    let stats = scheduler.stats();
    drop(scheduler);
    let out = results.borrow_mut().iter_mut().map(|r| r.take().expect("ended").expect("generated")).collect();
    (out, stats)
}

fn same_answers(with: &[GenerationOutput], without: &[GenerationOutput], what: &str) {
    for (i, (a, b)) in with.iter().zip(without).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{what}, request {i}: tokens");
        assert_eq!(a.text, b.text, "{what}, request {i}: text");
        assert_eq!(a.finish, b.finish, "{what}, request {i}: finish");
        assert_eq!(a.logprobs.len(), b.logprobs.len(), "{what}, request {i}: logprobs");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert_eq!(x.token, y.token, "{what}, request {i}");
            assert_eq!(x.logprob.to_bits(), y.logprob.to_bits(), "{what}, request {i}: logprob of {}", x.token);
            assert_eq!(x.top, y.top, "{what}, request {i}: alternatives");
        }
    }
}

#[test]
fn guessing_ahead_never_changes_an_answer() {
    let engine = Engine::load(&models::smollm2_gguf(), None).expect("load SmolLM2");
    let sampled = SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        repeat_penalty: 1.1,
        frequency_penalty: 0.2,
        seed: Some(7),
        ..Default::default()
    };
    let mut requests: Vec<GenerationRequest> =
        prompts(&engine).into_iter().map(|p| request(p, SamplingParams::greedy())).collect();
    requests.extend(prompts(&engine).into_iter().map(|p| request(p, sampled.clone())));

    for together in [false, true] {
        let what = if together { "batched" } else { "one at a time" };
        let (with, stats) = run(&engine, true, &requests, together);
        let (without, off) = run(&engine, false, &requests, together);
        same_answers(&with, &without, what);
        assert_eq!(off.drafted_tokens.load(Ordering::Relaxed), 0, "{what}: off means no guesses");
        let drafted = stats.drafted_tokens.load(Ordering::Relaxed);
        let accepted = stats.accepted_tokens.load(Ordering::Relaxed);
        eprintln!(
            "{what}: {drafted} tokens guessed, {accepted} kept; {} steps with guessing, {} without",
            stats.steps.load(Ordering::Relaxed),
            off.steps.load(Ordering::Relaxed)
        );
        if !together {
            // A lone stream copying text: guesses are made, most are kept, and steps are saved.
            assert!(accepted > 0 && accepted * 2 >= drafted, "{accepted} of {drafted} guesses kept");
            assert!(stats.steps.load(Ordering::Relaxed) < off.steps.load(Ordering::Relaxed));
        }
    }
}
