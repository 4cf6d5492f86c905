//! The VNNI kernel of the K-quants for tokens that llama.cpp multiplies with its tiled kernel
//! (batches of [`super::super::TILED_FROM`] or more: prefill, large decode batches).
//!
//! In that kernel a block's product is its exact integer sums, scaled once: only the totals
//! matter, not which lanes they were summed in. That frees the arithmetic, and this kernel uses an
//! outer product: eight tokens' activations are transposed so that one 256-bit register holds
//! four consecutive values of each of eight tokens, and one `vpdpbusd` with four bytes of a
//! weight row broadcast adds 32 products, one (row, token) pair per lane. Weight rows are unpacked
//! to one byte per value once per job and used for every token in it. The one-row tiles did the
//! same sums with three instructions per 32 products and unpacked each block again for every
//! four tokens.
//!
//! Per block, as llama.cpp's tiled kernel and the one-row tiles: `s1 = Σ scale · Σ code · y`
//! (less the codes' bias times `Σ scale · Σ y`, Q6_K), `s2 = Σ min · Σ y`, then
//! `r = s1 · d − dmin · s2` (one fused multiply-add) and `acc = r · d_y + acc` (another). The
//! terms in `Σ y` take `vpmaddwd` over pairs of 16-bit sums, not a 32-bit multiply per scale.

use std::arch::x86_64::*;

use super::{Job, f16_at, k4_scales_mins, prefetch_ahead, q6k_codes, q45k_codes};

/// Weight rows multiplied together.
const ROWS: usize = 4;
/// Tokens multiplied together: one per 32-bit lane.
const LANES: usize = 8;
/// Values in a K-quant block.
const QK: usize = 256;

/// A K-quant format as the outer-product kernel reads it.
pub(super) trait KBlock {
    const BYTES: usize;
    /// Values per scale (32 for Q4_K and Q5_K, 16 for Q6_K).
    const SUB: usize;
    /// The block has minimums (Q4_K, Q5_K).
    const HAS_MIN: bool;
    /// log2 of what every code holds above its value (Q6_K's 32; 0 for none), taken back
    /// through the activations' sums.
    const BIAS_SHIFT: i32;
    /// The block's codes (256 unsigned bytes in value order, into `codes`), its scales (one per
    /// `SUB` values), what multiplies the activations' sums (the minimums, or Q6_K's scales) in
    /// pairs of 16-bit values, and its `d` and `dmin`.
    unsafe fn unpack(
        p: *const u8,
        codes: &mut [__m256i; 8],
        scales: &mut [i32; 16],
        pairs: &mut [i32; 8],
    ) -> (f32, f32);
}

/// Two 16-bit values in one 32-bit lane, as `vpmaddwd` reads them.
fn pair(low: i32, high: i32) -> i32 {
    (low as i16 as u16 as u32 | ((high as i16 as u16 as u32) << 16)) as i32
}

/// Every product of the job's rows and tokens; every token of the job is one llama.cpp computes
/// with its tiled kernel.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C, AVX-512 VNNI and VL; the job's bounds were checked by
/// `matmul_tiles` (Q8_K activations with their sums).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn multiply<B: KBlock>(job: &Job<'_>) {
    let nb = job.acts.nb;
    let tokens = job.tokens.len();
    let groups = tokens.div_ceil(LANES);
    let acts = transpose::<B>(job, groups);
    let mut panel = Panel {
        codes: vec![[_mm256_setzero_si256(); 8]; ROWS * nb],
        scales: vec![[0; 16]; ROWS * nb],
        pairs: vec![[0; 8]; ROWS * nb],
        d: vec![(0.0, 0.0); ROWS * nb],
    };
    for r0 in (0..job.rows).step_by(ROWS) {
        let valid = (job.rows - r0).min(ROWS);
        for r in 0..ROWS {
            // Rows past the job's last repeat it; their products are not written.
            let row = r0 + r.min(valid - 1);
            for b in 0..nb {
                // SAFETY: the row is inside the job and has `nb` blocks.
                unsafe {
                    let p = job.w.add(row * job.row_bytes + b * B::BYTES);
                    prefetch_ahead(p, B::BYTES);
                    let at = r * nb + b;
                    panel.d[at] = B::unpack(p, &mut panel.codes[at], &mut panel.scales[at], &mut panel.pairs[at]);
                }
            }
        }
        // Token groups two at a time: each broadcast weight word then feeds two `vpdpbusd`s
        // (loads, not arithmetic, bounded one group at a time).
        let mut g = 0;
        while g < groups {
            let take = (groups - g).min(2);
            let lanes = (tokens - g * LANES).min(take * LANES);
            // SAFETY: rows r0..r0 + valid and the groups' tokens are inside the checked bounds.
            unsafe {
                let out = job.out.add(g * LANES * job.layout.token_stride + r0 * job.layout.row_stride);
                if take == 2 {
                    tile::<B, 2>(&panel, &acts, g, nb, out, job, valid, lanes);
                } else {
                    tile::<B, 1>(&panel, &acts, g, nb, out, job, valid, lanes);
                }
            }
            g += take;
        }
    }
}

