//! Handing a request to its model's scheduler and following it from an async handler.
//!
//! [`start`] queues the request at once, so a full queue is a 429 before any response begins.
//! Tokens arrive on a channel; when the handler lets go of its [`Generation`] (the client went
//! away, or the handler is done), the scheduler sees the channel closed and frees the sequence's
//! cache blocks at its next step.
//!
//! An API request may run several generations (`n` choices, a list of prompts); they share one
//! [`RequestUsage`], which records the request once in usage and in its span, as the last of them
//! ends.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use berth_engine::scheduler::TokenSink;
use berth_engine::{EngineError, GenerationOutput, GenerationRequest, TokenEvent};
use tokio::sync::mpsc;

use crate::accounts::{NO_KEY, Outcome, Record};
use crate::auth::Caller;
use crate::deployments::window::ServedRequest;
use crate::error::ApiError;
use crate::models::{Hold, Served};

/// What a running generation reports.
pub enum Update {
    Token(TokenEvent),
    Done(Result<GenerationOutput, ApiError>),
}

enum Message {
    Token(TokenEvent),
    Done(Result<GenerationOutput, EngineError>),
}

struct ChannelSink(mpsc::UnboundedSender<Message>);

impl TokenSink for ChannelSink {
    fn token(&mut self, event: &TokenEvent) -> bool {
        self.0.send(Message::Token(event.clone())).is_ok()
    }

    fn finish(&mut self, result: Result<GenerationOutput, EngineError>) {
        let _ = self.0.send(Message::Done(result));
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A queued or running generation. Dropping it cancels the request.
pub struct Generation {
    rx: mpsc::UnboundedReceiver<Message>,
    model: Served,
    done: bool,
    started: Instant,
    last_token: Option<Instant>,
    /// Keeps the model from being unloaded as idle while the request lives.
    _hold: Hold,
    /// The API request this generation is part of.
    usage: Arc<RequestUsage>,
    /// Whether its prompt counts in the request's usage (the first choice of each prompt does; the
    /// other choices share that prompt).
    counts_prompt: bool,
    prompt_tokens: usize,
    tokens: usize,
    first_token: Option<Instant>,
}

/// The usage of one API request, added up over its generations and recorded when the last ends.
struct RequestUsage {
    /// Who to charge (the key, or none on a server without keys).
    caller: Option<Caller>,
    model: String,
    /// The version that answers (a manifest digest's first 12 hex digits).
    version: String,
    /// Where a deployment's version counts how the request ended.
    served: Option<Arc<ServedRequest>>,
    request_id: String,
    started: Instant,
    /// The request's span, kept open until the answer ends, and given its figures then.
    span: tracing::Span,
    tally: Mutex<Tally>,
    /// Tokens of the key's daily quota held for this request while it runs.
    reserved: u64,
}

struct Tally {
    /// Generations still running.
    open: usize,
    /// Recorded already (the request was refused, or every generation ended).
    settled: bool,
    /// The worst end among the generations: a failure, else a hang-up, else completed.
    outcome: Outcome,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_token: Option<Instant>,
    /// A choice ended at the token limit.
    hit_length: bool,
}

impl RequestUsage {
    /// One generation ended.
    fn end(&self, end: End) {
        let End { outcome, prompt_tokens, completion_tokens, hit_length, first_token } = end;
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        if t.settled {
            return;
        }
        t.outcome = t.outcome.max(outcome);
        t.prompt_tokens += prompt_tokens;
        t.completion_tokens += completion_tokens;
        t.hit_length |= hit_length;
        t.first_token = match (t.first_token, first_token) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        t.open = t.open.saturating_sub(1);
        if t.open == 0 {
            t.settled = true;
            self.record(&t);
        }
    }

    /// Refused before it ran: recorded as such, and the generations already queued are not
    /// counted when they end. (None has ended yet, so the tally holds no tokens.)
    fn refuse(&self) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.settled = true;
        t.outcome = Outcome::Rejected;
        self.record(&t);
    }

    fn record(&self, t: &Tally) {
        if let Some(served) = &self.served {
            if t.outcome == Outcome::Failed {
                served.fail();
            }
            if let Some(first) = t.first_token {
                served.first_token(first);
            }
        }
        let record = Record {
            key_id: NO_KEY,
            model: &self.model,
            model_version: &self.version,
            outcome: t.outcome,
            prompt_tokens: t.prompt_tokens as u64,
            completion_tokens: t.completion_tokens as u64,
            duration: self.started.elapsed(),
            time_to_first_token: t.first_token.map(|f| f.duration_since(self.started)),
            hit_length: t.hit_length,
        };
        account(self.caller.as_ref(), &self.span, record, self.reserved);
    }
}

/// An API request ended: its figures go into its span, and its usage row is charged to the caller
/// (whose key replaces `record.key_id`).
pub fn account(caller: Option<&Caller>, span: &tracing::Span, record: Record<'_>, reserved: u64) {
    span.record("model", record.model);
    span.record("outcome", record.outcome.name());
    span.record("prompt_tokens", record.prompt_tokens);
    span.record("completion_tokens", record.completion_tokens);
    if let Some(ttft) = record.time_to_first_token {
        span.record("ttft_ms", ms(ttft));
    }
    if let Some(c) = caller {
        c.record(&Record { key_id: c.key_id(), ..record }, reserved);
    }
}

/// How one generation ended.
struct End {
    outcome: Outcome,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Completed at the token limit.
    hit_length: bool,
    first_token: Option<Instant>,
}

/// Milliseconds to a tenth, for logs and spans.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Let go before the end: the client went away.
        if !self.done {
            self.model.metrics.success(berth_engine::FinishReason::Cancelled);
            self.charge(self.cut_short(Outcome::Aborted));
        }
    }
}

