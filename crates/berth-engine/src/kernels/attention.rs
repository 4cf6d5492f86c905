//! Causal attention over paged f16 KV caches, computed as llama.cpp computes it without
//! flash attention (see ARCHITECTURE.md, "Agreement with llama.cpp"): keys times the query
//! rounded to f16, ggml's softmax, values times the probabilities rounded to f16, each product
//! reduced in the order of the kernel llama.cpp picks for the step.
//!
//! The loops walk the cache row by row (each position's keys and values are contiguous) and keep
//! the reduction lanes in small accumulator arrays, so they vectorise over the head dimension
//! while producing exactly the bits of the lane-by-lane definition in `ops`.

use std::ops::Range;

use super::kv_type::KvType;
use super::{f16, ops};

/// How llama.cpp reduces a dot product in this step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    /// One token in the step: `ggml_vec_dot_f16` (four 16-lane accumulators over 64-element steps).
    Gemv,
    /// Several tokens: tinyBLAS (one 16-lane accumulator over 16-element steps).
    Gemm,
}

/// Shape and scoring of one layer's attention.
pub struct Attention {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplies the scores inside the softmax (`1/√head_dim` for most models; 1 where the model
    /// scales its queries itself).
    pub scale: f32,
    /// Gemma 2's soft-capping of the raw scores (`cap · tanh(s / cap)`, before `scale`).
    pub softcap: Option<f32>,
    /// A sliding-window layer sees only the last `window` positions (itself included).
    pub window: Option<usize>,
}

impl Attention {
    /// Plain causal attention scaled by `1/√head_dim`.
    pub fn causal(n_head: usize, n_head_kv: usize, head_dim: usize) -> Self {
        Self { n_head, n_head_kv, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), softcap: None, window: None }
    }
}

/// Fold four 16-lane accumulators the way `GGML_F32x16_REDUCE` does before the final reduction.
#[inline(always)]
fn fold4(acc: &[[f32; 16]; 4]) -> [f32; 16] {
    let mut out = [0f32; 16];
    for l in 0..16 {
        let a = acc[0][l] + acc[2][l];
        let b = acc[1][l] + acc[3][l];
        out[l] = a + b;
    }
    out
}

/// q·k over the head dimension (a multiple of 16, zero-padded to 64 for the gemv order).
#[inline(always)]
fn dot_qk(q: &[f32], k: &[f32], order: Order) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::dot_qk(q, k, order) };
    }
    dot_qk_portable(q, k, order)
}

#[inline(always)]
fn dot_qk_portable(q: &[f32], k: &[f32], order: Order) -> f32 {
    match order {
        Order::Gemm => {
            let mut acc = [0f32; 16];
            for (qc, kc) in q.chunks_exact(16).zip(k.chunks_exact(16)) {
                for l in 0..16 {
                    acc[l] = kc[l].mul_add(qc[l], acc[l]);
                }
            }
            ops::reduce16(&acc)
        }
        Order::Gemv => {
            let mut acc = [[0f32; 16]; 4];
            // Whole 64-element steps with the accumulator fixed per 16 lanes (so the loop
            // vectorises), then any 16-element rest in the same rotation.
            let steps = k.len() / 64;
            for (qc, kc) in q.chunks_exact(64).zip(k.chunks_exact(64)) {
                for (a, acc) in acc.iter_mut().enumerate() {
                    for l in 0..16 {
                        acc[l] = kc[a * 16 + l].mul_add(qc[a * 16 + l], acc[l]);
                    }
                }
            }
            let rest = q[steps * 64..].chunks_exact(16).zip(k[steps * 64..].chunks_exact(16));
            for (i, (qc, kc)) in rest.enumerate() {
                let a = &mut acc[i % 4];
                for l in 0..16 {
                    a[l] = kc[l].mul_add(qc[l], a[l]);
                }
            }
            ops::reduce16(&fold4(&acc))
        }
    }
}

