//! Element-wise and row operations of a transformer step, computed the way ggml computes them
//! (sums of squares in f64, RoPE angles stepped in f32) so results track llama.cpp's.

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

/// `y ← layer_norm(x) · w + b` for one row (BERT).
pub fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for ((v, g), bias) in x.iter_mut().zip(w).zip(b) {
        *v = ((*v as f64 - mean) * inv) as f32 * g + bias;
    }
}

/// Rotary position embedding on adjacent pairs (GGML's "normal" mode, used by the llama family),
/// applied to every head of one token's vector.
pub fn rope_norm(v: &mut [f32], head_dim: usize, rope_dim: usize, pos: u32, base: f32) {
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    for head in v.chunks_exact_mut(head_dim) {
        let mut theta = pos as f32;
        for i in (0..rope_dim).step_by(2) {
            let (s, c) = theta.sin_cos();
            let (a, b) = (head[i], head[i + 1]);
            head[i] = a * c - b * s;
            head[i + 1] = a * s + b * c;
            theta *= theta_scale;
        }
    }
}

/// `gate ← silu(gate) · up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// GELU with the erf form, as BERT uses it.
pub fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        let f = *v as f64;
        *v = (0.5 * f * (1.0 + erf(f / std::f64::consts::SQRT_2))) as f32;
    }
}

/// erf to double precision (Abramowitz–Stegun 7.1.26 is too coarse for golden tests; this is the
/// Numerical Recipes erfc Chebyshev fit, relative error < 1.2e-7).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 { 1.0 - r } else { r - 1.0 }
}

/// In-place softmax of one row.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
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

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [(0.0, 0.0), (0.5, 0.5204998778), (1.0, 0.8427007929), (-2.0, -0.9953222650)] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x})");
        }
    }
}
