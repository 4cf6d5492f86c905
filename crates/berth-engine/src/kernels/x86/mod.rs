//! x86-64 versions of the integer block dot products: llama.cpp's own instruction sequence
//! (nibble unpacking, byte products summed into eight lanes, one FMA per block), so results are
//! the bits the portable kernels in `quant.rs` compute, only many times faster.
//!
//! Two levels are compiled into every binary and chosen at run time: AVX2+FMA, and the same with
//! VNNI (`vpdpbusd` sums the byte products in one instruction instead of `vpmaddubsw`+`vpmaddwd`).
//! The integer sums are identical — no product pair can reach `vpmaddubsw`'s saturation, because
//! one side is always a 4-bit value or a quantised activation in [-127, 127] — so both levels give
//! the same bits. Weights are multiplied in tiles of one row by up to four tokens: each weight
//! block is unpacked once for the four, and four independent accumulators keep the FMA unit busy.

use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use berth_formats::gguf::GgmlType;

use super::{Acts, Layout};

mod k_panel;
mod panel;

/// The instruction-set levels berth has kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx2,
    /// AVX2 plus 256-bit VNNI (AVX-512 VNNI with VL, or AVX-VNNI).
    Vnni,
}

/// The best level this CPU has, or `None` below AVX2 (checked once).
pub fn level() -> Option<Level> {
    static LEVEL: OnceLock<Option<Level>> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let vnni = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        match (avx2, vnni) {
            (false, _) => None,
            (true, false) => Some(Level::Avx2),
            (true, true) => Some(Level::Vnni),
        }
    })
}

/// Whether this CPU has AVX2, FMA and F16C.
pub fn has_avx2() -> bool {
    level().is_some()
}

