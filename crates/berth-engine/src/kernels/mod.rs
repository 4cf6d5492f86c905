//! Numeric kernels: the one seam through which every weight matrix product passes.
//!
//! [`QMatrix::matmul`] multiplies a batch of activation rows by a (possibly quantised) weight matrix.
//! Like llama.cpp, activations are quantised per block to 8 bits for the 4- and 8-bit weight formats
//! and the products are computed in integers, which is both what makes results agree with llama.cpp
//! and what makes them fast. The CPU-speed work replaces the insides of this module, not its callers.

/// Define a function whose body is compiled twice: portably, and with AVX2+FMA for CPUs that
/// have them (chosen at run time, so one binary runs on any x86-64). Fused multiply-adds must be
/// instructions, not library calls, in the hot loops; the results are the same either way.
macro_rules! fma_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if crate::kernels::x86::has_avx2() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub mod attention;
pub mod f16;
pub mod kv_type;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub mod ops;
pub mod quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use std::ops::Range;

use berth_formats::gguf::GgmlType;

use crate::error::EngineError;
use quant::{ActivationFormat, QuantizedActivations};

/// A weight matrix of `rows` × `cols` in GGML layout (row-major, each row `cols` weights, quantised
/// in blocks along the row), borrowed from the memory-mapped model file.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    pub ggml_type: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    row_bytes: usize,
}

impl<'a> QMatrix<'a> {
    pub fn new(ggml_type: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, EngineError> {
        if !quant::supported(ggml_type) {
            return Err(EngineError::UnsupportedTensorType(ggml_type.to_string()));
        }
        let row_bytes = ggml_type
            .bytes_for(cols as u64)
            .ok_or_else(|| EngineError::BadModel(format!("{cols} columns do not fit {ggml_type} blocks")))?
            as usize;
        if data.len() != row_bytes * rows {
            return Err(EngineError::BadModel(format!(
                "a {ggml_type} matrix of {rows}×{cols} needs {} bytes, has {}",
                row_bytes * rows,
                data.len()
            )));
        }
        Ok(Self { ggml_type, rows, cols, data, row_bytes })
    }

    fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantise one row into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quant::dequantize(self.ggml_type, self.row(r), out);
    }

