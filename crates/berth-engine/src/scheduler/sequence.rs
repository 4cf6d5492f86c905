//! One request as the scheduler runs it: its tokens, how far its cache has come, and the state of
//! its answer (sampler, stop strings, UTF-8 stream decoding), handed to its [`TokenSink`].

use std::time::Instant;

use super::blocks::PrefixKey;
use super::speculation::Acceptance;
use crate::constraint::{Constraint, MAX_FORCED_TOKENS, Trigger};
use crate::error::EngineError;
use crate::request::{FinishReason, GenerationOutput, GenerationRequest, TokenEvent};
use crate::sampling::{Sampler, TokenLogprob};
use crate::stop::{StopCheck, StopMatcher};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Where a sequence's tokens and its end go.
pub trait TokenSink {
    /// A token, or text released at the end; `false` when nobody listens any more (the sequence
    /// is then cancelled).
    fn token(&mut self, event: &TokenEvent) -> bool;
    /// The end: the whole answer, or why there is none.
    fn finish(&mut self, result: Result<GenerationOutput, EngineError>);
    /// Whether the listener has gone, checked at every step (also while the sequence waits).
    fn is_closed(&self) -> bool {
        false
    }
}

/// A sequence's part in sampling, lent to a worker thread.
pub(super) struct Sampling<'a> {
    pub sampler: &'a mut Sampler,
    pub logprobs: Option<usize>,
    pub constraint: Option<&'a mut Constraint>,
    /// Time spent computing the grammar's mask (ns), for the scheduler's figures.
    pub mask_nanos: u64,
}

impl Sampling<'_> {
    /// Pick the next token from the logits (masked first by the grammar, if any). Logprobs are
    /// the model's, before the mask (as llama.cpp's server and vLLM report them): a token the
    /// grammar leaves as the only choice still shows how likely the model found it.
    pub fn pick(&mut self, logits: &mut [f32]) -> Result<(u32, Option<TokenLogprob>), EngineError> {
        let Some(c) = self.constraint.as_mut() else { return Ok(self.sampler.sample(logits, self.logprobs)) };
        let started = Instant::now();
        let mask = c.allowed()?;
        self.mask_nanos += started.elapsed().as_nanos() as u64;
        self.sampler.adjust(logits);
        let unmasked = self.logprobs.map(|n| (logits.to_vec(), n));
        crate::constraint::apply_mask(logits, &mask);
        let token = self.sampler.choose(logits);
        Ok((token, unmasked.map(|(u, n)| crate::sampling::log_probs(&u, token, n))))
    }
}

pub(super) struct Sequence<'s> {
    /// The prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Positions whose keys and values are in `blocks`.
    pub computed: usize,
    /// The block table.
    pub blocks: Vec<u32>,
    /// Prefix keys of the leading full prompt blocks, for chaining the next one.
    pub keys: Vec<PrefixKey>,
    /// Tokens guessed to follow the pending one, verified in the coming step (empty: none).
    pub draft: Vec<u32>,
    /// How its guesses have fared.
    pub acceptance: Acceptance,
    req: GenerationRequest,
    sampler: Sampler,
    /// The grammar the answer follows, taken out of the request (it changes as tokens come).
    constraint: Option<Constraint>,
    /// Whether the grammar applies yet (a lazy one waits for its opening token).
    constraint_active: bool,
    stops: StopMatcher,
    decoder: StreamDecoder,
    hit_stop_string: bool,
    out: GenerationOutput,
    sink: Box<dyn TokenSink + 's>,
    pub arrived: Instant,
    pub admitted: Option<Instant>,
    first_token: Option<Instant>,
    pub deadline: Option<Instant>,
    /// Whether it has been admitted once (waiting again only after preemption).
    pub was_admitted: bool,
}

impl<'s> Sequence<'s> {
    pub fn new(mut req: GenerationRequest, sink: Box<dyn TokenSink + 's>, deadline: Option<Instant>) -> Self {
        let constraint = req.constraint.take();
        let constraint_active = constraint.as_ref().is_some_and(|c| c.trigger().is_none());
        let sampler = Sampler::new(req.sampling.clone()).with_history(&req.prompt);
        let stops = StopMatcher::new(req.stop.clone());
        let out = GenerationOutput { prompt_tokens: req.prompt.len(), ..Default::default() };
        Self {
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            computed: 0,
            blocks: Vec::new(),
            keys: Vec::new(),
            draft: Vec::new(),
            acceptance: Acceptance::default(),
            req,
            sampler,
            constraint,
            constraint_active,
            stops,
            decoder: StreamDecoder::new(),
            hit_stop_string: false,
            out,
            sink,
            arrived: Instant::now(),
            admitted: None,
            first_token: None,
            deadline,
            was_admitted: false,
        }
    }

    /// Tokens not yet through the model (at least one while the sequence runs: the next input).
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn max_tokens(&self) -> usize {
        self.req.max_tokens
    }

    /// Whether guessed tokens can be verified by sampling: not under a grammar (its mask and
    /// forced tokens follow each accepted token, which a guess would have to run ahead of).
    pub fn may_speculate(&self) -> bool {
        self.constraint.is_none()
    }

