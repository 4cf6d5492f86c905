//! The llama-family transformer, batched from the start: one step takes tokens of many sequences,
//! each with its own positions and KV cache, and sends all of them through each weight matrix at once.

use std::fs::File;
use std::path::Path;

use berth_formats::gguf::{GgmlType, GgufFile, TensorInfo};
use memmap2::Mmap;

use super::config::LlamaConfig;
use crate::error::EngineError;
use crate::kernels::attention::{Attention, Order};
use crate::kernels::{QMatrix, f16, ops, quant};

/// Where a weight matrix lies in the mapped file.
#[derive(Debug, Clone)]
struct Weight {
    ggml_type: GgmlType,
    rows: usize,
    cols: usize,
    offset: usize,
    len: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    ffn_norm: Vec<f32>,
    w_gate: Weight,
    w_up: Weight,
    w_down: Weight,
}

/// A loaded llama-family model. Weights stay in the memory-mapped file.
pub struct LlamaModel {
    mmap: Mmap,
    pub config: LlamaConfig,
    pub gguf: GgufFile,
    token_embd: Weight,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Weight,
}

/// One sequence's keys and values for every layer, stored as f16 bits (as llama.cpp does by default).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize, kv_dim: usize) {
        if len < self.len {
            for l in self.k.iter_mut().chain(self.v.iter_mut()) {
                l.truncate(len * kv_dim);
            }
            self.len = len;
        }
    }
}

/// One sequence's part of a batched step.
pub struct SeqStep<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    /// Logits for every token of the step (teacher forcing, echo) or only the last.
    pub all_logits: bool,
}

