//! Element-wise and row operations of a transformer step, computed the way ggml computes them
//! (sums of squares in f64, RoPE angles stepped in f32) so results track llama.cpp's.

fma_dispatch! {
/// `x ← x / rms(x) · w` for one row.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    // ggml squares in f32 and sums in f64.
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}
}

/// How a model rotates its queries and keys (GGML's `rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: the llama family.
    Normal,
    /// Pairs `(i, i + rope_dim / 2)`, as GPT-NeoX: Qwen, Gemma, Phi-3.
    Neox,
}

/// One layer's rotary position embedding: `rope_dim` of each head's `head_dim` dimensions turn,
/// the rest pass through.
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub style: RopeStyle,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub base: f32,
    /// Linear position scaling (`1 / rope.scaling.factor`), 1 without.
    pub freq_scale: f32,
    /// Multiplies the sine and cosine (`rope.scaling.attn_factor`, LongRoPE's magnitude), 1 without.
    pub attn_factor: f32,
    /// Per-frequency divisors of the angle (`rope_freqs` of Llama 3.1, Phi-3's long/short factors).
    pub factors: Option<&'a [f32]>,
}

fma_dispatch! {
/// Rotary position embedding of every head of one token's vector, as ggml computes it: angles
/// step by repeated multiplication (`rope_yarn` without extrapolation: `freq_scale · θ / factor`,
/// cosine and sine times `attn_factor`) and each rotation fuses one product into a multiply-add
/// (`x0·cos − x1·sin` and `x0·sin + x1·cos`, each with its first product unrounded), as ggml's
/// compiled code does. With no scaling and no factors every extra step multiplies or divides by
/// one, so the llama family's bits are unchanged.
pub fn rope(v: &mut [f32], r: &Rope<'_>, pos: u32) {
    let half = r.rope_dim / 2;
    let theta_scale = r.base.powf(-2.0 / r.rope_dim as f32);
    let mut cache = [(0f32, 0f32); 256];
    let mut theta = pos as f32;
    for (i, c) in cache.iter_mut().take(half).enumerate() {
        let factor = r.factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
        let angle = r.freq_scale * (theta / factor);
        let (s, co) = angle.sin_cos();
        *c = (co * r.attn_factor, s * r.attn_factor);
        theta *= theta_scale;
    }
    let (stride, offset) = match r.style {
        RopeStyle::Normal => (2, 1),
        RopeStyle::Neox => (1, half),
    };
    for head in v.chunks_exact_mut(r.head_dim) {
        for (i, &(cos, sin)) in cache.iter().take(half).enumerate() {
            let (a, b) = (stride * i, stride * i + offset);
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0.mul_add(cos, -(x1 * sin));
            head[b] = x0.mul_add(sin, x1 * cos);
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_weights_gives_unit_rms() {
        let mut x = vec![3.0f32, -4.0, 0.0, 5.0];
        rms_norm(&mut x, &[1.0; 4], 0.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut v = vec![1.0f32, 2.0, 3.0, 4.0];
        let rope_of = |style| Rope {
            style,
            head_dim: 4,
            rope_dim: 4,
            base: 10000.0,
            freq_scale: 1.0,
            attn_factor: 1.0,
            factors: None,
        };
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            rope(&mut v, &rope_of(style), 0);
            assert_eq!(v, [1.0, 2.0, 3.0, 4.0]);
        }
        let r = rope_of(RopeStyle::Normal);
        rope(&mut v, &r, 17);
        let n: f32 = v.iter().map(|x| x * x).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }
}

// ---- Functions that reproduce ggml's AVX-512 code paths exactly (see quant.rs for why). ----

/// ggml's vectorised `expf` (`ggml_v_expf`, AVX-512 variant), lane by lane: a polynomial
/// approximation whose results differ from libm's `expf` in the last bits.
#[inline(always)]
pub fn ggml_expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4B40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(f32::from_bits(0x35BF_BE8E), (-n).mul_add(f32::from_bits(0x3F31_7200), x)); // 0x1.7f7d1cp-20, 0x1.62e4p-1
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = (f32::from_bits(0x3C07_2010).mul_add(b, f32::from_bits(0x3D2B_9F17)))
        .mul_add(u, f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)))
        .mul_add(u, f32::from_bits(0x3F7F_FFF6).mul_add(b, 1.0));
    // _mm512_scalef_ps: j · 2^n with a single rounding (exact in f64, rounded once to f32).
    // 2^n is built from its exponent bits: |n| ≤ 192 here, well inside f64's range.
    let scale = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * scale) as f32
}

fma_dispatch! {
/// `gate ← silu(gate) · up`, as `ggml_vec_swiglu_f32` computes it.
pub fn swiglu_ggml(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let e = ggml_expf(0.0 - *g);
        *g = (*g / (1.0 + e)) * u;
    }
}
}

/// ggml's tanh-approximated GELU of one value, as its table stores it: the input rounded to f16,
/// the result rounded to f16 (`GGML_GELU_FP16`), saturating outside ±10.
#[inline(always)]
pub fn gelu_ggml(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_COEF_A: f32 = 0.044715;
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let x = super::f16::to_f32(super::f16::from_f32(x));
    let g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh());
    super::f16::to_f32(super::f16::from_f32(g))
}

