//! Continuous batching: many sequences share one model, one forward pass per step.
//!
//! Each step
//! 1. drops sequences nobody waits for any more (client gone, time limit passed), freeing their blocks;
//! 2. gives every running sequence that is generating its next token — decodes go first;
//! 3. admits waiting sequences in arrival order (FIFO) while the running set, the free cache blocks
//!    and the pace allow; a sequence that does not fit holds the line, so a large request is never
//!    overtaken for ever by small ones;
//! 4. fills the step with prompt chunks of running sequences, oldest first (chunked prefill), up to
//!    the token budget (`max_batch_tokens`) and, when streams share the step, a time limit learned
//!    from the steps already run ([`pacing`]), so a new prompt slows the running streams by a bounded
//!    share instead of stalling them;
//! 5. runs all of it as one batched forward pass, samples, streams, and retires finished sequences.
//!
//! The KV cache is a fixed pool of blocks ([`blocks::BlockPool`]): a sequence is admitted only with
//! blocks for its whole prompt; generating takes one block per [`BLOCK_TOKENS`] tokens. When a
//! generating sequence finds the pool empty, the most recently admitted sequence is preempted: its
//! blocks are freed and it waits at the front of the queue, to be recomputed (its prompt blocks
//! usually still in the prefix cache) and continued where it stopped. Memory never grows past the
//! pool; a request too large for the whole pool is refused when it arrives.
//!
//! Batching does not change answers: every token's arithmetic depends only on its own sequence
//! (see [`crate::model::SeqStep::prompt_len`]).

pub mod blocks;
pub mod pacing;
mod runner;
mod sequence;
pub mod speculation;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use self::blocks::BlockPool;
use self::pacing::{Pacer, StepShape, StepTarget};
use self::sequence::Sequence;
use crate::error::EngineError;
use crate::generate::Engine;
use crate::model::{BLOCK_TOKENS, KvPool, KvType, Logits, SeqStep, blocks_for};
use crate::request::{FinishReason, GenerationRequest};

pub use runner::{Runner, RunnerConfig};

/// Most tokens a generating sequence puts through one step: its sampled token and those a grammar
/// forced after it. More pending than that (a preempted sequence coming back) is a prompt chunk.
const MAX_DECODE_TOKENS: usize = crate::constraint::MAX_FORCED_TOKENS + 1;
pub use sequence::TokenSink;

/// Prompt tokens a step with generating sequences takes at least (when any prompt waits), so
/// prompts move however tight the time target.
const MIN_PROMPT_CHUNK: usize = BLOCK_TOKENS;

/// Limits of one model's scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens one step may run (decodes plus prompt chunks): the size of a prompt-only step. A
    /// step that also carries generating sequences is sized by time (`target`).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Cache blocks in the pool (see [`Engine::kv_blocks_for`]).
    pub kv_blocks: usize,
    /// Reuse the cached blocks of a shared prompt prefix.
    pub prefix_cache: bool,
    /// How the cache stores keys and values.
    pub kv_type: KvType,
    /// Guess generating sequences' next tokens from their own text and verify the guesses in the
    /// step (see [`speculation`]); answers are the same either way.
    pub speculation: bool,
    /// The price of one guessed token as a share of a step's time per stream, in place of the one
    /// the step-cost fit gives; `None` in use. (Tests fix it: a shared machine's load must not
    /// decide whether a test's stream guesses.)
    pub draft_cost: Option<f64>,
    /// What steps that carry generating sequences aim for (see [`pacing`]); `None` sizes every
    /// step by `max_batch_tokens` alone and runs as many sequences as fit.
    pub target: Option<StepTarget>,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::BadConfig(m));
        if self.max_running == 0 || self.max_running > 4096 {
            return bad(format!("max running sequences must be between 1 and 4096, got {}", self.max_running));
        }
        if self.max_batch_tokens < self.max_running || self.max_batch_tokens > 65536 {
            return bad(format!(
                "max batch tokens must be at least the running sequences ({}) and at most 65536, got {}",
                self.max_running, self.max_batch_tokens
            ));
        }
        if self.kv_blocks == 0 {
            return bad("the KV cache must hold at least one block".into());
        }
        if let Some(t) = &self.target
            && (t.itl.is_zero() || !(0.0..=100.0).contains(&t.prompt_share) || !(0.0..1.0).contains(&t.min_batch_gain))
        {
            return bad(format!(
                "the step target must have a positive time, a share of 0 to 100 and a gain below 1: {t:?}"
            ));
        }
        Ok(())
    }
}

