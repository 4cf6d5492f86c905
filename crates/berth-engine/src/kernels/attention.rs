//! Causal attention over one sequence's f16 KV cache, computed as llama.cpp computes it without
//! flash attention (see ARCHITECTURE.md, "Agreement with llama.cpp"): keys times the query
//! rounded to f16, ggml's softmax, values times the probabilities rounded to f16, each product
//! reduced in the order of the kernel llama.cpp picks for the step.
//!
//! The loops walk the cache row by row (each position's keys and values are contiguous) and keep
//! the reduction lanes in small accumulator arrays, so they vectorise over the head dimension
//! while producing exactly the bits of the lane-by-lane definition in `ops`.

use super::{f16, ops};

/// How llama.cpp reduces a dot product in this step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    /// One token in the step: `ggml_vec_dot_f16` (four 16-lane accumulators over 64-element steps).
    Gemv,
    /// Several tokens: tinyBLAS (one 16-lane accumulator over 16-element steps).
    Gemm,
}

/// Shape of the attention and the per-call scratch space.
pub struct Attention {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
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
    /// The CPU must have AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_qk(q: &[f32], k: &[f32], order: Order) -> f32 {
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
        // reduce16: lanes 8..16 onto 0..8, then 4..8 onto 0..4, then (0 + 2) + (1 + 3).
        let t3 = _mm256_add_ps(hi[0], lo[0]);
        let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        let pairs = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }
}

/// f16 bits to f32 (hardware conversion where the CPU has it; exact either way).
fn widen(src: &[u16], dst: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    src.reinterpret_cast::<half::f16>().convert_to_f32_slice(dst);
}

