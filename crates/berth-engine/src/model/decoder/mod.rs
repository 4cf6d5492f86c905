//! The decoder-only transformer every supported text family shares (llama, Mistral, Qwen 2/3 and
//! Qwen3-MoE, Gemma 2/3, Phi-3), driven by the family's [`Architecture`] description, and batched
//! from the start: one step takes tokens of many sequences, each with its own positions and KV
//! cache, and sends all of them through each weight matrix at once.
//!
//! For the llama family every operation is the one berth reproduces llama.cpp with bit for bit;
//! the other families' switches add steps (biases, norms, scaling, capping, windows, experts) in
//! the places and orders llama.cpp's graphs put them.

mod ffn;
mod weights;

use berth_formats::gguf::GgufFile;
use memmap2::Mmap;

use super::config::DecoderConfig;
use super::kv::{BLOCK_TOKENS, KvStore, KvType, blocks_for};
use super::{KvPool, Logits, SeqStep, TextModel};
use crate::error::EngineError;
use crate::kernels::attention::{Attention, SeqKv};
use crate::kernels::ops::Rope;
use crate::kernels::{QMatrix, ops};
use ffn::FfnScratch;
use weights::{Ffn, Layer, Qkv, Weight};

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

/// The tokens of one step as the weight products see them.
#[derive(Clone, Copy)]
struct Batch<'a> {
    /// Tokens in the step.
    n: usize,
    /// Per token: the size of the batch llama.cpp would compute it in
    /// ([`QMatrix::matmul_batched`]).
    peer_batch: &'a [u32],
    /// Per token: its sequence's index in the step.
    owner: &'a [usize],
}

impl DecoderModel {
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
        let batch = Batch { n, peer_batch: &peer_batch, owner: &owner };
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
            self.project_qkv(layer, &h, batch, &mut q, &mut k, &mut v);
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
                let (kr, vr) = (&k[i * kv_dim..(i + 1) * kv_dim], &v[i * kv_dim..(i + 1) * kv_dim]);
                store.write(li, steps[s].blocks[pos / BLOCK_TOKENS], pos % BLOCK_TOKENS, kr, vr);
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
                    kv_type: store.kv_type(),
                    k_blocks,
                    v_blocks,
                });
                row += len;
            }
            attention.batch(&q, &seqs, BLOCK_TOKENS, &mut attn);
            self.mat(&layer.wo).matmul_batched(&attn, n, &peer_batch, &mut o);
            if let Some(norm) = &layer.attn_post_norm {
                rows(&mut o, d, |_, row| ops::rms_norm(row, norm, c.rms_eps));
            }
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            h.copy_from_slice(&x);
            rows(&mut h, d, |_, row| ops::rms_norm(row, &layer.ffn_norm, c.rms_eps));
            match &layer.ffn {
                Ffn::Dense { gate_up, down } => self.dense_ffn(gate_up, down, &h, batch, &mut o, &mut scratch),
                Ffn::Experts(experts) => {
                    let e = c.experts.as_ref().expect("an expert layer has an expert configuration");
                    self.expert_ffn(e, experts, &h, batch, &mut o);
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
        // rows as the sequence asks for, and a generated token's is a batch of one (so drafted
        // tokens verified together get the logits each would have had alone).
        let mut wanted = Vec::new();
        let mut wanted_batch = Vec::new();
        let mut first = 0;
        for step in steps.iter() {
            let len = step.tokens.len();
            match step.logits {
                Logits::All => {
                    wanted.extend(first..first + len);
                    let together = u32::try_from(len).unwrap_or(u32::MAX);
                    wanted_batch.extend((0..len).map(|i| if step.start + i < step.prompt_len { together } else { 1 }));
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
    fn project_qkv(&self, layer: &Layer, h: &[f32], batch: Batch<'_>, q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
        let (q_dim, kv_dim) = (self.config.q_dim(), self.config.kv_dim());
        let (n, lb) = (batch.n, batch.peer_batch);
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

    fn supports_kv_type(&self, kv_type: KvType) -> bool {
        kv_type.fits_head(self.config.head_dim)
    }

    fn kv_block_bytes(&self, kv_type: KvType) -> usize {
        KvStore::block_bytes(self.config.n_layers, self.config.kv_dim(), kv_type)
    }

    fn new_kv_pool(&self, blocks: usize, kv_type: KvType) -> Result<Box<dyn KvPool>, EngineError> {
        if !self.supports_kv_type(kv_type) {
            return Err(EngineError::BadConfig(format!(
                "a {kv_type} KV cache needs heads of a multiple of 32 values; this model's have {}",
                self.config.head_dim
            )));
        }
        Ok(Box::new(KvStore::new(self.config.n_layers, self.config.kv_dim(), blocks, kv_type)))
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
