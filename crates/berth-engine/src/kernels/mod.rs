//! Numeric kernels: the one seam through which every weight matrix product passes.
//!
//! [`QMatrix::matmul`] multiplies a batch of activation rows by a (possibly quantised) weight matrix.
//! Like llama.cpp, activations are quantised per block to 8 bits for the 4- and 8-bit weight formats
//! and the products are computed in integers, which is both what makes results agree with llama.cpp
//! and what makes them fast. The CPU-speed work replaces the insides of this module, not its callers.

pub mod ops;
pub mod quant;

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
        // Work is split by output rows; each task writes a contiguous [rows_chunk × n] block of a
        // transposed result, copied into place afterwards.
        const ROWS_PER_TASK: usize = 16;
        let mut transposed = vec![0f32; self.rows * n];
        transposed.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(chunk, block)| {
            let first = chunk * ROWS_PER_TASK;
            for (i, row_out) in block.chunks_mut(n).enumerate() {
                let w = self.row(first + i);
                for (t, o) in row_out.iter_mut().enumerate() {
                    *o = quant::vec_dot(self.ggml_type, w, &acts, t);
                }
            }
        });
        for t in 0..n {
            for r in 0..self.rows {
                out[t * self.rows + r] = transposed[r * n + t];
            }
        }
    }
}
