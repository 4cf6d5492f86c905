//! The one request type the scheduler accepts, and the one place a request is checked.
//!
//! Every API (OpenAI, Ollama, `berth run`) maps its fields onto a [`RequestDraft`], naming each
//! parameter as its clients spell it; [`validate`] turns the draft and the prompt's tokens into a
//! [`GenerationRequest`] within the model's [`RequestLimits`], or says which parameter is wrong.
//! The scheduler runs the same [`check`] when a request arrives, so a request that passed
//! validation is never refused later (an API can answer 400 before its response starts).

use std::time::Duration;

use crate::constraint::{Constraint, ConstraintSpec};
use crate::error::EngineError;
use crate::sampling::{SamplingParams, TokenLogprob};

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// A grammar the answer must follow, compiled for the model ([`crate::Engine::constrain`]).
    pub constraint: Option<Constraint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context ran out.
    #[default]
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// One generated token as it streams.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// The token, or `None` for text released at the end (held back until then).
    pub token: Option<u32>,
    /// Text that became final with this token (may be empty while a character or a possible stop
    /// string is incomplete).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// From arrival to admission.
    pub queue_time: Duration,
    /// From admission to the first token.
    pub prefill_time: Duration,
    /// From the first token to the end.
    pub decode_time: Duration,
}

/// What a model can take, known once it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Positions of the model's context (or less, where the operator set less).
    pub context: usize,
    /// Tokens the whole KV cache holds.
    pub kv_tokens: usize,
    pub vocab: usize,
}

/// A numeric parameter as the client sent it, with the name the client used for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Param {
    pub name: &'static str,
    pub value: f64,
}

impl Param {
    pub fn new(name: &'static str, value: f64) -> Param {
        Param { name, value }
    }
}

