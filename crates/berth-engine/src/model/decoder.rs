//! The decoder-only transformer every supported text family shares (llama, Mistral, Qwen 2/3 and
//! Qwen3-MoE, Gemma 2/3, Phi-3), driven by the family's [`Architecture`] description, and batched
//! from the start: one step takes tokens of many sequences, each with its own positions and KV
//! cache, and sends all of them through each weight matrix at once.
//!
//! For the llama family every operation is the one berth reproduces llama.cpp with bit for bit;
//! the other families' switches add steps (biases, norms, scaling, capping, windows, experts) in
//! the places and orders llama.cpp's graphs put them.

use std::fs::File;
use std::path::Path;

use berth_formats::gguf::{GgmlType, GgufFile, TensorInfo};
use memmap2::Mmap;

use super::config::{Activation, DecoderConfig, ExpertConfig};
use super::kv::{BLOCK_TOKENS, KvStore, blocks_for};
use super::{KvPool, Logits, SeqStep, TextModel};
use crate::error::EngineError;
use crate::kernels::attention::{Attention, SeqKv};
use crate::kernels::ops::Rope;
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

/// The query, key and value projections: three matrices, or one fused (Phi-3).
enum Qkv {
    Separate { q: Weight, k: Weight, v: Weight },
    Fused(Weight),
}

/// The gate and up projections of a gated feed-forward block: two matrices, or one fused (Phi-3),
/// gate rows first.
enum GateUp {
    Separate { gate: Weight, up: Weight },
    Fused(Weight),
}

/// Experts stored as one 3-D tensor (`count` matrices of `rows × cols`, one after another).
struct ExpertWeights {
    matrix: Weight,
    count: usize,
}

/// A mixture-of-experts block: the router and every expert's gate, up and down matrices.
struct Experts {
    router: Weight,
    gate: ExpertWeights,
    up: ExpertWeights,
    down: ExpertWeights,
}

enum Ffn {
    Dense { gate_up: GateUp, down: Weight },
    Experts(Experts),
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Qkv,
    /// Projection biases (Qwen2), `q_dim + 2·kv_dim` values in q, k, v order.
    qkv_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    wo: Weight,
    attn_post_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
    ffn_post_norm: Option<Vec<f32>>,
}

/// A loaded decoder model. Weights stay in the memory-mapped file.
pub struct DecoderModel {
    mmap: Mmap,
    config: DecoderConfig,
    gguf: GgufFile,
    token_embd: Weight,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Weight,
    /// Per-frequency RoPE divisors (Llama 3.1's `rope_freqs`, Phi-3's long or short factors).
    rope_factors: Option<Vec<f32>>,
    /// Queries are multiplied by this before attention (Gemma, Phi-3), or 1.
    query_scale: f32,
}

/// The loader's view of the mapped file: typed, shape-checked access to tensors.
struct Tensors<'a> {
    gguf: &'a GgufFile,
    mmap: &'a [u8],
}

impl Tensors<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.gguf.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    fn has(&self, name: &str) -> bool {
        self.gguf.tensor(name).is_some()
    }

    /// A `rows × cols` matrix (GGML dims `[cols, rows]`).
    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Weight, EngineError> {
        let t = self.info(name)?;
        expect_shape(t, &[cols as u64, rows as u64])?;
        let w = Weight { ggml_type: t.ggml_type, rows, cols, offset: t.offset as usize, len: t.size as usize };
        QMatrix::new(w.ggml_type, rows, cols, &self.mmap[w.offset..w.offset + w.len])?;
        Ok(w)
    }

    /// `count` matrices of `rows × cols` (GGML dims `[cols, rows, count]`).
    fn experts(&self, name: &str, cols: usize, rows: usize, count: usize) -> Result<ExpertWeights, EngineError> {
        let t = self.info(name)?;
        expect_shape(t, &[cols as u64, rows as u64, count as u64])?;
        let (offset, len) = (t.offset as usize, t.size as usize);
        if len % count != 0 {
            return Err(EngineError::BadModel(format!("{name} does not split into {count} experts")));
        }
        let matrix = Weight { ggml_type: t.ggml_type, rows, cols, offset, len: len / count };
        QMatrix::new(matrix.ggml_type, rows, cols, &self.mmap[offset..offset + matrix.len])?;
        Ok(ExpertWeights { matrix, count })
    }

    /// A vector of `n` values, dequantised.
    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, EngineError> {
        let t = self.info(name)?;
        expect_shape(t, &[n as u64])?;
        if !quant::supported(t.ggml_type) {
            return Err(EngineError::UnsupportedTensorType(t.ggml_type.to_string()));
        }
        let bytes = t.ggml_type.bytes_for(n as u64).filter(|&b| b == t.size);
        if bytes.is_none() {
            return Err(EngineError::BadModel(format!("{name} holds {} bytes for {n} values", t.size)));
        }
        let mut out = vec![0f32; n];
        quant::dequantize(t.ggml_type, &self.mmap[t.offset as usize..(t.offset + t.size) as usize], &mut out);
        Ok(out)
    }

    fn optional_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>, EngineError> {
        if self.has(name) { self.vector(name, n).map(Some) } else { Ok(None) }
    }
}