/// The dot products of `dot_qk` with the accumulators held in registers (the compiler keeps
/// the portable version's 64 lanes on the stack and multiplies one lane at a time).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Order;

    /// # Safety
    /// The CPU must have AVX and F16C.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let whole = n / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: `i + 8 <= n`, inside both slices.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        let t = crate::kernels::f16::table();
        for i in whole..n {
            dst[i] = t[src[i] as usize];
        }
    }

    /// Round every value to f16 and back, eight at a time (`vcvtps2ph` rounds to nearest even,
    /// as `half`'s conversion does); returns how many were rounded (a multiple of 8).
    ///
    /// # Safety
    /// The CPU must have AVX and F16C.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn round_f16(x: &mut [f32]) -> usize {
        let whole = x.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: `i + 8 <= whole <= x.len()`.
            unsafe {
                let at = x.as_mut_ptr().add(i);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(at));
                _mm256_storeu_ps(at, _mm256_cvtph_ps(h));
            }
        }
        whole
    }

    /// `acc[d0..d0 + 8N] = Σ_r rows[r][d0..d0 + 8N] · p[r·stride]` over `count` rows `hd` apart,
    /// each lane one chain of fused multiply-adds from zero in row order, held in registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `count` rows of `hd` values at `rows`, `count` values
    /// `stride` apart at `p`, and `d0 + 8N <= hd` values at `acc`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate<const N: usize>(
        rows: *const f32,
        hd: usize,
        d0: usize,
        p: *const f32,
        stride: usize,
        count: usize,
        acc: *mut f32,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe {
            let mut a = [_mm256_setzero_ps(); N];
            for r in 0..count {
                let pr = _mm256_set1_ps(*p.add(r * stride));
                let row = rows.add(r * hd + d0);
                for (i, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8 * i)), pr, *a);
                }
            }
            for (i, a) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(d0 + 8 * i), *a);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_qk(q: &[f32], k: &[f32], order: Order) -> f32 {
        // SAFETY: forwarded from the caller.
        let t3 = unsafe { lanes8(q, k, order) };
        // The rest of reduce16: 4..8 onto 0..4, then (0 + 2) + (1 + 3).
        let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        let pairs = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }

    /// [`dot_qk`] of eight keys, rows of `hd` values one after another in `k`, into `out`: the
    /// same additions lane for lane, with the last steps of `reduce16` done for the eight sums
    /// together by transposing (one horizontal reduction per key was most of the scores' time).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `k` holds at least `8 * hd` values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_qk8(q: &[f32], k: &[f32], hd: usize, order: Order, out: &mut [f32]) {
        assert!(k.len() >= 8 * hd && out.len() >= 8);
        // SAFETY: forwarded from the caller; each row is inside `k`.
        let t: [__m256; 8] = std::array::from_fn(|j| unsafe { lanes8(q, &k[j * hd..(j + 1) * hd], order) });
        // Lanes 4..8 onto 0..4, keys j and j + 4 in one register's halves.
        let u: [__m256; 4] = std::array::from_fn(|j| {
            _mm256_add_ps(_mm256_permute2f128_ps(t[j], t[j + 4], 0x31), _mm256_permute2f128_ps(t[j], t[j + 4], 0x20))
        });
        // (0 + 2) and (1 + 3): pairs of 64-bit halves interleaved and added.
        let pairs = |a: __m256, b: __m256| {
            let (a, b) = (_mm256_castps_pd(a), _mm256_castps_pd(b));
            _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)))
        };
        // Keys 0, 1 | 4, 5 and 2, 3 | 6, 7, two lanes each; the last step adds each key's two.
        let (p01, p23) = (pairs(u[0], u[1]), pairs(u[2], u[3]));
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(p01, p23);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(p01, p23);
        // SAFETY: `out` holds eight values (asserted).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(even, odd)) };
    }

    /// q·k's sixteen lanes (four accumulators folded in the gemv order) with lanes 8..16 added
    /// onto 0..8: the first step of `reduce16`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes8(q: &[f32], k: &[f32], order: Order) -> __m256 {
        let n = q.len().min(k.len()) / 16 * 16;
        // SAFETY: every load reads 8 floats at an offset below `n`, inside both slices.
        let at = |s: &[f32], i: usize| unsafe { _mm256_loadu_ps(s.as_ptr().add(i)) };
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        match order {
            Order::Gemm => {
                for i in (0..n).step_by(16) {
                    lo[0] = _mm256_fmadd_ps(at(k, i), at(q, i), lo[0]);
                    hi[0] = _mm256_fmadd_ps(at(k, i + 8), at(q, i + 8), hi[0]);
                }
            }
            Order::Gemv => {
                for (step, i) in (0..n).step_by(16).enumerate() {
                    let a = step % 4;
                    lo[a] = _mm256_fmadd_ps(at(k, i), at(q, i), lo[a]);
                    hi[a] = _mm256_fmadd_ps(at(k, i + 8), at(q, i + 8), hi[a]);
                }
                // fold4: (0 + 2) + (1 + 3), lane by lane.
                lo[0] = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
                hi[0] = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
            }
        }
        _mm256_add_ps(hi[0], lo[0])
    }
}

