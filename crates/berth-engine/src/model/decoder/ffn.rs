//! The feed-forward blocks: dense gated (SwiGLU, GeGLU; gate and up apart or fused) and routed
//! experts.

use super::weights::{Experts, GateUp, Weight};
use super::{Batch, DecoderModel, rows};
use crate::kernels::quant::{ActivationFormat, QuantizedActivations};
use crate::kernels::{QMatrix, ops};
use crate::model::config::{Activation, ExpertConfig};

impl DecoderModel {
    /// A dense gated feed-forward block: `out = down(act(gate(h)) · up(h))`.
    pub(super) fn dense_ffn(
        &self,
        gate_up: &GateUp,
        down: &Weight,
        h: &[f32],
        batch: Batch<'_>,
        out: &mut [f32],
        s: &mut FfnScratch,
    ) {
        let (n, lb) = (batch.n, batch.peer_batch);
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
    /// the step, so other sequences never change a result.
    pub(super) fn expert_ffn(&self, e: &ExpertConfig, experts: &Experts, h: &[f32], batch: Batch<'_>, out: &mut [f32]) {
        let (n, lb, owner) = (batch.n, batch.peer_batch, batch.owner);
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
        // Each expert's (token, pick) pairs, in token order, gathered in one pass.
        let mut chosen_by: Vec<Vec<(usize, usize)>> = vec![Vec::new(); e.count];
        for (t, c) in choices.iter().enumerate() {
            for (slot, &(expert, _)) in c.iter().enumerate() {
                chosen_by[expert].push((t, slot));
            }
        }
        // The input quantised once for every expert that reads it: quantising is row by row, so
        // an expert's gathered rows are what quantising its tokens alone would give.
        let mut formats = vec![ActivationFormat::for_weights(self.expert(gate, 0).ggml_type)];
        let up_format = ActivationFormat::for_weights(self.expert(up, 0).ggml_type);
        if up_format != formats[0] {
            formats.push(up_format);
        }
        let quantized: Vec<QuantizedActivations<'_>> =
            formats.iter().map(|&f| QuantizedActivations::new(f, h, n, d)).collect();
        // Each expert over the tokens that chose it; results kept per (token, pick) for the sum.
        let mut picked = vec![0f32; n * e.used * d];
        let (n_ff, mut g, mut u, mut y) = (e.n_ff, Vec::new(), Vec::new(), Vec::new());
        for (expert, users) in chosen_by.iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let m = users.len();
            let mut per_sequence: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
            for &(t, _) in users {
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
            let tokens: Vec<usize> = users.iter().map(|&(t, _)| t).collect();
            let acts: Vec<QuantizedActivations<'_>> =
                quantized.iter().map(|q| q.gather(&tokens).with_peer_batch(&user_lb)).collect();
            QMatrix::matmul_many_prepared(&acts, m, &mut [(wg, &mut g), (wu, &mut u)]);
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
pub(super) struct FfnScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    fused: Vec<f32>,
}