/// Multiply `rows` consecutive weight rows (`w`, `row_bytes` each) by the activations of
/// `tokens`, writing every product into `out` as `layout` says (token and row counted from the
/// starts of their ranges).
///
/// # Panics
/// If the slices are too short for the shapes (checked once, before any unchecked access), or
/// `ty` has no integer kernel.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tiles(
    level: Level,
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    acts: Acts<'_>,
    tokens: Range<usize>,
    out: &mut [f32],
    layout: Layout,
) {
    let (block_bytes, values) = match ty {
        GgmlType::Q8_0 => (<Q8_0 as Kernel>::BYTES, 32),
        GgmlType::Q4_0 => (<Q4_0 as Kernel>::BYTES, 32),
        GgmlType::Q4_1 => (<Q4_1 as Kernel>::BYTES, 32),
        GgmlType::Q5_0 => (<Q5_0 as Kernel>::BYTES, 32),
        GgmlType::Q5_1 => (<Q5_1 as Kernel>::BYTES, 32),
        GgmlType::Q4_K => (<Q4K as Kernel>::BYTES, 256),
        GgmlType::Q5_K => (<Q5K as Kernel>::BYTES, 256),
        GgmlType::Q6_K => (<Q6K as Kernel>::BYTES, 256),
        other => panic!("no integer kernel for {other}"),
    };
    let nb = acts.nb;
    assert!(w.len() >= rows * nb * block_bytes);
    assert!(acts.qs.len() >= tokens.end * nb * values && acts.d.len() >= tokens.end * nb);
    assert!(!matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) || acts.s.len() >= tokens.end * nb);
    assert!(values != 256 || acts.bsums.len() >= tokens.end * nb * 16);
    if rows == 0 || tokens.is_empty() {
        return;
    }
    let last = (tokens.len() - 1) * layout.token_stride + (rows - 1) * layout.row_stride;
    assert!(last < out.len());
    let many = tokens.len() >= panel::PANEL_FROM;
    // K-quants take the outer-product kernel only where llama.cpp's tiled kernel would (see k_panel).
    let all_tiled = many && tokens.clone().all(|t| acts.peer_batch.get(t).is_some_and(|&b| b >= super::TILED_FROM));
    let job = Job { w: w.as_ptr(), row_bytes: nb * block_bytes, rows, acts, tokens, out: out.as_mut_ptr(), layout };
    // SAFETY: the features were detected (a `Level` only comes from `level()` or a test that
    // checked it); every access stays inside the bounds asserted above.
    unsafe {
        match (level, ty) {
            (Level::Avx2, GgmlType::Q8_0) if many => panel::multiply_avx2::<Q8_0>(&job),
            (Level::Avx2, GgmlType::Q8_0) => avx2::<Q8_0>(&job),
            (Level::Avx2, GgmlType::Q4_0) if many => panel::multiply_avx2::<Q4_0>(&job),
            (Level::Avx2, GgmlType::Q4_0) => avx2::<Q4_0>(&job),
            (Level::Avx2, GgmlType::Q4_1) if many => panel::multiply_avx2::<Q4_1>(&job),
            (Level::Avx2, GgmlType::Q4_1) => avx2::<Q4_1>(&job),
            (Level::Avx2, GgmlType::Q5_0) if many => panel::multiply_avx2::<Q5_0>(&job),
            (Level::Avx2, GgmlType::Q5_0) => avx2::<Q5_0>(&job),
            (Level::Avx2, GgmlType::Q5_1) if many => panel::multiply_avx2::<Q5_1>(&job),
            (Level::Avx2, GgmlType::Q5_1) => avx2::<Q5_1>(&job),
            (Level::Avx2, GgmlType::Q4_K) => avx2::<Q4K>(&job),
            (Level::Avx2, GgmlType::Q5_K) => avx2::<Q5K>(&job),
            (Level::Avx2, _) => avx2::<Q6K>(&job),
            (Level::Vnni, GgmlType::Q8_0) if many => panel::multiply::<Q8_0>(&job),
            (Level::Vnni, GgmlType::Q8_0) => vnni::<Q8_0>(&job),
            (Level::Vnni, GgmlType::Q4_0) if many => panel::multiply::<Q4_0>(&job),
            (Level::Vnni, GgmlType::Q4_0) => vnni::<Q4_0>(&job),
            (Level::Vnni, GgmlType::Q4_1) if many => panel::multiply::<Q4_1>(&job),
            (Level::Vnni, GgmlType::Q4_1) => vnni::<Q4_1>(&job),
            (Level::Vnni, GgmlType::Q5_0) if many => panel::multiply::<Q5_0>(&job),
            (Level::Vnni, GgmlType::Q5_0) => vnni::<Q5_0>(&job),
            (Level::Vnni, GgmlType::Q5_1) if many => panel::multiply::<Q5_1>(&job),
            (Level::Vnni, GgmlType::Q5_1) => vnni::<Q5_1>(&job),
            (Level::Vnni, GgmlType::Q4_K) if all_tiled => k_panel::multiply::<k_panel::Q45K<false>>(&job),
            (Level::Vnni, GgmlType::Q5_K) if all_tiled => k_panel::multiply::<k_panel::Q45K<true>>(&job),
            (Level::Vnni, GgmlType::Q6_K) if all_tiled => k_panel::multiply::<k_panel::Q6K>(&job),
            (Level::Vnni, GgmlType::Q4_K) => vnni::<Q4K>(&job),
            (Level::Vnni, GgmlType::Q5_K) => vnni::<Q5K>(&job),
            (Level::Vnni, _) => vnni::<Q6K>(&job),
        }
    }
}

