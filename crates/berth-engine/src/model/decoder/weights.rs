//! A decoder's weights: where each matrix and vector lies in the memory-mapped file, found by the
//! names llama.cpp's converter writes and checked (shape, type, size) once at load.

use std::fs::File;
use std::path::Path;

use berth_formats::gguf::{GgmlType, GgufFile, TensorInfo};
use memmap2::Mmap;

use super::DecoderModel;
use crate::error::EngineError;
use crate::kernels::{QMatrix, quant};
use crate::model::config::DecoderConfig;

/// Where a weight matrix lies in the mapped file.
#[derive(Debug, Clone)]
pub(super) struct Weight {
    pub(super) ggml_type: GgmlType,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) offset: usize,
    pub(super) len: usize,
}

/// The query, key and value projections: three matrices, or one fused (Phi-3).
pub(super) enum Qkv {
    Separate { q: Weight, k: Weight, v: Weight },
    Fused(Weight),
}

/// The gate and up projections of a gated feed-forward block: two matrices, or one fused (Phi-3),
/// gate rows first.
pub(super) enum GateUp {
    Separate { gate: Weight, up: Weight },
    Fused(Weight),
}

/// Experts stored as one 3-D tensor: the first expert's matrix, the others following it at
/// steps of its length (as many as the model's expert count, checked at load).
pub(super) struct ExpertWeights {
    pub(super) matrix: Weight,
}

/// A mixture-of-experts block: the router and every expert's gate, up and down matrices.
pub(super) struct Experts {
    pub(super) router: Weight,
    pub(super) gate: ExpertWeights,
    pub(super) up: ExpertWeights,
    pub(super) down: ExpertWeights,
}

pub(super) enum Ffn {
    Dense { gate_up: GateUp, down: Weight },
    Experts(Experts),
}

pub(super) struct Layer {
    pub(super) attn_norm: Vec<f32>,
    pub(super) qkv: Qkv,
    /// Projection biases (Qwen2), `q_dim + 2·kv_dim` values in q, k, v order.
    pub(super) qkv_bias: Option<Vec<f32>>,
    pub(super) q_norm: Option<Vec<f32>>,
    pub(super) k_norm: Option<Vec<f32>>,
    pub(super) wo: Weight,
    pub(super) attn_post_norm: Option<Vec<f32>>,
    pub(super) ffn_norm: Vec<f32>,
    pub(super) ffn: Ffn,
    pub(super) ffn_post_norm: Option<Vec<f32>>,
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
        Ok(ExpertWeights { matrix })
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
        let rope_factors = match (c.arch.rope_factors, t.has("rope_freqs.weight"), long) {
            (false, _, _) => None,
            (true, true, _) => Some(t.vector("rope_freqs.weight", half)?),
            (true, false, true) => t.optional_vector("rope_factors_long.weight", half)?,
            (true, false, false) => t.optional_vector("rope_factors_short.weight", half)?,
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

    pub(super) fn mat(&self, w: &Weight) -> QMatrix<'_> {
        // Checked at load time: the slice and the block geometry fit.
        QMatrix::new(w.ggml_type, w.rows, w.cols, &self.mmap[w.offset..w.offset + w.len])
            .expect("weights were checked when the model was loaded")
    }

    pub(super) fn expert(&self, w: &ExpertWeights, e: usize) -> QMatrix<'_> {
        let m = &w.matrix;
        let at = m.offset + e * m.len;
        QMatrix::new(m.ggml_type, m.rows, m.cols, &self.mmap[at..at + m.len])
            .expect("expert weights were checked when the model was loaded")
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
