//! A decoder's hyper-parameters and its architecture's description, read from GGUF metadata.
//!
//! Most decoder-only families differ from llama in a handful of switches (how RoPE pairs
//! dimensions, biases on the projections, norms of the queries and keys, norms after the blocks,
//! the feed-forward activation, embedding scaling, sliding windows, soft-capping, experts): one
//! [`Architecture`] per family sets them, and [`super::decoder`] follows them.

use berth_formats::gguf::{Array, GgufFile, Value};

use crate::error::EngineError;
use crate::kernels::ops::RopeStyle;

/// The feed-forward block's gated activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up` (llama, Qwen, Phi).
    SwiGlu,
    /// `gelu_tanh(gate) · up` (Gemma).
    GeGlu,
}

/// What distinguishes one decoder family from another.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub rope: RopeStyle,
    /// Per-head RMS norms of the queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMS norms after the attention and feed-forward blocks, before the residual add (Gemma 2/3).
    pub post_norms: bool,
    pub activation: Activation,
    /// The embeddings are multiplied by √n_embd (Gemma).
    pub scale_embeddings: bool,
    /// The output layer is always the embedding (Gemma 2 has no `output.weight`).
    pub always_tied: bool,
    /// Which layers use a sliding window: `n` means every layer but each `n`-th (llama.cpp's
    /// `set_swa_pattern`); 0 means the family has no sliding windows (Phi-3's files name one that
    /// llama.cpp does not apply). A file's `attention.sliding_window_pattern` overrides it.
    pub swa_pattern: u32,
    /// Sliding window used when the file names none (Gemma 2's 4096); `None`: no window unless the
    /// file gives one.
    pub default_window: Option<usize>,
    /// RoPE base of sliding-window layers when the file does not say (`rope.freq_base_swa`);
    /// `None`: the global base.
    pub swa_rope_base: Option<f32>,
    /// Attention soft-capping: `Some(default)` where the family reads the file's
    /// `attn_logit_softcapping` (Gemma 2: 50 unless the file says otherwise; 0 is off).
    pub attn_softcap: Option<f32>,
    /// Final-logit soft-capping, the same way (Gemma 2: 30; Gemma 3: only if the file sets it).
    pub final_softcap: Option<f32>,
    /// Queries are scaled before attention by `1/√head_dim` and the softmax scale is 1 (Gemma,
    /// Phi-3), instead of the softmax scaling the scores.
    pub prescale_queries: bool,
    /// Routed experts in every layer's feed-forward block (Qwen3-MoE).
    pub experts: bool,
    /// RoPE frequency factors from the file (`rope_freqs` of Llama 3.1+, Phi-3's long and short
    /// factors), where llama.cpp's graph of the family applies them.
    pub rope_factors: bool,
}

impl Architecture {
    /// The description of a GGUF architecture berth runs, or `None`.
    pub fn named(name: &str) -> Option<Architecture> {
        let llama = Architecture {
            rope: RopeStyle::Normal,
            qk_norm: false,
            post_norms: false,
            activation: Activation::SwiGlu,
            scale_embeddings: false,
            always_tied: false,
            swa_pattern: 0,
            default_window: None,
            swa_rope_base: None,
            attn_softcap: None,
            final_softcap: None,
            prescale_queries: false,
            experts: false,
            rope_factors: true,
        };
        let neox = Architecture { rope: RopeStyle::Neox, rope_factors: false, ..llama.clone() };
        let gemma = Architecture {
            rope: RopeStyle::Neox,
            post_norms: true,
            activation: Activation::GeGlu,
            scale_embeddings: true,
            prescale_queries: true,
            rope_factors: false,
            ..llama.clone()
        };
        Some(match name {
            "llama" | "mistral" => llama,
            // Qwen2's projection biases are found by name (`attn_q.bias`), like any bias.
            "qwen2" => neox,
            "qwen3" => Architecture { qk_norm: true, ..neox },
            "qwen3moe" => Architecture { qk_norm: true, experts: true, ..neox },
            "phi3" => Architecture { prescale_queries: true, rope_factors: true, ..neox },
            "gemma2" => Architecture {
                always_tied: true,
                swa_pattern: 2,
                default_window: Some(4096),
                attn_softcap: Some(50.0),
                final_softcap: Some(30.0),
                ..gemma
            },
            "gemma3" => Architecture {
                qk_norm: true,
                swa_pattern: 6,
                swa_rope_base: Some(10_000.0),
                final_softcap: Some(0.0),
                ..gemma
            },
            _ => return None,
        })
    }
}