struct Job<'a> {
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    acts: Acts<'a>,
    tokens: Range<usize>,
    out: *mut f32,
    layout: Layout,
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<B: Kernel>(job: &Job<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { tiles::<B, false>(job) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn vnni<B: Kernel>(job: &Job<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { tiles::<B, true>(job) }
}

/// Rows in blocks of 16 and tokens in groups of 4: a block's weights and a group's activations
/// both stay in L1 while every pair of them is multiplied. (NEON walks the same way. The walk is
/// not a shared helper taking a closure: a closure does not inherit this function's target
/// features, and where it was not inlined the kernels ran without AVX2, 6× slower for Q5_0.)
#[inline(always)]
unsafe fn tiles<B: Kernel, const VNNI: bool>(job: &Job<'_>) {
    const ROW_BLOCK: usize = 16;
    let (t0, t1) = (job.tokens.start, job.tokens.end);
    for r0 in (0..job.rows).step_by(ROW_BLOCK) {
        let r1 = (r0 + ROW_BLOCK).min(job.rows);
        let mut t = t0;
        while t < t1 {
            let group = (t1 - t).min(4);
            for r in r0..r1 {
                // SAFETY: r < rows and t + group <= tokens.end, inside the asserted bounds.
                unsafe {
                    let w = job.w.add(r * job.row_bytes);
                    let o = job.out.add((t - t0) * job.layout.token_stride + r * job.layout.row_stride);
                    let ts = job.layout.token_stride;
                    match group {
                        4 => B::tile::<VNNI, 4>(w, &job.acts, t, o, ts),
                        3 => B::tile::<VNNI, 3>(w, &job.acts, t, o, ts),
                        2 => B::tile::<VNNI, 2>(w, &job.acts, t, o, ts),
                        _ => B::tile::<VNNI, 1>(w, &job.acts, t, o, ts),
                    }
                }
            }
            t += group;
        }
    }
}

/// A weight format's tile kernel: one weight row by `T` tokens starting at `first`, each product
/// reduced exactly as llama.cpp's single dot product reduces it, written `token_stride` apart.
trait Kernel {
    const BYTES: usize;
    unsafe fn tile<const VNNI: bool, const T: usize>(
        w: *const u8,
        acts: &Acts<'_>,
        first: usize,
        out: *mut f32,
        token_stride: usize,
    );
}

impl<B: Block> Kernel for B {
    const BYTES: usize = B::BYTES;
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const T: usize>(
        w: *const u8,
        acts: &Acts<'_>,
        first: usize,
        out: *mut f32,
        token_stride: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { tile_32::<B, VNNI, T>(w, acts, first, out, token_stride) }
    }
}

/// The tile kernel of the 32-value formats.
#[inline(always)]
unsafe fn tile_32<B: Block, const VNNI: bool, const T: usize>(
    w: *const u8,
    acts: &Acts<'_>,
    first: usize,
    out: *mut f32,
    token_stride: usize,
) {
    let nb = acts.nb;
    let mut summs = [0f32; T];
    // SAFETY (whole body): the caller guarantees AVX2, `nb` blocks of weights at `w`, `nb`
    // activation blocks for tokens first..first+T, and T outputs `token_stride` apart at `out`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        let qs = acts.qs.as_ptr().add(first * nb * 32);
        let d = acts.d.as_ptr().add(first * nb);
        let s = acts.s.as_ptr();
        for b in 0..nb {
            let wb = w.add(b * B::BYTES);
            prefetch_ahead(wb, B::BYTES);
            let (dw, qx) = B::load(wb);
            let ax = if B::SIGNED { _mm256_sign_epi8(qx, qx) } else { qx };
            for (t, a) in acc.iter_mut().enumerate() {
                let qy = _mm256_loadu_si256(qs.add((t * nb + b) * 32) as *const __m256i);
                let sy = if B::SIGNED { _mm256_sign_epi8(qy, qx) } else { qy };
                if B::HAS_MIN {
                    let s = *s.add((first + t) * nb + b);
                    summs[t] = B::min(wb).mul_add(s, summs[t]);
                }
                let scale = _mm256_set1_ps(dw * *d.add(t * nb + b));
                *a = _mm256_fmadd_ps(scale, lanes::<VNNI>(ax, sy), *a);
            }
        }
        for t in 0..T {
            let sum = hsum8(acc[t]);
            *out.add(t * token_stride) = if B::HAS_MIN { sum + summs[t] } else { sum };
        }
    }
}

/// Q4_K (`FIVE` false) and Q5_K (`FIVE` true).
struct Q45K<const FIVE: bool>;
type Q4K = Q45K<false>;
type Q5K = Q45K<true>;
struct Q6K;

impl<const FIVE: bool> Kernel for Q45K<FIVE> {
    const BYTES: usize = if FIVE { 176 } else { 144 };
    /// llama.cpp's AVX2 `ggml_vec_dot_q4_K_q8_K` or `ggml_vec_dot_q5_K_q8_K`, with each weight
    /// chunk unpacked once for `T` tokens.
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const T: usize>(
        w: *const u8,
        acts: &Acts<'_>,
        first: usize,
        out: *mut f32,
        token_stride: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { tile_q4_5_k::<FIVE, T>(w, acts, first, out, token_stride) }
    }
}

/// The tile kernel of Q4_K (`FIVE` false) and Q5_K (`FIVE` true: a fifth bit per value from
/// `qh`, and the minimums' term summed as one scalar instead of four lanes); each token reduced
/// in the order llama.cpp uses for its batch size (vector dot product, or the tiled kernel from
/// [`super::TILED_FROM`] tokens).
#[inline(always)]
unsafe fn tile_q4_5_k<const FIVE: bool, const T: usize>(
    w: *const u8,
    acts: &Acts<'_>,
    first: usize,
    out: *mut f32,
    token_stride: usize,
) {
    let nb = acts.nb;
    // SAFETY (whole body): the caller guarantees AVX2, `nb` blocks at `w`, and `nb` Q8_K
    // activation blocks for tokens first..first+T.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        // Q4_K keeps the minimums' term in four lanes, Q5_K as one scalar (llama.cpp's kernels).
        let mut acc_m = [_mm_setzero_ps(); T];
        let mut summs = [0f32; T];
        let tiled = tiled_tokens::<T>(acts, first);
        let mut tiled_acc = [0f32; T];
        for i in 0..nb {
            let x = w.add(i * Q45K::<FIVE>::BYTES);
            prefetch_ahead(x, Q45K::<FIVE>::BYTES);
            let wd = f16_at(x);
            let wmin = f16_at(x.add(2));
            let scales_mins = k4_scales_mins(x);
            let mins_and_scales = _mm256_cvtepu8_epi16(_mm_loadu_si128(scales_mins.as_ptr() as *const __m128i));
            let mins = _mm256_extracti128_si256(mins_and_scales, 1);
            let sc128 = _mm256_extracti128_si256(mins_and_scales, 0);
            let scales = _mm256_set_m128i(sc128, sc128);
            let mut sumi = [_mm256_setzero_si256(); T];
            let hbits = if FIVE { _mm256_loadu_si256(x.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
            let q5 = x.add(if FIVE { 48 } else { 16 });
            for j in 0..4 {
                let scale_l = _mm256_shuffle_epi8(scales, scale_shuffle_k4(2 * j));
                let scale_h = _mm256_shuffle_epi8(scales, scale_shuffle_k4(2 * j + 1));
                let (q4l, q4h) = q45k_codes::<FIVE>(q5, hbits, j);
                for (t, sum) in sumi.iter_mut().enumerate() {
                    let q8 = acts.qs.as_ptr().add(((first + t) * nb + i) * 256 + 64 * j);
                    let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                    let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                    let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                    let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                    *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(p16l, p16h));
                }
            }
            for t in 0..T {
                let block = (first + t) * nb + i;
                let yd = *acts.d.as_ptr().add(block);
                let q8sums = _mm256_loadu_si256(acts.bsums.as_ptr().add(block * 16) as *const __m256i);
                let q8s = _mm_hadd_epi16(_mm256_extracti128_si256(q8sums, 0), _mm256_extracti128_si256(q8sums, 1));
                let prod = _mm_madd_epi16(mins, q8s);
                if tiled[t] {
                    // The whole block's integer sums, scaled once (llama.cpp's tiled kernel).
                    let r = (-wmin).mul_add(hsum_epi32_128(prod) as f32, hsum_epi32(sumi[t]) as f32 * wd);
                    tiled_acc[t] = tiled_update(tiled_acc[t], r, yd);
                    continue;
                }
                if FIVE {
                    summs[t] = (-yd * wmin).mul_add(hsum_epi32_128(prod) as f32, summs[t]);
                } else {
                    acc_m[t] = _mm_fmadd_ps(_mm_set1_ps(-yd * wmin), _mm_cvtepi32_ps(prod), acc_m[t]);
                }
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(yd * wd), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            }
        }
        for t in 0..T {
            let mins = if FIVE {
                summs[t]
            } else {
                let m = _mm_add_ps(acc_m[t], _mm_movehl_ps(acc_m[t], acc_m[t]));
                _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
            };
            *out.add(t * token_stride) = if tiled[t] { tiled_acc[t] } else { hsum8(acc[t]) + mins };
        }
    }
}

impl Kernel for Q6K {
    const BYTES: usize = 210;
    /// llama.cpp's AVX2 `ggml_vec_dot_q6_K_q8_K`, with each weight chunk unpacked once for `T`
    /// tokens.
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const T: usize>(
        w: *const u8,
        acts: &Acts<'_>,
        first: usize,
        out: *mut f32,
        token_stride: usize,
    ) {
        let nb = acts.nb;
        // SAFETY (whole body): as for Q4K.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); T];
            let tiled = tiled_tokens::<T>(acts, first);
            let mut tiled_acc = [0f32; T];
            for i in 0..nb {
                let x = w.add(i * Self::BYTES);
                prefetch_ahead(x, Self::BYTES);
                let wd = f16_at(x.add(208));
                let scales = _mm_loadu_si128(x.add(192) as *const __m128i);
                let mut sumi = [_mm256_setzero_si256(); T];
                for j in 0..2 {
                    let q = q6k_codes(x, j);
                    let sc: [__m256i; 4] = std::array::from_fn(|k| {
                        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, scale_shuffle(4 * j + k)))
                    });
                    for (t, sum) in sumi.iter_mut().enumerate() {
                        let q8 = acts.qs.as_ptr().add(((first + t) * nb + i) * 256 + 128 * j);
                        let p: [__m256i; 4] = std::array::from_fn(|k| {
                            let q8k = _mm256_loadu_si256(q8.add(32 * k) as *const __m256i);
                            _mm256_madd_epi16(sc[k], _mm256_maddubs_epi16(q[k], q8k))
                        });
                        *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(p[0], p[1]));
                        *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(p[2], p[3]));
                    }
                }
                for t in 0..T {
                    let block = (first + t) * nb + i;
                    let q8sums = _mm256_loadu_si256(acts.bsums.as_ptr().add(block * 16) as *const __m256i);
                    let q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, _mm256_cvtepi8_epi16(scales)), 5);
                    let s = _mm256_sub_epi32(sumi[t], q8sclsub);
                    let yd = *acts.d.as_ptr().add(block);
                    if tiled[t] {
                        tiled_acc[t] = tiled_update(tiled_acc[t], hsum_epi32(s) as f32 * wd, yd);
                        continue;
                    }
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(yd * wd), _mm256_cvtepi32_ps(s), acc[t]);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                *out.add(t * token_stride) = if tiled[t] { tiled_acc[t] } else { hsum8(*a) };
            }
        }
    }
}