/// A request's parameters before any check. Absent ones take OpenAI's defaults (temperature 1,
/// no truncation, no penalties), and `max_tokens` absent means "until the model stops or the
/// context is full".
#[derive(Debug, Clone, Default)]
pub struct RequestDraft {
    pub max_tokens: Option<Param>,
    pub temperature: Option<Param>,
    pub top_p: Option<Param>,
    pub top_k: Option<Param>,
    pub min_p: Option<Param>,
    pub repeat_penalty: Option<Param>,
    pub repeat_last_n: Option<Param>,
    pub presence_penalty: Option<Param>,
    pub frequency_penalty: Option<Param>,
    pub seed: Option<Param>,
    pub stop: Vec<String>,
    /// Token id (as text, the JSON key) → bias.
    pub logit_bias: Vec<(String, f64)>,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    /// A grammar for the answer, with the name of the field that carried it (compiled against
    /// the model by [`crate::Engine::constrain`], not by [`validate`]).
    pub constraint: Option<(&'static str, ConstraintSpec)>,
}

/// Most stop strings a request may give, and their longest length in bytes.
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

/// A number as a person would write it (`1e308`, not 309 digits).
fn shown(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1e15 { format!("{v:e}") } else { format!("{v}") }
}

fn invalid(param: &str, message: String) -> EngineError {
    EngineError::InvalidParameter { param: param.to_string(), message }
}

/// A finite number within `lo..=hi`, or the default.
fn ranged(p: Option<Param>, lo: f64, hi: f64, default: f64) -> Result<f32, EngineError> {
    match p {
        None => Ok(default as f32),
        Some(Param { value, .. }) if value.is_finite() && value >= lo && value <= hi => Ok(value as f32),
        Some(Param { name, value }) => {
            Err(invalid(name, format!("{name} must be between {lo} and {hi}, got {}", shown(value))))
        }
    }
}

/// Refuse a parameter that is not a whole number.
fn integral(Param { name, value }: Param) -> Result<(), EngineError> {
    if value.is_finite() && value.fract() == 0.0 {
        Ok(())
    } else {
        Err(invalid(name, format!("{name} must be a whole number, got {}", shown(value))))
    }
}

/// A whole number within `lo..=hi`.
fn whole(p: Param, lo: f64, hi: f64) -> Result<i64, EngineError> {
    integral(p)?;
    let Param { name, value } = p;
    if value < lo || value > hi {
        return Err(invalid(name, format!("{name} must be between {lo} and {hi}, got {}", shown(value))));
    }
    Ok(value as i64)
}

/// Check a draft and its prompt against the model's limits and build the request the scheduler
/// runs. `max_tokens` beyond what the context leaves after the prompt is lowered to fit (the
/// answer ends with `length`); one beyond the whole context is an error.
pub fn validate(
    draft: &RequestDraft,
    prompt: Vec<u32>,
    limits: &RequestLimits,
) -> Result<GenerationRequest, EngineError> {
    let ctx = limits.context;
    let room = ctx.saturating_sub(prompt.len());
    let max_tokens = match draft.max_tokens {
        None => room,
        Some(p @ Param { name, value }) => {
            integral(p)?;
            if value < 1.0 {
                return Err(invalid(name, format!("{name} must be at least 1, got {}", shown(value))));
            }
            if value > ctx as f64 {
                return Err(invalid(
                    name,
                    format!("{name} is {}, more than this model's context of {ctx} tokens", shown(value)),
                ));
            }
            (value as usize).min(room)
        }
    };
    if draft.stop.len() > MAX_STOPS || draft.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(
            "stop",
            format!("stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    let vocab = limits.vocab;
    let mut logit_bias = Vec::with_capacity(draft.logit_bias.len());
    for (key, bias) in &draft.logit_bias {
        let id = key.trim().parse::<u32>().ok().filter(|&i| (i as usize) < vocab).ok_or_else(|| {
            invalid("logit_bias", format!("logit_bias key {key:?} is not a token id of this model (0..{vocab})"))
        })?;
        if !(bias.is_finite() && (-100.0..=100.0).contains(bias)) {
            return Err(invalid(
                "logit_bias",
                format!("logit_bias values must be between -100 and 100, got {}", shown(*bias)),
            ));
        }
        logit_bias.push((id, *bias as f32));
    }
    let top_p = ranged(draft.top_p, 0.0, 1.0, 1.0)?;
    if top_p <= 0.0 {
        let name = draft.top_p.map_or("top_p", |p| p.name);
        return Err(invalid(name, format!("{name} must be greater than 0")));
    }
    let sampling = SamplingParams {
        temperature: ranged(draft.temperature, 0.0, 2.0, 1.0)?,
        top_k: draft.top_k.map(|p| whole(p, 0.0, vocab as f64)).transpose()?.unwrap_or(0) as usize,
        top_p,
        min_p: ranged(draft.min_p, 0.0, 1.0, 0.0)?,
        repeat_penalty: ranged(draft.repeat_penalty, 0.01, 10.0, 1.0)?,
        repeat_last_n: draft.repeat_last_n.map(|p| whole(p, 0.0, ctx as f64)).transpose()?.unwrap_or(64) as usize,
        presence_penalty: ranged(draft.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: ranged(draft.frequency_penalty, -2.0, 2.0, 0.0)?,
        // Seeds are 64-bit; negative ones (some clients send -1 for "random") wrap.
        seed: draft.seed.map(|p| whole(p, i64::MIN as f64, u64::MAX as f64)).transpose()?.map(|s| s as u64),
        logit_bias,
    };
    let req = GenerationRequest {
        prompt,
        max_tokens,
        sampling,
        stop: draft.stop.clone(),
        stop_token_ids: Vec::new(),
        logprobs: draft.logprobs,
        ignore_eos: draft.ignore_eos,
        constraint: None,
    };
    check(&req, limits)?;
    Ok(req)
}

/// Whether a request can ever run on a model with these limits: a prompt, inside the context, a
/// cache that holds it, sampling parameters in range. The scheduler checks every request it is
/// given with this; [`validate`] ends with it.
pub fn check(req: &GenerationRequest, limits: &RequestLimits) -> Result<(), EngineError> {
    let n = req.prompt.len();
    if n == 0 {
        return Err(invalid("prompt", "the prompt is empty".into()));
    }
    if n >= limits.context {
        return Err(EngineError::ContextOverflow { needed: n + 1, limit: limits.context });
    }
    if n + 1 > limits.kv_tokens {
        return Err(EngineError::KvCacheTooSmall { needed: n + 1, capacity: limits.kv_tokens });
    }
    req.sampling.validate(limits.vocab)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits { context: 64, kv_tokens: 48, vocab: 100 };

    fn draft() -> RequestDraft {
        RequestDraft::default()
    }

    #[test]
    fn fits_the_answer_to_the_context_and_names_what_is_wrong() {
        let r = validate(
            &RequestDraft { max_tokens: Some(Param::new("max_tokens", 60.0)), ..draft() },
            vec![1; 10],
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.max_tokens, 54, "lowered to what the context leaves");
        assert_eq!(validate(&draft(), vec![1; 10], &LIMITS).unwrap().max_tokens, 54, "no max_tokens: the rest");
        let param = |d: RequestDraft, prompt: Vec<u32>| match validate(&d, prompt, &LIMITS) {
            Err(EngineError::InvalidParameter { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            param(RequestDraft { max_tokens: Some(Param::new("num_predict", 1e308)), ..draft() }, vec![1]),
            "num_predict"
        );
        assert_eq!(
            param(RequestDraft { temperature: Some(Param::new("temperature", f64::NAN)), ..draft() }, vec![1]),
            "temperature"
        );
        assert_eq!(param(RequestDraft { top_k: Some(Param::new("top_k", 1.5)), ..draft() }, vec![1]), "top_k");
        assert_eq!(param(RequestDraft { logit_bias: vec![("100".into(), 1.0)], ..draft() }, vec![1]), "logit_bias");
        assert_eq!(param(RequestDraft { stop: vec!["x".into(); 5], ..draft() }, vec![1]), "stop");
        assert_eq!(param(draft(), vec![]), "prompt");
    }

    #[test]
    fn refuses_what_can_never_run_as_the_scheduler_would() {
        assert!(matches!(validate(&draft(), vec![1; 64], &LIMITS), Err(EngineError::ContextOverflow { .. })));
        assert!(matches!(validate(&draft(), vec![1; 48], &LIMITS), Err(EngineError::KvCacheTooSmall { .. })));
        let ok = validate(&draft(), vec![1; 47], &LIMITS).unwrap();
        assert!(check(&ok, &LIMITS).is_ok());
    }
}