/// Routed experts of a mixture-of-experts feed-forward block.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertConfig {
    pub count: usize,
    /// Experts each token uses.
    pub used: usize,
    /// Width of one expert's feed-forward block.
    pub n_ff: usize,
    /// Scale applied to the routing weights after normalisation (1 without).
    pub weights_scale: f32,
}

/// One layer's attention settings that may differ between layers.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAttention {
    pub window: Option<usize>,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
}

/// Hyper-parameters of a decoder model, from its GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub name: String,
    pub arch: Architecture,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// `rope.scaling.attn_factor` (1 without).
    pub rope_attn_factor: f32,
    /// The context the model was trained for before long-context RoPE (`rope.scaling.original_
    /// context_length`): Phi-3 uses its long factors when serving more than this.
    pub rope_original_context: usize,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub experts: Option<ExpertConfig>,
    pub layers: Vec<LayerAttention>,
}

/// Largest supported sizes: well above any released model, low enough that products of them
/// cannot overflow or ask for absurd allocations.
const MAX_DIM: u64 = 1 << 24;
/// Layers: released models have at most a few hundred; per-layer settings are allocated before
/// the tensors are checked.
const MAX_LAYERS: usize = 4096;

impl DecoderConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let name = gguf.architecture().ok_or_else(|| EngineError::MissingMetadata("general.architecture".into()))?;
        let arch = Architecture::named(name).ok_or_else(|| EngineError::UnsupportedArchitecture(name.to_string()))?;
        let key = |k: &str| format!("{name}.{k}");
        let int = |k: &str| -> Result<usize, EngineError> {
            let full = key(k);
            let v = gguf.get_u64(&full).ok_or_else(|| EngineError::MissingMetadata(full.clone()))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && (v as u64) < MAX_DIM)
                .ok_or_else(|| EngineError::BadModel(format!("{full} = {v} is out of range")))
        };
        // A key that may be absent: absent is `None`, present but out of range is still an error.
        let optional = |k: &str| -> Result<Option<usize>, EngineError> {
            match int(k) {
                Ok(v) => Ok(Some(v)),
                Err(EngineError::MissingMetadata(_)) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let float = |k: &str| -> Option<f32> { gguf.get(&key(k)).and_then(|v| v.as_f64()).map(|v| v as f32) };
        let n_layers = int("block_count")?;
        if n_layers > MAX_LAYERS {
            return Err(EngineError::BadModel(format!("{n_layers} layers is more than berth runs ({MAX_LAYERS})")));
        }
        let n_embd = int("embedding_length")?;
        let n_head = int("attention.head_count")?;
        let n_head_kv = optional("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(EngineError::BadModel(format!("{n_head} heads do not share out over {n_head_kv} KV heads")));
        }
        let head_dim = match optional("attention.key_length")? {
            Some(v) => v,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(EngineError::BadModel(format!(
                    "{n_embd} embedding width does not divide into {n_head} heads"
                )));
            }
        };
        if optional("attention.value_length")?.is_some_and(|v| v != head_dim) {
            return Err(EngineError::BadModel("keys and values of different widths are not supported".into()));
        }
        if head_dim % 16 != 0 || head_dim > 1024 {
            return Err(EngineError::BadModel(format!("a head width of {head_dim} is not supported")));
        }
        let rope_dim = optional("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 || rope_dim > 512 {
            return Err(EngineError::BadModel(format!("rope dimension {rope_dim} does not fit head size {head_dim}")));
        }
        let vocab_size = match optional("vocab_size")? {
            Some(v) => v,
            None => gguf
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| EngineError::MissingMetadata(key("vocab_size")))?,
        };
        if vocab_size == 0 || vocab_size as u64 >= MAX_DIM {
            return Err(EngineError::BadModel(format!("a vocabulary of {vocab_size} tokens is out of range")));
        }
        let rms_eps = float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
        let rope_base = float("rope.freq_base").unwrap_or(10_000.0);
        if !(rms_eps > 0.0 && rms_eps < 1.0 && rope_base > 1.0 && rope_base.is_finite()) {
            return Err(EngineError::BadModel("RMS epsilon or RoPE base out of range".into()));
        }
        let scaling = gguf.get(&key("rope.scaling.type")).and_then(|v| v.as_str()).unwrap_or("linear");
        if !matches!(scaling, "linear" | "none") {
            return Err(EngineError::BadModel(format!(
                "RoPE scaling \"{scaling}\" is not supported yet (berth runs linear scaling and per-frequency factors)"
            )));
        }
        let factor = float("rope.scaling.factor").or_else(|| float("rope.scale_linear")).unwrap_or(0.0);
        let rope_freq_scale = if scaling == "none" || factor == 0.0 { 1.0 } else { 1.0 / factor };
        let rope_attn_factor = float("rope.scaling.attn_factor").unwrap_or(1.0);
        for (what, v) in [("RoPE scaling factor", rope_freq_scale), ("RoPE attention factor", rope_attn_factor)] {
            if !(v.is_finite() && v > 0.0 && v < 1e6) {
                return Err(EngineError::BadModel(format!("{what} {v} is out of range")));
            }
        }
        let context_length = int("context_length")?;
        let rope_original_context = optional("rope.scaling.original_context_length")?.unwrap_or(context_length);
        let softcap = |k: &str, default: Option<f32>| -> Result<Option<f32>, EngineError> {
            // Only families that cap read the keys (llama.cpp ignores them elsewhere); 0 turns it off.
            let Some(default) = default else { return Ok(None) };
            match float(k).unwrap_or(default) {
                0.0 => Ok(None),
                v if v.is_finite() && v > 0.0 => Ok(Some(v)),
                v => Err(EngineError::BadModel(format!("{} = {v} is out of range", key(k)))),
            }
        };
        let attn_softcap = softcap("attn_logit_softcapping", arch.attn_softcap)?;
        let final_softcap = softcap("final_logit_softcapping", arch.final_softcap)?;

        // Sliding windows: the file's window (or the family's default) on the layers its pattern
        // (an array of flags, or a period) marks. Only families whose llama.cpp graph slides read
        // a window (a Mistral or Qwen2 file may name one that llama.cpp ignores, and so does berth).
        let window =
            if arch.swa_pattern > 0 { optional("attention.sliding_window")?.or(arch.default_window) } else { None };
        let swa_layers: Vec<bool> = match (window, gguf.get(&key("attention.sliding_window_pattern"))) {
            (None, _) => vec![false; n_layers],
            (Some(_), Some(Value::Array(flags))) => {
                let flags: Vec<bool> = match flags {
                    Array::Bool(v) => v.clone(),
                    Array::U8(v) => v.iter().map(|&n| n != 0).collect(),
                    Array::I32(v) => v.iter().map(|&n| n != 0).collect(),
                    Array::U32(v) => v.iter().map(|&n| n != 0).collect(),
                    _ => {
                        return Err(EngineError::BadModel(
                            key("attention.sliding_window_pattern") + " is not a list of flags",
                        ));
                    }
                };
                if flags.len() != n_layers {
                    return Err(EngineError::BadModel(format!(
                        "{} has {} flags for {n_layers} layers",
                        key("attention.sliding_window_pattern"),
                        flags.len()
                    )));
                }
                flags
            }
            (Some(_), pattern) => {
                let n = pattern.and_then(|v| v.as_u64()).map_or(arch.swa_pattern as u64, |n| n.min(MAX_DIM));
                (0..n_layers as u64).map(|il| n == 0 || il % n < n - 1).collect()
            }
        };
        let swa_base = float("rope.freq_base_swa").or(arch.swa_rope_base).unwrap_or(rope_base);
        let layers = swa_layers
            .iter()
            .map(|&swa| LayerAttention {
                window: if swa { window } else { None },
                rope_base: if swa { swa_base } else { rope_base },
                rope_freq_scale: if swa { 1.0 } else { rope_freq_scale },
            })
            .collect();

        let experts = if arch.experts {
            let count = int("expert_count")?;
            let used = int("expert_used_count")?;
            if used > count || used > 64 {
                return Err(EngineError::BadModel(format!("{used} experts used of {count}")));
            }
            let n_ff = match optional("expert_feed_forward_length")? {
                Some(n) => n,
                None => (int("feed_forward_length")? / used).max(1),
            };
            let weights_scale = float("expert_weights_scale").filter(|&s| s != 0.0).unwrap_or(1.0);
            if !(weights_scale.is_finite() && weights_scale > 0.0) {
                return Err(EngineError::BadModel(format!(
                    "{} = {weights_scale} is out of range",
                    key("expert_weights_scale")
                )));
            }
            Some(ExpertConfig { count, used, n_ff, weights_scale })
        } else {
            None
        };
        let n_ff =
            if experts.is_some() { optional("feed_forward_length")?.unwrap_or(1) } else { int("feed_forward_length")? };
        Ok(Self {
            name: name.to_string(),
            arch,
            n_layers,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rms_eps,
            context_length,
            vocab_size,
            rope_attn_factor,
            rope_original_context,
            attn_softcap,
            final_softcap,
            experts,
            layers,
        })
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}