/// A Q4_K/Q5_K block's 12 bytes of 6-bit scales and minimums, decoded as llama.cpp does: the
/// eight scales in bytes 0..8, the eight minimums in 8..16.
///
/// # Safety
/// A whole block at `x`.
#[inline(always)]
pub(super) unsafe fn k4_scales_mins(x: *const u8) -> [u8; 16] {
    let mut utmp = [0u32; 4];
    // SAFETY: the caller guarantees the block; 12 bytes into a 16-byte array.
    unsafe { std::ptr::copy_nonoverlapping(x.add(4), utmp.as_mut_ptr() as *mut u8, 12) };
    utmp[3] = ((utmp[2] >> 4) & 0x0f0f0f0f) | (((utmp[1] >> 6) & 0x03030303) << 4);
    let uaux = utmp[1] & 0x3f3f3f3f;
    utmp[1] = (utmp[2] & 0x0f0f0f0f) | (((utmp[0] >> 6) & 0x03030303) << 4);
    utmp[2] = uaux;
    utmp[0] &= 0x3f3f3f3f;
    let mut bytes = [0u8; 16];
    for (k, word) in utmp.iter().enumerate() {
        bytes[4 * k..4 * k + 4].copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

/// Values 64j..64j+64 of a Q4_K/Q5_K block as one byte each: the low nibbles of the 32 bytes at
/// `q + 32j` (values 64j..64j+32) and their high nibbles (the next 32); for Q5_K (`FIVE`), the
/// fifth bit of each from `hbits` (bit 2j for the low nibbles, 2j + 1 for the high).
///
/// # Safety
/// AVX2; 32 bytes at `q + 32j`.
#[inline(always)]
pub(super) unsafe fn q45k_codes<const FIVE: bool>(q: *const u8, hbits: __m256i, j: usize) -> (__m256i, __m256i) {
    // SAFETY: as the caller guarantees.
    unsafe {
        let m4 = _mm256_set1_epi8(0xF);
        let bits = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
        let mut low = _mm256_and_si256(bits, m4);
        let mut high = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
        if FIVE {
            let (bl, bh) = (_mm256_set1_epi8(1 << (2 * j)), _mm256_set1_epi8(1 << (2 * j + 1)));
            let sixteen = _mm256_set1_epi8(16);
            low = _mm256_or_si256(low, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl), sixteen));
            high = _mm256_or_si256(high, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh), sixteen));
        }
        (low, high)
    }
}

