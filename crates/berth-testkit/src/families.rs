//! Small random-weight models of every decoder family berth runs, written the way llama.cpp's
//! converter writes the real ones: the family's tensor names and metadata keys, and a real
//! vocabulary (with its tokenizer settings) copied from one of llama.cpp's `ggml-vocab-*.gguf`
//! test files. Dimensions are small but multiples of 256 where the weight matrices need it, so
//! llama.cpp's `llama-quantize` can turn them into Q4_K_M for real; sliding windows are shorter
//! than the test prompts, so windows are exercised.
//!
//! The weights are pseudo-random with a fixed seed, scaled so that activations keep their size
//! through the layers and the logits have a clear leader (agreement tests compare top-1 tokens).

use std::path::Path;

use berth_formats::gguf::{GgmlType, GgufBuilder, GgufFile, Value};

/// A family berth runs, with the vocabulary and chat template its test model borrows.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The GGUF architecture name.
    pub arch: &'static str,
    /// Stem of the `ggml-vocab-<stem>.gguf` file whose tokenizer the model uses.
    pub vocab: &'static str,
    /// A real chat template of the family, from llama.cpp's `models/templates`.
    pub template: &'static str,
}

pub const FAMILIES: &[Family] = &[
    Family { arch: "llama", vocab: "llama-bpe", template: "meta-llama-Llama-3.2-3B-Instruct.jinja" },
    Family { arch: "qwen2", vocab: "qwen2", template: "Qwen-Qwen2.5-7B-Instruct.jinja" },
    Family { arch: "qwen3", vocab: "qwen2", template: "Qwen-Qwen3-0.6B.jinja" },
    Family { arch: "qwen3moe", vocab: "qwen2", template: "Qwen-Qwen3-0.6B.jinja" },
    Family { arch: "gemma2", vocab: "llama-spm", template: "google-gemma-2-2b-it.jinja" },
    Family { arch: "gemma3", vocab: "llama-spm", template: "google-gemma-2-2b-it.jinja" },
    Family { arch: "phi3", vocab: "phi-3", template: "microsoft-Phi-3.5-mini-instruct.jinja" },
];

pub fn family(arch: &str) -> Option<Family> {
    FAMILIES.iter().copied().find(|f| f.arch == arch)
}

/// The window of the sliding-window layers in the test models: shorter than the test prompts.
pub const WINDOW: usize = 32;
/// The test models' context.
pub const CONTEXT: usize = 1024;

/// Weight matrices' storage in a written model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    F32,
    F16,
    Q8_0,
}

/// Write the test model of `family` to `out`, its vocabulary from `testdata` (the folder
/// `scripts/fetch-llamacpp-testdata` prints) and its chat template from the same place.
pub fn write_family_model(family: Family, testdata: &Path, storage: Storage, out: &Path) -> std::io::Result<()> {
    write_family_model_shaped(family, &Shape::test(family.arch), testdata, storage, out)
}

/// [`write_family_model`] in another shape.
pub fn write_family_model_shaped(
    family: Family,
    shape: &Shape,
    testdata: &Path,
    storage: Storage,
    out: &Path,
) -> std::io::Result<()> {
    let models = testdata.join("models");
    // "-" for the testdata folder: the synthetic byte-level vocabulary and a ChatML template of
    // berth_testkit::synthetic (small files, for fuzzing seeds).
    let (vocab_bytes, template) = if testdata == Path::new("-") {
        let tiny = crate::synthetic::tiny_llama(&crate::synthetic::LlamaShape::default()).build();
        let parsed = GgufFile::parse(&tiny).map_err(|e| std::io::Error::other(e.to_string()))?;
        let template = parsed.get_str("tokenizer.chat_template").unwrap_or_default().to_string();
        (tiny, template)
    } else {
        let template = std::fs::read_to_string(models.join("templates").join(family.template))?;
        (std::fs::read(models.join(format!("ggml-vocab-{}.gguf", family.vocab)))?, template)
    };
    let vocab = GgufFile::parse(&vocab_bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let bytes = family_model_shaped(family.arch, shape, &vocab, &template, storage).build();
    let part = out.with_extension("part");
    std::fs::write(&part, bytes)?;
    std::fs::rename(part, out)
}

/// Dimensions of a written model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Experts, experts used per token, and each expert's feed-forward width (MoE families).
    pub experts: (usize, usize, usize),
    /// Without `output.weight` even where the family may have one.
    pub tied: bool,
}