impl DecoderModel {
    /// Map and check a GGUF file of a supported decoder family.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let io = |source| EngineError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; berth's store never rewrites a blob in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let gguf = GgufFile::parse(&mmap).map_err(|source| EngineError::Gguf { path: path.to_path_buf(), source })?;
        let config = DecoderConfig::from_gguf(&gguf)?;
        let c = &config;
        let t = Tensors { gguf: &gguf, mmap: &mmap };
        let (d, q_dim, kv_dim) = (c.n_embd, c.q_dim(), c.kv_dim());
        let token_embd = t.matrix("token_embd.weight", d, c.vocab_size)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let qkv = if t.has(&n("attn_qkv.weight")) {
                Qkv::Fused(t.matrix(&n("attn_qkv.weight"), d, q_dim + 2 * kv_dim)?)
            } else {
                Qkv::Separate {
                    q: t.matrix(&n("attn_q.weight"), d, q_dim)?,
                    k: t.matrix(&n("attn_k.weight"), d, kv_dim)?,
                    v: t.matrix(&n("attn_v.weight"), d, kv_dim)?,
                }
            };
            let qkv_bias = if t.has(&n("attn_qkv.bias")) {
                Some(t.vector(&n("attn_qkv.bias"), q_dim + 2 * kv_dim)?)
            } else if t.has(&n("attn_q.bias")) {
                let mut b = t.vector(&n("attn_q.bias"), q_dim)?;
                b.extend(t.vector(&n("attn_k.bias"), kv_dim)?);
                b.extend(t.vector(&n("attn_v.bias"), kv_dim)?);
                Some(b)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.arch.qk_norm {
                (
                    Some(t.vector(&n("attn_q_norm.weight"), c.head_dim)?),
                    Some(t.vector(&n("attn_k_norm.weight"), c.head_dim)?),
                )
            } else {
                (None, None)
            };
            let post = |name: &str| if c.arch.post_norms { t.vector(&n(name), d).map(Some) } else { Ok(None) };
            let ffn = match &c.experts {
                Some(e) => Ffn::Experts(Experts {
                    router: t.matrix(&n("ffn_gate_inp.weight"), d, e.count)?,
                    gate: t.experts(&n("ffn_gate_exps.weight"), d, e.n_ff, e.count)?,
                    up: t.experts(&n("ffn_up_exps.weight"), d, e.n_ff, e.count)?,
                    down: t.experts(&n("ffn_down_exps.weight"), e.n_ff, d, e.count)?,
                }),
                None => Ffn::Dense {
                    gate_up: if t.has(&n("ffn_gate.weight")) {
                        GateUp::Separate {
                            gate: t.matrix(&n("ffn_gate.weight"), d, c.n_ff)?,
                            up: t.matrix(&n("ffn_up.weight"), d, c.n_ff)?,
                        }
                    } else {
                        GateUp::Fused(t.matrix(&n("ffn_up.weight"), d, 2 * c.n_ff)?)
                    },
                    down: t.matrix(&n("ffn_down.weight"), c.n_ff, d)?,
                },
            };
            layers.push(Layer {
                attn_norm: t.vector(&n("attn_norm.weight"), d)?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                wo: t.matrix(&n("attn_output.weight"), q_dim, d)?,
                attn_post_norm: post("post_attention_norm.weight")?,
                ffn_norm: t.vector(&n("ffn_norm.weight"), d)?,
                ffn,
                ffn_post_norm: post("post_ffw_norm.weight")?,
            });
        }
        let output_norm = t.vector("output_norm.weight", d)?;
        // Tied embeddings (SmolLM2, Gemma): without output.weight the embedding is the output layer.
        let output = if t.has("output.weight") && !c.arch.always_tied {
            t.matrix("output.weight", d, c.vocab_size)?
        } else {
            token_embd.clone()
        };
        // Phi-3 chooses its long-context factors when it serves more than its original context;
        // berth serves the whole context the file declares.
        let half = c.rope_dim / 2;
        let long = c.context_length > c.rope_original_context;
        let rope_factors = match (t.has("rope_freqs.weight"), long) {
            (true, _) => Some(t.vector("rope_freqs.weight", half)?),
            (false, true) => t.optional_vector("rope_factors_long.weight", half)?,
            (false, false) => t.optional_vector("rope_factors_short.weight", half)?,
        };
        if rope_factors.as_ref().is_some_and(|f| f.iter().any(|&v| !(v.is_finite() && v > 0.0))) {
            return Err(EngineError::BadModel("RoPE frequency factors must be positive".into()));
        }
        let query_scale = if c.arch.prescale_queries {
            // llama.cpp follows the reference Gemma code: the 27B models scale by the embedding
            // width per head instead of the head width.
            let gemma_27b = (c.name == "gemma2" && c.n_layers == 46) || (c.name == "gemma3" && c.n_layers == 62);
            let width = if gemma_27b { c.n_embd / c.n_head } else { c.head_dim };
            1.0 / (width as f32).sqrt()
        } else {
            1.0
        };
        Ok(Self { mmap, config, gguf, token_embd, layers, output_norm, output, rope_factors, query_scale })
    }

    fn mat(&self, w: &Weight) -> QMatrix<'_> {
        // Checked at load time: the slice and the block geometry fit.
        QMatrix::new(w.ggml_type, w.rows, w.cols, &self.mmap[w.offset..w.offset + w.len])
            .expect("weights were checked when the model was loaded")
    }

    fn expert(&self, w: &ExpertWeights, e: usize) -> QMatrix<'_> {
        let m = &w.matrix;
        let at = m.offset + e * m.len;
        QMatrix::new(m.ggml_type, m.rows, m.cols, &self.mmap[at..at + m.len])
            .expect("expert weights were checked when the model was loaded")
    }

    pub fn config(&self) -> &DecoderConfig {
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
        // The batch llama.cpp computes each token in, run alone: a prompt token with its whole
        // prompt, a generated token by itself (decided per sequence, never by what else shares
        // the step; the kernels follow llama.cpp's reduction order for that batch size).
        let peer_batch: Vec<u32> = steps
            .iter()
            .flat_map(|st| {
                let prompt = u32::try_from(st.prompt_len).unwrap_or(u32::MAX);
                (0..st.tokens.len()).map(move |i| if st.start + i < st.prompt_len { prompt } else { 1 })
            })
            .collect();
        let lb = &peer_batch[..];
        let embd = self.mat(&self.token_embd);
        let mut x = vec![0f32; n * d];
        for (row, &t) in x.chunks_exact_mut(d).zip(&tokens) {
            embd.dequantize_row(t as usize, row);
        }
        if c.arch.scale_embeddings {
            let scale = (d as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
        }

        let mut h = vec![0f32; n * d];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut o = vec![0f32; n * d];
        let mut scratch = FfnScratch::default();
        for (li, layer) in self.layers.iter().enumerate() {
            let la = &c.layers[li];
            h.copy_from_slice(&x);
            rows(&mut h, d, |_, row| ops::rms_norm(row, &layer.attn_norm, c.rms_eps));
            self.project_qkv(layer, &h, n, lb, &mut q, &mut k, &mut v);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                rows(&mut q, c.head_dim, |_, head| ops::rms_norm(head, qn, c.rms_eps));
                rows(&mut k, c.head_dim, |_, head| ops::rms_norm(head, kn, c.rms_eps));
            }
            let rope = Rope {
                style: c.arch.rope,
                head_dim: c.head_dim,
                rope_dim: c.rope_dim,
                base: la.rope_base,
                freq_scale: la.rope_freq_scale,
                attn_factor: c.rope_attn_factor,
                factors: self.rope_factors.as_deref(),
            };
            rows(&mut q, q_dim, |i, row| ops::rope(row, &rope, positions[i]));
            rows(&mut k, kv_dim, |i, row| ops::rope(row, &rope, positions[i]));
            if self.query_scale != 1.0 {
                q.iter_mut().for_each(|v| *v *= self.query_scale);
            }
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
            let attention = Attention {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: c.head_dim,
                scale: if c.arch.prescale_queries { 1.0 } else { 1.0 / (c.head_dim as f32).sqrt() },
                softcap: c.attn_softcap,
                window: la.window,
            };
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
            self.mat(&layer.wo).matmul_batched(&attn, n, lb, &mut o);
            if let Some(norm) = &layer.attn_post_norm {
                rows(&mut o, d, |_, row| ops::rms_norm(row, norm, c.rms_eps));
            }
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            h.copy_from_slice(&x);
            rows(&mut h, d, |_, row| ops::rms_norm(row, &layer.ffn_norm, c.rms_eps));
            match &layer.ffn {
                Ffn::Dense { gate_up, down } => self.dense_ffn(gate_up, down, &h, n, lb, &mut o, &mut scratch),
                Ffn::Experts(experts) => {
                    let e = c.experts.as_ref().expect("an expert layer has an expert configuration");
                    self.expert_ffn(e, experts, &h, n, (lb, &owner), &mut o);
                }
            }
            if let Some(norm) = &layer.ffn_post_norm {
                rows(&mut o, d, |_, row| ops::rms_norm(row, norm, c.rms_eps));
            }
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
        }
        // Logits only for the rows asked for; llama.cpp's output product is a batch of as many
        // rows as the sequence asks for.
        let mut wanted = Vec::new();
        let mut wanted_batch = Vec::new();
        let mut first = 0;
        for step in steps.iter() {
            let len = step.tokens.len();
            match step.logits {
                Logits::All => {
                    wanted.extend(first..first + len);
                    wanted_batch.extend(std::iter::repeat_n(u32::try_from(len).unwrap_or(u32::MAX), len));
                }
                Logits::Last if len > 0 => {
                    wanted.push(first + len - 1);
                    wanted_batch.push(1);
                }
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
            self.mat(&self.output).matmul_batched(&rows, wanted.len(), &wanted_batch, &mut logits);
        }
        if let Some(cap) = c.final_softcap {
            logits.iter_mut().for_each(|l| *l = ops::softcap(*l, cap));
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

    /// Queries, keys and values of `n` normed rows, with their biases.
    #[allow(clippy::too_many_arguments)]
    fn project_qkv(&self, layer: &Layer, h: &[f32], n: usize, lb: &[u32], q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
        let (q_dim, kv_dim) = (self.config.q_dim(), self.config.kv_dim());
        match &layer.qkv {
            Qkv::Separate { q: wq, k: wk, v: wv } => {
                let (wq, wk, wv) = (self.mat(wq), self.mat(wk), self.mat(wv));
                QMatrix::matmul_many_batched(h, n, lb, &mut [(wq, q), (wk, k), (wv, v)]);
            }
            Qkv::Fused(w) => {
                let width = q_dim + 2 * kv_dim;
                let mut fused = vec![0f32; n * width];
                self.mat(w).matmul_batched(h, n, lb, &mut fused);
                for (i, row) in fused.chunks_exact(width).enumerate() {
                    q[i * q_dim..(i + 1) * q_dim].copy_from_slice(&row[..q_dim]);
                    k[i * kv_dim..(i + 1) * kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
                    v[i * kv_dim..(i + 1) * kv_dim].copy_from_slice(&row[q_dim + kv_dim..]);
                }
            }
        }
        if let Some(bias) = &layer.qkv_bias {
            let (bq, rest) = bias.split_at(q_dim);
            let (bk, bv) = rest.split_at(kv_dim);
            for (out, b, dim) in [(q, bq, q_dim), (k, bk, kv_dim), (v, bv, kv_dim)] {
                for row in out.chunks_exact_mut(dim) {
                    row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
                }
            }
        }
    }

    /// A dense gated feed-forward block: `out = down(act(gate(h)) · up(h))`.
    #[allow(clippy::too_many_arguments)]
    fn dense_ffn(
        &self,
        gate_up: &GateUp,
        down: &Weight,
        h: &[f32],
        n: usize,
        lb: &[u32],
        out: &mut [f32],
        s: &mut FfnScratch,
    ) {
        let n_ff = down.cols;
        s.gate.resize(n * n_ff, 0.0);
        s.up.resize(n * n_ff, 0.0);
        match gate_up {
            GateUp::Separate { gate, up } => {
                let (wg, wu) = (self.mat(gate), self.mat(up));
                QMatrix::matmul_many_batched(h, n, lb, &mut [(wg, &mut s.gate), (wu, &mut s.up)]);
            }
            GateUp::Fused(w) => {
                s.fused.resize(n * 2 * n_ff, 0.0);
                self.mat(w).matmul_batched(h, n, lb, &mut s.fused);
                for (i, row) in s.fused.chunks_exact(2 * n_ff).enumerate() {
                    s.gate[i * n_ff..(i + 1) * n_ff].copy_from_slice(&row[..n_ff]);
                    s.up[i * n_ff..(i + 1) * n_ff].copy_from_slice(&row[n_ff..]);
                }
            }
        }
        let up = &s.up;
        match self.config.arch.activation {
            Activation::SwiGlu => rows(&mut s.gate, n_ff, |i, g| ops::swiglu_ggml(g, &up[i * n_ff..(i + 1) * n_ff])),
            Activation::GeGlu => rows(&mut s.gate, n_ff, |i, g| ops::geglu_ggml(g, &up[i * n_ff..(i + 1) * n_ff])),
        }
        self.mat(down).matmul_batched(&s.gate, n, lb, out);
    }

    /// A mixture-of-experts block (Qwen3-MoE): each token's router picks its top experts by
    /// softmax probability, their weights are renormalised to sum to one, and the chosen experts'
    /// outputs are summed in the order they were picked (as llama.cpp adds them). Each expert
    /// runs once over all the tokens of the step that chose it.
    ///
    /// llama.cpp multiplies an expert by the tokens of the batch that chose it, so its reduction
    /// order follows how many did; berth counts only the token's own sequence's prompt tokens in
    /// the step, so other sequences never change a result (`batch`: each token's batch size as
    /// for the dense products, and its sequence).
    fn expert_ffn(
        &self,
        e: &ExpertConfig,
        experts: &Experts,
        h: &[f32],
        n: usize,
        (lb, owner): (&[u32], &[usize]),
        out: &mut [f32],
    ) {
        let Experts { router, gate, up, down } = experts;
        let d = self.config.n_embd;
        let mut logits = vec![0f32; n * e.count];
        self.mat(router).matmul_batched(h, n, lb, &mut logits);
        // Per token: the chosen experts and their weights, in pick order.
        let mut choices: Vec<Vec<(usize, f32)>> = Vec::with_capacity(n);
        for row in logits.chunks_exact_mut(e.count) {
            ops::softmax_row_ggml(row);
            let probs = &*row;
            let mut order: Vec<usize> = (0..e.count).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            order.truncate(e.used);
            // ggml sums a row in f64 and keeps the sum at least f16's smallest normal.
            let total = (order.iter().map(|&i| probs[i] as f64).sum::<f64>() as f32).max(6.103_515_6e-5);
            let scale = |w: f32| if e.weights_scale == 1.0 { w } else { w * e.weights_scale };
            choices.push(order.iter().map(|&i| (i, scale(probs[i] / total))).collect());
        }
        // Each expert over the tokens that chose it; results kept per (token, pick) for the sum.
        let mut picked = vec![0f32; n * e.used * d];
        let (n_ff, mut x, mut g, mut u, mut y) = (e.n_ff, Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for expert in 0..gate.count.min(up.count).min(down.count) {
            let users: Vec<(usize, usize)> = choices
                .iter()
                .enumerate()
                .filter_map(|(t, c)| c.iter().position(|&(i, _)| i == expert).map(|slot| (t, slot)))
                .collect();
            if users.is_empty() {
                continue;
            }
            let m = users.len();
            x.clear();
            for &(t, _) in &users {
                x.extend_from_slice(&h[t * d..(t + 1) * d]);
            }
            let mut per_sequence: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
            for &(t, _) in &users {
                if lb[t] > 1 {
                    *per_sequence.entry(owner[t]).or_default() += 1;
                }
            }
            let user_lb: Vec<u32> =
                users.iter().map(|&(t, _)| if lb[t] > 1 { per_sequence[&owner[t]] } else { 1 }).collect();
            g.resize(m * n_ff, 0.0);
            u.resize(m * n_ff, 0.0);
            y.resize(m * d, 0.0);
            let (wg, wu) = (self.expert(gate, expert), self.expert(up, expert));
            QMatrix::matmul_many_batched(&x, m, &user_lb, &mut [(wg, &mut g), (wu, &mut u)]);
            rows(&mut g, n_ff, |i, gr| ops::swiglu_ggml(gr, &u[i * n_ff..(i + 1) * n_ff]));
            self.expert(down, expert).matmul_batched(&g, m, &user_lb, &mut y);
            for (r, &(t, slot)) in users.iter().enumerate() {
                let w = choices[t][slot].1;
                let dst = &mut picked[(t * e.used + slot) * d..(t * e.used + slot + 1) * d];
                dst.iter_mut().zip(&y[r * d..(r + 1) * d]).for_each(|(o, v)| *o = v * w);
            }
        }
        for (t, dst) in out.chunks_exact_mut(d).enumerate() {
            dst.copy_from_slice(&picked[t * e.used * d..(t * e.used + 1) * d]);
            for slot in 1..e.used {
                let src = &picked[(t * e.used + slot) * d..(t * e.used + slot + 1) * d];
                dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
            }
        }
    }
}

/// Buffers of the feed-forward block, reused across layers.
#[derive(Default)]
struct FfnScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    fused: Vec<f32>,
}

impl TextModel for DecoderModel {
    fn architecture(&self) -> &str {
        &self.config.name
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