impl Generation {
    /// Log the generation's end with its request id, model, tokens and timings, and add it to the
    /// request's usage.
    fn charge(&self, end: End) {
        tracing::info!(
            request_id = %self.usage.request_id,
            model = %self.model.name,
            outcome = ?end.outcome,
            prompt_tokens = end.prompt_tokens,
            completion_tokens = end.completion_tokens,
            ttft_ms = self.first_token.map(|t| ms(t.duration_since(self.started))),
            duration_ms = ms(self.started.elapsed()),
            "generation"
        );
        let prompt_tokens = if self.counts_prompt { end.prompt_tokens } else { 0 };
        self.usage.end(End { prompt_tokens, ..end });
    }

    /// How the generation ended, short of a completed answer: with the tokens it got so far.
    fn cut_short(&self, outcome: Outcome) -> End {
        End {
            outcome,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.tokens,
            hit_length: false,
            first_token: self.first_token,
        }
    }
}

/// Hold what the request may use of its key's daily token quota: its prompts and every choice's
/// `max_tokens`, or, when less is left, the prompts and what remains shared among the choices
/// (their `max_tokens` lowered to fit). Many requests at once therefore cannot together use more
/// than the quota. A request whose prompts alone do not fit is refused with 429.
fn reserve_quota(caller: Option<&Caller>, reqs: &mut [(GenerationRequest, bool)]) -> Result<u64, ApiError> {
    let Some((caller, key)) = caller.and_then(|c| c.key.as_ref().map(|k| (c, k))) else { return Ok(0) };
    if key.tokens_per_day.is_none() {
        return Ok(0);
    }
    let prompts: u64 = reqs.iter().filter(|r| r.1).map(|r| r.0.prompt.len() as u64).sum();
    let answers: u64 = reqs.iter().map(|r| r.0.max_tokens as u64).sum();
    let granted = caller.auth.reserve_tokens(key, prompts + answers)?;
    if granted >= prompts + answers {
        return Ok(granted);
    }
    let per_choice = granted.saturating_sub(prompts) / reqs.len().max(1) as u64;
    if per_choice == 0 {
        caller.auth.release_tokens(&key.id, granted);
        let message = format!(
            "the key `{}` has {granted} tokens left of its {} for the day, and this request's prompt needs {prompts}",
            key.name,
            key.tokens_per_day.unwrap_or(0)
        );
        return Err(ApiError::overloaded(message, 60).with_code("insufficient_quota"));
    }
    for (req, _) in reqs.iter_mut() {
        req.max_tokens = req.max_tokens.min(per_choice as usize);
    }
    Ok(granted)
}

/// Queue `req` on `model`'s scheduler; refused at once (429) when its queue is full.
pub fn start(model: &Served, req: GenerationRequest) -> Result<Generation, ApiError> {
    let mut started = start_all(model, vec![(req, true)])?;
    started.pop().ok_or_else(|| ApiError::internal("no generation was started"))
}