/// Live figures of a scheduler, read by metrics and `berth ps` while it runs.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    /// Waiting sequences, preempted ones included.
    pub waiting: AtomicUsize,
    /// Waiting sequences never admitted yet (what `max_queue` bounds).
    pub queued: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Prompt tokens run through the model (recomputation after preemption included).
    pub prefill_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Wall time of steps (forward pass, sampling, streaming), in nanoseconds.
    pub step_nanos: AtomicU64,
    /// Time constrained sequences spent computing their grammars' masks, summed over sequences
    /// (ns; they run in parallel with each other's sampling, so this bounds the wall time).
    pub mask_nanos: AtomicU64,
    /// Steps whose prompt work was cut short to keep the running streams' pace.
    pub paced_steps: AtomicU64,
    /// Steps in which a waiting sequence was held back although it might have fit: one more
    /// stream would have slowed every stream without raising throughput.
    pub pace_holds: AtomicU64,
    /// Tokens guessed ahead and verified, and those of them kept ([`speculation`]).
    pub drafted_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
}

impl SchedulerStats {
    /// Share of the KV cache held by sequences, 0 to 1.
    pub fn kv_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Ordering::Relaxed);
        if total == 0 { 0.0 } else { self.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64 }
    }
}

pub struct Scheduler<'e, 's> {
    engine: &'e Engine,
    config: SchedulerConfig,
    /// The model's cache blocks (owned by its backend; the scheduler hands out their numbers).
    store: Box<dyn KvPool>,
    pool: BlockPool,
    waiting: VecDeque<Sequence<'s>>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<Sequence<'s>>,
    /// What steps cost on this machine, and what they aim for (when they aim for anything).
    pacer: Option<Pacer>,
    stats: Arc<SchedulerStats>,
}

impl<'e, 's> Scheduler<'e, 's> {
    pub fn new(engine: &'e Engine, config: SchedulerConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let stats = Arc::new(SchedulerStats::default());
        stats.kv_blocks_total.store(config.kv_blocks, Ordering::Relaxed);
        Ok(Self {
            engine,
            store: engine.model().new_kv_pool(config.kv_blocks, config.kv_type)?,
            pool: BlockPool::new(config.kv_blocks, config.prefix_cache),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pacer: config.target.map(Pacer::new),
            config,
            stats,
        })
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }

    /// Whether nothing is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Tokens the whole pool holds.
    pub fn capacity(&self) -> usize {
        self.config.kv_blocks * BLOCK_TOKENS
    }

    /// What a request must fit (see [`crate::request::check`]).
    pub fn limits(&self) -> crate::request::RequestLimits {
        crate::request::RequestLimits {
            context: self.engine.context_length(),
            kv_tokens: self.capacity(),
            vocab: self.engine.model().vocab_size(),
        }
    }

    /// Queue a request. Requests that can never run (bad parameters, larger than the context or the
    /// whole cache) fail at once through their sink.
    pub fn submit(&mut self, req: GenerationRequest, sink: Box<dyn TokenSink + 's>, deadline: Option<Instant>) {
        let checked = crate::request::check(&req, &self.limits());
        let seq = Sequence::new(req, sink, deadline);
        match checked {
            Err(e) => seq.fail(e),
            Ok(()) if seq.max_tokens() == 0 => seq.finish(FinishReason::Length),
            Ok(()) => self.waiting.push_back(seq),
        }
        self.publish();
    }

