//! The llama-family transformer, batched from the start: one step takes tokens of many sequences,
//! each with its own positions and KV cache, and sends all of them through each weight matrix at once.

use std::fs::File;
use std::path::Path;

use berth_formats::gguf::{GgmlType, GgufFile, TensorInfo};
use memmap2::Mmap;

use super::config::LlamaConfig;
use super::kv::{BLOCK_TOKENS, KvStore, blocks_for};
use super::{KvPool, Logits, SeqStep, TextModel};
use crate::error::EngineError;
use crate::kernels::attention::{Attention, SeqKv};
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
    config: LlamaConfig,
    gguf: GgufFile,
    token_embd: Weight,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Weight,
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

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Run one step for a batch of sequences whose caches live in `store`. Returns, per sequence,
    /// the logits it asked for (`rows × vocab`).
    fn forward_store(&self, store: &mut KvStore, steps: &[SeqStep<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let c = &self.config;
        let (d, kv_dim, q_dim) = (c.n_embd, c.kv_dim(), c.q_dim());
        // Which sequence and position each token of the batch belongs to.
        let mut owner = Vec::new();
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for (s, step) in steps.iter().enumerate() {
            let needed = step.start + step.tokens.len();
            if needed > c.context_length {
                return Err(EngineError::ContextOverflow { needed, limit: c.context_length });
            }
            // A scheduler bug, not bad input, but a clear error beats reading another sequence's cache.
            let covered = step.blocks.len() * BLOCK_TOKENS;
            if needed > covered || step.blocks.iter().any(|&b| b as usize >= store.blocks()) {
                return Err(EngineError::BadModel(format!(
                    "a block table covers {covered} positions of a store of {} blocks; {needed} are needed",
                    store.blocks()
                )));
            }
            for (i, &t) in step.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(EngineError::BadModel(format!("token id {t} is outside the vocabulary")));
                }
                owner.push(s);
                positions.push((step.start + i) as u32);
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
            // Store the new keys and values in each sequence's blocks.
            for (i, (&s, &pos)) in owner.iter().zip(&positions).enumerate() {
                let pos = pos as usize;
                let (kd, vd) = store.slot_mut(li, steps[s].blocks[pos / BLOCK_TOKENS], pos % BLOCK_TOKENS);
                for (dst, &f) in kd.iter_mut().zip(&k[i * kv_dim..(i + 1) * kv_dim]) {
                    *dst = f16::from_f32(f);
                }
                for (dst, &f) in vd.iter_mut().zip(&v[i * kv_dim..(i + 1) * kv_dim]) {
                    *dst = f16::from_f32(f);
                }
            }
            let attention = Attention { n_head: c.n_head, n_head_kv: c.n_head_kv, head_dim: c.head_dim };
            let mut seqs = Vec::with_capacity(steps.len());
            let mut row = 0;
            for step in steps {
                let len = step.tokens.len();
                let used = blocks_for(step.start + len);
                let (k_blocks, v_blocks) = step.blocks[..used].iter().map(|&b| store.block(li, b)).unzip();
                seqs.push(SeqKv {
                    rows: row..row + len,
                    first: step.start,
                    // llama.cpp reduces a prompt of several tokens as a matrix product (tinyBLAS)
                    // and a generated token as a vector product: berth picks the order by the
                    // token's place in its sequence, not by what shares the step.
                    gemm_until: if step.prompt_len > 1 { step.prompt_len } else { 0 },
                    k_blocks,
                    v_blocks,
                });
                row += len;
            }
            attention.batch(&q, &seqs, BLOCK_TOKENS, &mut attn);
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
        // Logits only for the rows asked for.
        let mut wanted = Vec::new();
        let mut first = 0;
        for step in steps.iter() {
            let len = step.tokens.len();
            match step.logits {
                Logits::All => wanted.extend(first..first + len),
                Logits::Last if len > 0 => wanted.push(first + len - 1),
                _ => {}
            }
            first += len;
        }
        let mut rows = vec![0f32; wanted.len() * d];
        for (dst, &src) in rows.chunks_exact_mut(d).zip(&wanted) {
            dst.copy_from_slice(&x[src * d..(src + 1) * d]);
            ops::rms_norm(dst, &self.output_norm, c.rms_eps);
        }
        let mut logits = vec![0f32; wanted.len() * c.vocab_size];
        if !wanted.is_empty() {
            self.mat(&self.output).matmul(&rows, wanted.len(), &mut logits);
        }
        let mut out = Vec::with_capacity(steps.len());
        let mut at = 0;
        for step in steps.iter() {
            let count = match step.logits {
                Logits::All => step.tokens.len(),
                Logits::Last => usize::from(!step.tokens.is_empty()),
                Logits::None => 0,
            };
            out.push(logits[at * c.vocab_size..(at + count) * c.vocab_size].to_vec());
            at += count;
        }
        Ok(out)
    }
}

impl TextModel for LlamaModel {
    fn architecture(&self) -> &str {
        self.gguf.architecture().unwrap_or("llama")
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn context_length(&self) -> usize {
        self.config.context_length
    }

    fn kv_block_bytes(&self) -> usize {
        KvStore::block_bytes(self.config.n_layers, self.config.kv_dim())
    }

    fn new_kv_pool(&self, blocks: usize) -> Box<dyn KvPool> {
        Box::new(KvStore::new(self.config.n_layers, self.config.kv_dim(), blocks))
    }

    fn forward(&self, pool: &mut dyn KvPool, steps: &[SeqStep<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let store = pool.as_any_mut().downcast_mut::<KvStore>().ok_or_else(|| {
            EngineError::BadModel("a cache pool of another backend was given to the CPU model".into())
        })?;
        self.forward_store(store, steps)
    }

    fn metadata(&self) -> &GgufFile {
        &self.gguf
    }
}

/// Apply `f(index, row)` to every row of `rows`: in parallel for a batch, in the calling thread
/// for a few rows, where handing work to the pool would cost more than the work.
fn rows(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    const PARALLEL_FROM: usize = 32;
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