/// One head of one token: its query, the sequence's widened keys and values, which key/value head
/// it reads, its position, and the reduction order of the step.
struct HeadJob<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    kvh: usize,
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
    /// The calling thread's f32 copies of a sequence's keys and values for one layer.
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Attention {
    /// Attention for a run of `n` consecutive tokens of one sequence at positions `first..first + n`
    /// (`q` is `n × n_head·head_dim`). `k_cache`/`v_cache` hold f16 bits, `kv_dim` values per
    /// position, for at least `first + n` positions; `out` receives `n × n_head·head_dim` values.
    ///
    /// The cache is widened to f32 once for the whole run, so every key and value is converted
    /// once per layer instead of once per query and head.
    pub fn sequence(&self, q: &[f32], first: usize, k_cache: &[u16], v_cache: &[u16], order: Order, out: &mut [f32]) {
        let (hd, kv_dim) = (self.head_dim, self.n_head_kv * self.head_dim);
        let q_dim = self.n_head * hd;
        let n = q.len() / q_dim;
        let len = first + n;
        WIDENED.with_borrow_mut(|(k_buf, v_buf)| {
            // Reused between calls (see the end for how much is kept).
            if k_buf.len() < len * kv_dim {
                k_buf.resize(len * kv_dim, 0.0);
                v_buf.resize(len * kv_dim, 0.0);
            }
            let (k, v) = (&mut k_buf[..len * kv_dim], &mut v_buf[..len * kv_dim]);
            let chunk = 256 * kv_dim;
            let team = crate::team();
            let mut pieces: Vec<(&mut [f32], &[u16])> = k
                .chunks_mut(chunk)
                .zip(k_cache[..len * kv_dim].chunks(chunk))
                .chain(v.chunks_mut(chunk).zip(v_cache[..len * kv_dim].chunks(chunk)))
                .collect();
            team.for_each_mut(&mut pieces, |(d, s)| widen(s, d));
            self.heads(q, first, k, v, order, out);
            // Keep up to 16 MiB per buffer for the next call; a long context's copies are let go.
            if k_buf.capacity() > 4 << 20 {
                *k_buf = Vec::new();
                *v_buf = Vec::new();
            }
        });
    }

    /// Every head of every token of the run, shared out among the workers.
    fn heads(&self, q: &[f32], first: usize, k: &[f32], v: &[f32], order: Order, out: &mut [f32]) {
        let hd = self.head_dim;
        let q_dim = self.n_head * hd;
        crate::team().for_each_chunk_mut(out, hd, |i, out_head| {
            let (t, h) = (i / self.n_head, i % self.n_head);
            let q_head = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            let job = HeadJob { q: q_head, k, v, kvh: h / (self.n_head / self.n_head_kv), pos: first + t, order };
            SCRATCH.with_borrow_mut(|scratch| self.head(&job, out_head, scratch));
        });
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
        let &HeadJob { q, k, v, kvh, pos, order } = job;
        let hd = self.head_dim;
        let kv_dim = self.n_head_kv * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let valid = pos + 1;
        // Positions are padded with zeros to whole reduction steps, as llama.cpp's KV cache is;
        // so is the query, for the gemv order's 64-element steps.
        let padded = valid.next_multiple_of(64);
        let hd_padded = hd.next_multiple_of(64);
        let t = f16::table();
        let HeadScratch { qh, scores, acc } = scratch;
        qh.clear();
        qh.extend(q.iter().map(|&x| t[f16::from_f32(x) as usize]));
        qh.resize(hd_padded, 0.0);
        scores.clear();
        scores.resize(padded, 0.0);
        for (j, s) in scores.iter_mut().enumerate().take(valid) {
            let row = &k[j * kv_dim + kvh * hd..j * kv_dim + (kvh + 1) * hd];
            *s = dot_qk(qh, row, order);
        }
        ops::softmax_ggml(scores, valid, scale);
        // Values: position j feeds lane j % 16 (and accumulator (j % 64) / 16 in gemv order) of
        // every output dimension; positions past `valid` carry probability zero. Accumulators
        // are lane-major ([lane][dim]): each position's value row updates one contiguous slice,
        // so the update vectorises over the head dimension.
        let slots = match order {
            Order::Gemm => 16,
            Order::Gemv => 64,
        };
        acc.clear();
        acc.resize(slots * hd, 0.0);
        for (j, &s) in scores.iter().enumerate().take(valid) {
            let p = t[f16::from_f32(s) as usize];
            let row = &v[j * kv_dim + kvh * hd..j * kv_dim + (kvh + 1) * hd];
            let slot = j % slots;
            for (a, &x) in acc[slot * hd..(slot + 1) * hd].iter_mut().zip(row) {
                *a = x.mul_add(p, *a);
            }
        }
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
        if !crate::kernels::x86::has_avx2() {
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
    }

    /// The fast loops equal the lane-by-lane definitions in `ops` bit for bit.
    #[test]
    fn matches_the_reference_reductions() {
        let (n_head, n_head_kv, hd) = (4, 2, 64);
        let kv_dim = n_head_kv * hd;
        let mut seed = 5u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        let positions = 70;
        let k: Vec<u16> = (0..positions * kv_dim).map(|_| f16::from_f32(rnd())).collect();
        let v: Vec<u16> = (0..positions * kv_dim).map(|_| f16::from_f32(rnd())).collect();
        let q: Vec<f32> = (0..n_head * hd).map(|_| rnd()).collect();
        let att = Attention { n_head, n_head_kv, head_dim: hd };
        for order in [Order::Gemm, Order::Gemv] {
            let pos = positions - 1;
            let mut fast = vec![0f32; n_head * hd];
            att.sequence(&q, pos, &k, &v, order, &mut fast);
            // Reference: the closure-based definitions.
            let t = f16::table();
            for h in 0..n_head {
                let kvh = h / 2;
                let qh: Vec<f32> = q[h * hd..(h + 1) * hd].iter().map(|&x| t[f16::from_f32(x) as usize]).collect();
                let padded = (pos + 1).next_multiple_of(64);
                let mut scores = vec![0f32; padded];
                for (j, s) in scores.iter_mut().enumerate().take(pos + 1) {
                    let kat = |d: usize| t[k[j * kv_dim + kvh * hd + d] as usize];
                    *s = match order {
                        Order::Gemm => ops::dot_f16_gemm(kat, |d| qh[d], hd),
                        Order::Gemv => ops::dot_f16_gemv(kat, |d| qh[d], hd),
                    };
                }
                ops::softmax_ggml(&mut scores, pos + 1, 1.0 / 8.0);
                let probs: Vec<f32> = scores.iter().map(|&s| t[f16::from_f32(s) as usize]).collect();
                for d in 0..hd {
                    let vat = |j: usize| if j <= pos { t[v[j * kv_dim + kvh * hd + d] as usize] } else { 0.0 };
                    let want = match order {
                        Order::Gemm => ops::dot_f16_gemm(vat, |j| probs[j], padded),
                        Order::Gemv => ops::dot_f16_gemv(vat, |j| probs[j], padded),
                    };
                    assert_eq!(fast[h * hd + d].to_bits(), want.to_bits(), "{order:?} head {h} dim {d}");
                }
            }
        }
    }
}