/// Four weight rows unpacked, `[row][block]`.
struct Panel {
    codes: Vec<[__m256i; 8]>,
    scales: Vec<[i32; 16]>,
    pairs: Vec<[i32; 8]>,
    d: Vec<(f32, f32)>,
}

/// The job's activations by groups of eight tokens, lane `t` holding token `t` of the group
/// (tokens past the job's last are zeros).
struct Transposed {
    /// `[group][block][QK / 4]`: four consecutive values of each token.
    values: Vec<[i32; LANES]>,
    /// `[group][block][8]`: the sums of the values of each scale (16 or 32 values), in pairs of
    /// 16-bit halves (32 × 127 fits).
    sums: Vec<[i32; LANES]>,
    /// `[group][block]`: the activations' scales.
    d: Vec<[f32; LANES]>,
}

fn transpose<B: KBlock>(job: &Job<'_>, groups: usize) -> Transposed {
    let nb = job.acts.nb;
    let mut t = Transposed {
        values: vec![[0; LANES]; groups * nb * QK / 4],
        sums: vec![[0; LANES]; groups * nb * 8],
        d: vec![[0.0; LANES]; groups * nb],
    };
    for (i, token) in job.tokens.clone().enumerate() {
        let (g, lane) = (i / LANES, i % LANES);
        for b in 0..nb {
            let block = token * nb + b;
            let qs = &job.acts.qs[block * QK..(block + 1) * QK];
            for (k, four) in qs.chunks_exact(4).enumerate() {
                t.values[(g * nb + b) * QK / 4 + k][lane] =
                    i32::from_le_bytes([four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8]);
            }
            let bs = &job.acts.bsums[block * 16..(block + 1) * 16];
            let sum = |s: usize| if B::SUB == 16 { bs[s] as i32 } else { bs[2 * s] as i32 + bs[2 * s + 1] as i32 };
            for k in 0..QK / B::SUB / 2 {
                t.sums[(g * nb + b) * 8 + k][lane] = pair(sum(2 * k), sum(2 * k + 1));
            }
            t.d[g * nb + b][lane] = job.acts.d[block];
        }
    }
    t
}

