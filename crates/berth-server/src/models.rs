//! Loaded models: loaded on first use (concurrent first requests share one load), kept while they
//! are used, unloaded when idle past their keep-alive, and held within a memory budget: before a load,
//! idle models that are not pinned are evicted, least recently used first, or the load is refused
//! with the reason. Each text model gets a scheduler thread that batches its requests (see
//! `berth_engine::scheduler`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_engine::model::KvType;
use berth_engine::model::bert::BertEmbedder;
use berth_engine::scheduler::{Runner, RunnerConfig, SchedulerConfig};
use berth_engine::{Engine, EngineError};
use berth_store::{Reference, Store};
use tokio::sync::{Mutex, OnceCell};
use tracing::Instrument;

use crate::BatchingConfig;
use crate::error::ApiError;
use crate::limits::ModelLimits;
use crate::metrics::ServingMetrics;

pub struct LoadedModel {
    /// The name it was first loaded by (`ai/smollm2:latest`, or a deployment's): its name in
    /// metrics and logs. Answers carry the name each request used (see [`Served`]).
    pub name: String,
    /// Its manifest digest's first 12 hex digits (`model_version` in metrics, the
    /// `x-berth-model-version` header).
    pub version: String,
    pub engine: Arc<Engine>,
    /// The model's scheduler thread.
    pub runner: Runner,
    pub size: u64,
    pub metrics: ServingMetrics,
    /// Requests holding the model now (queued, running, or being answered).
    pub in_flight: AtomicUsize,
    /// When the last request let go of it.
    pub last_active: std::sync::Mutex<Instant>,
    /// Turns true at shutdown, when running generations must end.
    pub abort: tokio::sync::watch::Receiver<bool>,
    /// Tokens of context a request may use: the model's own, or less where a limit says so.
    pub context: usize,
}

impl LoadedModel {
    /// A request takes the model; the guard lets go (and notes the time) when dropped.
    pub fn hold(self: &Arc<Self>) -> Hold {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Hold(self.clone())
    }

    /// Bytes the model may use: weights, its whole KV cache, and working memory.
    pub fn memory_bytes(&self) -> u64 {
        self.size + self.kv_cache_bytes() + OVERHEAD
    }

    /// Bytes of KV cache the model's scheduler may use.
    pub fn kv_cache_bytes(&self) -> u64 {
        let scheduler = &self.runner.config().scheduler;
        (scheduler.kv_blocks * self.engine.model().kv_block_bytes(scheduler.kv_type)) as u64
    }

    /// What every request to this model must fit: the context the operator allows, the
    /// scheduler's KV cache and the vocabulary.
    pub fn limits(&self) -> berth_engine::RequestLimits {
        berth_engine::RequestLimits { context: self.context, ..self.runner.limits() }
    }

    /// An engine error as the API reports it, counted as a failure under its label; a full queue
    /// says when to come back (roughly one round of the running sequences per waiting batch of
    /// that size).
    pub fn error(&self, e: EngineError) -> ApiError {
        let max_running = self.runner.config().scheduler.max_running.max(1);
        let api = ApiError::from_engine(e, &self.name, max_running);
        self.metrics.failure(api.metric_label());
        api
    }
}

/// A loaded model as one request reached it: by a store reference or by a deployment's name,
/// which its answer repeats.
#[derive(Clone)]
pub struct Served {
    pub model: Arc<LoadedModel>,
    /// The name the request used.
    pub name: String,
}