/// Queue the generations of one API request together (so they share steps), each with whether
/// its prompt counts in the request's usage. If one is refused, none runs.
pub fn start_all(model: &Served, mut reqs: Vec<(GenerationRequest, bool)>) -> Result<Vec<Generation>, ApiError> {
    let caller = crate::auth::caller();
    let reserved = match reserve_quota(caller.as_ref(), &mut reqs) {
        Ok(r) => r,
        Err(e) => {
            // Refused before it ran: counted like every other refusal, in metrics and in usage.
            model.metrics.failure(e.metric_label());
            if let Some(c) = &caller {
                c.record(&Record { model_version: &model.version, ..Record::rejected(c.key_id(), &model.name) }, 0);
            }
            return Err(e);
        }
    };
    let usage = Arc::new(RequestUsage {
        reserved,
        caller,
        model: model.name.clone(),
        version: model.version.clone(),
        served: crate::deployments::served::current(),
        request_id: crate::request_log::current().unwrap_or_default(),
        started: Instant::now(),
        span: tracing::Span::current(),
        tally: Mutex::new(Tally {
            open: reqs.len(),
            settled: false,
            outcome: Outcome::Completed,
            prompt_tokens: 0,
            completion_tokens: 0,
            first_token: None,
            hit_length: false,
        }),
    });
    let mut generations = Vec::with_capacity(reqs.len());
    for (req, counts_prompt) in reqs {
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_tokens = req.prompt.len();
        if let Err(e) = model.runner.submit(req, Box::new(ChannelSink(tx))) {
            // The ones already queued are cancelled as `generations` drops.
            usage.refuse();
            return Err(model.error(e));
        }
        generations.push(Generation {
            rx,
            model: model.clone(),
            done: false,
            started: Instant::now(),
            last_token: None,
            _hold: model.hold(),
            usage: usage.clone(),
            counts_prompt,
            prompt_tokens,
            tokens: 0,
            first_token: None,
        });
    }
    Ok(generations)
}

impl Generation {
    /// The next token, or the end (after which there is nothing more).
    pub async fn next(&mut self) -> Update {
        if self.done {
            return Update::Done(Err(ApiError::internal("the generation already ended")));
        }
        let mut abort = self.model.abort.clone();
        let message = tokio::select! {
            m = self.rx.recv() => m,
            _ = abort.wait_for(|stop| *stop) => {
                self.done = true;
                self.model.metrics.failure("error");
                self.charge(self.cut_short(Outcome::Failed));
                return Update::Done(Err(ApiError::unavailable(
                    "the server shut down before this answer finished (its drain timeout passed)",
                )));
            }
        };
        let metrics = &self.model.metrics;
        match message {
            Some(Message::Token(t)) => {
                if t.token.is_some() {
                    let now = Instant::now();
                    self.tokens += 1;
                    self.first_token.get_or_insert(now);
                    match self.last_token {
                        None => metrics.ttft.observe(now.duration_since(self.started).as_secs_f64()),
                        Some(last) => metrics.itl.observe(now.duration_since(last).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                }
                Update::Token(t)
            }
            Some(Message::Done(result)) => {
                self.done = true;
                match &result {
                    Ok(out) => {
                        metrics.e2e.observe(self.started.elapsed().as_secs_f64());
                        metrics.queue.observe(out.queue_time.as_secs_f64());
                        metrics.success(out.finish);
                        let outcome = match out.finish {
                            berth_engine::FinishReason::Cancelled => Outcome::Aborted,
                            _ => Outcome::Completed,
                        };
                        self.charge(End {
                            outcome,
                            prompt_tokens: out.prompt_tokens,
                            completion_tokens: out.tokens.len(),
                            hit_length: out.finish == berth_engine::FinishReason::Length,
                            first_token: self.first_token,
                        });
                    }
                    Err(_) => self.charge(self.cut_short(Outcome::Failed)),
                }
                Update::Done(result.map_err(|e| self.model.error(e)))
            }
            None => {
                // The scheduler went away without a last word: the request still counts, once.
                self.done = true;
                self.charge(self.cut_short(Outcome::Failed));
                Update::Done(Err(self.model.error(EngineError::Stopped)))
            }
        }
    }

    /// Wait for the whole answer.
    pub async fn finish(mut self) -> Result<GenerationOutput, ApiError> {
        loop {
            if let Update::Done(result) = self.next().await {
                return result;
            }
        }
    }
}