    /// Run one step. Returns the number of tokens it put through the model.
    pub fn step(&mut self) -> usize {
        self.drop_abandoned();
        let mut budget = self.config.max_batch_tokens;
        // (index in `running`, tokens this step)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        self.plan_decodes(&mut plan, &mut budget);
        let mut shape = StepShape::default();
        for &(i, n) in &plan {
            shape.add(self.running[i].computed, n, false);
        }
        if self.config.speculation {
            self.plan_drafts(&plan, &mut shape, &mut budget);
        }
        self.admit(budget);
        // With streams in the step, prompt work may stretch it only to a time limit. Requests
        // admitted and still on their prompts count for their fair share (those the pace keeps
        // waiting do not: prompt work for them would only add streams past it).
        let streams = plan.len();
        let starting = self.running.len().saturating_sub(streams);
        let limit = self.pacer.as_ref().and_then(|p| Some((p, p.limit_ms(&shape, streams, starting)?)));
        // Prompt chunks (and the first token of sequences admitted just now), oldest sequence
        // first, within what is left of the budget and the time.
        let mut planned = vec![false; self.running.len()];
        for &(i, _) in &plan {
            planned[i] = true;
        }
        let mut prompt_tokens = 0;
        let mut paced = false;
        for (i, seq) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if planned[i] {
                continue;
            }
            let mut n = seq.pending().min(budget);
            if let Some((pacer, limit)) = limit {
                let fits = pacer.prompt_tokens_within(&shape, seq.computed, n, limit);
                let floor = MIN_PROMPT_CHUNK.saturating_sub(prompt_tokens).min(n);
                paced |= fits < n;
                n = fits.max(floor);
            }
            if n == 0 {
                break;
            }
            shape.add(seq.computed, n, true);
            plan.push((i, n));
            budget -= n;
            prompt_tokens += n;
        }
        if paced {
            self.stats.paced_steps.fetch_add(1, Ordering::Relaxed);
        }
        plan.sort_unstable();
        let started = Instant::now();
        let tokens = self.run(&plan);
        if tokens > 0
            && let Some(pacer) = &mut self.pacer
        {
            pacer.cost.observe(&shape, started.elapsed());
        }
        self.publish();
        tokens
    }

    /// Fail everything (the model is going away).
    pub fn abort_all(&mut self, error: impl Fn() -> EngineError) {
        let all: Vec<Sequence<'s>> = self.waiting.drain(..).chain(self.running.drain(..)).collect();
        for seq in all {
            self.release_blocks_of(&seq);
            seq.fail(error());
        }
        self.publish();
    }

    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let gone = |s: &Sequence<'_>| s.is_closed() || s.deadline.is_some_and(|d| now >= d);
        let mut i = 0;
        while i < self.waiting.len() {
            if gone(&self.waiting[i]) {
                let seq = self.waiting.remove(i).expect("index checked");
                self.end_abandoned(seq, now);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if gone(&self.running[i]) {
                let seq = self.running.remove(i);
                self.end_abandoned(seq, now);
            } else {
                i += 1;
            }
        }
    }

    fn end_abandoned(&mut self, seq: Sequence<'s>, now: Instant) {
        self.release_blocks_of(&seq);
        match seq.deadline {
            Some(d) if now >= d && !seq.is_closed() => {
                let waited = now.duration_since(seq.arrived);
                seq.fail(EngineError::TimedOut(waited));
            }
            _ => seq.finish(FinishReason::Cancelled),
        }
    }

    /// The next tokens of every generating sequence (one, or more where a grammar forced some),
    /// preempting the newest when blocks run out.
    fn plan_decodes(&mut self, plan: &mut Vec<(usize, usize)>, budget: &mut usize) {
        let mut i = 0;
        while i < self.running.len() {
            let seq = &self.running[i];
            // Still reading its prompt: planned as a chunk, within the budget, by `step`.
            if seq.computed < seq.prompt_len || seq.pending() > MAX_DECODE_TOKENS {
                i += 1;
                continue;
            }
            let n = seq.pending();
            if self.reserve(i, n) {
                plan.push((i, n));
                *budget = budget.saturating_sub(n);
                i += 1;
                continue;
            }
            // Out of blocks: the newest running sequence (perhaps this one) gives its blocks back.
            if self.running.len() == 1 {
                // Alone and still no room: the whole pool is this sequence's. It ends as if the
                // context had run out.
                let seq = self.running.remove(0);
                self.release_blocks_of(&seq);
                seq.finish(FinishReason::Length);
                return;
            }
            self.preempt_newest();
        }
    }

    /// Guess ahead for the generating sequences of this step where guessing pays (see
    /// [`speculation`]): each guess is added to its sequence's tokens for this step, with cache
    /// blocks taken only where free ones are left (a guess never preempts anyone).
    fn plan_drafts(&mut self, plan: &[(usize, usize)], shape: &mut StepShape, budget: &mut usize) {
        let streams = plan.len();
        let context = self.engine.context_length();
        for &(i, n) in plan {
            if n != 1 || !self.running[i].may_speculate() {
                continue;
            }
            // What one more token adds to the step, over the step's time per stream (the step
            // yields a token per stream): a guess pays when its chance to survive beats that.
            let cost = match (self.config.draft_cost, &self.pacer) {
                (Some(fixed), _) => fixed,
                (None, Some(p)) if p.cost.is_calibrated() => {
                    let step = p.cost.predict(shape).max(f64::EPSILON);
                    let mut more = *shape;
                    more.add(self.running[i].computed + n, 1, false);
                    (p.cost.predict(&more) - step) * streams as f64 / step
                }
                // Not measured yet: guess for a lone stream only, at a cost typical of a CPU.
                _ if streams == 1 => 0.5,
                _ => continue,
            };
            let seq = &mut self.running[i];
            let most = seq.acceptance.draft_len(cost).min(seq.room_after_next(context)).min(*budget);
            let mut draft = speculation::lookup_draft(&seq.tokens, most);
            if draft.is_empty() {
                seq.acceptance.quiet();
                continue;
            }
            let needed = blocks_for(seq.computed + n + draft.len());
            while seq.blocks.len() < needed {
                match self.pool.allocate() {
                    Some(b) => seq.blocks.push(b),
                    None => break,
                }
            }
            draft.truncate((seq.blocks.len() * BLOCK_TOKENS).saturating_sub(seq.computed + n));
            shape.add(seq.computed + n, draft.len(), false);
            *budget = budget.saturating_sub(draft.len());
            seq.draft = draft;
        }
    }

    /// Blocks for the sequence's next `n` positions; false if the pool has too few.
    fn reserve(&mut self, i: usize, n: usize) -> bool {
        let seq = &mut self.running[i];
        let needed = blocks_for(seq.computed + n);
        while seq.blocks.len() < needed {
            match self.pool.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    fn preempt_newest(&mut self) {
        let Some(mut seq) = self.running.pop() else { return };
        self.release_blocks_of(&seq);
        seq.blocks.clear();
        seq.keys.clear();
        seq.draft.clear();
        seq.computed = 0;
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(seq);
    }

    fn release_blocks_of(&mut self, seq: &Sequence<'_>) {
        for &b in &seq.blocks {
            self.pool.release(b);
        }
    }

    /// Admit waiting sequences in order while they fit, and while the running set's pace allows.
    fn admit(&mut self, budget: usize) {
        // Positions the running sequences hold, kept as they join (for their mean context).
        let mut positions: usize = self.running.iter().map(|s| s.tokens.len()).sum();
        while budget > 0 && self.running.len() < self.config.max_running {
            if self.waiting.is_empty() {
                break;
            }
            let context = positions / self.running.len().max(1);
            if self.pacer.as_ref().is_some_and(|p| !p.may_grow(self.running.len(), context)) {
                self.stats.pace_holds.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let Some(seq) = self.waiting.front_mut() else { break };
            let total_needed = blocks_for(seq.tokens.len());
            if total_needed > self.pool.total() {
                // Grown past the whole pool while preempted: it cannot run again.
                let seq = self.waiting.pop_front().expect("front exists");
                seq.finish(FinishReason::Length);
                continue;
            }
            // Reuse cached blocks of the longest matching prefix; at least the last token is run
            // again, for its logits.
            let reusable = (seq.tokens.len() - 1) / BLOCK_TOKENS;
            let mut found = Vec::new();
            let mut keys = Vec::new();
            for chunk in seq.tokens[..reusable * BLOCK_TOKENS].chunks_exact(BLOCK_TOKENS) {
                match self.pool.lookup(keys.last().copied(), chunk) {
                    Some((block, key)) => {
                        found.push(block);
                        keys.push(key);
                    }
                    None => break,
                }
            }
            let needed = total_needed - found.len();
            // Keep a block in hand for each running sequence's next token, so admitting does not
            // immediately force a preemption.
            let reserve = self.running.len();
            if self.pool.available() < needed + reserve {
                for b in found {
                    self.pool.release(b);
                }
                break;
            }
            for _ in 0..needed {
                found.push(self.pool.allocate().expect("availability checked"));
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            let cached = keys.len() * BLOCK_TOKENS;
            if !seq.was_admitted {
                self.stats.prefix_queried_tokens.fetch_add(seq.prompt_len as u64, Ordering::Relaxed);
                self.stats.prefix_hit_tokens.fetch_add(cached as u64, Ordering::Relaxed);
                seq.note_cached(cached);
                seq.admitted = Some(Instant::now());
            }
            seq.was_admitted = true;
            seq.blocks = found;
            seq.keys = keys;
            seq.computed = cached;
            positions += seq.tokens.len();
            self.running.push(seq);
        }
    }

    /// Run the planned tokens as one forward pass, then sample and retire.
    fn run(&mut self, plan: &[(usize, usize)]) -> usize {
        if plan.is_empty() {
            return 0;
        }
        let started = Instant::now();
        let total = self.run_planned(plan);
        self.stats.step_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        total
    }

    fn run_planned(&mut self, plan: &[(usize, usize)]) -> usize {
        // A sequence with guesses runs its pending token and the guesses, and wants every row's
        // logits to check them.
        let guessed: Vec<Option<Vec<u32>>> = plan
            .iter()
            .map(|&(i, n)| {
                let seq = &self.running[i];
                (!seq.draft.is_empty()).then(|| [&seq.tokens[seq.computed..seq.computed + n], &seq.draft[..]].concat())
            })
            .collect();
        let steps: Vec<SeqStep<'_>> = plan
            .iter()
            .zip(&guessed)
            .map(|(&(i, n), guessed)| {
                let seq = &self.running[i];
                let (tokens, logits) = match guessed {
                    Some(tokens) => (&tokens[..], Logits::All),
                    None => (
                        &seq.tokens[seq.computed..seq.computed + n],
                        if seq.computed + n == seq.tokens.len() { Logits::Last } else { Logits::None },
                    ),
                };
                SeqStep { blocks: &seq.blocks, start: seq.computed, tokens, prompt_len: seq.prompt_len, logits }
            })
            .collect();
        let result = self.engine.model().forward(self.store.as_mut(), &steps);
        drop(steps);
        let total: usize = plan.iter().zip(&guessed).map(|(&(_, n), g)| g.as_ref().map_or(n, Vec::len)).sum();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Nothing in a step fails for a well-formed model; if it does, the sequences in it
                // end with the reason rather than loop.
                let message = e.to_string();
                for &(i, _) in plan.iter().rev() {
                    let seq = self.running.remove(i);
                    self.release_blocks_of(&seq);
                    seq.fail(EngineError::BadModel(message.clone()));
                }
                return total;
            }
        };
        let context = self.engine.context_length();
        let mut sampled: Vec<Option<Vec<f32>>> = vec![None; self.running.len()];
        for (&(i, n), rows) in plan.iter().zip(logits) {
            let seq = &mut self.running[i];
            let prefill = n.min(seq.prompt_len.saturating_sub(seq.computed));
            self.stats.prefill_tokens.fetch_add(prefill as u64, Ordering::Relaxed);
            seq.computed += n;
            // Full prompt blocks become findable by later sequences.
            let full = seq.computed.min(seq.prompt_len) / BLOCK_TOKENS;
            while seq.keys.len() < full {
                let b = seq.keys.len();
                let tokens = &seq.tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS];
                let key = self.pool.register(seq.blocks[b], seq.keys.last().copied(), tokens);
                seq.keys.push(key);
            }
            if !rows.is_empty() {
                sampled[i] = Some(rows);
            }
        }
        // Sequences with guesses check them one row at a time, below; the others sample (a
        // grammar's mask, a sort of the vocabulary at some settings) all at once.
        let mut verify = Vec::new();
        for (i, rows) in sampled.iter_mut().enumerate() {
            if !self.running[i].draft.is_empty()
                && let Some(rows) = rows.take()
            {
                verify.push((i, rows));
            }
        }
        let mut jobs: Vec<_> = self
            .running
            .iter_mut()
            .zip(sampled)
            .enumerate()
            .filter_map(|(i, (seq, rows))| rows.map(|rows| (i, seq.sampling(), rows, None)))
            .collect();
        crate::team().for_each_mut(&mut jobs, |(_, sampling, rows, pick)| {
            *pick = Some(sampling.pick(rows));
        });
        let mask_nanos: u64 = jobs.iter().map(|(_, sampling, _, _)| sampling.mask_nanos).sum();
        self.stats.mask_nanos.fetch_add(mask_nanos, Ordering::Relaxed);
        let picks: Vec<_> = jobs.into_iter().filter_map(|(i, _, _, pick)| pick.map(|p| (i, p))).collect();
        let mut finished = Vec::new();
        for (i, rows) in verify {
            if let Some(end) = self.verify_draft(i, rows, context) {
                finished.push((i, end));
            }
        }
        for (i, pick) in picks {
            let seq = &mut self.running[i];
            let before = seq.tokens.len();
            let end = pick.and_then(|(token, lp)| seq.accept(token, lp, self.engine.tokenizer(), context));
            self.stats.generated_tokens.fetch_add((seq.tokens.len() - before) as u64, Ordering::Relaxed);
            if let Some(end) = end.transpose() {
                finished.push((i, end));
            }
        }
        finished.sort_unstable_by_key(|&(i, _)| i);
        for (i, end) in finished.into_iter().rev() {
            let seq = self.running.remove(i);
            self.release_blocks_of(&seq);
            match end {
                Ok(end) => seq.finish(end),
                Err(e) => seq.fail(e),
            }
        }
        total
    }

    /// Check a sequence's guesses against its rows of logits (its pending token's, then each
    /// guess's): sample each row as decoding one token at a time would, and go on while the
    /// sampled token is the guess. Every sampled token is kept (the first one that differs
    /// included); the cache keeps the guesses that survived. Returns how the sequence ends, if
    /// it does.
    fn verify_draft(
        &mut self,
        i: usize,
        mut rows: Vec<f32>,
        context: usize,
    ) -> Option<Result<FinishReason, EngineError>> {
        let engine = self.engine;
        let vocab = engine.model().vocab_size();
        let seq = &mut self.running[i];
        let draft = std::mem::take(&mut seq.draft);
        let mut accepted = 0;
        let mut end = None;
        for (r, row) in rows.chunks_exact_mut(vocab).enumerate() {
            let before = seq.tokens.len();
            let picked = seq.sampling().pick(row);
            let result = picked.and_then(|(token, lp)| seq.accept(token, lp, engine.tokenizer(), context));
            self.stats.generated_tokens.fetch_add((seq.tokens.len() - before) as u64, Ordering::Relaxed);
            match result {
                Ok(None) => {}
                Ok(Some(finish)) => {
                    end = Some(Ok(finish));
                    break;
                }
                Err(e) => {
                    end = Some(Err(e));
                    break;
                }
            }
            if r < draft.len() && seq.tokens.last() == Some(&draft[r]) {
                accepted += 1;
            } else {
                break;
            }
        }
        seq.computed += accepted;
        seq.acceptance.observe(draft.len(), accepted);
        self.stats.drafted_tokens.fetch_add(draft.len() as u64, Ordering::Relaxed);
        self.stats.accepted_tokens.fetch_add(accepted as u64, Ordering::Relaxed);
        end
    }

    fn publish(&self) {
        let s = &self.stats;
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.waiting.store(self.waiting.len(), Ordering::Relaxed);
        s.queued.store(self.waiting.iter().filter(|q| !q.was_admitted).count(), Ordering::SeqCst);
        s.kv_blocks_used.store(self.pool.in_use(), Ordering::Relaxed);
    }
}