impl LlamaModel {
    /// Map and check a GGUF file of the llama family.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let io = |source| EngineError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; berth's store never rewrites a blob in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let gguf = GgufFile::parse(&mmap).map_err(|source| EngineError::Gguf { path: path.to_path_buf(), source })?;
        let config = LlamaConfig::from_gguf(&gguf)?;
        let c = &config;
        let weight = |name: &str, cols: usize, rows: usize| -> Result<Weight, EngineError> {
            let t = gguf.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
            expect_shape(t, &[cols as u64, rows as u64])?;
            let w = Weight { ggml_type: t.ggml_type, rows, cols, offset: t.offset as usize, len: t.size as usize };
            QMatrix::new(w.ggml_type, rows, cols, &mmap[w.offset..w.offset + w.len])?;
            Ok(w)
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, EngineError> {
            let t = gguf.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
            expect_shape(t, &[n as u64])?;
            if !quant::supported(t.ggml_type) {
                return Err(EngineError::UnsupportedTensorType(t.ggml_type.to_string()));
            }
            let mut out = vec![0f32; n];
            quant::dequantize(t.ggml_type, &mmap[t.offset as usize..(t.offset + t.size) as usize], &mut out);
            Ok(out)
        };
        let token_embd = weight("token_embd.weight", c.n_embd, c.vocab_size)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm"), c.n_embd)?,
                wq: weight(&n("attn_q"), c.n_embd, c.q_dim())?,
                wk: weight(&n("attn_k"), c.n_embd, c.kv_dim())?,
                wv: weight(&n("attn_v"), c.n_embd, c.kv_dim())?,
                wo: weight(&n("attn_output"), c.q_dim(), c.n_embd)?,
                ffn_norm: vector(&n("ffn_norm"), c.n_embd)?,
                w_gate: weight(&n("ffn_gate"), c.n_embd, c.n_ff)?,
                w_up: weight(&n("ffn_up"), c.n_embd, c.n_ff)?,
                w_down: weight(&n("ffn_down"), c.n_ff, c.n_embd)?,
            });
        }
        let output_norm = vector("output_norm.weight", c.n_embd)?;
        // Tied embeddings (SmolLM2): without output.weight the embedding is the output layer.
        let output = match gguf.tensor("output.weight") {
            Some(_) => weight("output.weight", c.n_embd, c.vocab_size)?,
            None => token_embd.clone(),
        };
        Ok(Self { mmap, config, gguf, token_embd, layers, output_norm, output })
    }

    fn mat(&self, w: &Weight) -> QMatrix<'_> {
        // Checked at load time: the slice and the block geometry fit.
        QMatrix::new(w.ggml_type, w.rows, w.cols, &self.mmap[w.offset..w.offset + w.len])
            .expect("weights were checked when the model was loaded")
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache { k: vec![Vec::new(); self.config.n_layers], v: vec![Vec::new(); self.config.n_layers], len: 0 }
    }

    /// Run one step for a batch of sequences. Returns, per sequence, its logits rows
    /// (`rows × vocab`): all of its new tokens' or only the last one's.
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let c = &self.config;
        let (d, kv_dim, q_dim) = (c.n_embd, c.kv_dim(), c.q_dim());
        // Which sequence and position each token of the batch belongs to.
        let mut owner = Vec::new();
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for (s, step) in steps.iter().enumerate() {
            let needed = step.cache.len + step.tokens.len();
            if needed > c.context_length {
                return Err(EngineError::ContextOverflow { needed, limit: c.context_length });
            }
            for (i, &t) in step.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(EngineError::BadModel(format!("token id {t} is outside the vocabulary")));
                }
                owner.push(s);
                positions.push((step.cache.len + i) as u32);
                tokens.push(t);
            }
        }
        let n = tokens.len();
        if n == 0 {
            return Ok(steps.iter().map(|_| Vec::new()).collect());
        }
        let embd = self.mat(&self.token_embd);
        let mut x = vec![0f32; n * d];
        for (row, &t) in x.chunks_exact_mut(d).zip(&tokens) {
            embd.dequantize_row(t as usize, row);
        }

        let mut h = vec![0f32; n * d];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut o = vec![0f32; n * d];
        let mut gate = vec![0f32; n * c.n_ff];
        let mut up = vec![0f32; n * c.n_ff];
        for (li, layer) in self.layers.iter().enumerate() {
            h.copy_from_slice(&x);
            rows(&mut h, d, |_, row| ops::rms_norm(row, &layer.attn_norm, c.rms_eps));
            let (wq, wk, wv) = (self.mat(&layer.wq), self.mat(&layer.wk), self.mat(&layer.wv));
            QMatrix::matmul_many(&h, n, &mut [(wq, &mut q), (wk, &mut k), (wv, &mut v)]);
            let rope = |v: &mut [f32], dim: usize| {
                rows(v, dim, |i, row| ops::rope_norm(row, c.head_dim, c.rope_dim, positions[i], c.rope_base))
            };
            rope(&mut q, q_dim);
            rope(&mut k, kv_dim);
            // Append the new keys and values to each sequence's cache, in token order.
            for (i, &s) in owner.iter().enumerate() {
                let cache = &mut *steps[s].cache;
                cache.k[li].extend(k[i * kv_dim..(i + 1) * kv_dim].iter().map(|&f| f16::from_f32(f)));
                cache.v[li].extend(v[i * kv_dim..(i + 1) * kv_dim].iter().map(|&f| f16::from_f32(f)));
            }
            // llama.cpp reduces attention products in one order for single-token steps and another
            // for steps of several tokens; berth follows it (see `Order`).
            let order = if n > 1 { Order::Gemm } else { Order::Gemv };
            let attention = Attention { n_head: c.n_head, n_head_kv: c.n_head_kv, head_dim: c.head_dim };
            // Each sequence's tokens are consecutive in the batch: split the queries and outputs
            // by sequence and attend each run over its own cache.
            let mut runs = Vec::with_capacity(steps.len());
            let mut rest = attn.as_mut_slice();
            let mut start = 0;
            for step in steps.iter() {
                let len = step.tokens.len();
                let (out, tail) = rest.split_at_mut(len * q_dim);
                rest = tail;
                runs.push((&*step.cache, start, out));
                start += len;
            }
            // Sequences one after another; inside each, heads and tokens are shared out.
            for (cache, start, out) in runs.into_iter().filter(|(_, _, out)| !out.is_empty()) {
                let q_run = &q[start * q_dim..start * q_dim + out.len()];
                let first = positions[start] as usize;
                attention.sequence(q_run, first, &cache.k[li], &cache.v[li], order, out);
            }
            self.mat(&layer.wo).matmul(&attn, n, &mut o);
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            h.copy_from_slice(&x);
            rows(&mut h, d, |_, row| ops::rms_norm(row, &layer.ffn_norm, c.rms_eps));
            let (w_gate, w_up) = (self.mat(&layer.w_gate), self.mat(&layer.w_up));
            QMatrix::matmul_many(&h, n, &mut [(w_gate, &mut gate), (w_up, &mut up)]);
            rows(&mut gate, c.n_ff, |i, g| ops::swiglu_ggml(g, &up[i * c.n_ff..(i + 1) * c.n_ff]));
            self.mat(&layer.w_down).matmul(&gate, n, &mut o);
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
        }
        for step in steps.iter_mut() {
            step.cache.len += step.tokens.len();
        }

        // Logits only for the rows asked for.
        let mut wanted = Vec::new();
        let mut first = 0;
        for step in steps.iter() {
            let len = step.tokens.len();
            if step.all_logits {
                wanted.extend(first..first + len);
            } else if len > 0 {
                wanted.push(first + len - 1);
            }
            first += len;
        }
        let mut rows = vec![0f32; wanted.len() * d];
        for (dst, &src) in rows.chunks_exact_mut(d).zip(&wanted) {
            dst.copy_from_slice(&x[src * d..(src + 1) * d]);
            ops::rms_norm(dst, &self.output_norm, c.rms_eps);
        }
        let mut logits = vec![0f32; wanted.len() * c.vocab_size];
        self.mat(&self.output).matmul(&rows, wanted.len(), &mut logits);
        let mut out = Vec::with_capacity(steps.len());
        let mut at = 0;
        for step in steps.iter() {
            let count = if step.all_logits { step.tokens.len() } else { usize::from(!step.tokens.is_empty()) };
            out.push(logits[at * c.vocab_size..(at + count) * c.vocab_size].to_vec());
            at += count;
        }
        Ok(out)
    }
}

/// Apply `f(index, row)` to every row of `rows`: in parallel for a batch, in the calling thread
/// for a few rows, where handing work to the pool would cost more than the work.
fn rows(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    const PARALLEL_FROM: usize = 8;
    if data.len() / width < PARALLEL_FROM {
        data.chunks_exact_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        crate::team().for_each_chunk_mut(data, width, f);
    }
}

fn expect_shape(t: &TensorInfo, expected: &[u64]) -> Result<(), EngineError> {
    if t.dims != expected {
        return Err(EngineError::WrongShape {
            name: t.name.clone(),
            expected: expected.to_vec(),
            actual: t.dims.clone(),
        });
    }
    Ok(())
}
