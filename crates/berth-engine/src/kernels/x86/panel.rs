//! The panel kernel of the 32-value formats for many tokens at once (prefill, large decode
//! batches): weight rows are unpacked once into a panel and then multiplied by every token of the
//! job, four rows by four tokens at a time (by two on AVX2 without VNNI, whose 16 registers hold
//! fewer accumulators).
//!
//! Why a second kernel: the one-row tiles unpack each weight block again for every four tokens and
//! spend a sign instruction, a scalar multiply and a broadcast on every (row, token) pair; at 512
//! tokens that bookkeeping, not the integer products, was most of the time. Here the panel holds
//! the values as unsigned bytes (the format's offset added, so `vpdpbusd` takes them as they
//! are), the offset's share of each lane is taken back once per token and block (it seeds the
//! accumulating `vpdpbusd`), and the scales of four rows meet four tokens' in vector multiplies.
//! Without VNNI the panel holds magnitudes and signs instead, and `vpmaddubsw` with `vpmaddwd`
//! make the lanes (the sign trick of llama.cpp's AVX2 kernel); the tile is the same.
//!
//! The results are the same bits as the one-row tiles and llama.cpp's vector dot product: each
//! lane's integer sum is exact either way (Σ(q + o)·y − o·Σy = Σq·y, far from overflow), and the
//! lanes are converted, scaled by the same rounded product of the two scales and added block by
//! block into the same eight float lanes, summed last by `hsum8`.

use std::arch::x86_64::*;

use super::{Block, Job, hsum8, prefetch_ahead};

/// Weight rows unpacked and multiplied together.
const ROWS: usize = 4;
// The mins of a block's rows are one `__m128`.
const _: () = assert!(ROWS == 4);

/// From how many tokens a job's 32-value products take the panel kernel (below it, unpacking a
/// panel costs more than it saves).
pub(super) const PANEL_FROM: usize = 8;

/// Tokens multiplied together with the panel's rows: VNNI's 32 registers hold four rows by four
/// tokens' accumulators; AVX2's 16 hold four rows by two.
const TOKENS_VNNI: usize = 4;
const TOKENS_AVX2: usize = 2;

/// A panel: `ROWS` weight rows' blocks unpacked, block-major (`[block][row]`).
struct Panel {
    /// VNNI: the values plus the format's offset, as unsigned bytes. AVX2: `vpmaddubsw` would
    /// saturate on such bytes (Q8_0's reach 255), so the values' magnitudes, or the values
    /// themselves where they are unsigned.
    values: Vec<__m256i>,
    /// AVX2 and signed values: the values, whose signs go onto the activations (the sign trick).
    signs: Vec<__m256i>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

/// Every product of the job's rows and tokens (the tokens at least [`PANEL_FROM`]).
///
/// # Safety
/// The CPU has AVX2, FMA, F16C, AVX-512 VNNI and VL; the job's bounds were checked by
/// `matmul_tiles`.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn multiply<B: Block>(job: &Job<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { multiply_with::<B, true>(job) }
}

/// [`multiply`] with AVX2's `vpmaddubsw` and `vpmaddwd` instead of `vpdpbusd`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the job's bounds were checked by `matmul_tiles`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn multiply_avx2<B: Block>(job: &Job<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { multiply_with::<B, false>(job) }
}

#[inline(always)]
unsafe fn multiply_with<B: Block, const VNNI: bool>(job: &Job<'_>) {
    let nb = job.acts.nb;
    // SAFETY: the callers have AVX.
    let zero = unsafe { _mm256_setzero_si256() };
    let mut panel = Panel {
        values: vec![zero; nb * ROWS],
        signs: if !VNNI && B::SIGNED { vec![zero; nb * ROWS] } else { Vec::new() },
        scales: vec![0.0; nb * ROWS],
        mins: if B::HAS_MIN { vec![0.0; nb * ROWS] } else { Vec::new() },
    };
    let tokens = if VNNI { TOKENS_VNNI } else { TOKENS_AVX2 };
    let (t0, t1) = (job.tokens.start, job.tokens.end);
    for r0 in (0..job.rows).step_by(ROWS) {
        let valid = (job.rows - r0).min(ROWS);
        // SAFETY: rows r0..r0 + valid are inside the job; a short panel repeats its last row.
        unsafe { unpack::<B, VNNI>(job, r0, valid, &mut panel) };
        let mut t = t0;
        while t < t1 {
            let group = (t1 - t).min(tokens);
            // SAFETY: tokens t..t + group and rows r0..r0 + valid are inside the checked bounds.
            unsafe {
                let out = job.out.add((t - t0) * job.layout.token_stride + r0 * job.layout.row_stride);
                // (The guards keep AVX2's instances to the groups it forms.)
                match group {
                    4 if VNNI => tile::<B, 4, VNNI>(&panel, job, t, out, valid),
                    3 if VNNI => tile::<B, 3, VNNI>(&panel, job, t, out, valid),
                    2 => tile::<B, 2, VNNI>(&panel, job, t, out, valid),
                    _ => tile::<B, 1, VNNI>(&panel, job, t, out, valid),
                }
            }
            t += group;
        }
    }
}