/// Values 128j..128j+128 of a Q6_K block at `x` as 6-bit codes, one byte each (the value plus 32),
/// in four registers of 32 consecutive values.
///
/// # Safety
/// AVX2; a whole block at `x`; `j` is 0 or 1.
#[inline(always)]
pub(super) unsafe fn q6k_codes(x: *const u8, j: usize) -> [__m256i; 4] {
    // SAFETY: as the caller guarantees.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m15 = _mm256_set1_epi8(15);
        let low1 = _mm256_loadu_si256(x.add(64 * j) as *const __m256i);
        let low2 = _mm256_loadu_si256(x.add(64 * j + 32) as *const __m256i);
        let high = _mm256_loadu_si256(x.add(128 + 32 * j) as *const __m256i);
        let h0 = _mm256_slli_epi16(_mm256_and_si256(high, m3), 4);
        let h1 = _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(12)), 2);
        let h2 = _mm256_and_si256(high, _mm256_set1_epi8(48));
        let h3 = _mm256_srli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(-64)), 2);
        [
            _mm256_or_si256(_mm256_and_si256(low1, m15), h0),
            _mm256_or_si256(_mm256_and_si256(low2, m15), h1),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low1, 4), m15), h2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low2, 4), m15), h3),
        ]
    }
}

/// The sum of eight 32-bit lanes (exact: the sums of a block fit easily).
#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let mut lanes = [0i32; 8];
    // SAFETY: an unaligned store of 32 bytes into a 32-byte array.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
    lanes.iter().fold(0i32, |a, &b| a.wrapping_add(b))
}