    /// `out[t][r] = Σ_c W[r][c] · x[t][c]` for every activation row `t`: `x` is `n × cols`, `out` is
    /// `n × rows`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_batched(x, n, &[], out)
    }

    /// [`Self::matmul`] with, per token, the size of the batch llama.cpp would compute it in
    /// (`peer_batch[t]`; missing means 1): llama.cpp's CPU backend reduces some products in
    /// another order for larger batches (f32 weights from 2 tokens, K-quants from
    /// [`TILED_FROM`]), and berth follows it token by token, so which tokens share a step never
    /// changes a result.
    pub fn matmul_batched(&self, x: &[f32], n: usize, peer_batch: &[u32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        Self::matmul_many_batched(x, n, peer_batch, &mut [(*self, out)]);
    }

    /// Several matrices times the same activations (a layer's query, key and value, or its gate
    /// and up projections): the activations are quantised once per format, and for few tokens all
    /// the matrices' rows are shared among the workers in one parallel region.
    pub fn matmul_many(x: &[f32], n: usize, products: &mut [(QMatrix<'_>, &mut [f32])]) {
        Self::matmul_many_batched(x, n, &[], products)
    }

    /// [`Self::matmul_many`] with the tokens' batch sizes as in [`Self::matmul_batched`].
    pub fn matmul_many_batched(x: &[f32], n: usize, peer_batch: &[u32], products: &mut [(QMatrix<'_>, &mut [f32])]) {
        let mut acts: Vec<QuantizedActivations<'_>> = Vec::new();
        for (m, _) in products.iter() {
            let format = ActivationFormat::for_weights(m.ggml_type);
            if !acts.iter().any(|a| a.format == format) {
                acts.push(QuantizedActivations::new(format, x, n, m.cols).with_peer_batch(peer_batch));
            }
        }
        Self::matmul_many_prepared(&acts, n, products)
    }

    /// [`Self::matmul_many_batched`] with the activations already in the formats the matrices
    /// take (one [`QuantizedActivations`] per format, each with its tokens' batch sizes).
    ///
    /// # Panics
    /// If a matrix's format is missing from `acts`.
    pub fn matmul_many_prepared(
        acts: &[QuantizedActivations<'_>],
        n: usize,
        products: &mut [(QMatrix<'_>, &mut [f32])],
    ) {
        for (m, _) in products.iter() {
            let format = ActivationFormat::for_weights(m.ggml_type);
            assert!(acts.iter().any(|a| a.format == format), "no {format:?} activations for a {} matrix", m.ggml_type);
        }
        let which = |m: &QMatrix<'_>| {
            let format = ActivationFormat::for_weights(m.ggml_type);
            acts.iter().position(|a| a.format == format).unwrap_or_default()
        };
        let team = crate::team();
        let workers = team.size();
        if n >= 4 * TOKEN_GROUP * workers {
            // Many tokens (prefill): each task takes a run of tokens and every weight row, and
            // writes its tokens' output rows in place. The weights are read once per task.
            for (m, out) in products.iter_mut() {
                let acts = &acts[which(m)];
                let per_task = n.div_ceil(workers).next_multiple_of(TOKEN_GROUP);
                let rows = m.rows;
                team.for_each_chunk_mut(out, per_task * rows, |i, chunk| {
                    let first = i * per_task;
                    let layout = Layout { token_stride: rows, row_stride: 1 };
                    m.products(acts, 0..rows, first..first + chunk.len() / rows, chunk, layout);
                });
            }
            return;
        }
        // Few tokens (decode): split by output rows, a few tasks per worker. With several tokens
        // each task writes a contiguous [rows × n] block of a transposed result, put in place after.
        let mut transposed: Vec<Vec<f32>> =
            products.iter().map(|(m, _)| if n > 1 { vec![0f32; m.rows * n] } else { Vec::new() }).collect();
        let mut tasks = Vec::new();
        for ((m, out), buffer) in products.iter_mut().zip(transposed.iter_mut()) {
            let a = which(m);
            let rows_per_task = m.rows.div_ceil(workers * 4).max(16);
            let target: &mut [f32] = if n > 1 { buffer } else { out };
            for (i, chunk) in target.chunks_mut(rows_per_task * n).enumerate() {
                tasks.push((*m, a, i * rows_per_task, chunk));
            }
        }
        let layout = Layout { token_stride: 1, row_stride: n };
        team.for_each_mut(&mut tasks, |(m, a, first, chunk)| {
            m.products(&acts[*a], *first..*first + chunk.len() / n, 0..n, chunk, layout);
        });
        drop(tasks);
        if n > 1 {
            // Every matrix's every token row put in place, in one parallel region.
            let mut rows_out = Vec::with_capacity(n * products.len());
            for ((m, out), buffer) in products.iter_mut().zip(&transposed) {
                rows_out.extend(out.chunks_mut(m.rows).enumerate().map(|(t, row)| (t, row, buffer.as_slice())));
            }
            team.for_each_mut(&mut rows_out, |(t, row, buffer)| {
                for (r, o) in row.iter_mut().enumerate() {
                    *o = buffer[r * n + *t];
                }
            });
        }
    }

    /// Products of weight rows `rows` with activation rows `tokens`, written to `out` as `layout`
    /// says (positions counted from the ranges' starts).
    fn products(
        &self,
        acts: &QuantizedActivations<'_>,
        rows: Range<usize>,
        tokens: Range<usize>,
        out: &mut [f32],
        layout: Layout,
    ) {
        let at = |t: usize, r: usize| (t - tokens.start) * layout.token_stride + (r - rows.start) * layout.row_stride;
        #[cfg(target_arch = "x86_64")]
        if acts.format != ActivationFormat::F32
            && let Some(level) = x86::level()
        {
            let w = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
            for run in passes(tokens.clone()) {
                let o = &mut out[at(run.start, rows.start)..];
                x86::matmul_tiles(level, self.ggml_type, w, rows.len(), acts.view(), run, o, layout);
            }
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if acts.format != ActivationFormat::F32 && neon::supports(self.ggml_type) {
            let w = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
            for run in passes(tokens.clone()) {
                let o = &mut out[at(run.start, rows.start)..];
                neon::matmul_tiles(self.ggml_type, w, rows.len(), acts.view(), run, o, layout);
            }
            return;
        }
        if acts.format != ActivationFormat::F32 {
            for r in rows.clone() {
                for t in tokens.clone() {
                    out[at(t, r)] = quant::vec_dot(self.ggml_type, self.row(r), acts, t);
                }
            }
            return;
        }
        // Formats without an integer kernel: dequantise each weight row once for all tokens. F32
        // weights (an MoE router) reduce in llama.cpp's orders: tinyBLAS for a batch of two or
        // more tokens, its vector dot product for one.
        let f32_orders = self.ggml_type == GgmlType::F32 && self.cols.is_multiple_of(16);
        let mut row_f32 = vec![0f32; self.cols];
        for r in rows.clone() {
            quant::dequantize(self.ggml_type, self.row(r), &mut row_f32);
            for t in tokens.clone() {
                out[at(t, r)] = match (f32_orders, acts.peer_batch(t)) {
                    (true, 1) => ops::dot_f32_ggml(&row_f32, acts.row_f32(t)),
                    (true, _) => ops::dot_f32_tinyblas(&row_f32, acts.row_f32(t)),
                    (false, _) => quant::dot_f32(&row_f32, acts.row_f32(t)),
                };
            }
        }
    }
}

/// Batches from which llama.cpp's x86 build multiplies K-quant weights with its tiled kernel
/// (`ggml_tiled_min_batch`).
pub const TILED_FROM: u32 = 8;

/// Tokens multiplied together by one weight block in the tile kernels.
const TOKEN_GROUP: usize = 4;
/// Tokens per pass over a task's weight rows at most (64 × 576 quantised values ≈ 37 KB, inside L1).
const TOKENS_PER_PASS: usize = 64;

/// `tokens` in passes of at most [`TOKENS_PER_PASS`], as even as they can be: 130 tokens are
/// three passes of 44, 43 and 43, not 64, 64 and a last 2 too few for the panel kernels.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
fn passes(tokens: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let count = tokens.len().div_ceil(TOKENS_PER_PASS).max(1);
    let (base, extra) = (tokens.len() / count, tokens.len() % count);
    (0..count).scan(tokens.start, move |start, i| {
        let run = *start..*start + base + usize::from(i < extra);
        *start = run.end;
        Some(run)
    })
}

/// Quantised activations of a batch of tokens as the SIMD kernels read them, `nb` blocks per token.
#[derive(Clone, Copy)]
pub(crate) struct Acts<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    /// Scaled block sums (Q8_1 only; empty otherwise).
    pub s: &'a [f32],
    /// Sums of every 16 values (Q8_K only; empty otherwise). Only x86 has K-quant SIMD kernels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub bsums: &'a [i16],
    /// Per token: the size of the batch llama.cpp would compute it in (missing means 1). Only the
    /// x86 K-quant kernels read it (llama.cpp's tiled kernel from [`TILED_FROM`] tokens).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub peer_batch: &'a [u32],
    pub nb: usize,
}

/// Where products go: `out[t · token_stride + r · row_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub token_stride: usize,
    pub row_stride: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_cover_the_tokens_evenly_and_in_order() {
        let bounds = |runs: Vec<Range<usize>>| runs.into_iter().map(|r| (r.start, r.end)).collect::<Vec<_>>();
        for (range, want) in [
            (0..0, vec![(0, 0)]),
            (3..10, vec![(3, 10)]),
            (0..64, vec![(0, 64)]),
            (0..130, vec![(0, 44), (44, 87), (87, 130)]),
            (5..70, vec![(5, 38), (38, 70)]),
        ] {
            assert_eq!(bounds(passes(range.clone()).collect()), want, "{range:?}");
        }
    }
}