/// Unpack rows `r0..r0 + valid` of the job's weights into `panel` (rows past `valid` repeat the
/// last one; their products are computed and not written).
#[inline(always)]
unsafe fn unpack<B: Block, const VNNI: bool>(job: &Job<'_>, r0: usize, valid: usize, panel: &mut Panel) {
    let nb = job.acts.nb;
    for r in 0..ROWS {
        // SAFETY (whole loop): the row is inside the job, and `nb` blocks of it are readable.
        unsafe {
            let row = job.w.add((r0 + r.min(valid - 1)) * job.row_bytes);
            for b in 0..nb {
                let wb = row.add(b * B::BYTES);
                prefetch_ahead(wb, B::BYTES);
                let (d, values) = if VNNI {
                    B::load_unsigned(wb)
                } else {
                    let (d, q) = B::load(wb);
                    if B::SIGNED {
                        *panel.signs.get_unchecked_mut(b * ROWS + r) = q;
                        (d, _mm256_sign_epi8(q, q))
                    } else {
                        (d, q)
                    }
                };
                *panel.values.get_unchecked_mut(b * ROWS + r) = values;
                *panel.scales.get_unchecked_mut(b * ROWS + r) = d;
                if B::HAS_MIN {
                    *panel.mins.get_unchecked_mut(b * ROWS + r) = B::min(wb);
                }
            }
        }
    }
}

/// The panel's rows by tokens `first..first + T`, each product reduced as llama.cpp's vector dot
/// product reduces it; the first `valid` rows written.
#[inline(always)]
unsafe fn tile<B: Block, const T: usize, const VNNI: bool>(
    panel: &Panel,
    job: &Job<'_>,
    first: usize,
    out: *mut f32,
    valid: usize,
) {
    let nb = job.acts.nb;
    // SAFETY (whole body): the caller guarantees the features, `nb` activation blocks for tokens
    // first..first + T, and outputs for `valid` rows and T tokens at `out`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); T]; ROWS];
        // The mins' share, the four rows of a token in one vector (kept out of the row loop: written
        // per row and token, the compiler gathered and stored it through memory every block).
        let mut summs = [_mm_setzero_ps(); T];
        let qs = job.acts.qs.as_ptr().add(first * nb * 32);
        let d = job.acts.d.as_ptr().add(first * nb);
        let s = job.acts.s.as_ptr();
        for b in 0..nb {
            let qy: [__m256i; T] =
                std::array::from_fn(|t| _mm256_loadu_si256(qs.add((t * nb + b) * 32) as *const __m256i));
            let base: [__m256i; T] =
                std::array::from_fn(|t| if VNNI { vnni_base::<B>(qy[t]) } else { _mm256_setzero_si256() });
            let dy: [__m256; T] = std::array::from_fn(|t| _mm256_set1_ps(*d.add(t * nb + b)));
            if B::HAS_MIN {
                // The same fused multiply-add per row and token as one at a time.
                let mins = _mm_loadu_ps(panel.mins.as_ptr().add(b * ROWS));
                for (t, summ) in summs.iter_mut().enumerate() {
                    *summ = _mm_fmadd_ps(mins, _mm_set1_ps(*s.add((first + t) * nb + b)), *summ);
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = b * ROWS + r;
                let dw = _mm256_set1_ps(*panel.scales.get_unchecked(at));
                for t in 0..T {
                    let lanes = _mm256_cvtepi32_ps(lane_sums::<B, VNNI>(panel, at, qy[t], base[t]));
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dy[t]), lanes, acc[t]);
                }
            }
        }
        let (ts, rs) = (job.layout.token_stride, job.layout.row_stride);
        let mut mins_share = [[0f32; ROWS]; T];
        for (lanes, summ) in mins_share.iter_mut().zip(summs) {
            _mm_storeu_ps(lanes.as_mut_ptr(), summ);
        }
        for r in 0..valid {
            for t in 0..T {
                let sum = hsum8(acc[r][t]);
                *out.add(t * ts + r * rs) = if B::HAS_MIN { sum + mins_share[t][r] } else { sum };
            }
        }
    }
}

/// VNNI: −offset · (the sum of each lane's four activations), where the lane sums of one token's
/// block start.
#[inline(always)]
unsafe fn vnni_base<B: Block>(qy: __m256i) -> __m256i {
    // SAFETY: only VNNI's instances call it.
    unsafe {
        let zero = _mm256_setzero_si256();
        if B::OFFSET == 0 {
            zero
        } else {
            _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(B::OFFSET as i8), qy))
        }
    }
}

/// The eight lanes' integer sums of panel entry `at` and one token's block `qy`: by `vpdpbusd`
/// of the offset values from `base` (VNNI), or by `vpmaddubsw` and `vpmaddwd` of the magnitudes
/// and the signed activations, as llama.cpp's AVX2 vector dot product sums them. Either way each
/// lane's sum is exact, so the two give the same integers.
#[inline(always)]
unsafe fn lane_sums<B: Block, const VNNI: bool>(panel: &Panel, at: usize, qy: __m256i, base: __m256i) -> __m256i {
    // SAFETY (whole body): `at` is inside the panel; the caller has the features of its level.
    unsafe {
        let values = *panel.values.get_unchecked(at);
        if VNNI {
            _mm256_dpbusd_epi32(base, values, qy)
        } else {
            let sy = if B::SIGNED { _mm256_sign_epi8(qy, *panel.signs.get_unchecked(at)) } else { qy };
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(values, sy))
        }
    }
}
