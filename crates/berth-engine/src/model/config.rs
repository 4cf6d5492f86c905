use berth_formats::gguf::GgufFile;

use crate::error::EngineError;

/// Hyper-parameters of a llama-family model, from its GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

/// Architectures that share llama's graph.
pub const LLAMA_FAMILY: &[&str] = &["llama", "mistral"];

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let arch = gguf.architecture().ok_or_else(|| EngineError::MissingMetadata("general.architecture".into()))?;
        if !LLAMA_FAMILY.contains(&arch) {
            return Err(EngineError::UnsupportedArchitecture(arch.to_string()));
        }
        let int = |key: &str| -> Result<usize, EngineError> {
            let full = format!("{arch}.{key}");
            let v = gguf.get_u64(&full).ok_or_else(|| EngineError::MissingMetadata(full.clone()))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < 1 << 24)
                .ok_or_else(|| EngineError::BadModel(format!("{full} = {v} is out of range")))
        };
        let float = |key: &str, default: f32| -> f32 {
            gguf.get(&format!("{arch}.{key}")).and_then(|v| v.as_f64()).map(|v| v as f32).unwrap_or(default)
        };
        let n_embd = int("embedding_length")?;
        let n_head = int("attention.head_count")?;
        let n_head_kv = int("attention.head_count_kv").unwrap_or(n_head);
        if n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::BadModel(format!(
                "{n_embd} embedding width with {n_head} heads and {n_head_kv} KV heads do not divide"
            )));
        }
        let head_dim = int("attention.key_length").unwrap_or(n_embd / n_head);
        let rope_dim = int("rope.dimension_count").unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 || rope_dim > 512 {
            return Err(EngineError::BadModel(format!("rope dimension {rope_dim} does not fit head size {head_dim}")));
        }
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => gguf
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| EngineError::MissingMetadata(format!("{arch}.vocab_size")))?,
        };
        let rms_eps = float("attention.layer_norm_rms_epsilon", 1e-5);
        let rope_base = float("rope.freq_base", 10_000.0);
        if !(rms_eps > 0.0 && rms_eps < 1.0 && rope_base > 1.0 && rope_base.is_finite()) {
            return Err(EngineError::BadModel("RMS epsilon or RoPE base out of range".into()));
        }
        Ok(Self {
            n_layers: int("block_count")?,
            n_embd,
            n_ff: int("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_base,
            rms_eps,
            context_length: int("context_length")?,
            vocab_size,
        })
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}