/// f16 bits to f32 (hardware conversion where the CPU has it; exact either way). Called per
/// cache row, so the x86 path converts in registers without a library call per eight values.
fn widen(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: F16C and AVX were detected (`has_avx2` checks F16C too).
        unsafe { x86::widen(src, dst) };
        return;
    }
    let t = f16::table();
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = t[s as usize];
    }
}

/// Round every value to f16 and back, as llama.cpp stores the query and the probabilities before
/// multiplying them by the f16 cache (vectorised where the CPU converts in hardware: one call per
/// value was a fifth of attention's time).
fn round_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    let done = if super::x86::has_avx2() {
        // SAFETY: F16C and AVX were detected (`has_avx2` checks F16C too).
        unsafe { x86::round_f16(x) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let t = f16::table();
    for v in &mut x[done..] {
        *v = t[f16::from_f32(*v) as usize];
    }
}

/// The reduction lanes (slots) of the values' sum: position j feeds slot `j % slots`.
fn slots(order: Order) -> usize {
    match order {
        Order::Gemm => 16,
        Order::Gemv => 64,
    }
}

/// Where position j's row is in widened values laid out by slot: each slot's positions
/// contiguous and in order, so a slot's sum reads one stream and stays in registers.
fn slot_row(j: usize, slots: usize, rounds: usize) -> usize {
    (j % slots) * rounds + j / slots
}

/// Every slot's sum of values times probabilities over positions `visible`, from values laid
/// out by slot (`rounds` rows per slot): `acc[slot][d] = Σ p_j · v_j[d]` over the slot's positions
/// in order, one fused multiply-add each from zero; a slot without positions stays zero.
fn accumulate_slots(v: &[f32], hd: usize, rounds: usize, probs: &[f32], visible: Range<usize>, acc: &mut [f32]) {
    let slots = acc.len() / hd;
    for slot in 0..slots {
        let r_lo = visible.start.saturating_sub(slot).div_ceil(slots);
        let r_hi = visible.end.saturating_sub(slot).div_ceil(slots);
        if r_lo >= r_hi {
            continue;
        }
        let rows = &v[(slot * rounds + r_lo) * hd..(slot * rounds + r_hi) * hd];
        let p = &probs[slot + slots * r_lo..];
        let count = r_hi - r_lo;
        assert!(p.len() > (count - 1) * slots);
        let dst = &mut acc[slot * hd..(slot + 1) * hd];
        #[cfg(target_arch = "x86_64")]
        if super::x86::has_avx2() && hd.is_multiple_of(8) {
            let (rp, pp, ap) = (rows.as_ptr(), p.as_ptr(), dst.as_mut_ptr());
            let mut d0 = 0;
            while d0 < hd {
                let width = match hd - d0 {
                    64.. => 64,
                    32.. => 32,
                    16.. => 16,
                    _ => 8,
                };
                // SAFETY: AVX2 and FMA were detected; `count` rows of `hd` values, `count`
                // probabilities `slots` apart (asserted) and `hd` outputs; `d0 + width <= hd`.
                unsafe {
                    match width {
                        64 => x86::accumulate::<8>(rp, hd, d0, pp, slots, count, ap),
                        32 => x86::accumulate::<4>(rp, hd, d0, pp, slots, count, ap),
                        16 => x86::accumulate::<2>(rp, hd, d0, pp, slots, count, ap),
                        _ => x86::accumulate::<1>(rp, hd, d0, pp, slots, count, ap),
                    }
                }
                d0 += width;
            }
            continue;
        }
        for (r, row) in rows.chunks_exact(hd).enumerate() {
            let pr = p[r * slots];
            for (a, &x) in dst.iter_mut().zip(row) {
                *a = x.mul_add(pr, *a);
            }
        }
    }
}

/// One sequence's part of a batched attention step.
pub struct SeqKv<'a> {
    /// Its tokens' rows in the step's queries and outputs.
    pub rows: Range<usize>,
    /// The position of its first row.
    pub first: usize,
    /// Positions below this reduce in [`Order::Gemm`] (they were a prompt of several tokens),
    /// later ones in [`Order::Gemv`] (generated one at a time), so a token's result does not
    /// depend on which other tokens share its step.
    pub gemm_until: usize,
    /// How its cache rows are stored.
    pub kv_type: KvType,
    /// Its cache blocks for this layer, in position order: `block_tokens` rows of `kv_dim` values
    /// each (as `kv_type` stores them), covering at least positions `0..first + rows.len()`.
    pub k_blocks: Vec<&'a [u16]>,
    pub v_blocks: Vec<&'a [u16]>,
}