impl Shape {
    /// The agreement-test shape of a family: a few layers, widths that are multiples of 256.
    pub fn test(arch: &str) -> Shape {
        Shape {
            n_layers: if arch == "gemma3" { 6 } else { 4 },
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            // Qwen3 declares its head width apart from the embedding width; so does its test model.
            head_dim: if arch.starts_with("qwen3") { 128 } else { 64 },
            n_ff: 512,
            experts: (8, 2, 256),
            tied: false,
        }
    }

    /// A minimal shape (one layer, widths of 32), for fuzzing seeds.
    pub fn tiny() -> Shape {
        Shape {
            n_layers: 1,
            n_embd: 32,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 16,
            n_ff: 32,
            experts: (4, 2, 32),
            tied: true,
        }
    }

    /// Qwen2.5-0.5B's shape (24 layers of 896, 14 query and 2 key/value heads, 4864 wide
    /// feed-forward, tied embeddings), for speed measurements.
    pub fn qwen2_5_0_5b() -> Shape {
        Shape {
            n_layers: 24,
            n_embd: 896,
            n_head: 14,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 4864,
            experts: (0, 0, 0),
            tied: true,
        }
    }

    /// Qwen3-30B-A3B's shape made small: its layer widths (2048 wide, 32 query and 4 key/value
    /// heads of 128, experts 768 wide, 8 used per token) with 8 layers and 32 experts instead of
    /// 48 and 128, for speed measurements of routed experts.
    pub fn small_qwen3_moe() -> Shape {
        Shape {
            n_layers: 8,
            n_embd: 2048,
            n_head: 32,
            n_head_kv: 4,
            head_dim: 128,
            n_ff: 6144,
            experts: (32, 8, 768),
            tied: false,
        }
    }
}

/// The test model of a family as a GGUF builder (tests may change it before writing).
pub fn family_model(arch: &str, vocab: &GgufFile, template: &str, storage: Storage) -> GgufBuilder {
    family_model_shaped(arch, &Shape::test(arch), vocab, template, storage)
}