/// The panel's rows by token groups `g..g + G` (`lanes` tokens of them real), the first `valid`
/// rows written.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<B: KBlock, const G: usize>(
    panel: &Panel,
    acts: &Transposed,
    g: usize,
    nb: usize,
    out: *mut f32,
    job: &Job<'_>,
    valid: usize,
    lanes: usize,
) {
    let subs = QK / B::SUB;
    // SAFETY (whole body): the caller guarantees the features and the outputs; every index below
    // is inside the vectors built for `nb` blocks and these groups.
    unsafe {
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); G]; ROWS];
        for b in 0..nb {
            let values: [*const __m256i; G] =
                std::array::from_fn(|i| acts.values.as_ptr().add(((g + i) * nb + b) * QK / 4) as *const __m256i);
            let sums: [*const __m256i; G] =
                std::array::from_fn(|i| acts.sums.as_ptr().add(((g + i) * nb + b) * 8) as *const __m256i);
            let mut s1 = [[zero; G]; ROWS];
            let codes: [*const u8; ROWS] = std::array::from_fn(|r| panel.codes[r * nb + b].as_ptr() as *const u8);
            for s in 0..subs {
                let mut dot = [[zero; G]; ROWS];
                for k in 0..B::SUB / 4 {
                    let four = s * B::SUB / 4 + k;
                    let y: [__m256i; G] = std::array::from_fn(|i| _mm256_loadu_si256(values[i].add(four)));
                    for r in 0..ROWS {
                        let w = _mm256_set1_epi32((codes[r].add(4 * four) as *const i32).read_unaligned());
                        for i in 0..G {
                            dot[r][i] = _mm256_dpbusd_epi32(dot[r][i], w, y[i]);
                        }
                    }
                }
                for r in 0..ROWS {
                    let scale = _mm256_set1_epi32(panel.scales[r * nb + b][s]);
                    for i in 0..G {
                        s1[r][i] = _mm256_add_epi32(s1[r][i], _mm256_mullo_epi32(dot[r][i], scale));
                    }
                }
            }
            let dy: [__m256; G] = std::array::from_fn(|i| _mm256_loadu_ps(acts.d[(g + i) * nb + b].as_ptr()));
            for r in 0..ROWS {
                let pairs = &panel.pairs[r * nb + b];
                let (d, dmin) = panel.d[r * nb + b];
                for i in 0..G {
                    // The minimums' term (Q4_K, Q5_K) or the bias's (Q6_K): pairs of factors
                    // times pairs of the activations' sums.
                    let mut s2 = zero;
                    for (k, &factors) in pairs.iter().enumerate().take(subs / 2) {
                        let term = _mm256_madd_epi16(_mm256_set1_epi32(factors), _mm256_loadu_si256(sums[i].add(k)));
                        s2 = _mm256_add_epi32(s2, term);
                    }
                    let mut s1 = s1[r][i];
                    if B::BIAS_SHIFT != 0 {
                        s1 = _mm256_sub_epi32(s1, _mm256_sllv_epi32(s2, _mm256_set1_epi32(B::BIAS_SHIFT)));
                    }
                    let mut res = _mm256_mul_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(d));
                    if B::HAS_MIN {
                        res = _mm256_fnmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(s2), res);
                    }
                    acc[r][i] = _mm256_fmadd_ps(res, dy[i], acc[r][i]);
                }
            }
        }
        let (ts, rs) = (job.layout.token_stride, job.layout.row_stride);
        for (r, a) in acc.iter().enumerate().take(valid) {
            let mut lane = [[0f32; LANES]; G];
            for i in 0..G {
                _mm256_storeu_ps(lane[i].as_mut_ptr(), a[i]);
            }
            for (t, v) in lane.iter().flatten().enumerate().take(lanes) {
                *out.add(t * ts + r * rs) = *v;
            }
        }
    }
}

/// Q4_K (`FIVE` false) and Q5_K (`FIVE` true).
pub(super) struct Q45K<const FIVE: bool>;

impl<const FIVE: bool> KBlock for Q45K<FIVE> {
    const BYTES: usize = if FIVE { 176 } else { 144 };
    const SUB: usize = 32;
    const HAS_MIN: bool = true;
    const BIAS_SHIFT: i32 = 0;
    #[inline(always)]
    unsafe fn unpack(
        x: *const u8,
        codes: &mut [__m256i; 8],
        scales: &mut [i32; 16],
        pairs: &mut [i32; 8],
    ) -> (f32, f32) {
        // SAFETY: the caller guarantees a whole block at `x` and AVX2.
        unsafe {
            let bytes = k4_scales_mins(x);
            for s in 0..8 {
                scales[s] = bytes[s] as i32;
            }
            for (k, factors) in pairs.iter_mut().enumerate().take(4) {
                *factors = pair(bytes[8 + 2 * k] as i32, bytes[9 + 2 * k] as i32);
            }
            let hbits = if FIVE { _mm256_loadu_si256(x.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
            let q = x.add(if FIVE { 48 } else { 16 });
            for j in 0..4 {
                (codes[2 * j], codes[2 * j + 1]) = q45k_codes::<FIVE>(q, hbits, j);
            }
            (f16_at(x), f16_at(x.add(2)))
        }
    }
}

pub(super) struct Q6K;

impl KBlock for Q6K {
    const BYTES: usize = 210;
    const SUB: usize = 16;
    const HAS_MIN: bool = false;
    const BIAS_SHIFT: i32 = 5;
    #[inline(always)]
    unsafe fn unpack(
        x: *const u8,
        codes: &mut [__m256i; 8],
        scales: &mut [i32; 16],
        pairs: &mut [i32; 8],
    ) -> (f32, f32) {
        // SAFETY: the caller guarantees a whole block at `x` and AVX2.
        unsafe {
            for j in 0..2 {
                codes[4 * j..4 * j + 4].copy_from_slice(&q6k_codes(x, j));
            }
            for (s, scale) in scales.iter_mut().enumerate() {
                *scale = *x.add(192 + s) as i8 as i32;
            }
            for (k, factors) in pairs.iter_mut().enumerate() {
                *factors = pair(scales[2 * k], scales[2 * k + 1]);
            }
            (f16_at(x.add(208)), 0.0)
        }
    }
}
