//! Loaded models: loaded on first use (concurrent first requests share one load) and kept.
//! Each text model gets a scheduler thread that batches its requests (see
//! `berth_engine::scheduler`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_engine::model::bert::BertEmbedder;
use berth_engine::scheduler::{Runner, RunnerConfig, SchedulerConfig};
use berth_engine::{Engine, EngineError};
use berth_store::{Reference, Store};
use tokio::sync::{Mutex, OnceCell};

use crate::BatchingConfig;
use crate::error::ApiError;
use crate::metrics::ServingMetrics;

pub struct LoadedModel {
    /// The name clients use (`ai/smollm2:latest`).
    pub name: String,
    pub engine: Arc<Engine>,
    /// The model's scheduler thread.
    pub runner: Runner,
    pub size: u64,
    pub metrics: ServingMetrics,
}

impl LoadedModel {
    /// Bytes of KV cache the model's scheduler may use.
    pub fn kv_cache_bytes(&self) -> u64 {
        (self.runner.config().scheduler.kv_blocks * self.engine.model.kv_block_bytes()) as u64
    }

    /// An engine error as the API reports it (and counted as a failure); a full queue says when to
    /// come back.
    pub fn error(&self, e: EngineError) -> ApiError {
        self.metrics.failure(match &e {
            EngineError::QueueFull { .. } => "queue_full",
            EngineError::TimedOut(_) => "timeout",
            EngineError::ContextOverflow { .. }
            | EngineError::KvCacheTooSmall { .. }
            | EngineError::Sampling(_)
            | EngineError::Template(_)
            | EngineError::Tokenizer(_) => "invalid",
            _ => "error",
        });
        match e {
            EngineError::QueueFull { waiting } => {
                // Roughly one round of the running sequences per waiting batch of that size.
                let max_running = self.runner.config().scheduler.max_running.max(1);
                let seconds = (1 + waiting / max_running).min(60) as u64;
                ApiError::overloaded(
                    format!(
                        "{waiting} requests are already waiting for `{}` (the server's --max-queue); retry in {seconds} s",
                        self.name
                    ),
                    seconds,
                )
            }
            other => ApiError::from(other),
        }
    }
}

/// A sentence-embedding model.
pub struct EmbeddingModel {
    pub name: String,
    pub embedder: BertEmbedder,
    pub size: u64,
}

/// What a name loaded into: a model that generates text or one that embeds it.
#[derive(Clone)]
pub enum Loaded {
    Chat(Arc<LoadedModel>),
    Embed(Arc<EmbeddingModel>),
}

impl Loaded {
    pub fn name(&self) -> &str {
        match self {
            Loaded::Chat(m) => &m.name,
            Loaded::Embed(m) => &m.name,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Loaded::Chat(m) => m.size,
            Loaded::Embed(m) => m.size,
        }
    }
}