    /// Tokens it may still generate after the pending one, within its `max_tokens` and `context`.
    pub fn room_after_next(&self, context: usize) -> usize {
        let by_length = self.req.max_tokens.saturating_sub(self.out.tokens.len() + 1);
        let by_context = context.saturating_sub(self.tokens.len() + 1);
        by_length.min(by_context)
    }

    pub fn is_closed(&self) -> bool {
        self.sink.is_closed()
    }

    /// Prompt tokens found in the prefix cache at its first admission.
    pub fn note_cached(&mut self, tokens: usize) {
        self.out.cached_tokens = tokens;
    }

    /// What sampling needs: the sampler, how many alternatives to report, and the grammar that
    /// masks the logits. (Sampling runs on the engine's workers, one sequence each; the rest of
    /// `accept` stays on the scheduler thread.)
    pub fn sampling(&mut self) -> Sampling<'_> {
        Sampling {
            sampler: &mut self.sampler,
            logprobs: self.req.logprobs,
            constraint: self.constraint.as_mut().filter(|_| self.constraint_active),
            mask_nanos: 0,
        }
    }

    /// Take the sampled next token and any the grammar forces after it, stream them, and say
    /// whether the sequence ends here (an error: the grammar cannot go on).
    pub fn accept(
        &mut self,
        token: u32,
        lp: Option<TokenLogprob>,
        tokenizer: &Tokenizer,
        context: usize,
    ) -> Result<Option<FinishReason>, EngineError> {
        let now = Instant::now();
        if self.first_token.is_none() {
            self.first_token = Some(now);
            self.out.prefill_time = now.duration_since(self.admitted.unwrap_or(self.arrived));
        }
        if let Some(end) = self.emit(token, lp, tokenizer, context) {
            return Ok(Some(end));
        }
        let Some(constraint) = self.constraint.as_mut() else { return Ok(None) };
        if !self.constraint_active {
            // A lazy grammar starts after its opening, which the model chose freely.
            let opened = match constraint.trigger() {
                Some(Trigger::Token(t)) => *t == token,
                Some(Trigger::Text(t)) => self.out.text.ends_with(t.as_str()),
                None => true,
            };
            if !opened {
                return Ok(None);
            }
            self.constraint_active = true;
        } else {
            constraint.consume(token)?;
        }
        if constraint.is_finished() {
            return Ok(Some(FinishReason::Stop));
        }
        // Tokens the grammar forces (a schema's keys, its punctuation) go in without sampling:
        // they join the next forward pass together, as a prompt chunk does. Not where the answer
        // reports logprobs: a token fed without its logits has none to report, so each is then
        // picked from its own step's logits (the mask leaves only the grammar's text to write).
        if self.req.logprobs.is_some() {
            return Ok(None);
        }
        let room = (self.req.max_tokens - self.out.tokens.len()).min(context.saturating_sub(self.tokens.len()));
        let forced = constraint.forced(room.min(MAX_FORCED_TOKENS));
        let finished = constraint.is_finished();
        for t in forced {
            if let Some(end) = self.emit(t, None, tokenizer, context) {
                return Ok(Some(end));
            }
        }
        Ok(finished.then_some(FinishReason::Stop))
    }

    /// Stream one token of the answer; `Some` when the answer ends with it.
    fn emit(
        &mut self,
        token: u32,
        lp: Option<TokenLogprob>,
        tokenizer: &Tokenizer,
        context: usize,
    ) -> Option<FinishReason> {
        let ends =
            !self.req.ignore_eos && tokenizer.is_end_of_generation(token) || self.req.stop_token_ids.contains(&token);
        if ends {
            return Some(FinishReason::Stop);
        }
        self.out.tokens.push(token);
        if let Some(lp) = &lp {
            self.out.logprobs.push(lp.clone());
        }
        let piece = self.decoder.push(&tokenizer.token_bytes(token));
        let (text, stopped) = match self.stops.push(&piece) {
            StopCheck::Continue(t) => (t, false),
            StopCheck::Stopped(t) => (t, true),
        };
        self.out.text.push_str(&text);
        let listening = self.sink.token(&TokenEvent { token: Some(token), text, logprob: lp });
        self.tokens.push(token);
        if stopped {
            self.hit_stop_string = true;
            return Some(FinishReason::Stop);
        }
        if !listening {
            return Some(FinishReason::Cancelled);
        }
        // The new token is the next input: it needs a position inside the context.
        if self.out.tokens.len() >= self.req.max_tokens || self.tokens.len() > context {
            return Some(FinishReason::Length);
        }
        None
    }

    /// End the sequence: release any text held back for a possible stop string and hand over the
    /// answer.
    pub fn finish(mut self, finish: FinishReason) {
        if !self.hit_stop_string && finish != FinishReason::Cancelled {
            let tail = self.stops.finish() + &self.decoder.finish();
            if !tail.is_empty() {
                self.out.text.push_str(&tail);
                self.sink.token(&TokenEvent { token: None, text: tail, logprob: None });
            }
        }
        let now = Instant::now();
        self.out.finish = finish;
        self.out.queue_time = self.admitted.unwrap_or(now).duration_since(self.arrived);
        self.out.decode_time = self.first_token.map(|t| now.duration_since(t)).unwrap_or_default();
        let out = std::mem::take(&mut self.out);
        self.sink.finish(Ok(out));
    }

    /// End the sequence with an error.
    pub fn fail(mut self, error: EngineError) {
        self.sink.finish(Err(error));
    }
}