/// A model of a family in any shape, with the same pseudo-random weights' statistics.
pub fn family_model_shaped(
    arch: &str,
    shape: &Shape,
    vocab: &GgufFile,
    template: &str,
    storage: Storage,
) -> GgufBuilder {
    let n_vocab = match vocab.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => panic!("the vocabulary file has no tokens"),
    };
    let moe = arch == "qwen3moe";
    let Shape { n_layers, n_embd, n_head, n_head_kv, head_dim, n_ff, experts, tied } = shape.clone();
    let (q_dim, kv_dim) = (n_head * head_dim, n_head_kv * head_dim);
    let (n_expert, n_expert_used, n_ff_exp) = experts;

    let key = |k: &str| format!("{arch}.{k}");
    let mut b = GgufBuilder::new()
        .metadata("general.architecture", Value::String(arch.into()))
        .metadata("general.name", Value::String(format!("berth test {arch}")))
        .metadata(&key("block_count"), Value::U32(n_layers as u32))
        .metadata(&key("context_length"), Value::U32(CONTEXT as u32))
        .metadata(&key("embedding_length"), Value::U32(n_embd as u32))
        .metadata(&key("feed_forward_length"), Value::U32(n_ff as u32))
        .metadata(&key("attention.head_count"), Value::U32(n_head as u32))
        .metadata(&key("attention.head_count_kv"), Value::U32(n_head_kv as u32))
        .metadata(&key("attention.key_length"), Value::U32(head_dim as u32))
        .metadata(&key("attention.value_length"), Value::U32(head_dim as u32))
        .metadata(&key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6))
        .metadata(&key("rope.freq_base"), Value::F32(if arch == "gemma3" { 1_000_000.0 } else { 10_000.0 }));
    match arch {
        "gemma2" => {
            b = b
                .metadata(&key("attention.sliding_window"), Value::U32(WINDOW as u32))
                .metadata(&key("attn_logit_softcapping"), Value::F32(50.0))
                .metadata(&key("final_logit_softcapping"), Value::F32(30.0));
        }
        "gemma3" => {
            b = b
                .metadata(&key("attention.sliding_window"), Value::U32(WINDOW as u32))
                .metadata(&key("rope.scaling.type"), Value::String("linear".into()))
                .metadata(&key("rope.scaling.factor"), Value::F32(8.0));
        }
        "phi3" => {
            // Phi-3.5's long-context RoPE: per-frequency factors and a magnitude; the file's
            // window is one llama.cpp ignores.
            b = b
                .metadata(&key("rope.scaling.original_context_length"), Value::U32(128))
                .metadata(&key("rope.scaling.attn_factor"), Value::F32(1.1902381))
                .metadata(&key("attention.sliding_window"), Value::U32(262_144));
        }
        "qwen3moe" => {
            b = b
                .metadata(&key("expert_count"), Value::U32(n_expert as u32))
                .metadata(&key("expert_used_count"), Value::U32(n_expert_used as u32))
                .metadata(&key("expert_feed_forward_length"), Value::U32(n_ff_exp as u32));
        }
        _ => {}
    }
    for (k, v) in &vocab.metadata {
        if k.starts_with("tokenizer.") && k != "tokenizer.chat_template" {
            b = b.metadata(k, v.clone());
        }
    }
    b = b.metadata("tokenizer.chat_template", Value::String(template.into()));

    let rng = std::cell::RefCell::new(Lcg(
        0x5eed ^ arch.bytes().fold(0u64, |h, c| h.wrapping_mul(31).wrapping_add(c as u64))
    ));
    let w = |b: GgufBuilder, name: &str, dims: &[u64], spread: f32| -> GgufBuilder {
        let n = dims.iter().product::<u64>() as usize;
        let values: Vec<f32> = (0..n).map(|_| rng.borrow_mut().uniform() * spread).collect();
        write_tensor(b, name, dims, &values, if dims.len() == 1 { Storage::F32 } else { storage })
    };
    let norm = |b: GgufBuilder, name: &str, n: usize| -> GgufBuilder {
        // Around one, as trained norms are (Gemma's files store 1 + weight already).
        let values: Vec<f32> = (0..n).map(|_| 1.0 + 0.2 * rng.borrow_mut().uniform()).collect();
        write_tensor(b, name, &[n as u64], &values, Storage::F32)
    };
    // Uniform in ±spread has a standard deviation of spread/√3: matrices keep activations' size.
    let for_cols = |cols: usize| (3.0 / cols as f32).sqrt();
    let (e, v) = (n_embd as u64, n_vocab as u64);
    b = w(b, "token_embd.weight", &[e, v], 1.7);
    for i in 0..n_layers {
        let t = |s: &str| format!("blk.{i}.{s}");
        b = norm(b, &t("attn_norm.weight"), n_embd);
        if arch == "phi3" {
            b = w(b, &t("attn_qkv.weight"), &[e, (q_dim + 2 * kv_dim) as u64], for_cols(n_embd));
        } else {
            b = w(b, &t("attn_q.weight"), &[e, q_dim as u64], for_cols(n_embd));
            b = w(b, &t("attn_k.weight"), &[e, kv_dim as u64], for_cols(n_embd));
            b = w(b, &t("attn_v.weight"), &[e, kv_dim as u64], for_cols(n_embd));
        }
        if arch == "qwen2" {
            b = w(b, &t("attn_q.bias"), &[q_dim as u64], 0.5);
            b = w(b, &t("attn_k.bias"), &[kv_dim as u64], 0.5);
            b = w(b, &t("attn_v.bias"), &[kv_dim as u64], 0.5);
        }
        if arch.starts_with("qwen3") || arch == "gemma3" {
            b = norm(b, &t("attn_q_norm.weight"), head_dim);
            b = norm(b, &t("attn_k_norm.weight"), head_dim);
        }
        b = w(b, &t("attn_output.weight"), &[q_dim as u64, e], for_cols(q_dim));
        if arch.starts_with("gemma") {
            b = norm(b, &t("post_attention_norm.weight"), n_embd);
        }
        b = norm(b, &t("ffn_norm.weight"), n_embd);
        if moe {
            let (x, f) = (n_expert as u64, n_ff_exp as u64);
            // The router stays F32, as llama.cpp's converter writes it and its quantizer keeps it.
            let router: Vec<f32> =
                (0..n_embd * n_expert).map(|_| rng.borrow_mut().uniform() * for_cols(n_embd) * 4.0).collect();
            b = write_tensor(b, &t("ffn_gate_inp.weight"), &[e, x], &router, Storage::F32);
            b = w(b, &t("ffn_gate_exps.weight"), &[e, f, x], for_cols(n_embd));
            b = w(b, &t("ffn_up_exps.weight"), &[e, f, x], for_cols(n_embd));
            b = w(b, &t("ffn_down_exps.weight"), &[f, e, x], for_cols(n_ff_exp));
        } else if arch == "phi3" {
            b = w(b, &t("ffn_up.weight"), &[e, 2 * n_ff as u64], for_cols(n_embd));
            b = w(b, &t("ffn_down.weight"), &[n_ff as u64, e], for_cols(n_ff));
        } else {
            b = w(b, &t("ffn_gate.weight"), &[e, n_ff as u64], for_cols(n_embd));
            b = w(b, &t("ffn_up.weight"), &[e, n_ff as u64], for_cols(n_embd));
            b = w(b, &t("ffn_down.weight"), &[n_ff as u64, e], for_cols(n_ff));
        }
        if arch.starts_with("gemma") {
            b = norm(b, &t("post_ffw_norm.weight"), n_embd);
        }
    }
    b = norm(b, "output_norm.weight", n_embd);
    if arch == "llama" {
        // Llama 3.1's RoPE frequency factors: 1 for the fast-turning dimensions, up to 8 for the
        // slow ones (the file stores the divisors llama.cpp applies).
        let half = head_dim / 2;
        let factors: Vec<f32> = (0..half).map(|i| 1.0 + 7.0 * (i as f32 / (half - 1) as f32).powi(2)).collect();
        b = write_tensor(b, "rope_freqs.weight", &[half as u64], &factors, Storage::F32);
    }
    if arch == "phi3" {
        let half = head_dim / 2;
        let long: Vec<f32> = (0..half).map(|i| 1.0 + i as f32 * 0.5).collect();
        let short: Vec<f32> = (0..half).map(|i| 1.0 + i as f32 * 0.01).collect();
        b = write_tensor(b, "rope_factors_long.weight", &[half as u64], &long, Storage::F32);
        b = write_tensor(b, "rope_factors_short.weight", &[half as u64], &short, Storage::F32);
    }
    // Gemma ties its output to the embedding; the others get their own output layer.
    if !arch.starts_with("gemma") && !tied {
        b = w(b, "output.weight", &[e, v], 1.7 / 4.0);
    }
    b
}

fn write_tensor(b: GgufBuilder, name: &str, dims: &[u64], values: &[f32], storage: Storage) -> GgufBuilder {
    match storage {
        Storage::F32 => b.tensor(name, dims, GgmlType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Storage::F16 => {
            b.tensor(name, dims, GgmlType::F16, values.iter().flat_map(|&v| f16_bits(v).to_le_bytes()).collect())
        }
        Storage::Q8_0 => b.tensor(name, dims, GgmlType::Q8_0, q8_0(values)),
    }
}

/// GGML's Q8_0 blocks: an f16 scale and 32 signed bytes (`quantize_row_q8_0_ref`).
pub fn q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16_bits(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// IEEE half-precision bits of `x`, rounded to nearest even (subnormals included).
pub fn f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7e00;
    }
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 6.103_515_6e-5 {
        // Subnormal: a multiple of 2^-24, rounded half to even by the float addition.
        let m = (a * 16_777_216.0).round_ties_even() as u16;
        return sign | m;
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mant = bits & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

struct Lcg(u64);

impl Lcg {
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
