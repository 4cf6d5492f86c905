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

fma_dispatch! {
/// Rotary position embedding on adjacent pairs (GGML's "normal" mode, used by the llama family),
/// applied to every head of one token's vector. Angles step by repeated multiplication and the
/// rotation fuses one product into a multiply-add, exactly as ggml's compiled code does
/// (`x0·cos − x1·sin` and `x0·sin + x1·cos`, each with its first product unrounded).
pub fn rope_norm(v: &mut [f32], head_dim: usize, rope_dim: usize, pos: u32, base: f32) {
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut cache = [(0f32, 0f32); 256];
    let mut theta = pos as f32;
    for c in cache.iter_mut().take(rope_dim / 2) {
        let (s, co) = theta.sin_cos();
        *c = (co, s);
        theta *= theta_scale;
    }
    for head in v.chunks_exact_mut(head_dim) {
        for (i, &(cos, sin)) in cache.iter().take(rope_dim / 2).enumerate() {
            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = x0.mul_add(cos, -(x1 * sin));
            head[2 * i + 1] = x0.mul_add(sin, x1 * cos);
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
        rope_norm(&mut v, 4, 4, 0, 10000.0);
        assert_eq!(v, [1.0, 2.0, 3.0, 4.0]);
        rope_norm(&mut v, 4, 4, 17, 10000.0);
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

/// Softmax of attention scores as ggml computes it: scale, mask (`valid` entries, the rest −∞),
/// max, `ggml_expf` in 16-wide chunks summed in f64 chunk by chunk, then one multiply by the
/// inverse. `scores.len()` must be a multiple of 16.
#[inline(always)]
pub fn softmax_ggml(scores: &mut [f32], valid: usize, scale: f32) {
    for (i, s) in scores.iter_mut().enumerate() {
        *s = if i < valid { *s * scale } else { f32::NEG_INFINITY };
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for chunk in scores.chunks_exact_mut(16) {
        let mut e = [0f32; 16];
        for (v, s) in e.iter_mut().zip(chunk.iter()) {
            *v = ggml_expf(*s - max);
        }
        chunk.copy_from_slice(&e);
        sum += reduce16(&e) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

#[cfg(test)]
mod ggml_tests {
    use super::*;

    #[test]
    fn ggml_expf_is_close_to_exp() {
        for x in [-100.0f32, -20.0, -1.5, -0.1, 0.0, 0.3, 1.0, 10.0, 80.0] {
            let (a, b) = (ggml_expf(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "{x}: {a} vs {b}");
        }
        assert_eq!(ggml_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(ggml_expf(-200.0), 0.0);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut s: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
        softmax_ggml(&mut s, 20, 1.0);
        let total: f32 = s.iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(s[20..].iter().all(|&p| p == 0.0));
    }
}
