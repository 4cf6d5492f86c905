//! AVX2 versions of the integer block dot products: llama.cpp's own instruction sequence
//! (nibble unpacking, `maddubs`/`madd` into eight lanes, one FMA per block), so results are the
//! bits the portable kernels in `quant.rs` compute, only many times faster.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use berth_formats::gguf::GgmlType;

/// Whether this CPU has AVX2 and FMA (checked once).
pub fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    super::f16::to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// llama.cpp's `hsum_float_8`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8(x: __m256) -> f32 {
    let res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// Eight lanes of sums of four consecutive products of unsigned weights with signed activations.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lanes_u8_i8(ax: __m256i, sy: __m256i) -> __m256 {
    let dot16 = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot16))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn lanes_i8_i8(x: __m256i, y: __m256i) -> __m256 {
    lanes_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// 16 bytes of nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let tmp = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// One weight row against every activation row: `out[t]` for each token `t`, with the dispatch
/// and the CPU check done once per row instead of once per product.
///
/// # Safety
/// AVX2 and FMA must be available; `qs`, `d` (and `s` for Q4_1) hold `nb` blocks per token for
/// `out.len()` tokens; `w` holds `nb` blocks of `ty`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dots(ty: GgmlType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32], nb: usize, out: &mut [f32]) {
    for (t, o) in out.iter_mut().enumerate() {
        let (qs, d) = (&qs[t * nb * 32..(t + 1) * nb * 32], &d[t * nb..(t + 1) * nb]);
        // SAFETY: the caller's guarantees, per token.
        *o = unsafe {
            match ty {
                GgmlType::Q8_0 => dot_q8_0_q8_0(w, qs, d, nb),
                GgmlType::Q4_0 => dot_q4_0_q8_0(w, qs, d, nb),
                _ => dot_q4_1_q8_1(w, qs, d, &s[t * nb..(t + 1) * nb], nb),
            }
        };
    }
}

/// # Safety
/// AVX2 and FMA must be available; `w` holds `nb` Q8_0 blocks, `qs` `32·nb` values, `d` `nb` scales.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q8_0_q8_0(w: &[u8], qs: &[i8], d: &[f32], nb: usize) -> f32 {
    assert!(w.len() >= nb * 34 && qs.len() >= nb * 32 && d.len() >= nb);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let wb = &w[b * 34..b * 34 + 34];
        let scale = _mm256_set1_ps(f16_at(wb, 0) * d[b]);
        // SAFETY: bounds asserted above.
        let (qx, qy) = unsafe {
            (
                _mm256_loadu_si256(wb.as_ptr().add(2) as *const __m256i),
                _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i),
            )
        };
        acc = _mm256_fmadd_ps(scale, lanes_i8_i8(qx, qy), acc);
    }
    hsum8(acc)
}

/// # Safety
/// As [`dot_q8_0_q8_0`], for Q4_0 weight blocks.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q4_0_q8_0(w: &[u8], qs: &[i8], d: &[f32], nb: usize) -> f32 {
    assert!(w.len() >= nb * 18 && qs.len() >= nb * 32 && d.len() >= nb);
    let mut acc = _mm256_setzero_ps();
    let eight = _mm256_set1_epi8(8);
    for b in 0..nb {
        let wb = &w[b * 18..b * 18 + 18];
        let scale = _mm256_set1_ps(f16_at(wb, 0) * d[b]);
        // SAFETY: bounds asserted above.
        let (qx, qy) =
            unsafe { (nibbles(wb.as_ptr().add(2)), _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i)) };
        acc = _mm256_fmadd_ps(scale, lanes_i8_i8(_mm256_sub_epi8(qx, eight), qy), acc);
    }
    hsum8(acc)
}

/// # Safety
/// As [`dot_q8_0_q8_0`], for Q4_1 weight blocks and Q8_1 activations (`s`: scaled block sums).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q4_1_q8_1(w: &[u8], qs: &[i8], d: &[f32], s: &[f32], nb: usize) -> f32 {
    assert!(w.len() >= nb * 20 && qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for b in 0..nb {
        let wb = &w[b * 20..b * 20 + 20];
        summs = f16_at(wb, 2).mul_add(s[b], summs);
        let scale = _mm256_set1_ps(f16_at(wb, 0) * d[b]);
        // SAFETY: bounds asserted above.
        let (qx, qy) =
            unsafe { (nibbles(wb.as_ptr().add(4)), _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i)) };
        acc = _mm256_fmadd_ps(scale, lanes_u8_i8(qx, qy), acc);
    }
    hsum8(acc) + summs
}
