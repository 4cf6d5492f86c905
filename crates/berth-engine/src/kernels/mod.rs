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
pub mod ops;
pub mod quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use berth_formats::gguf::GgmlType;
use rayon::prelude::*;

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
    /// `n × rows`. Every weight row is read once for the whole batch.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        let acts = QuantizedActivations::new(ActivationFormat::for_weights(self.ggml_type), x, n, self.cols);
        // Work is split by output rows, a few tasks per worker; each task writes a contiguous
        // [rows × n] block of a transposed result, copied into place afterwards.
        let workers = rayon::current_num_threads();
        let rows_per_task = self.rows.div_ceil(workers * 4).max(16);
        let mut transposed = vec![0f32; self.rows * n];
        let integer = acts.format != ActivationFormat::F32;
        let task = |(chunk, block): (usize, &mut [f32])| {
            let first = chunk * rows_per_task;
            // Formats without an integer kernel: dequantise each weight row once for all tokens.
            let mut row_f32 = if integer { Vec::new() } else { vec![0f32; self.cols] };
            for (i, row_out) in block.chunks_mut(n).enumerate() {
                let w = self.row(first + i);
                if integer {
                    quant::row_dots(self.ggml_type, w, &acts, row_out);
                } else {
                    quant::dequantize(self.ggml_type, w, &mut row_f32);
                    for (t, o) in row_out.iter_mut().enumerate() {
                        *o = quant::dot_f32(&row_f32, acts.row_f32(t));
                    }
                }
            }
        };
        if workers == 1 {
            // One worker: no hand-off to the pool (and no thread switches per matrix).
            transposed.chunks_mut(rows_per_task * n).enumerate().for_each(task);
        } else {
            transposed.par_chunks_mut(rows_per_task * n).enumerate().for_each(task);
        }
        for t in 0..n {
            for r in 0..self.rows {
                out[t * self.rows + r] = transposed[r * n + t];
            }
        }
    }
}
