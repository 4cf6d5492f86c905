//! A loaded model ready to answer: tokenizer, chat template, and generation. One request at a
//! time runs through the same scheduler that batches many (see [`crate::scheduler`]), so there is
//! one generation loop.

use crate::constraint::{Constraint, ConstraintSpec, Grammars};
use crate::error::EngineError;
use crate::model::{TextModel, blocks_for};
pub use crate::request::{FinishReason, GenerationOutput, GenerationRequest, TokenEvent};
use crate::scheduler::{Scheduler, SchedulerConfig, TokenSink};
use crate::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Tokens of a prompt processed per forward pass when one request runs alone, bounding the
/// memory of one step.
const PREFILL_CHUNK: usize = 512;

/// A model with its tokenizer and chat template: what the APIs and `berth run` hold.
pub struct Engine {
    model: Box<dyn TextModel>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    /// The grammar compiler, built at the first constrained request (its token trie takes a
    /// moment and memory that a model never asked for structured output does not need).
    grammars: OnceLock<Result<Grammars, String>>,
}

/// The chat template a GGUF file carries, if any (read from its metadata, nothing loaded).
pub fn chat_template_of(path: &Path) -> Result<Option<String>, EngineError> {
    let io = |source| EngineError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and dropped before this returns; berth's store files are
    // never written in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let gguf = berth_formats::gguf::GgufFile::parse(&map)
        .map_err(|source| EngineError::Gguf { path: path.to_path_buf(), source })?;
    Ok(gguf.get_str("tokenizer.chat_template").map(str::to_string))
}

/// Vet the chat template a model artifact would run (its template layer when it has one, else
/// the one inside its GGUF file) before the artifact enters a store: see [`crate::template::vet`].
/// A GGUF file without a template passes; an unreadable layer does not.
pub fn vet_artifact_template(gguf: Option<&Path>, layer: Option<&[u8]>) -> Result<(), EngineError> {
    let source = match (layer, gguf) {
        (Some(bytes), _) => {
            if bytes.len() > crate::template::MAX_SOURCE_BYTES {
                return Err(EngineError::Template(format!(
                    "the template layer is {} bytes; a chat template may have at most {}",
                    bytes.len(),
                    crate::template::MAX_SOURCE_BYTES
                )));
            }
            std::str::from_utf8(bytes)
                .map_err(|_| EngineError::Template("the template layer is not UTF-8 text".into()))?
                .to_string()
        }
        (None, Some(path)) => match chat_template_of(path)? {
            Some(text) => text,
            None => return Ok(()),
        },
        (None, None) => return Ok(()),
    };
    crate::template::vet(&source)
}

impl Engine {
    /// Load a GGUF model; `template_override` (an artifact's template layer) replaces the file's.
    pub fn load(path: &Path, template_override: Option<&str>) -> Result<Engine, EngineError> {
        let model = crate::model::load(path)?;
        let tokenizer = Tokenizer::from_gguf(model.metadata())?;
        if tokenizer.vocab_size() != model.vocab_size() {
            return Err(EngineError::BadModel(format!(
                "the tokenizer has {} tokens but the model {}",
                tokenizer.vocab_size(),
                model.vocab_size()
            )));
        }
        let source = template_override.or_else(|| model.metadata().get_str("tokenizer.chat_template"));
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default().to_string();
        let template = match source {
            Some(src) => Some(ChatTemplate::new(src, &token(tokenizer.bos), &token(tokenizer.eos))?),
            None => None,
        };
        Ok(Engine { model, tokenizer: Arc::new(tokenizer), template, grammars: OnceLock::new() })
    }

    pub fn model(&self) -> &dyn TextModel {
        self.model.as_ref()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Compile a request's constraint against this model's vocabulary; an error names `param`.
    pub fn constrain(&self, spec: &ConstraintSpec, param: &str) -> Result<Constraint, EngineError> {
        let grammars = self.grammars.get_or_init(|| Grammars::new(self.tokenizer.clone()).map_err(|e| e.to_string()));
        match grammars {
            Ok(g) => g.compile(spec, param),
            Err(e) => Err(EngineError::Grammar(e.clone())),
        }
    }

    /// The chat template in use (the artifact's override, else the file's), if there is one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    pub fn context_length(&self) -> usize {
        self.model.context_length()
    }

    /// Tokens of a chat: the template's markers as special tokens, the messages' text as text.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let Some(template) = &self.template else {
            // No template: the messages' text, one per line, as a plain completion prompt.
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            return self.text_prompt(&text.join("\n"));
        };
        // Roles and contents come from users: the special tokens' text in them is defused, so only
        // the template's own markers become special tokens.
        let messages: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: self.tokenizer.defuse_specials(&m.role).into_owned(),
                content: self.tokenizer.defuse_specials(&m.content).into_owned(),
            })
            .collect();
        let rendered = template.render(&messages, true)?;
        Ok(self.with_bos(self.tokenizer.encode_rendered(&rendered)?))
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

    /// What a request run by [`Engine::generate`] must fit (it sizes its cache to the request, so
    /// only the context bounds it).
    pub fn request_limits(&self) -> crate::request::RequestLimits {
        let context = self.context_length();
        crate::request::RequestLimits { context, kv_tokens: context, vocab: self.model.vocab_size() }
    }

    /// Cache blocks that hold `tokens` positions.
    pub fn kv_blocks_for(&self, tokens: usize) -> usize {
        blocks_for(tokens).max(1)
    }

    /// Generate one answer by itself, calling `on_token` for every token; it returns `false` to
    /// stop early.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<GenerationOutput, EngineError> {
        let ctx = self.context_length();
        let config = SchedulerConfig {
            max_batch_tokens: PREFILL_CHUNK,
            max_running: 1,
            kv_blocks: self.kv_blocks_for((req.prompt.len() + req.max_tokens + 1).min(ctx)),
            prefix_cache: false,
        };
        let mut result = None;
        {
            let mut scheduler = Scheduler::new(self, config)?;
            let sink = CallbackSink { on_token, result: &mut result };
            scheduler.submit(req.clone(), Box::new(sink), None);
            while !scheduler.is_idle() {
                scheduler.step();
            }
        }
        result.unwrap_or(Err(EngineError::Stopped))
    }
}

/// Hands a lone generation's tokens to a callback and keeps its end.
struct CallbackSink<'a> {
    on_token: &'a mut dyn FnMut(&TokenEvent) -> bool,
    result: &'a mut Option<Result<GenerationOutput, EngineError>>,
}

impl TokenSink for CallbackSink<'_> {
    fn token(&mut self, event: &TokenEvent) -> bool {
        (self.on_token)(event)
    }

    fn finish(&mut self, result: Result<GenerationOutput, EngineError>) {
        *self.result = Some(result);
    }
}
