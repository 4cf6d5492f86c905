//! A loaded model ready to answer: tokenizer, chat template, and a generation loop for one
//! sequence at a time. (The scheduler that batches many sequences drives the same forward pass.)

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::EngineError;
use crate::model::{KvCache, LlamaModel, SeqStep};
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::stop::{StopCheck, StopMatcher};
use crate::template::{ChatTemplate, Message};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Tokens of a prompt processed per forward pass, bounding the memory of one step.
const PREFILL_CHUNK: usize = 512;

pub struct Engine {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context ran out.
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

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Engine {
    /// Load a GGUF model; `template_override` (an artifact's template layer) replaces the file's.
    pub fn load(path: &Path, template_override: Option<&str>) -> Result<Engine, EngineError> {
        let model = LlamaModel::load(path)?;
        let tokenizer = Tokenizer::from_gguf(&model.gguf)?;
        if tokenizer.vocab_size() != model.config.vocab_size {
            return Err(EngineError::BadModel(format!(
                "the tokenizer has {} tokens but the model {}",
                tokenizer.vocab_size(),
                model.config.vocab_size
            )));
        }
        let source = template_override.or_else(|| model.gguf.get_str("tokenizer.chat_template"));
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default().to_string();
        let template = match source {
            Some(src) => Some(ChatTemplate::new(src, &token(tokenizer.bos), &token(tokenizer.eos))?),
            None => None,
        };
        Ok(Engine { model, tokenizer, template })
    }

    pub fn context_length(&self) -> usize {
        self.model.config.context_length
    }

    /// Tokens of a chat: the template's markers as special tokens, the messages as plain text.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let Some(template) = &self.template else {
            // No template: the messages' text, one per line, as a plain completion prompt.
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            return self.text_prompt(&text.join("\n"));
        };
        let rendered = template.render(messages, true)?;
        let mut ids = Vec::new();
        let mut at = 0;
        for span in &rendered.content_spans {
            ids.extend(self.tokenizer.encode(&rendered.text[at..span.start], true)?);
            ids.extend(self.tokenizer.encode(&rendered.text[span.clone()], false)?);
            at = span.end;
        }
        ids.extend(self.tokenizer.encode(&rendered.text[at..], true)?);
        Ok(self.with_bos(ids))
    }

    /// Tokens of a raw completion prompt (special-token text stays text).
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.with_bos(self.tokenizer.encode(text, false)?))
    }

    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some(bos)) = (self.tokenizer.add_bos, self.tokenizer.bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        ids
    }

    /// Run the prompt through the model, returning the last position's logits.
    pub fn prefill(&self, cache: &mut KvCache, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = Vec::new();
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            logits = self.model.forward(&mut [SeqStep { cache, tokens: chunk, all_logits: false }])?.remove(0);
        }
        Ok(logits)
    }

    /// Generate, calling `on_token` for every token; it returns `false` to stop early.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<GenerationOutput, EngineError> {
        let ctx = self.context_length();
        if req.prompt.is_empty() {
            return Err(EngineError::BadModel("the prompt is empty".into()));
        }
        if req.prompt.len() >= ctx {
            return Err(EngineError::ContextOverflow { needed: req.prompt.len() + 1, limit: ctx });
        }
        req.sampling.validate(self.model.config.vocab_size)?;
        let started = Instant::now();
        let mut cache = self.model.new_cache();
        let mut logits = self.prefill(&mut cache, &req.prompt)?;
        let prefill_time = started.elapsed();
        let decode_started = Instant::now();
        let mut sampler = Sampler::new(req.sampling.clone()).with_history(&req.prompt);
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut decoder = StreamDecoder::new();
        let mut hit_stop_string = false;
        let mut out = GenerationOutput {
            text: String::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: FinishReason::Length,
            prompt_tokens: req.prompt.len(),
            prefill_time,
            decode_time: Duration::ZERO,
        };
        while out.tokens.len() < req.max_tokens && cache.len() < ctx {
            let (token, lp) = sampler.sample(&mut logits, req.logprobs);
            let ends =
                !req.ignore_eos && self.tokenizer.is_end_of_generation(token) || req.stop_token_ids.contains(&token);
            if ends {
                out.finish = FinishReason::Stop;
                break;
            }
            out.tokens.push(token);
            if let Some(lp) = &lp {
                out.logprobs.push(lp.clone());
            }
            let piece = decoder.push(&self.tokenizer.token_bytes(token));
            let (text, stopped) = match stops.push(&piece) {
                StopCheck::Continue(t) => (t, false),
                StopCheck::Stopped(t) => (t, true),
            };
            out.text.push_str(&text);
            let keep_going = on_token(&TokenEvent { token: Some(token), text, logprob: lp });
            if stopped {
                hit_stop_string = true;
                out.finish = FinishReason::Stop;
                break;
            }
            if !keep_going {
                out.finish = FinishReason::Cancelled;
                break;
            }
            if out.tokens.len() >= req.max_tokens || cache.len() >= ctx {
                break;
            }
            logits = self
                .model
                .forward(&mut [SeqStep { cache: &mut cache, tokens: &[token], all_logits: false }])?
                .remove(0);
        }
        // Text held back for a possible stop string was not one after all: release it.
        if !hit_stop_string {
            let tail = stops.finish() + &decoder.finish();
            if !tail.is_empty() {
                out.text.push_str(&tail);
                on_token(&TokenEvent { token: None, text: tail, logprob: None });
            }
        }
        out.decode_time = decode_started.elapsed();
        Ok(out)
    }
}