/// The sum of four 32-bit lanes.
#[inline(always)]
unsafe fn hsum_epi32_128(v: __m128i) -> i32 {
    let mut lanes = [0i32; 4];
    // SAFETY: an unaligned store of 16 bytes into a 16-byte array.
    unsafe { _mm_storeu_si128(lanes.as_mut_ptr() as *mut __m128i, v) };
    lanes.iter().fold(0i32, |a, &b| a.wrapping_add(b))
}

/// Which of tokens `first..first + T` llama.cpp computes with its tiled K-quant kernel (a batch of
/// [`super::TILED_FROM`] or more).
#[inline(always)]
fn tiled_tokens<const T: usize>(acts: &Acts<'_>, first: usize) -> [bool; T] {
    std::array::from_fn(|t| acts.peer_batch.get(first + t).is_some_and(|&b| b >= super::TILED_FROM))
}

/// One block's contribution to a product in llama.cpp's tiled K-quant kernel, which it uses for
/// batches of 8 or more tokens: `acc + r · d_activation` in one fused multiply-add (GCC contracts
/// the kernel's separate multiply and add intrinsics; measured against llama.cpp's own build).
#[inline(always)]
fn tiled_update(acc: f32, r: f32, yd: f32) -> f32 {
    r.mul_add(yd, acc)
}

