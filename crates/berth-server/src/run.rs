//! Handing a request to its model's scheduler and following it from an async handler.
//!
//! [`start`] queues the request at once, so a full queue is a 429 before any response begins.
//! Tokens arrive on a channel; when the handler lets go of its [`Generation`] (the client went
//! away, or the handler is done), the scheduler sees the channel closed and frees the sequence's
//! cache blocks at its next step.

use std::sync::Arc;
use std::time::Instant;

use berth_engine::scheduler::TokenSink;
use berth_engine::{EngineError, GenerationOutput, GenerationRequest, TokenEvent};
use tokio::sync::mpsc;

use crate::accounts::{Outcome, Record};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::models::{Hold, LoadedModel};

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
    model: Arc<LoadedModel>,
    done: bool,
    started: Instant,
    last_token: Option<Instant>,
    /// Keeps the model from being unloaded as idle while the request lives.
    _hold: Hold,
    /// Who to charge (the key, or none on a server without keys).
    caller: Option<Caller>,
    prompt_tokens: usize,
    tokens: usize,
    first_token: Option<Instant>,
    request_id: String,
    /// The request's span, kept open until the answer ends, and given its figures then.
    span: tracing::Span,
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Let go before the end: the client went away.
        if !self.done {
            self.model.metrics.success(berth_engine::FinishReason::Cancelled);
            self.charge(Outcome::Aborted, self.prompt_tokens, self.tokens);
        }
    }
}

impl Generation {
    /// Log the generation's end with its request id, model, tokens and timings, and record it
    /// against the caller's key (or none).
    fn charge(&self, outcome: Outcome, prompt_tokens: usize, completion_tokens: usize) {
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let ttft_ms = self.first_token.map(|t| ms(t.duration_since(self.started)));
        self.span.record("model", self.model.name.as_str());
        self.span.record("outcome", outcome.name());
        self.span.record("prompt_tokens", prompt_tokens);
        self.span.record("completion_tokens", completion_tokens);
        if let Some(ttft) = ttft_ms {
            self.span.record("ttft_ms", ttft);
        }
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model.name,
            outcome = ?outcome,
            prompt_tokens,
            completion_tokens,
            ttft_ms,
            duration_ms = ms(self.started.elapsed()),
            "generation"
        );
        if let Some(c) = &self.caller {
            c.record(&Record {
                key_id: c.key_id(),
                model: &self.model.name,
                outcome,
                prompt_tokens: prompt_tokens as u64,
                completion_tokens: completion_tokens as u64,
                duration: self.started.elapsed(),
                time_to_first_token: self.first_token.map(|t| t.duration_since(self.started)),
            });
        }
    }
}

/// Queue `req` on `model`'s scheduler; refused at once (429) when its queue is full.
pub fn start(model: &Arc<LoadedModel>, req: GenerationRequest) -> Result<Generation, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = req.prompt.len();
    let caller = crate::auth::caller();
    if let Err(e) = model.runner.submit(req, Box::new(ChannelSink(tx))) {
        if let Some(c) = &caller {
            c.record(&Record::rejected(c.key_id(), &model.name));
        }
        return Err(model.error(e));
    }
    let hold = model.hold();
    Ok(Generation {
        rx,
        model: model.clone(),
        done: false,
        started: Instant::now(),
        last_token: None,
        _hold: hold,
        caller,
        prompt_tokens,
        tokens: 0,
        first_token: None,
        request_id: crate::request_log::current().unwrap_or_default(),
        span: tracing::Span::current(),
    })
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
                self.charge(Outcome::Failed, self.prompt_tokens, self.tokens);
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
                        self.charge(outcome, out.prompt_tokens, out.tokens.len());
                    }
                    Err(_) => self.charge(Outcome::Failed, self.prompt_tokens, self.tokens),
                }
                Update::Done(result.map_err(|e| self.model.error(e)))
            }
            None => {
                self.done = true;
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
