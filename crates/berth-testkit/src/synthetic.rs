//! Small llama-family GGUF models with pseudo-random weights, written in memory: for tests of
//! loading, broken files and the engine's plumbing where the real model's size would only slow
//! things down. (Speed does not depend on the weights' values.)

use berth_formats::gguf::{Array, GgmlType, GgufBuilder, Value};

/// Shape of a synthetic llama model.
#[derive(Debug, Clone)]
pub struct LlamaShape {
    pub architecture: String,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub context_length: usize,
    /// Tokens in the vocabulary: at least [`VOCAB`]; the rest are reserved control tokens.
    pub vocab: usize,
    /// Type of the weight matrices (F32 or Q4_1); norms are always F32.
    pub weight_type: GgmlType,
    /// Without `output.weight`: the embedding doubles as the output layer.
    pub tied_embeddings: bool,
}

impl LlamaShape {
    /// The shape of Llama-3.2-1B (16 layers of 2048, 32 query and 8 key/value heads, 8192 wide
    /// feed-forward, 128,256 tokens, tied embeddings, a context of 131,072), in Q4_1: for speed
    /// measurements (pp4096 among them), where the values of the weights do not matter.
    pub fn llama_3_2_1b() -> Self {
        Self {
            architecture: "llama".into(),
            n_layers: 16,
            n_embd: 2048,
            n_head: 32,
            n_head_kv: 8,
            n_ff: 8192,
            context_length: 131_072,
            vocab: 128_256,
            weight_type: GgmlType::Q4_1,
            tied_embeddings: true,
        }
    }
}

impl Default for LlamaShape {
    fn default() -> Self {
        Self {
            architecture: "llama".into(),
            n_layers: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            context_length: 256,
            vocab: VOCAB,
            weight_type: GgmlType::F32,
            tied_embeddings: true,
        }
    }
}

/// The vocabulary: the 256 byte-level characters, then `<|im_start|>` and `<|im_end|>`.
pub const VOCAB: usize = 258;

fn byte_level_tokens() -> Vec<String> {
    // GPT-2's byte → character map, as the real tokenizers store their vocabularies.
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        out.push(if printable {
            (b as char).to_string()
        } else {
            n += 1;
            char::from_u32(255 + n).map(|c| c.to_string()).unwrap_or_default()
        });
    }
    out
}

fn weights(n: usize, seed: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v = ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Q4_1 blocks (scale, minimum, 32 nibbles) with pseudo-random nibbles and small, sane scales.
fn q4_1_weights(n: usize, seed: &mut u64) -> Vec<u8> {
    let (d, m) = (crate::families::f16_bits(0.002), crate::families::f16_bits(-0.015));
    let mut out = Vec::with_capacity(n / 32 * 20);
    for _ in 0..n / 32 {
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        for _ in 0..2 {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            out.extend_from_slice(&seed.to_le_bytes());
        }
    }
    out
}

/// A builder holding a complete model; tests may add or replace parts before `build()`.
pub fn tiny_llama(shape: &LlamaShape) -> GgufBuilder {
    tiny_llama_without(shape, &[])
}

/// The same model without the named tensors.
pub fn tiny_llama_without(shape: &LlamaShape, skip: &[&str]) -> GgufBuilder {
    let s = shape;
    let arch = s.architecture.as_str();
    let head_dim = s.n_embd / s.n_head;
    let kv = s.n_head_kv * head_dim;
    let mut tokens = byte_level_tokens();
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut types = vec![1i32; 256];
    types.extend([3, 3]);
    for i in VOCAB..s.vocab.max(VOCAB) {
        tokens.push(format!("<|reserved_{i}|>"));
        types.push(3);
    }
    let mut b = GgufBuilder::new()
        .metadata("general.architecture", Value::String(arch.into()))
        .metadata(&format!("{arch}.block_count"), Value::U32(s.n_layers as u32))
        .metadata(&format!("{arch}.context_length"), Value::U32(s.context_length as u32))
        .metadata(&format!("{arch}.embedding_length"), Value::U32(s.n_embd as u32))
        .metadata(&format!("{arch}.feed_forward_length"), Value::U32(s.n_ff as u32))
        .metadata(&format!("{arch}.attention.head_count"), Value::U32(s.n_head as u32))
        .metadata(&format!("{arch}.attention.head_count_kv"), Value::U32(s.n_head_kv as u32))
        .metadata(&format!("{arch}.rope.freq_base"), Value::F32(10000.0))
        .metadata(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5))
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", Value::String("smollm".into()))
        .metadata("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)))
        .metadata("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .metadata("tokenizer.ggml.merges", Value::Array(Array::String(Vec::new())))
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(256))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(257))
        .metadata(
            "tokenizer.chat_template",
            Value::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        );
    let mut seed = 1u64;
    let mut tensor = |b: GgufBuilder, name: &str, dims: &[u64]| -> GgufBuilder {
        if skip.contains(&name) {
            return b;
        }
        let n: u64 = dims.iter().product();
        if dims.len() == 2 && s.weight_type == GgmlType::Q4_1 {
            b.tensor(name, dims, GgmlType::Q4_1, q4_1_weights(n as usize, &mut seed))
        } else {
            b.tensor(name, dims, GgmlType::F32, weights(n as usize, &mut seed))
        }
    };
    let (e, ff, v) = (s.n_embd as u64, s.n_ff as u64, s.vocab.max(VOCAB) as u64);
    b = tensor(b, "token_embd.weight", &[e, v]);
    for i in 0..s.n_layers {
        b = tensor(b, &format!("blk.{i}.attn_norm.weight"), &[e]);
        b = tensor(b, &format!("blk.{i}.attn_q.weight"), &[e, e]);
        b = tensor(b, &format!("blk.{i}.attn_k.weight"), &[e, kv as u64]);
        b = tensor(b, &format!("blk.{i}.attn_v.weight"), &[e, kv as u64]);
        b = tensor(b, &format!("blk.{i}.attn_output.weight"), &[e, e]);
        b = tensor(b, &format!("blk.{i}.ffn_norm.weight"), &[e]);
        b = tensor(b, &format!("blk.{i}.ffn_gate.weight"), &[e, ff]);
        b = tensor(b, &format!("blk.{i}.ffn_up.weight"), &[e, ff]);
        b = tensor(b, &format!("blk.{i}.ffn_down.weight"), &[ff, e]);
    }
    b = tensor(b, "output_norm.weight", &[e]);
    if !s.tied_embeddings {
        b = tensor(b, "output.weight", &[e, v]);
    }
    b
}