pub struct ModelManager {
    home: PathBuf,
    batching: BatchingConfig,
    loaded: Mutex<HashMap<String, Arc<OnceCell<Loaded>>>>,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ModelManager {
    pub fn new(home: PathBuf, batching: BatchingConfig) -> Self {
        Self { home, batching, loaded: Mutex::new(HashMap::new()) }
    }

    fn store(&self) -> Result<Store, ApiError> {
        Store::open(&self.home).map_err(|e| ApiError::internal(e.to_string()))
    }

    pub fn home(&self) -> &std::path::Path {
        &self.home
    }

    /// Forget a loaded model (requests running on it finish; its memory goes with the last one).
    pub async fn unload(&self, reference: &Reference) {
        self.loaded.lock().await.remove(&reference.to_string());
    }

    /// Names of the models in the store, as clients write them.
    pub fn available(&self) -> Vec<String> {
        self.store()
            .and_then(|s| s.list().map_err(|e| ApiError::internal(e.to_string())))
            .map(|l| l.into_iter().map(|m| m.reference).collect())
            .unwrap_or_default()
    }

    /// The models in the store with their details.
    pub fn list(&self) -> Result<Vec<berth_store::ModelSummary>, ApiError> {
        self.store()?.list().map_err(|e| ApiError::internal(e.to_string()))
    }

    pub fn details(&self, model: &str) -> Result<berth_store::ModelDetails, ApiError> {
        let reference = Reference::parse(model).map_err(|_| ApiError::model_not_found(model, &self.available()))?;
        self.store()?.inspect(&reference).map_err(|_| ApiError::model_not_found(model, &self.available()))
    }

    /// Models in memory now.
    pub async fn loaded(&self) -> Vec<Loaded> {
        let map = self.loaded.lock().await;
        map.values().filter_map(|c| c.get().cloned()).collect()
    }

    /// A text-generation model, loading it first if needed.
    pub async fn get(&self, model: &str) -> Result<Arc<LoadedModel>, ApiError> {
        match self.load(model).await? {
            Loaded::Chat(m) => Ok(m),
            Loaded::Embed(m) => Err(ApiError::invalid(
                "model",
                format!("`{}` is an embedding model; use /v1/embeddings or /api/embed", m.name),
            )),
        }
    }

    /// An embedding model, loading it first if needed.
    pub async fn get_embedder(&self, model: &str) -> Result<Arc<EmbeddingModel>, ApiError> {
        match self.load(model).await? {
            Loaded::Embed(m) => Ok(m),
            Loaded::Chat(m) => Err(ApiError::invalid(
                "model",
                format!(
                    "`{}` generates text; embeddings need an embedding model (a BERT safetensors artifact)",
                    m.name
                ),
            )),
        }
    }

    /// Load a model of either kind (at server start).
    pub async fn preload(&self, model: &str) -> Result<(), ApiError> {
        self.load(model).await.map(|_| ())
    }

    /// The loaded model, loading it first if needed.
    async fn load(&self, model: &str) -> Result<Loaded, ApiError> {
        let reference = Reference::parse(model).map_err(|_| ApiError::model_not_found(model, &self.available()))?;
        let key = reference.to_string();
        let cell = {
            let mut map = self.loaded.lock().await;
            map.entry(key).or_default().clone()
        };
        let home = self.home.clone();
        let batching = self.batching.clone();
        let available = self.available();
        let name = reference.familiar();
        cell.get_or_try_init(|| async move {
            let started = std::time::Instant::now();
            let store = Store::open(&home).map_err(|e| ApiError::internal(e.to_string()))?;
            let (_, manifest, _) = store.load(&reference).map_err(|e| match e {
                berth_store::StoreError::NotFound(_) => ApiError::model_not_found(model, &available),
                other => ApiError::internal(format!("cannot load {name}: {other}")),
            })?;
            let size = manifest.total_size();
            if !manifest.layers.iter().any(|l| l.media_type == berth_store::media::GGUF) {
                // A safetensors folder: the embedding engine reads it by its files' paths.
                let files: HashMap<String, PathBuf> =
                    store.model_files(&manifest).into_iter().map(|(_, path, blob)| (path, blob)).collect();
                let embedder = tokio::task::spawn_blocking(move || BertEmbedder::load(&files))
                    .await
                    .map_err(|e| ApiError::internal(format!("loading stopped: {e}")))?
                    .map_err(|e| ApiError::invalid("model", format!("cannot load {name}: {e}")))?;
                return Ok(Loaded::Embed(Arc::new(EmbeddingModel { name, embedder, size })));
            }
            let found = store.gguf_model(&reference).map_err(|e| match e {
                berth_store::StoreError::NotFound(_) => ApiError::model_not_found(model, &available),
                berth_store::StoreError::Config(m) => ApiError::invalid("model", m),
                other => ApiError::internal(format!("cannot load {name}: {other}")),
            })?;
            let engine = tokio::task::spawn_blocking(move || Engine::load(&found.path, found.chat_template.as_deref()))
                .await
                .map_err(|e| ApiError::internal(format!("loading stopped: {e}")))?
                .map_err(|e| ApiError::internal(format!("cannot load {name}: {e}")))?;
            let engine = Arc::new(engine);
            let config = runner_config(&engine, &batching);
            let runner = Runner::start(engine.clone(), config)
                .map_err(|e| ApiError::internal(format!("cannot start {name}: {e}")))?;
            let metrics = ServingMetrics::new(started.elapsed().as_secs_f64());
            Ok(Loaded::Chat(Arc::new(LoadedModel { name, engine, runner, size, metrics })))
        })
        .await
        .cloned()
    }
}

/// The scheduler's limits for one model: the KV cache gets the configured memory, but no more than
/// every running sequence at full context could use.
fn runner_config(engine: &Engine, batching: &BatchingConfig) -> RunnerConfig {
    let block_bytes = engine.model.kv_block_bytes().max(1) as u64;
    let by_memory = (batching.kv_cache_bytes / block_bytes) as usize;
    let by_use = engine.kv_blocks_for(batching.max_running.saturating_mul(engine.context_length()));
    RunnerConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: batching.max_batch_tokens,
            max_running: batching.max_running,
            kv_blocks: by_memory.min(by_use).max(1),
            prefix_cache: batching.prefix_cache,
        },
        max_queue: batching.max_queue,
        request_timeout: batching.request_timeout,
    }
}