/// llama.cpp's `get_scale_shuffle_k4`: 16-bit scale `i` repeated over all 16 lanes.
#[inline(always)]
unsafe fn scale_shuffle_k4(i: usize) -> __m256i {
    let (lo, hi) = (2 * i as i8, 2 * i as i8 + 1);
    // SAFETY: AVX is implied by the callers' features.
    unsafe { _mm256_set1_epi16(i16::from_le_bytes([lo as u8, hi as u8])) }
}

/// llama.cpp's `get_scale_shuffle`: byte `2i` in the low 8 bytes, byte `2i + 1` in the high 8.
#[inline(always)]
unsafe fn scale_shuffle(i: usize) -> __m128i {
    let (lo, hi) = (2 * i as i8, 2 * i as i8 + 1);
    // SAFETY: SSE2 is implied by the callers' features.
    unsafe { _mm_set_epi8(hi, hi, hi, hi, hi, hi, hi, hi, lo, lo, lo, lo, lo, lo, lo, lo) }
}

/// How far ahead of the block being multiplied the weights are fetched into cache. The
/// hardware prefetcher alone leaves single-token products waiting on memory: on the 2-core
/// test machine this took SmolLM2 Q4_1 decoding from 56 to 85 tokens/s (512 to 8192 bytes
/// measured; 4096 was best). Prefetches never fault, so running past the end is harmless.
const PREFETCH: usize = 4096;

/// Fetch into cache the weights [`PREFETCH`] bytes past a block of `bytes` at `p`: one request per
/// cache line the block spans there.
#[inline(always)]
fn prefetch_ahead(p: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + line) as *const i8) };
    }
}

/// A weight block format with an integer kernel.
trait Block {
    const BYTES: usize;
    /// Values are signed (multiplied with the sign trick) rather than unsigned nibbles.
    const SIGNED: bool;
    /// The block has a minimum (`m`), multiplied by the activations' scaled sums.
    const HAS_MIN: bool;
    /// What [`Self::load_unsigned`] adds to every value (0 where the values are unsigned).
    const OFFSET: u8;
    /// The block's scale and its 32 values as bytes.
    unsafe fn load(p: *const u8) -> (f32, __m256i);
    /// The block's scale and its 32 values plus [`Self::OFFSET`], as unsigned bytes.
    unsafe fn load_unsigned(p: *const u8) -> (f32, __m256i);
    unsafe fn min(_p: *const u8) -> f32 {
        0.0
    }
}