impl std::ops::Deref for Served {
    type Target = Arc<LoadedModel>;
    fn deref(&self) -> &Arc<LoadedModel> {
        &self.model
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
}

/// A request's hold on a model (see [`LoadedModel::hold`]).
pub struct Hold(Arc<LoadedModel>);

impl Drop for Hold {
    fn drop(&mut self) {
        *self.0.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a request without `model` waits for models still loading to become its default.
const LOADING_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Working memory of a loaded model beyond weights and KV cache (activations of a step, logits,
/// scratch): a generous allowance for the models berth runs on a CPU.
const OVERHEAD: u64 = 64 << 20;

/// How long a model stays loaded after its last request (Ollama's `keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    /// Ollama's forms: a number of seconds, or a duration string ("5m", "1h30m", "90s", "0"); a
    /// negative value means for ever.
    pub fn parse(value: &serde_json::Value) -> Result<KeepAlive, String> {
        let bad = || format!("keep_alive must be a duration like \"5m\", \"1h\", 0 or -1, got {value}");
        match value {
            serde_json::Value::Number(n) => {
                let secs = n.as_f64().ok_or_else(bad)?;
                if secs < 0.0 {
                    Ok(KeepAlive::Forever)
                } else if secs > 1e9 {
                    Err(bad())
                } else {
                    Ok(KeepAlive::For(Duration::from_secs_f64(secs)))
                }
            }
            serde_json::Value::String(s) => Self::parse_str(s).ok_or_else(bad),
            _ => Err(bad()),
        }
    }

    pub fn parse_str(text: &str) -> Option<KeepAlive> {
        let t = text.trim();
        if t.starts_with('-') {
            return Some(KeepAlive::Forever);
        }
        if let Ok(secs) = t.parse::<u64>() {
            return (secs <= 1_000_000_000).then_some(KeepAlive::For(Duration::from_secs(secs)));
        }
        let mut total = 0f64;
        let mut rest = t;
        while !rest.is_empty() {
            let split = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
            let (number, tail) = rest.split_at(split);
            let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
            let (unit, next) = tail.split_at(unit_len);
            let n: f64 = number.parse().ok()?;
            total += n * match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return None,
            };
            rest = next;
        }
        (total.is_finite() && total <= 1e9).then(|| KeepAlive::For(Duration::from_secs_f64(total)))
    }
}

/// How the manager keeps models in memory.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Bytes all loaded models may use together.
    pub budget: u64,
    /// Default keep-alive of a model after its last request.
    pub keep_alive: KeepAlive,
    /// Models never evicted (references as clients write them).
    pub pinned: Vec<String>,
}

/// A loaded (or loading) model, keyed by its manifest digest: tags move freely, and two names of
/// one manifest share one load.
struct Entry {
    cell: Arc<OnceCell<Loaded>>,
    /// The reference it was first loaded by (`registry/repo:tag`), to unload it by that name.
    name: String,
    /// Bytes reserved for it (an upper bound while it loads, its own figure after).
    reserved: u64,
    keep_alive: KeepAlive,
    pinned: bool,
    last_used: Instant,
}

impl Entry {
    /// Whether no request holds it, and since when.
    fn idle_since(&self) -> Option<Instant> {
        match self.cell.get() {
            Some(Loaded::Chat(m)) => {
                if m.in_flight.load(Ordering::SeqCst) > 0 {
                    return None;
                }
                let last = *m.last_active.lock().unwrap_or_else(|e| e.into_inner());
                Some(last.max(self.last_used))
            }
            Some(Loaded::Embed(_)) => Some(self.last_used),
            None => None,
        }
    }
}

/// What `berth ps` shows of a loaded model.
pub struct ModelStatus {
    pub loaded: Option<Loaded>,
    pub name: String,
    pub digest: String,
    pub memory: u64,
    pub state: &'static str,
    pub pinned: bool,
    pub keep_alive: KeepAlive,
    pub idle: Option<Duration>,
}

impl ModelStatus {
    /// How long until this model is unloaded for being idle: `None` while it serves, when it is
    /// pinned, or when it is kept for ever.
    pub fn unloads_in(&self) -> Option<Duration> {
        match (self.keep_alive, self.idle, self.pinned) {
            (KeepAlive::For(d), Some(idle), false) => Some(d.saturating_sub(idle)),
            _ => None,
        }
    }
}

pub struct ModelManager {
    home: PathBuf,
    batching: BatchingConfig,
    memory: MemoryConfig,
    /// By manifest digest.
    loaded: Mutex<HashMap<String, Entry>>,
    /// Set at shutdown: generations still running end with an error.
    abort: tokio::sync::watch::Sender<bool>,
    pub deployments: crate::deployments::Deployments,
}

/// What a request will be answered by: a manifest of the store, under the name the request used.
pub(crate) struct Target {
    pub reference: Reference,
    pub digest: berth_store::Digest,
    pub name: String,
    pub settings: crate::deployments::spec::VersionSettings,
    /// Where a deployment's version records how it answered.
    pub window: Option<Arc<crate::deployments::window::Window>>,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ModelManager {
    /// `shared_deployments`: the PostgreSQL database a fleet shares its deployments in (else the
    /// home's SQLite).
    pub fn new(
        home: PathBuf,
        batching: BatchingConfig,
        memory: MemoryConfig,
        shared_deployments: Option<&str>,
    ) -> Result<Self, crate::deployments::db::DbError> {
        let (abort, _) = tokio::sync::watch::channel(false);
        let deployments = crate::deployments::Deployments::open(&home, shared_deployments)?;
        Ok(Self { home, batching, memory, loaded: Mutex::new(HashMap::new()), abort, deployments })
    }

    /// End every generation still running (shutdown).
    pub fn abort_all(&self) {
        self.abort.send_replace(true);
    }

    /// Requests holding any loaded model.
    pub async fn in_flight(&self) -> usize {
        let map = self.loaded.lock().await;
        map.values()
            .filter_map(|e| match e.cell.get() {
                Some(Loaded::Chat(m)) => Some(m.in_flight.load(Ordering::SeqCst)),
                _ => None,
            })
            .sum()
    }

    pub(crate) fn store(&self) -> Result<Store, ApiError> {
        Store::open(&self.home).map_err(|e| ApiError::internal(e.to_string()))
    }

    pub fn home(&self) -> &std::path::Path {
        &self.home
    }

    /// Forget a loaded model (requests running on it finish; its memory goes with the last one).
    pub async fn unload(&self, reference: &Reference) {
        let digest = self.store().ok().and_then(|s| s.resolve(reference).ok()).map(|d| d.to_string());
        let name = reference.to_string();
        self.loaded.lock().await.retain(|key, e| Some(key) != digest.as_ref() && e.name != name);
    }

    /// Pin a model (loading it first if needed): it is never unloaded for being idle nor evicted
    /// for another model, until it is unpinned or unloaded by name. Unpinning leaves it loaded,
    /// idle again under its keep-alive. Answers the name it is loaded under.
    pub async fn pin(&self, model: &str, pinned: bool) -> Result<String, ApiError> {
        let target = self.target(model).await?;
        if pinned {
            self.load_target(&target, None).await?;
        }
        match self.loaded.lock().await.get_mut(&target.digest.to_string()) {
            Some(e) => {
                e.pinned = pinned;
                e.last_used = Instant::now();
            }
            None if pinned => return Err(ApiError::unavailable("the model was unloaded while it was pinned; retry")),
            None => {}
        }
        tracing::info!(model = %target.name, "{}", if pinned { "pinned" } else { "unpinned" });
        Ok(target.name)
    }

    /// A version that stopped serving its deployment unloads once the requests on it have finished
    /// (unless it is pinned, or serves another deployment). Once no deployment may go back to it
    /// either, the store reference berth made for it goes (its files with it, unless a tag still
    /// names its manifest).
    pub async fn release(&self, version: &crate::deployments::spec::Version) {
        let digest = version.digest.as_str();
        if !self.deployments.serving_digests().contains(digest)
            && let Some(e) = self.loaded.lock().await.get_mut(digest).filter(|e| !e.pinned)
        {
            e.keep_alive = KeepAlive::For(Duration::ZERO);
        }
        if version.pinned_by_berth
            && !self.deployments.needs(digest)
            && let Ok(reference) = Reference::parse(&version.reference)
            && let Ok(store) = self.store()
        {
            match store.remove_ref(&reference) {
                Ok(_) => {
                    tracing::info!(model = %version.source, version = %version.label(), "no deployment needs this version any more; its pin is removed")
                }
                Err(e) => {
                    tracing::warn!(model = %version.source, "cannot remove the pin of a version no deployment needs: {e}")
                }
            }
        }
    }

    /// Unload the models idle past their keep-alive. Called periodically.
    pub async fn reap(&self) {
        let now = Instant::now();
        let mut map = self.loaded.lock().await;
        map.retain(|key, e| {
            let expired = match (e.pinned, e.keep_alive, e.idle_since()) {
                (false, KeepAlive::For(d), Some(since)) => now.duration_since(since) >= d,
                _ => false,
            };
            if expired {
                tracing::info!(model = %key, "unloaded: idle past its keep-alive");
            }
            !expired
        });
    }

    /// Every loaded or loading model, with what `berth ps` shows.
    pub async fn status(&self) -> Vec<ModelStatus> {
        let map = self.loaded.lock().await;
        let now = Instant::now();
        let mut out: Vec<ModelStatus> = map
            .iter()
            .map(|(key, e)| {
                let loaded = e.cell.get().cloned();
                let busy = matches!(&loaded, Some(Loaded::Chat(m)) if m.in_flight.load(Ordering::SeqCst) > 0);
                let state = match (&loaded, busy, e.keep_alive) {
                    (None, _, _) => "loading",
                    (Some(_), true, KeepAlive::For(d)) if d.is_zero() => "draining",
                    _ => "ready",
                };
                let name = loaded.as_ref().map(|l| l.name().to_string()).unwrap_or_else(|| e.name.clone());
                ModelStatus {
                    loaded,
                    name,
                    digest: key.clone(),
                    memory: e.reserved,
                    state,
                    pinned: e.pinned,
                    keep_alive: e.keep_alive,
                    idle: e.idle_since().map(|t| now.duration_since(t)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The memory budget in bytes.
    pub fn budget(&self) -> u64 {
        self.memory.budget
    }

    /// Make room for `needed` bytes: evict idle, unpinned models, least recently used first, or say
    /// why it cannot be done.
    fn make_room(&self, map: &mut HashMap<String, Entry>, needed: u64, name: &str) -> Result<(), ApiError> {
        let used = |map: &HashMap<String, Entry>| map.values().map(|e| e.reserved).sum::<u64>();
        // A version serving a deployment is never evicted for another model: a rollout that
        // cannot hold both versions is refused instead (see `can_hold`).
        let serving = self.deployments.serving_digests();
        let mut idle: Vec<(Instant, String)> = map
            .iter()
            .filter(|(k, e)| !e.pinned && !serving.contains(k.as_str()))
            .filter_map(|(k, e)| e.idle_since().map(|t| (t, k.clone())))
            .collect();
        idle.sort();
        let mut evict = idle.into_iter();
        while used(map) + needed > self.memory.budget {
            match evict.next() {
                Some((_, key)) => {
                    map.remove(&key);
                    tracing::info!(model = %key, "unloaded to make room for {name}");
                }
                None => {
                    let mib = |b: u64| b >> 20;
                    let holders: Vec<String> = map
                        .iter()
                        .map(|(k, e)| {
                            let why = if e.pinned {
                                "pinned"
                            } else if serving.contains(k.as_str()) {
                                "serving a deployment"
                            } else {
                                "in use"
                            };
                            format!("{} ({} MiB, {why})", e.name, mib(e.reserved))
                        })
                        .collect();
                    return Err(ApiError::insufficient_memory(format!(
                        "loading `{name}` needs about {} MiB, but the memory budget (--memory-budget, {} MiB) has {} MiB free{}; unload a model (berth unload REF), lower its --kv-cache, or raise --memory-budget",
                        mib(needed),
                        mib(self.memory.budget),
                        mib(self.memory.budget.saturating_sub(used(map))),
                        if holders.is_empty() {
                            String::new()
                        } else {
                            format!(" and is held by {}", holders.join(", "))
                        },
                    )));
                }
            }
        }
        Ok(())
    }

    /// Names of the models in the store the caller may use, as clients write them.
    pub fn available(&self) -> Vec<String> {
        self.list().map(|l| l.into_iter().map(|m| m.reference).collect()).unwrap_or_default()
    }

    /// The models in the store the caller may use, with their details.
    pub fn list(&self) -> Result<Vec<berth_store::ModelSummary>, ApiError> {
        let mut models = self.store()?.list().map_err(|e| ApiError::internal(e.to_string()))?;
        // A deployment is listed under its name, with its stable version's details.
        for d in self.deployments.list() {
            if let Some(stable) = models.iter().find(|m| m.digest.to_string() == d.stable.digest) {
                models.push(berth_store::ModelSummary { reference: d.name.clone(), ..stable.clone() });
            }
        }
        if let Some(caller) = crate::auth::caller() {
            models.retain(|m| caller.check_model(&m.reference).is_ok());
        }
        Ok(models)
    }

    /// Refuse a model the caller's key may not use.
    fn check_caller_may_use(reference: &Reference) -> Result<(), ApiError> {
        crate::auth::caller().map_or(Ok(()), |c| c.check_model(&reference.familiar()))
    }

    pub fn details(&self, model: &str) -> Result<berth_store::ModelDetails, ApiError> {
        // A deployment shows its stable version.
        if let Some(d) = self.deployments.get(model) {
            crate::auth::caller().map_or(Ok(()), |c| c.check_model(model))?;
            let reference = Reference::parse(&d.stable.reference).map_err(|_| ApiError::model_not_found(model, &[]))?;
            return self.store()?.inspect(&reference).map_err(|_| ApiError::model_not_found(model, &self.available()));
        }
        let reference = Reference::parse(model).map_err(|_| ApiError::model_not_found(model, &self.available()))?;
        Self::check_caller_may_use(&reference)?;
        self.store()?.inspect(&reference).map_err(|_| ApiError::model_not_found(model, &self.available()))
    }

    /// What a model in the store can do, from its type and chat template: `embeddings` for a BERT
    /// model; `chat`, `completion`, `json` (structured output), `tools` (every template, through
    /// the generic format where it has none) and `reasoning` where its template thinks in tags.
    pub fn capabilities(&self, summary: &berth_store::ModelSummary) -> Vec<&'static str> {
        if summary.format != "gguf" {
            return vec!["embeddings"];
        }
        let mut caps = vec!["chat", "completion", "json", "tools"];
        let template = Reference::parse(&summary.reference)
            .ok()
            .and_then(|r| self.store().ok()?.gguf_model(&r).ok())
            .and_then(|m| m.chat_template.or_else(|| berth_engine::chat_template_of(&m.path).ok().flatten()));
        if template.is_some_and(|t| berth_engine::reasoning::template_reasons(&t)) {
            caps.push("reasoning");
        }
        caps
    }

    /// Models in memory now.
    pub async fn loaded(&self) -> Vec<Loaded> {
        let map = self.loaded.lock().await;
        map.values().filter_map(|e| e.cell.get().cloned()).collect()
    }

    /// A text-generation model, loading it first if needed.
    pub async fn get(&self, model: &str) -> Result<Served, ApiError> {
        self.get_keeping(model, None).await
    }

    /// The same, setting how long the model stays loaded after this request (Ollama's `keep_alive`).
    pub async fn get_keeping(&self, model: &str, keep_alive: Option<KeepAlive>) -> Result<Served, ApiError> {
        let model = self.or_only_loaded(model, false).await?;
        match self.load(&model, keep_alive).await? {
            (Loaded::Chat(m), name) => Ok(Served { model: m, name }),
            (Loaded::Embed(m), _) => Err(ApiError::invalid(
                "model",
                format!("`{}` is an embedding model; use /v1/embeddings or /api/embed", m.name),
            )),
        }
    }

    /// An embedding model, loading it first if needed.
    pub async fn get_embedder(&self, model: &str) -> Result<Arc<EmbeddingModel>, ApiError> {
        let model = self.or_only_loaded(model, true).await?;
        match self.load(&model, None).await? {
            (Loaded::Embed(m), _) => Ok(m),
            (Loaded::Chat(m), _) => Err(ApiError::invalid(
                "model",
                format!(
                    "`{}` generates text; embeddings need an embedding model (a BERT safetensors artifact)",
                    m.name
                ),
            )),
        }
    }

    /// The model a request names, or where it names none (OpenAI's `model` omitted, as llama.cpp's
    /// server and vLLM accept), the one model of the kind it needs that is loaded.
    async fn or_only_loaded(&self, model: &str, embedding: bool) -> Result<String, ApiError> {
        if !model.trim().is_empty() {
            return Ok(model.to_string());
        }
        // A model still loading (the one `--model` names, right after start, while `/health`
        // already answers) is the default as soon as it is in: wait for loads in progress rather
        // than answer that nothing is loaded. A failed load leaves the map, so this ends.
        let deadline = Instant::now() + LOADING_WAIT;
        while self.loaded.lock().await.values().any(|e| e.cell.get().is_none()) && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut names: Vec<String> = self
            .loaded()
            .await
            .into_iter()
            .filter_map(|l| match l {
                Loaded::Chat(m) if !embedding => Some(m.name.clone()),
                Loaded::Embed(m) if embedding => Some(m.name.clone()),
                _ => None,
            })
            .filter(|name| crate::auth::caller().is_none_or(|c| c.check_model(name).is_ok()))
            .collect();
        names.sort();
        match names.as_slice() {
            [one] => Ok(one.clone()),
            [] => {
                let available = self.available();
                Err(ApiError::invalid(
                    "model",
                    if available.is_empty() {
                        "model is required, and no model is loaded to default to".to_string()
                    } else {
                        format!("model is required when no model is loaded; one of: {}", available.join(", "))
                    },
                ))
            }
            several => Err(ApiError::invalid(
                "model",
                format!("model is required when several models are loaded; one of: {}", several.join(", ")),
            )),
        }
    }

    /// A model named with its registry (`registry.example/ns/model:tag`, `localhost:5000/m`) that
    /// the store lacks is pulled (verified as every pull), so that a container can start from an
    /// empty volume. A short name (`ai/smollm2`) is never fetched behind the operator's back.
    pub async fn pull_if_missing(&self, model: &str) -> Result<(), ApiError> {
        let names_registry = model
            .split_once('/')
            .is_some_and(|(host, _)| host.contains('.') || host.contains(':') || host == "localhost");
        let Ok(reference) = Reference::parse(model) else { return Ok(()) };
        if !names_registry || self.store()?.resolve(&reference).is_ok() {
            return Ok(());
        }
        tracing::info!(model = %reference.familiar(), "not in the store: pulling it");
        let digest = self.pull(model).await?;
        tracing::info!(model = %reference.familiar(), digest = %digest, "pulled");
        Ok(())
    }

    /// Load a model of either kind (at server start).
    pub async fn preload(&self, model: &str, keep_alive: KeepAlive) -> Result<(), ApiError> {
        self.load(model, Some(keep_alive)).await.map(|_| ())
    }

    /// The loaded model a request names, loading it first if needed, with the name the request
    /// used; the request's response will name the version that answered.
    async fn load(&self, model: &str, keep_alive: Option<KeepAlive>) -> Result<(Loaded, String), ApiError> {
        let target = self.target(model).await?;
        let loaded = self.load_target(&target, keep_alive).await?;
        let version = crate::deployments::spec::version_label(&target.digest.to_string());
        crate::deployments::served::note(version, target.window.clone());
        Ok((loaded, target.name))
    }

    /// What a name means now: a deployment's version (chosen for this caller), or the manifest a
    /// store reference points to.
    async fn target(&self, model: &str) -> Result<Target, ApiError> {
        if let Some(route) = self.deployments.route(model, crate::deployments::served::identity().as_deref()) {
            crate::auth::caller().map_or(Ok(()), |c| c.check_model(model))?;
            return self.version_target(model, &route.version, Some(route.window));
        }
        let reference = Reference::parse(model).map_err(|_| ApiError::model_not_found(model, &self.available()))?;
        Self::check_caller_may_use(&reference)?;
        let key = reference.to_string();
        // The store decides what a name means on every request: a model removed from it (`berth
        // rm`, /api/delete) is unloaded and no longer answered; a tag moved to another manifest
        // loads that one (requests running on the old one finish on it, and it unloads when idle
        // past its keep-alive, or sooner when memory is needed).
        match self.store()?.resolve(&reference) {
            Ok(digest) => {
                Ok(Target { name: reference.familiar(), reference, digest, settings: Default::default(), window: None })
            }
            Err(berth_store::StoreError::NotFound(_)) => {
                let mut map = self.loaded.lock().await;
                let before = map.len();
                map.retain(|_, e| e.name != key);
                if map.len() < before {
                    tracing::info!(model = %reference.familiar(), "unloaded: removed from the store");
                }
                Err(ApiError::model_not_found(model, &self.available()))
            }
            Err(e) => Err(ApiError::internal(format!("cannot read the store: {e}"))),
        }
    }

    /// A deployment's version as what answers: its pinned reference, under the deployment's name.
    pub(crate) fn version_target(
        &self,
        deployment: &str,
        version: &crate::deployments::spec::Version,
        window: Option<Arc<crate::deployments::window::Window>>,
    ) -> Result<Target, ApiError> {
        let bad = |what: &str| ApiError::internal(format!("deployment {deployment} holds a bad {what}"));
        Ok(Target {
            reference: Reference::parse(&version.reference).map_err(|_| bad("reference"))?,
            digest: berth_store::Digest::parse(&version.digest).map_err(|_| bad("digest"))?,
            name: deployment.to_string(),
            settings: version.settings.clone(),
            window,
        })
    }

    /// Bytes a model would reserve when loaded: weights, a whole KV cache, working memory.
    fn reservation(&self, digest: &berth_store::Digest) -> Result<u64, ApiError> {
        let manifest =
            self.store()?.manifest(digest).map_err(|e| ApiError::internal(format!("cannot read the store: {e}")))?;
        Ok(manifest.total_size() + self.batching.kv_cache_bytes + OVERHEAD)
    }

    /// Refuse, up front, a model that would fit only by evicting what serves now: models pinned,
    /// serving a deployment, or busy stay; idle ones could make room.
    pub(crate) async fn can_hold(&self, target: &Target) -> Result<(), ApiError> {
        let key = target.digest.to_string();
        let needed = self.reservation(&target.digest)?;
        let map = self.loaded.lock().await;
        if map.contains_key(&key) {
            return Ok(());
        }
        let serving = self.deployments.serving_digests();
        let held: u64 = map
            .iter()
            .filter(|(k, e)| e.pinned || serving.contains(k.as_str()) || e.idle_since().is_none())
            .map(|(_, e)| e.reserved)
            .sum();
        if held + needed > self.memory.budget {
            let mib = |b: u64| b >> 20;
            return Err(ApiError::insufficient_memory(format!(
                "{} needs about {} MiB beside the {} MiB that serving models hold, and the memory budget (--memory-budget) is {} MiB; the stable version keeps serving. Raise --memory-budget, lower --kv-cache, or unload other models",
                target.reference.familiar(),
                mib(needed),
                mib(held),
                mib(self.memory.budget)
            )));
        }
        Ok(())
    }

    /// Load what a target names (once per manifest digest).
    pub(crate) async fn load_target(&self, target: &Target, keep_alive: Option<KeepAlive>) -> Result<Loaded, ApiError> {
        let key = target.digest.to_string();
        let cell = {
            let mut map = self.loaded.lock().await;
            match map.get_mut(&key) {
                Some(e) => {
                    e.last_used = Instant::now();
                    if let Some(k) = keep_alive {
                        e.keep_alive = k;
                    }
                    e.cell.clone()
                }
                None => {
                    // Reserve an upper bound now, so that concurrent loads of other models count it too.
                    let reserved = self.reservation(&target.digest)?;
                    self.make_room(&mut map, reserved, &target.reference.familiar())?;
                    let store = self.store()?;
                    let pinned = target.settings.pinned
                        || self.memory.pinned.iter().any(|p| {
                            Reference::parse(p)
                                .ok()
                                .and_then(|r| store.resolve(&r).ok())
                                .is_some_and(|d| d == target.digest)
                        });
                    let keep_alive = keep_alive
                        .or(target.settings.keep_alive_seconds.map(|s| {
                            if s < 0 { KeepAlive::Forever } else { KeepAlive::For(Duration::from_secs(s as u64)) }
                        }))
                        .unwrap_or(self.memory.keep_alive);
                    let cell = Arc::new(OnceCell::new());
                    map.insert(
                        key.clone(),
                        Entry {
                            cell: cell.clone(),
                            name: target.reference.to_string(),
                            reserved,
                            keep_alive,
                            pinned,
                            last_used: Instant::now(),
                        },
                    );
                    cell
                }
            }
        };
        let result = self.load_into(&cell, target, self.abort.subscribe()).await;
        let mut map = self.loaded.lock().await;
        match &result {
            // A failed load gives its reservation back, so that the next request tries again.
            Err(_) => {
                if map.get(&key).is_some_and(|e| Arc::ptr_eq(&e.cell, &cell) && e.cell.get().is_none()) {
                    map.remove(&key);
                }
            }
            // Loaded: the model's own figure replaces the upper bound.
            Ok(loaded) => {
                if let Some(e) = map.get_mut(&key).filter(|e| Arc::ptr_eq(&e.cell, &cell)) {
                    e.reserved = match loaded {
                        Loaded::Chat(m) => m.memory_bytes(),
                        Loaded::Embed(m) => m.size + OVERHEAD,
                    };
                }
            }
        }
        result
    }

    async fn load_into(
        &self,
        cell: &OnceCell<Loaded>,
        target: &Target,
        abort: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Loaded, ApiError> {
        // Only a first request loads; the others find the model in the cell and do none of this.
        let manager = self;
        let (reference, model, version) = (
            target.reference.clone(),
            target.name.as_str(),
            crate::deployments::spec::version_label(&target.digest.to_string()),
        );
        let name = target.name.clone();
        let span = tracing::info_span!("load_model", model = %name);
        cell.get_or_try_init(|| {
            async move {
                let started = std::time::Instant::now();
                let store = manager.store()?;
                let (_, manifest, _) = store.load(&reference).map_err(|e| match e {
                    berth_store::StoreError::NotFound(_) => ApiError::model_not_found(model, &manager.available()),
                    other => ApiError::internal(format!("cannot load {name}: {other}")),
                })?;
                let size = manifest.total_size();
                if !manifest.layers.iter().any(|l| l.media_type == berth_store::media::GGUF) {
                    // A safetensors folder: the embedding engine reads it by its files' paths.
                    let files: HashMap<String, PathBuf> =
                        store.model_files(&manifest).into_iter().map(|(_, path, blob)| (path, blob)).collect();
                    let checked = name.clone();
                    let embedder = tokio::task::spawn_blocking(move || {
                        store.verify_layers(&manifest).map_err(|e| damaged(&checked, e))?;
                        BertEmbedder::load(&files)
                            .map_err(|e| ApiError::invalid("model", format!("cannot load {checked}: {e}")))
                    })
                    .await
                    .map_err(|e| ApiError::internal(format!("loading stopped: {e}")))??;
                    tracing::info!(model = %name, seconds = started.elapsed().as_secs_f64(), "model loaded");
                    return Ok(Loaded::Embed(Arc::new(EmbeddingModel { name, embedder, size })));
                }
                let available = manager.available();
                let (model_name, checked, reference_to_load) = (model.to_string(), name.clone(), reference.clone());
                // Hashing the weights and mapping them take seconds for a large model: not on an
                // async worker.
                let engine = tokio::task::spawn_blocking(move || {
                    let found = store.gguf_model(&reference_to_load).map_err(|e| match e {
                        berth_store::StoreError::NotFound(_) => ApiError::model_not_found(&model_name, &available),
                        berth_store::StoreError::Config(m) => ApiError::invalid("model", m),
                        other => damaged(&checked, other),
                    })?;
                    let engine = Engine::load(&found.path, found.chat_template.as_deref())
                        .map_err(|e| ApiError::internal(format!("cannot load {checked}: {e}")))?;
                    Ok::<_, ApiError>((engine, found.context_size))
                })
                .await
                .map_err(|e| ApiError::internal(format!("loading stopped: {e}")))??;
                let (engine, packaged_context) = engine;
                let engine = Arc::new(engine);
                let batching = &manager.batching;
                let limits = batching.per_model.of(&reference);
                // The least of: the operator's limit (the server's per-model one, else the
                // deployment version's), the context the package declares, the model's own.
                let context = limits
                    .context
                    .or(target.settings.context)
                    .unwrap_or(usize::MAX)
                    .min(packaged_context.map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX)).max(1))
                    .min(engine.context_length());
                let config = runner_config(&engine, batching, &limits, context);
                let runner = Runner::start(engine.clone(), config)
                    .map_err(|e| ApiError::internal(format!("cannot start {name}: {e}")))?;
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(model = %name, seconds, "model loaded");
                let metrics = ServingMetrics::new(seconds);
                Ok(Loaded::Chat(Arc::new(LoadedModel {
                    name,
                    version,
                    engine,
                    runner,
                    size,
                    metrics,
                    in_flight: AtomicUsize::new(0),
                    last_active: std::sync::Mutex::new(Instant::now()),
                    abort,
                    context,
                })))
            }
            .instrument(span)
        })
        .await
        .cloned()
    }
}

/// A model whose files fail their check: the client learns that the model is damaged (503: the
/// operator repairs it with `berth pull`), the log gets the store's details.
fn damaged(name: &str, e: berth_store::StoreError) -> ApiError {
    use berth_store::StoreError as S;
    match e {
        S::DigestMismatch { .. } | S::SizeMismatch { .. } | S::MissingBlob(_) => {
            tracing::error!(model = %name, "cannot load: {e}");
            ApiError::unavailable(format!(
                "the files of model {name} are damaged or missing in the server's store; the operator can repair them with `berth pull {name}`"
            ))
            .with_code("model_damaged")
        }
        other => ApiError::internal(format!("cannot load {name}: {other}")),
    }
}

/// The scheduler's limits for one model: the server's, or the model's own where given. The KV cache
/// gets the configured memory, but no more than every running sequence at full context could use.
fn runner_config(engine: &Engine, batching: &BatchingConfig, limits: &ModelLimits, context: usize) -> RunnerConfig {
    let max_running = limits.max_running.unwrap_or(batching.max_running);
    let kv_type = if engine.model().supports_kv_type(batching.kv_type) {
        batching.kv_type
    } else {
        tracing::warn!(
            kv_type = %batching.kv_type,
            "this model's attention heads cannot be stored as {}; its KV cache stays f16",
            batching.kv_type
        );
        KvType::F16
    };
    let block_bytes = engine.model().kv_block_bytes(kv_type).max(1) as u64;
    let by_memory = (batching.kv_cache_bytes / block_bytes) as usize;
    let by_use = engine.kv_blocks_for(max_running.saturating_mul(context));
    RunnerConfig {
        scheduler: SchedulerConfig {
            // Every running sequence needs a token per step.
            max_batch_tokens: batching.max_batch_tokens.max(max_running),
            max_running,
            kv_blocks: by_memory.min(by_use).max(1),
            prefix_cache: batching.prefix_cache,
            kv_type,
            speculation: batching.speculation,
            draft_cost: batching.draft_cost,
            target: batching.step_target,
        },
        max_queue: batching.max_queue,
        request_timeout: batching.request_timeout,
        threads: limits.threads,
    }
}