/// `gate ← gelu(gate) · up`, as `ggml_vec_geglu_f32` computes it (Gemma's feed-forward).
pub fn geglu_ggml(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_ggml(*g) * u;
    }
}

/// `x ← cap · tanh(x / cap)`: Gemma 2's soft-capping of attention scores and logits, in ggml's
/// steps (scale by the inverse, tanh, scale back).
#[inline(always)]
pub fn softcap(x: f32, cap: f32) -> f32 {
    (x * (1.0 / cap)).tanh() * cap
}

fma_dispatch! {
/// An f32 dot product in the order of llamafile's tinyBLAS for f32 weights (llama.cpp's AVX-512
/// build): one 16-lane accumulator of fused multiply-adds over 16-element steps, then reduced.
/// `a.len()` must be a multiple of 16.
pub fn dot_f32_tinyblas(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    reduce16(&acc)
}
}

/// An f32 dot product as `ggml_vec_dot_f32` computes it (AVX-512 build): four 16-lane fused
/// accumulators over 64-element steps, folded and reduced, then the rest one fused multiply-add
/// at a time.
pub fn dot_f32_ggml(a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len().min(b.len()) / 64 * 64;
    let mut sum = if whole > 0 { dot_f16_gemv(|i| a[i], |i| b[i], whole) } else { 0.0 };
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

/// A softmax over one row as `ggml_soft_max` computes it on the CPU: max, `ggml_expf` over
/// 16-wide chunks with each chunk's sum reduced and added in f64, `expf` for the rest, then one
/// multiply by the inverse (attention scores, an MoE router's probabilities).
#[inline(always)]
pub fn softmax_row_ggml(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    let whole = x.len() / 16 * 16;
    for chunk in x[..whole].chunks_exact_mut(16) {
        let mut e = [0f32; 16];
        for (v, s) in e.iter_mut().zip(chunk.iter()) {
            *v = ggml_expf(*s - max);
        }
        chunk.copy_from_slice(&e);
        sum += reduce16(&e) as f64;
    }
    for v in &mut x[whole..] {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// GCC's `_mm512_reduce_add_ps`: halves, then quarters, then pairs.
#[inline(always)]
pub fn reduce16(a: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = a[8 + i] + a[i];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// A dot product of f16 values (given as f32) in the order of `ggml_vec_dot_f16` (AVX-512):
/// four 16-lane accumulators over 64-element steps, folded 0+2, 1+3, then 0+1, then reduced.
/// `n` must be a multiple of 64 (callers pad with zeros, as llama.cpp's padded KV cache does).
#[inline(always)]
pub fn dot_f16_gemv(x: impl Fn(usize) -> f32, y: impl Fn(usize) -> f32, n: usize) -> f32 {
    let mut sum = [[0f32; 16]; 4];
    for i in (0..n).step_by(64) {
        for (j, acc) in sum.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let k = i + 16 * j + l;
                *a = x(k).mul_add(y(k), *a);
            }
        }
    }
    let [mut a, mut b, c, d] = sum;
    for l in 0..16 {
        a[l] += c[l];
        b[l] += d[l];
    }
    for (x, y) in a.iter_mut().zip(&b) {
        *x += y;
    }
    reduce16(&a)
}

/// The same dot product in the order of llamafile's tinyBLAS (used by llama.cpp when a step has
/// several tokens): one 16-lane accumulator over 16-element steps, then reduced.
#[inline(always)]
pub fn dot_f16_gemm(x: impl Fn(usize) -> f32, y: impl Fn(usize) -> f32, n: usize) -> f32 {
    let mut acc = [0f32; 16];
    for i in (0..n).step_by(16) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = x(i + l).mul_add(y(i + l), *a);
        }
    }
    reduce16(&acc)
}

/// Softmax of attention scores as ggml computes it: scale, mask (entries outside `visible`, −∞),
/// max, `ggml_expf` in 16-wide chunks summed in f64 chunk by chunk, then one multiply by the
/// inverse. `scores.len()` must be a multiple of 16.
#[inline(always)]
pub fn softmax_ggml(scores: &mut [f32], visible: std::ops::Range<usize>, scale: f32) {
    for (i, s) in scores.iter_mut().enumerate() {
        *s = if visible.contains(&i) { *s * scale } else { f32::NEG_INFINITY };
    }
    softmax_row_ggml(scores);
}

#[cfg(test)]
mod ggml_tests {
    use super::*;

    #[test]
    fn ggml_expf_is_close_to_exp() {
        for x in [-100.0f32, -20.0, -1.5, -0.1, 0.0, 0.3, 1.0, 10.0, 80.0, 88.0] {
            let (a, b) = (ggml_expf(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "{x}: {a} vs {b}");
        }
        assert_eq!(ggml_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(ggml_expf(-200.0), 0.0);
        assert_eq!(ggml_expf(200.0), f32::INFINITY);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut s: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
        softmax_ggml(&mut s, 0..20, 1.0);
        let total: f32 = s.iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(s[20..].iter().all(|&p| p == 0.0));
    }
}