struct Q8_0;
struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    const OFFSET: u8 = 128;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, __m256i) {
        // SAFETY: the caller guarantees a whole block at `p`.
        unsafe { (f16_at(p), _mm256_loadu_si256(p.add(2) as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(p: *const u8) -> (f32, __m256i) {
        // SAFETY: as `load`. Flipping the top bit adds 128 to a signed byte read as unsigned.
        unsafe {
            let (d, q) = Self::load(p);
            (d, _mm256_xor_si256(q, _mm256_set1_epi8(0x80u8 as i8)))
        }
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    const OFFSET: u8 = 8;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, __m256i) {
        // SAFETY: the caller guarantees a whole block at `p`.
        unsafe { (f16_at(p), _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8))) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(p: *const u8) -> (f32, __m256i) {
        // SAFETY: as `load`; the nibbles are the values plus 8.
        unsafe { (f16_at(p), nibbles(p.add(2))) }
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    const HAS_MIN: bool = true;
    const OFFSET: u8 = 0;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, __m256i) {
        // SAFETY: the caller guarantees a whole block at `p`.
        unsafe { (f16_at(p), nibbles(p.add(4))) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(p: *const u8) -> (f32, __m256i) {
        // SAFETY: as `load`.
        unsafe { Self::load(p) }
    }
    #[inline(always)]
    unsafe fn min(p: *const u8) -> f32 {
        // SAFETY: as `load`.
        unsafe { f16_at(p.add(2)) }
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    const OFFSET: u8 = 16;
    #[inline(always)]
    unsafe fn load_unsigned(p: *const u8) -> (f32, __m256i) {
        // SAFETY: the caller guarantees a whole block at `p`. The fifth bit as 16, over the nibble.
        unsafe {
            let high = _mm256_and_si256(bits_as_bytes(p.add(2)), _mm256_set1_epi8(0x10));
            (f16_at(p), _mm256_or_si256(nibbles(p.add(6)), high))
        }
    }
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, __m256i) {
        // SAFETY: the caller guarantees a whole block at `p`.
        unsafe {
            // A clear fifth bit turns the nibble into nibble − 16 (0xF0 | nibble as a signed byte).
            let high = _mm256_andnot_si256(bits_as_bytes(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            (f16_at(p), _mm256_or_si256(nibbles(p.add(6)), high))
        }
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const SIGNED: bool = false;
    const HAS_MIN: bool = true;
    const OFFSET: u8 = 0;
    #[inline(always)]
    unsafe fn load_unsigned(p: *const u8) -> (f32, __m256i) {
        // SAFETY: as `load`.
        unsafe { Self::load(p) }
    }
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, __m256i) {
        // SAFETY: the caller guarantees a whole block at `p`.
        unsafe {
            let high = _mm256_and_si256(bits_as_bytes(p.add(4)), _mm256_set1_epi8(0x10));
            (f16_at(p), _mm256_or_si256(nibbles(p.add(8)), high))
        }
    }
    #[inline(always)]
    unsafe fn min(p: *const u8) -> f32 {
        // SAFETY: as `load`.
        unsafe { f16_at(p.add(2)) }
    }
}

/// llama.cpp's `bytes_from_bits_32`: 32 bits at `p` → 32 bytes, 0xFF where the bit is set.
#[inline(always)]
unsafe fn bits_as_bytes(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes at `p`, and AVX2.
    unsafe {
        let x32 = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
        let shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuffle);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }
}

/// An f16 at `p` as f32, with the F16C instruction (exact, like every f16 → f32 conversion).
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes and F16C.
    unsafe {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// llama.cpp's `hsum_float_8`.
#[inline(always)]
unsafe fn hsum8(x: __m256) -> f32 {
    // SAFETY: AVX is implied by the callers' features.
    unsafe {
        let res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }
}

/// Eight lanes of sums of four consecutive products of unsigned bytes with signed bytes.
#[inline(always)]
unsafe fn lanes<const VNNI: bool>(ax: __m256i, sy: __m256i) -> __m256 {
    // SAFETY: the callers are compiled with AVX2, and with VNNI when `VNNI`.
    unsafe {
        let sums = if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
        } else {
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy))
        };
        _mm256_cvtepi32_ps(sums)
    }
}

/// 16 bytes of nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`, and AVX2.
    unsafe {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}