/// Query tokens handled by one job: enough that widening the job's keys and values is a small
/// share of its work, few enough that a long prompt makes many jobs for the workers to share.
const TOKENS_PER_JOB: usize = 16;

/// One job: a run of one sequence's tokens and every query head that reads one key/value head.
struct Job {
    seq: usize,
    kvh: usize,
    rows: Range<usize>,
    /// The reduction order of every token of the run.
    order: Order,
    out: Vec<f32>,
}

/// One head of one token: its query, the widened keys and values of its key/value head (`head_dim`
/// values per position), its position, and the reduction order.
struct HeadJob<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// The values are laid out by the order's slots, this many rows per slot.
    v_rounds: usize,
    pos: usize,
    order: Order,
}

/// Per-thread buffers of one head's computation, reused across calls.
#[derive(Default)]
struct HeadScratch {
    qh: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<HeadScratch> = std::cell::RefCell::new(HeadScratch::default());
    /// The thread's f32 copies of one key/value head's keys and values.
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Attention {
    /// Causal attention for every sequence of a step in one parallel region: `q` and `out` are
    /// `tokens × n_head·head_dim`, each sequence's rows attending over its own blocks.
    ///
    /// Work is shared out as (sequence, key/value head, run of up to 16 tokens): each job widens
    /// its head's keys and values from f16 once and reuses them for every query head of the group
    /// and every token of the run.
    pub fn batch(&self, q: &[f32], seqs: &[SeqKv<'_>], block_tokens: usize, out: &mut [f32]) {
        let hd = self.head_dim;
        let q_dim = self.n_head * hd;
        let group = self.n_head / self.n_head_kv;
        let mut jobs = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            // A run never mixes the two orders, so each job lays its values out by its order's
            // slots: the rows before `gemm_until` and those after are split apart.
            let split = (seq.rows.start + seq.gemm_until.saturating_sub(seq.first)).min(seq.rows.end);
            // Longest runs first, so the workers finish together.
            for (part, order) in [(split..seq.rows.end, Order::Gemv), (seq.rows.start..split, Order::Gemm)] {
                let starts: Vec<usize> = part.clone().step_by(TOKENS_PER_JOB).collect();
                for &start in starts.iter().rev() {
                    let rows = start..(start + TOKENS_PER_JOB).min(part.end);
                    jobs.extend((0..self.n_head_kv).map(|kvh| Job {
                        seq: s,
                        kvh,
                        rows: rows.clone(),
                        order,
                        out: Vec::new(),
                    }));
                }
            }
        }
        crate::team().for_each_mut(&mut jobs, |job| {
            let seq = &seqs[job.seq];
            let first_pos = seq.first + (job.rows.start - seq.rows.start);
            let len = first_pos + job.rows.len();
            let (order, v_slots) = (job.order, slots(job.order));
            let v_rounds = len.div_ceil(v_slots);
            WIDENED.with_borrow_mut(|(k, v)| {
                self.widen_head(seq, job.kvh, len, block_tokens, v_slots, k, v);
                job.out.resize(job.rows.len() * group * hd, 0.0);
                SCRATCH.with_borrow_mut(|scratch| {
                    for (i, t) in job.rows.clone().enumerate() {
                        let pos = first_pos + i;
                        for g in 0..group {
                            let h = job.kvh * group + g;
                            let q_head = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
                            let dst = &mut job.out[(i * group + g) * hd..(i * group + g + 1) * hd];
                            self.head(&HeadJob { q: q_head, k, v, v_rounds, pos, order }, dst, scratch);
                        }
                    }
                });
                // Keep up to 4 MiB per buffer for the next job; a long context's copies are let go.
                if k.capacity() > 1 << 20 {
                    *k = Vec::new();
                    *v = Vec::new();
                }
            });
        });
        for job in &jobs {
            for (i, t) in job.rows.clone().enumerate() {
                let src = &job.out[i * group * hd..(i + 1) * group * hd];
                let at = t * q_dim + job.kvh * group * hd;
                out[at..at + group * hd].copy_from_slice(src);
            }
        }
    }

    /// Widen key/value head `kvh` of positions `0..len` into `k` and `v` (`head_dim` per position;
    /// the values laid out by `v_slots` slots, see [`slot_row`]).
    #[allow(clippy::too_many_arguments)]
    fn widen_head(
        &self,
        seq: &SeqKv<'_>,
        kvh: usize,
        len: usize,
        block_tokens: usize,
        v_slots: usize,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) {
        let hd = self.head_dim;
        let kv_dim = self.n_head_kv * hd;
        let rounds = len.div_ceil(v_slots);
        let v_row = |j: usize| slot_row(j, v_slots, rounds);
        k.resize(len * hd, 0.0);
        v.resize(rounds * v_slots * hd, 0.0);
        let ty = seq.kv_type;
        // Word offsets: a head's values are a whole number of q8_0 blocks, so it starts on one.
        let (row, head_at, head_len) = (ty.row_words(kv_dim), ty.row_words(kvh * hd), ty.row_words(hd));
        for j in 0..len {
            let (block, slot) = (j / block_tokens, j % block_tokens);
            let at = slot * row + head_at;
            let (ks, vs) = (&seq.k_blocks[block][at..at + head_len], &seq.v_blocks[block][at..at + head_len]);
            let (kd, vd) = (&mut k[j * hd..(j + 1) * hd], &mut v[v_row(j) * hd..(v_row(j) + 1) * hd]);
            match ty {
                KvType::F16 => {
                    widen(ks, kd);
                    widen(vs, vd);
                }
                KvType::Q8_0 => {
                    ty.decode(ks, kd);
                    ty.decode(vs, vd);
                }
            }
        }
    }

    /// One head of one token, over f32 keys and values.
    fn head(&self, job: &HeadJob<'_>, out: &mut [f32], scratch: &mut HeadScratch) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::has_avx2() {
            // SAFETY: AVX2 and FMA were detected; the body is the portable one, compiled with them.
            unsafe { self.head_avx2(job, out, scratch) };
            return;
        }
        self.head_portable(job, out, scratch);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn head_avx2(&self, job: &HeadJob<'_>, out: &mut [f32], scratch: &mut HeadScratch) {
        self.head_portable(job, out, scratch)
    }

    #[inline(always)]
    fn head_portable(&self, job: &HeadJob<'_>, out: &mut [f32], scratch: &mut HeadScratch) {
        let &HeadJob { q, k, v, v_rounds, pos, order } = job;
        let hd = self.head_dim;
        let valid = pos + 1;
        // Positions a sliding window no longer sees are masked like the future (ggml's
        // `LLAMA_SWA_TYPE_STANDARD`: key j is hidden from position p when p − j ≥ window).
        let first = self.window.map_or(0, |w| valid.saturating_sub(w));
        // Positions are padded with zeros to whole reduction steps, as llama.cpp's KV cache is;
        // so is the query, for the gemv order's 64-element steps.
        let padded = valid.next_multiple_of(64);
        let hd_padded = hd.next_multiple_of(64);
        let HeadScratch { qh, scores, acc } = scratch;
        qh.clear();
        qh.extend_from_slice(q);
        round_f16(qh);
        qh.resize(hd_padded, 0.0);
        scores.clear();
        scores.resize(padded, 0.0);
        #[allow(unused_mut)]
        let mut done = first;
        #[cfg(target_arch = "x86_64")]
        if super::x86::has_avx2() {
            while done + 8 <= valid {
                // SAFETY: AVX2 and FMA were detected; keys done..done + 8 are inside `k`.
                unsafe { x86::dot_qk8(qh, &k[done * hd..(done + 8) * hd], hd, order, &mut scores[done..done + 8]) };
                done += 8;
            }
        }
        for (j, s) in scores.iter_mut().enumerate().take(valid).skip(done) {
            *s = dot_qk(qh, &k[j * hd..(j + 1) * hd], order);
        }
        if let Some(cap) = self.softcap {
            for s in &mut scores[first..valid] {
                *s = ops::softcap(*s, cap);
            }
        }
        ops::softmax_ggml(scores, first..valid, self.scale);
        round_f16(&mut scores[first..valid]);
        // Values: position j feeds lane j % 16 (and accumulator (j % 64) / 16 in gemv order) of
        // every output dimension; positions past `valid` carry probability zero. Accumulators
        // are lane-major ([lane][dim]), so each slot's sum vectorises over the head dimension.
        acc.clear();
        acc.resize(slots(order) * hd, 0.0);
        accumulate_slots(v, hd, v_rounds, scores, first..valid, acc);
        // The reductions of `fold4` and `reduce16`, done for every output dimension at once:
        // each step adds whole lane rows, so it vectorises over the head dimension.
        let add = |acc: &mut [f32], dst: usize, a: usize, b: usize| {
            for d in 0..hd {
                acc[dst * hd + d] = acc[a * hd + d] + acc[b * hd + d];
            }
        };
        if order == Order::Gemv {
            // fold4: lane l = (acc0 + acc2) + (acc1 + acc3), accumulator k's lane l in row 16k + l.
            for l in 0..16 {
                add(acc, 32 + l, l, 32 + l);
                add(acc, 48 + l, 16 + l, 48 + l);
                add(acc, l, 32 + l, 48 + l);
            }
        }
        for i in 0..8 {
            add(acc, i, 8 + i, i);
        }
        for i in 0..4 {
            add(acc, i, 4 + i, i);
        }
        add(acc, 0, 0, 2);
        add(acc, 1, 1, 3);
        for (d, o) in out.iter_mut().enumerate() {
            *o = acc[d] + acc[hd + d];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register-held dot products equal the portable ones, in both orders and in lengths
    /// with and without a 16-element rest.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_dot_products_match_the_portable_ones() {
        // A machine without AVX2 would test nothing here: say so by failing, unless the person
        // running the tests accepted that the AVX2 kernels go untested.
        if !crate::kernels::x86::has_avx2() {
            assert!(
                std::env::var_os("BERTH_ACCEPT_NO_AVX2").is_some(),
                "this CPU lacks AVX2/FMA/F16C, so the AVX2 attention kernels cannot be tested here; set BERTH_ACCEPT_NO_AVX2=1 to accept that"
            );
            return;
        }
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for len in [16usize, 48, 64, 80, 128, 192] {
            let q: Vec<f32> = (0..len).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..len).map(|_| rnd()).collect();
            for order in [Order::Gemm, Order::Gemv] {
                // SAFETY: AVX2 and FMA were detected above.
                let fast = unsafe { x86::dot_qk(&q, &k, order) };
                assert_eq!(fast.to_bits(), dot_qk_portable(&q, &k, order).to_bits(), "{order:?} {len}");
            }
        }
        // Eight keys reduced together give each key's own sum.
        for hd in [64usize, 96, 128] {
            let q: Vec<f32> = (0..hd.next_multiple_of(64)).map(|i| if i < hd { rnd() } else { 0.0 }).collect();
            let k: Vec<f32> = (0..8 * hd).map(|_| rnd()).collect();
            for order in [Order::Gemm, Order::Gemv] {
                let mut eight = [0f32; 8];
                // SAFETY: AVX2 and FMA were detected above; `k` holds eight rows.
                unsafe { x86::dot_qk8(&q, &k, hd, order, &mut eight) };
                for (j, got) in eight.iter().enumerate() {
                    let want = dot_qk_portable(&q, &k[j * hd..(j + 1) * hd], order);
                    assert_eq!(got.to_bits(), want.to_bits(), "{order:?} hd {hd} key {j}");
                }
            }
        }
    }

    /// The fast loops equal the lane-by-lane definitions in `ops` bit for bit: one token and
    /// runs of tokens sharing their keys and values, each order and both in one run, head sizes of one and of one and
    /// a half register blocks, with and without a sliding window.
    #[test]
    fn matches_the_reference_reductions() {
        for hd in [64usize, 96] {
            for window in [None, Some(21)] {
                for tokens in [1usize, 5] {
                    check_against_reference(hd, window, tokens);
                }
            }
        }
    }

    fn check_against_reference(hd: usize, window: Option<usize>, tokens: usize) {
        let (n_head, n_head_kv) = (4, 2);
        let kv_dim = n_head_kv * hd;
        let mut seed = 5u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        let positions = 70;
        let k: Vec<u16> = (0..positions * kv_dim).map(|_| f16::from_f32(rnd())).collect();
        let v: Vec<u16> = (0..positions * kv_dim).map(|_| f16::from_f32(rnd())).collect();
        let q: Vec<f32> = (0..tokens * n_head * hd).map(|_| rnd()).collect();
        let att = Attention { window, ..Attention::causal(n_head, n_head_kv, hd) };
        // Cache blocks of 16 positions (the last one partly used).
        let block = 16 * kv_dim;
        let k_blocks: Vec<Vec<u16>> = k.chunks(block).map(|b| [b, &vec![0; block - b.len()]].concat()).collect();
        let v_blocks: Vec<Vec<u16>> = v.chunks(block).map(|b| [b, &vec![0; block - b.len()]].concat()).collect();
        let q_dim = n_head * hd;
        let first_pos = positions - tokens;
        // All prompt (gemm), all generated (gemv), and a run with both (split into a job per order).
        for gemm_until in [positions, 0, first_pos + 2] {
            let mut fast = vec![0f32; tokens * q_dim];
            let seq = SeqKv {
                rows: 0..tokens,
                first: first_pos,
                gemm_until,
                kv_type: KvType::F16,
                k_blocks: k_blocks.iter().map(|b| b.as_slice()).collect(),
                v_blocks: v_blocks.iter().map(|b| b.as_slice()).collect(),
            };
            att.batch(&q, &[seq], 16, &mut fast);
            // Reference: the closure-based definitions.
            let t = f16::table();
            for (i, pos) in (first_pos..positions).enumerate() {
                let order = if pos < gemm_until { Order::Gemm } else { Order::Gemv };
                let visible = window.map_or(0, |w| (pos + 1).saturating_sub(w))..pos + 1;
                for h in 0..n_head {
                    let kvh = h / 2;
                    let q = &q[i * q_dim..(i + 1) * q_dim];
                    let qh: Vec<f32> = q[h * hd..(h + 1) * hd].iter().map(|&x| t[f16::from_f32(x) as usize]).collect();
                    let padded = (pos + 1).next_multiple_of(64);
                    let mut scores = vec![0f32; padded];
                    for (j, s) in scores.iter_mut().enumerate().take(pos + 1) {
                        let kat = |d: usize| if d < hd { t[k[j * kv_dim + kvh * hd + d] as usize] } else { 0.0 };
                        *s = match order {
                            Order::Gemm => ops::dot_f16_gemm(kat, |d| qh[d], hd),
                            Order::Gemv => {
                                ops::dot_f16_gemv(kat, |d| qh.get(d).copied().unwrap_or(0.0), hd.next_multiple_of(64))
                            }
                        };
                    }
                    ops::softmax_ggml(&mut scores, visible.clone(), 1.0 / (hd as f32).sqrt());
                    let probs: Vec<f32> = scores.iter().map(|&s| t[f16::from_f32(s) as usize]).collect();
                    for d in 0..hd {
                        let vat = |j: usize| {
                            if visible.contains(&j) { t[v[j * kv_dim + kvh * hd + d] as usize] } else { 0.0 }
                        };
                        let want = match order {
                            Order::Gemm => ops::dot_f16_gemm(vat, |j| probs[j], padded),
                            Order::Gemv => ops::dot_f16_gemv(vat, |j| probs[j], padded),
                        };
                        let got = fast[i * q_dim + h * hd + d];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{order:?} hd {hd} {window:?} token {i} head {h} dim {d}"
                        );
                    }
                }
            }
        }
    }
}
