//! GGML block formats: dequantisation, activation quantisation, and block dot products.
//!
//! Layouts follow ggml-common.h. The integer dot products mirror llama.cpp's CPU path (Q4_0 and
//! Q8_0 weights against Q8_0 activations, Q4_1 against Q8_1), so berth's numbers agree with it to
//! within float rounding; other formats are dequantised to f32 and dotted in f32.

use std::borrow::Cow;

use berth_formats::gguf::GgmlType;
use half::{bf16, f16};

const QK: usize = 32;
const QK_K: usize = 256;

/// Whether berth can multiply by this type.
pub fn supported(t: GgmlType) -> bool {
    [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ]
    .contains(&t)
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    super::f16::to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantise a row of `out.len()` weights.
pub fn dequantize(t: GgmlType, src: &[u8], out: &mut [f32]) {
    match t {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 0xF) as i32 - 8) as f32;
                    o[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 0xF) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // Q5_0: d, 32 high bits, 16 bytes of low nibbles; x = d·(q − 16).
            // Q5_1: d, m, 32 high bits, 16 bytes of low nibbles; x = d·q + m.
            let (size, offset) = if t == GgmlType::Q5_0 { (22, 2) } else { (24, 4) };
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(size)) {
                let d = f16_at(b, 0);
                let (bias, m) = if t == GgmlType::Q5_0 { (16, 0.0) } else { (0, f16_at(b, 2)) };
                let qh = u32::from_le_bytes([b[offset], b[offset + 1], b[offset + 2], b[offset + 3]]);
                let qs = &b[offset + 4..offset + 20];
                for j in 0..16 {
                    let lo = (qs[j] & 0xF) as i32 | ((((qh >> j) & 1) as i32) << 4);
                    let hi = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
                    o[j] = d * (lo - bias) as f32 + m;
                    o[j + 16] = d * (hi - bias) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    o[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(144)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, o64) in o.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * g..32 * g + 32];
                    for l in 0..32 {
                        o64[l] = d1 * (q[l] & 0xF) as f32 - m1;
                        o64[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q5_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(176)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for (g, o64) in o.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
                    let q = &qs[32 * g..32 * g + 32];
                    for l in 0..32 {
                        let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        o64[l] = d1 * ((q[l] & 0xF) + hi1) as f32 - m1;
                        o64[32 + l] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(210)) {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                for (h, o128) in o.chunks_exact_mut(128).enumerate() {
                    let ql = &ql[64 * h..];
                    let qh = &qh[32 * h..];
                    let sc = &sc[8 * h..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        o128[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        o128[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        o128[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        o128[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        other => unreachable!("dequantize called for unsupported type {other}"),
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// How activations are prepared for a weight type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ActivationFormat {
    /// 32-value blocks, 8-bit values, one scale (llama.cpp's Q8_0).
    Q8_0,
    /// Q8_0 plus the block's scaled sum (llama.cpp's Q8_1), for weights with an offset (Q4_1).
    Q8_1,
    /// 256-value blocks, 8-bit values, an f32 scale and sums of every 16 values (llama.cpp's
    /// Q8_K), for the K-quants with integer kernels (Q4_K, Q5_K, Q6_K).
    Q8K,
    /// Plain f32, for weights dequantised before the dot product.
    F32,
}

impl ActivationFormat {
    pub fn for_weights(t: GgmlType) -> Self {
        match t {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActivationFormat::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => ActivationFormat::Q8_1,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => ActivationFormat::Q8K,
            _ => ActivationFormat::F32,
        }
    }
}

/// A batch of activation rows prepared for one weight format.
pub struct QuantizedActivations<'x> {
    pub format: ActivationFormat,
    pub cols: usize,
    blocks_per_row: usize,
    /// Per block: the scale (rounded through f16, as llama.cpp stores it).
    d: Vec<f32>,
    /// Per block: scale × sum of the quantised values (Q8_1 only).
    s: Vec<f32>,
    /// Per block: the sums of each 16 quantised values (Q8_K only).
    bsums: Vec<i16>,
    qs: Vec<i8>,
    /// The tokens' f32 rows: borrowed, or gathered (F32 only, where the kernels read them).
    f32_rows: Cow<'x, [f32]>,
    /// Per token: the size of the batch llama.cpp would compute it in (see [`super::Acts`]).
    peer_batch: &'x [u32],
}

/// Tokens from which quantising activations is shared out among the workers (below, the work is
/// smaller than what handing it out costs).
const PARALLEL_QUANTIZE_FROM: usize = 32;

impl<'x> QuantizedActivations<'x> {
    pub fn new(format: ActivationFormat, x: &'x [f32], n: usize, cols: usize) -> Self {
        let block = if format == ActivationFormat::Q8K { QK_K } else { QK };
        let blocks_per_row = cols / block;
        let mut acts = Self {
            format,
            cols,
            blocks_per_row,
            d: Vec::new(),
            s: Vec::new(),
            bsums: Vec::new(),
            qs: Vec::new(),
            f32_rows: Cow::Borrowed(x),
            peer_batch: &[],
        };
        let nb = n * blocks_per_row;
        if format == ActivationFormat::F32 {
            return acts;
        }
        let per_block = if format == ActivationFormat::Q8K { QK_K } else { QK };
        acts.d = vec![0.0; nb];
        acts.qs = vec![0; nb * per_block];
        if format == ActivationFormat::Q8_1 {
            acts.s = vec![0.0; nb];
        }
        if format == ActivationFormat::Q8K {
            acts.bsums = vec![0; nb * QK_K / 16];
        }
        // Token rows are independent: many of them are quantised by all the workers.
        let team = crate::team();
        let tokens_per_piece = if n >= PARALLEL_QUANTIZE_FROM { n.div_ceil(team.size() * 2) } else { n.max(1) };
        let blocks = tokens_per_piece * blocks_per_row;
        let has = |v: &[f32]| !v.is_empty();
        let (with_s, with_sums) = (has(&acts.s), !acts.bsums.is_empty());
        let mut pieces = Vec::new();
        let (mut d, mut s, mut qs, mut sums) =
            (&mut acts.d[..], &mut acts.s[..], &mut acts.qs[..], &mut acts.bsums[..]);
        let mut x_rest = &x[..nb * per_block];
        while !d.is_empty() {
            let b = blocks.min(d.len());
            let (d_piece, d_rest) = d.split_at_mut(b);
            let (s_piece, s_rest) = s.split_at_mut(if with_s { b } else { 0 });
            let (q_piece, q_rest) = qs.split_at_mut(b * per_block);
            let (sum_piece, sum_rest) = sums.split_at_mut(if with_sums { b * QK_K / 16 } else { 0 });
            let (x_piece, x_tail) = x_rest.split_at(b * per_block);
            pieces.push((x_piece, d_piece, s_piece, q_piece, sum_piece));
            (d, s, qs, sums, x_rest) = (d_rest, s_rest, q_rest, sum_rest, x_tail);
        }
        team.for_each_mut(&mut pieces, |(x, d, s, qs, sums)| match format {
            ActivationFormat::Q8K => quantize_q8_k(x, d, qs, sums),
            _ => quantize_q8(format, x, d, s, qs),
        });
        acts
    }

    /// The rows of `tokens`, in that order, as activations of their own. Quantising is row by
    /// row, so this is what quantising those rows would give: an MoE layer quantises its input
    /// once, not once per expert.
    pub fn gather<'y>(&self, tokens: &[usize]) -> QuantizedActivations<'y> {
        let nb = self.blocks_per_row;
        let per_block = self.qs.len() / self.d.len().max(1);
        let rows = |v: &[f32]| -> Vec<f32> {
            if v.is_empty() {
                Vec::new()
            } else {
                tokens.iter().flat_map(|&t| v[t * nb..(t + 1) * nb].iter().copied()).collect()
            }
        };
        QuantizedActivations {
            format: self.format,
            cols: self.cols,
            blocks_per_row: nb,
            d: rows(&self.d),
            s: rows(&self.s),
            bsums: if self.bsums.is_empty() {
                Vec::new()
            } else {
                tokens.iter().flat_map(|&t| self.bsums[t * nb * 16..(t + 1) * nb * 16].iter().copied()).collect()
            },
            qs: tokens
                .iter()
                .flat_map(|&t| self.qs[t * nb * per_block..(t + 1) * nb * per_block].iter().copied())
                .collect(),
            f32_rows: if self.format == ActivationFormat::F32 {
                Cow::Owned(tokens.iter().flat_map(|&t| self.row_f32(t).iter().copied()).collect())
            } else {
                Cow::Owned(Vec::new())
            },
            peer_batch: &[],
        }
    }

    /// Give each token the size of the batch llama.cpp would compute it in.
    pub fn with_peer_batch(mut self, peer_batch: &'x [u32]) -> Self {
        self.peer_batch = peer_batch;
        self
    }

    /// The size of the batch llama.cpp would compute token `t` in (1 if not given).
    pub fn peer_batch(&self, t: usize) -> u32 {
        self.peer_batch.get(t).copied().unwrap_or(1)
    }

    pub fn row_f32(&self, t: usize) -> &[f32] {
        &self.f32_rows[t * self.cols..(t + 1) * self.cols]
    }
}

/// Quantise 32-value activation blocks (Q8_0 or Q8_1): with AVX2 where the CPU has it, the
/// same bits as the portable loop either way.
fn quantize_q8(format: ActivationFormat, x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: AVX2 was detected.
        unsafe { quantize_q8_avx2(format, x, d, s, qs) };
        return;
    }
    quantize_blocks(format, x, d, s, qs);
}

/// The portable loop in registers, as llama.cpp's AVX2 `quantize_row_q8_0/q8_1` do it: the largest
/// magnitude by vector maxima, products rounded half to even, packed to bytes in order.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_avx2(format: ActivationFormat, x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    use std::arch::x86_64::*;
    let blocks = x.len() / QK;
    assert!(d.len() >= blocks && qs.len() >= blocks * QK && (format != ActivationFormat::Q8_1 || s.len() >= blocks));
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..blocks {
        // SAFETY: block `b` has 32 values in `x` and 32 bytes in `qs` (checked above).
        unsafe {
            let p = x.as_ptr().add(b * QK);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let mut m = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
            m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let scale = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mul = _mm256_set1_ps(id);
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let r = _mm256_round_ps(_mm256_mul_ps(v[i], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_cvtps_epi32(r)
            });
            if format == ActivationFormat::Q8_1 {
                let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s4 = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
                let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
                s[b] = f16::from_f32(scale * total as f32).to_f32();
            }
            // Packing works within 128-bit lanes; the permutation puts the bytes back in order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let packed = _mm256_permutevar8x32_epi32(packed, order);
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK).cast(), packed);
            d[b] = f16::from_f32(scale).to_f32();
        }
    }
}

fma_dispatch! {
/// Quantise activation blocks exactly as llama.cpp's `quantize_row_q8_0/q8_1` do: scale by
/// 127/amax, round half to even, scale stored through f16 (and for Q8_1 the scaled block sum).
fn quantize_blocks(format: ActivationFormat, x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    for (b, block) in x.chunks_exact(QK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qs[b * QK..(b + 1) * QK].iter_mut().zip(block) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        d[b] = f16::from_f32(scale).to_f32();
        if format == ActivationFormat::Q8_1 {
            s[b] = f16::from_f32(scale * sum as f32).to_f32();
        }
    }
}
}

fma_dispatch! {
/// Quantise 256-value blocks exactly as llama.cpp's `quantize_row_q8_K` does: scale by −127 over
/// the signed value of largest magnitude (the first, if several tie), round half to even, cap at
/// 127, keep the f32 scale and the sums of every 16 values. (Compiled for AVX2 too, where rounding
/// is one instruction instead of a call to `rintf`.)
fn quantize_q8_k(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    for (b, block) in x.chunks_exact(QK_K).enumerate() {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let q = &mut qs[b * QK_K..(b + 1) * QK_K];
        if amax == 0.0 {
            d[b] = 0.0;
            q.fill(0);
            bsums[b * 16..(b + 1) * 16].fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in q.iter_mut().zip(block) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (j, sum) in bsums[b * 16..(b + 1) * 16].iter_mut().enumerate() {
            *sum = q[j * 16..(j + 1) * 16].iter().map(|&v| v as i16).sum();
        }
        d[b] = 1.0 / iscale;
    }
}
}

/// The integer formats, as the SIMD tile kernels see them.
impl QuantizedActivations<'_> {
    pub(crate) fn view(&self) -> super::Acts<'_> {
        super::Acts {
            qs: &self.qs,
            d: &self.d,
            s: &self.s,
            bsums: &self.bsums,
            peer_batch: self.peer_batch,
            nb: self.blocks_per_row,
        }
    }
}

/// Portable dot product of one weight row with activation row `row` (the reference the x86
/// kernels are tested against, and the path on other CPUs).
pub fn vec_dot(t: GgmlType, w: &[u8], acts: &QuantizedActivations<'_>, row: usize) -> f32 {
    let nb = acts.blocks_per_row;
    let base = row * nb;
    match (t, acts.format) {
        (GgmlType::Q8_0, ActivationFormat::Q8_0) => dot_q8_0_q8_0(w, acts, base, nb),
        (GgmlType::Q4_0, ActivationFormat::Q8_0) => dot_q4_0_q8_0(w, acts, base, nb),
        (GgmlType::Q4_1, ActivationFormat::Q8_1) => dot_q4_1_q8_1(w, acts, base, nb),
        (GgmlType::Q5_0, ActivationFormat::Q8_0) => dot_q5_q8(w, acts, base, nb, false),
        (GgmlType::Q5_1, ActivationFormat::Q8_1) => dot_q5_q8(w, acts, base, nb, true),
        (GgmlType::Q4_K, ActivationFormat::Q8K) => dot_q4_k_q8_k(w, acts, base, nb),
        (GgmlType::Q5_K, ActivationFormat::Q8K) => dot_q5_k_q8_k(w, acts, base, nb),
        (GgmlType::Q6_K, ActivationFormat::Q8K) => dot_q6_k_q8_k(w, acts, base, nb),
        _ => {
            // Formats without an integer path: dequantise the row, then an f32 dot product.
            let mut buf = vec![0f32; acts.cols];
            dequantize(t, w, &mut buf);
            dot_f32(&buf, acts.row_f32(row))
        }
    }
}

/// f32 dot product in eight lanes, so the compiler vectorises it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

// The three integer dot products below reproduce llama.cpp's x86 kernels operation for
// operation: eight float lanes, lane `l` of a block holding the exact integer sum of elements
// 4l..4l+3, accumulated across blocks with one fused multiply-add per block, then summed
// pairwise as `hsum_float_8` does. Integer sums are exact, fused multiply-adds are exactly
// rounded, so the results match bit for bit, which matters: this model family amplifies
// last-bit differences in activation rounding into visible changes of the output.

/// llama.cpp's `hsum_float_8`: ((x4+x0)+(x6+x2)) + ((x5+x1)+(x7+x3)).
#[inline(always)]
pub fn hsum8(x: &[f32; 8]) -> f32 {
    let r = [x[4] + x[0], x[5] + x[1], x[6] + x[2], x[7] + x[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Lane sums of 4 consecutive products of 32 weights (already offset) with 32 activations.
/// Accumulate one block: each lane gains `d` times its exact integer sum, with one fused multiply-add.
#[inline(always)]
fn add_block(acc: &mut [f32; 8], d: f32, w: &[i32; 32], q: &[i8]) {
    let lanes = lane_sums(w, q);
    for (a, l) in acc.iter_mut().zip(lanes) {
        *a = d.mul_add(l, *a);
    }
}

#[inline(always)]
fn lane_sums(w: &[i32; 32], q: &[i8]) -> [f32; 8] {
    let mut lanes = [0f32; 8];
    for (l, lane) in lanes.iter_mut().enumerate() {
        let mut s = 0i32;
        for j in 4 * l..4 * l + 4 {
            s += w[j] * q[j] as i32;
        }
        *lane = s as f32;
    }
    lanes
}

/// Portable reference kernels; the x86 ones must produce the same bits.
#[inline(always)]
pub(crate) fn dot_q8_0_q8_0(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    let mut acc = [0f32; 8];
    for (b, wb) in w.chunks_exact(34).enumerate().take(nb) {
        let q = &acts.qs[(base + b) * QK..(base + b + 1) * QK];
        let mut wq = [0i32; 32];
        for (x, &v) in wq.iter_mut().zip(&wb[2..34]) {
            *x = v as i8 as i32;
        }
        let d = f16_at(wb, 0) * acts.d[base + b];
        add_block(&mut acc, d, &wq, q);
    }
    hsum8(&acc)
}

#[inline(always)]
pub(crate) fn dot_q4_0_q8_0(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    let mut acc = [0f32; 8];
    for (b, wb) in w.chunks_exact(18).enumerate().take(nb) {
        let q = &acts.qs[(base + b) * QK..(base + b + 1) * QK];
        let mut wq = [0i32; 32];
        for j in 0..16 {
            wq[j] = (wb[2 + j] & 0xF) as i32 - 8;
            wq[j + 16] = (wb[2 + j] >> 4) as i32 - 8;
        }
        let d = f16_at(wb, 0) * acts.d[base + b];
        add_block(&mut acc, d, &wq, q);
    }
    hsum8(&acc)
}

#[inline(always)]
pub(crate) fn dot_q4_1_q8_1(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (b, wb) in w.chunks_exact(20).enumerate().take(nb) {
        let q = &acts.qs[(base + b) * QK..(base + b + 1) * QK];
        let mut wq = [0i32; 32];
        for j in 0..16 {
            wq[j] = (wb[4 + j] & 0xF) as i32;
            wq[j + 16] = (wb[4 + j] >> 4) as i32;
        }
        // The compiler fuses llama.cpp's `summs += m * s` into one multiply-add.
        summs = f16_at(wb, 2).mul_add(acts.s[base + b], summs);
        let d = f16_at(wb, 0) * acts.d[base + b];
        add_block(&mut acc, d, &wq, q);
    }
    hsum8(&acc) + summs
}

/// Q5_0 against Q8_0 activations (values nibble + 16·bit − 16), or Q5_1 against Q8_1 (values
/// nibble + 16·bit, plus the minimum times the activations' scaled sum).
#[inline(always)]
pub(crate) fn dot_q5_q8(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize, with_min: bool) -> f32 {
    let (size, offset) = if with_min { (24, 4) } else { (22, 2) };
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (b, wb) in w.chunks_exact(size).enumerate().take(nb) {
        let q = &acts.qs[(base + b) * QK..(base + b + 1) * QK];
        let qh = u32::from_le_bytes([wb[offset], wb[offset + 1], wb[offset + 2], wb[offset + 3]]);
        let bias = if with_min { 0 } else { 16 };
        let mut wq = [0i32; 32];
        for j in 0..16 {
            wq[j] = ((wb[offset + 4 + j] & 0xF) as i32 | (((qh >> j) & 1) as i32) << 4) - bias;
            wq[j + 16] = ((wb[offset + 4 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) as i32) << 4) - bias;
        }
        if with_min {
            summs = f16_at(wb, 2).mul_add(acts.s[base + b], summs);
        }
        let d = f16_at(wb, 0) * acts.d[base + b];
        add_block(&mut acc, d, &wq, q);
    }
    hsum8(&acc) + summs
}

// The K-quant kernels follow llama.cpp's AVX2 `ggml_vec_dot_q4_K_q8_K` and
// `ggml_vec_dot_q6_K_q8_K`: per 256-value block, exact integer sums in eight lanes (lane `l`
// covers elements 4l..4l+3 of every 32-value chunk, each 16 or 32 values weighted by their
// integer scale), one fused multiply-add per block and lane, and for Q4_K the minimums in four
// separate lanes.

#[inline(always)]
pub(crate) fn dot_q4_k_q8_k(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    dot_q4_5_k_q8_k::<false>(w, acts, base, nb)
}

#[inline(always)]
pub(crate) fn dot_q5_k_q8_k(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    dot_q4_5_k_q8_k::<true>(w, acts, base, nb)
}

/// llama.cpp's `ggml_vec_dot_q4_K_q8_K` and `ggml_vec_dot_q5_K_q8_K` (AVX2): eight lanes of integer
/// sums scaled per block; the minimums' term in four lanes for Q4_K, as one scalar (a fused
/// multiply-add per block) for Q5_K, whose values carry a fifth bit from `qh`.
#[inline(always)]
fn dot_q4_5_k_q8_k<const FIVE: bool>(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    let bytes = if FIVE { 176 } else { 144 };
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    let mut summs = 0f32;
    for (i, wb) in w.chunks_exact(bytes).enumerate().take(nb) {
        let yd = acts.d[base + i];
        let d = yd * f16_at(wb, 0);
        let dmin = -yd * f16_at(wb, 2);
        let q8 = &acts.qs[(base + i) * QK_K..(base + i + 1) * QK_K];
        let bs = &acts.bsums[(base + i) * 16..(base + i + 1) * 16];
        let (mut sc, mut mn) = ([0i32; 8], [0i32; 8]);
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &wb[4..16]);
            (sc[j], mn[j]) = (s as i32, m as i32);
        }
        let pair = |k: usize| bs[2 * k] as i32 + bs[2 * k + 1] as i32;
        if FIVE {
            let prod: i32 = (0..8).map(|k| mn[k] * pair(k)).sum();
            summs = dmin.mul_add(prod as f32, summs);
        } else {
            for (p, a) in acc_m.iter_mut().enumerate() {
                let prod = mn[2 * p] * pair(2 * p) + mn[2 * p + 1] * pair(2 * p + 1);
                *a = dmin.mul_add(prod as f32, *a);
            }
        }
        let (qh, qs) = if FIVE { (&wb[16..48], &wb[48..176]) } else { (&wb[0..0], &wb[16..144]) };
        let fifth = |e: usize, bit: usize| if FIVE { ((qh[e] >> bit) & 1) << 4 } else { 0 };
        let mut sumi = [0i32; 8];
        for j in 0..4 {
            for (lane, sum) in sumi.iter_mut().enumerate() {
                let (mut lo, mut hi) = (0i32, 0i32);
                for e in 4 * lane..4 * lane + 4 {
                    let l = (qs[32 * j + e] & 0xF) | fifth(e, 2 * j);
                    let h = (qs[32 * j + e] >> 4) | fifth(e, 2 * j + 1);
                    lo += l as i32 * q8[64 * j + e] as i32;
                    hi += h as i32 * q8[64 * j + 32 + e] as i32;
                }
                *sum += sc[2 * j] * lo + sc[2 * j + 1] * hi;
            }
        }
        for (a, s) in acc.iter_mut().zip(sumi) {
            *a = d.mul_add(s as f32, *a);
        }
    }
    let mins = if FIVE { summs } else { (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]) };
    hsum8(&acc) + mins
}

#[inline(always)]
pub(crate) fn dot_q6_k_q8_k(w: &[u8], acts: &QuantizedActivations<'_>, base: usize, nb: usize) -> f32 {
    let mut acc = [0f32; 8];
    for (i, wb) in w.chunks_exact(210).enumerate().take(nb) {
        let d = acts.d[base + i] * f16_at(wb, 208);
        let q8 = &acts.qs[(base + i) * QK_K..(base + i + 1) * QK_K];
        let bs = &acts.bsums[(base + i) * 16..(base + i + 1) * 16];
        let (ql, qh) = (&wb[0..128], &wb[128..192]);
        let sc = |k: usize| wb[192 + k] as i8 as i32;
        let mut sumi = [0i32; 8];
        for j in 0..2 {
            for k in 0..4 {
                for (lane, sum) in sumi.iter_mut().enumerate() {
                    let mut p = 0i32;
                    for e in 4 * lane..4 * lane + 4 {
                        let (l1, l2, h) = (ql[64 * j + e], ql[64 * j + 32 + e], qh[32 * j + e]);
                        let q = match k {
                            0 => (l1 & 15) | ((h & 3) << 4),
                            1 => (l2 & 15) | (((h >> 2) & 3) << 4),
                            2 => (l1 >> 4) | (((h >> 4) & 3) << 4),
                            _ => (l2 >> 4) | (((h >> 6) & 3) << 4),
                        };
                        p += q as i32 * q8[128 * j + 32 * k + e] as i32;
                    }
                    *sum += sc(8 * j + 2 * k + usize::from(lane >= 4)) * p;
                }
            }
        }
        for (lane, sum) in sumi.iter_mut().enumerate() {
            // The values are stored plus 32: take 32 × scale × activation sum back out.
            *sum -= 32 * (bs[2 * lane] as i32 * sc(2 * lane) + bs[2 * lane + 1] as i32 * sc(2 * lane + 1));
        }
        for (a, s) in acc.iter_mut().zip(sumi) {
            *a = d.mul_add(s as f32, *a);
        }
    }
    hsum8(&acc)
}

#[cfg(test)]
mod quantize_tests {
    use super::*;

    /// The AVX2 quantisation equals the portable one bit for bit, zero blocks and ties included.
    #[test]
    fn simd_quantisation_matches_the_portable_one() {
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        };
        let mut x: Vec<f32> = (0..32 * 40).map(|_| rnd()).collect();
        x[..32].fill(0.0);
        // Values that land exactly on .5 after scaling (amax 127 gives id 1).
        x[32] = 127.0;
        for (i, v) in x[33..64].iter_mut().enumerate() {
            *v = i as f32 + 0.5;
        }
        for format in [ActivationFormat::Q8_0, ActivationFormat::Q8_1] {
            let blocks = x.len() / QK;
            let (mut d1, mut s1, mut q1) = (vec![0f32; blocks], vec![0f32; blocks], vec![0i8; blocks * QK]);
            let (mut d2, mut s2, mut q2) = (d1.clone(), s1.clone(), q1.clone());
            quantize_blocks(format, &x, &mut d1, &mut s1, &mut q1);
            quantize_q8(format, &x, &mut d2, &mut s2, &mut q2);
            assert_eq!(q1, q2, "{format:?} values");
            assert_eq!(
                d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in x.chunks(32) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            for v in b {
                out.push(((v / d).round() as i8) as u8);
            }
        }
        out
    }

    fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in x.chunks(32) {
            let (min, max) = b.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let d = (max - min) / 15.0;
            out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
            for j in 0..16 {
                let q0 = (((b[j] - min) / d).round() as u8).min(15);
                let q1 = (((b[j + 16] - min) / d).round() as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }

    /// `rows` rows of random K-quant blocks with sane scales (random bytes elsewhere are all valid).
    fn random_k_blocks(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let (bytes, scale_at) = match ty {
            GgmlType::Q4_K => (144, vec![0, 2]),
            GgmlType::Q5_K => (176, vec![0, 2]),
            _ => (210, vec![208]),
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK_K {
            let mut block: Vec<u8> = (0..bytes).map(|_| (lcg(seed) * 128.0 + 128.0) as u8).collect();
            for &at in &scale_at {
                let v = f16::from_f32(0.001 + 0.01 * lcg(seed).abs()).to_bits().to_le_bytes();
                block[at..at + 2].copy_from_slice(&v);
            }
            out.extend(block);
        }
        out
    }

    /// The K-quant integer paths agree with dequantise-then-f32 to within activation rounding.
    #[test]
    fn k_quant_integer_dots_match_the_float_reference() {
        let mut seed = 5;
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            for cols in [256usize, 768] {
                let w = random_k_blocks(ty, 1, cols, &mut seed);
                let x: Vec<f32> = (0..cols * 2).map(|_| lcg(&mut seed)).collect();
                let mut deq = vec![0f32; cols];
                dequantize(ty, &w, &mut deq);
                let acts = QuantizedActivations::new(ActivationFormat::Q8K, &x, 2, cols);
                for t in 0..2 {
                    let want = dot_f32(&deq, &x[t * cols..(t + 1) * cols]);
                    let got = vec_dot(ty, &w, &acts, t);
                    let scale = deq.iter().map(|v| v.abs()).sum::<f32>() / 127.0;
                    assert!((want - got).abs() <= scale, "{ty} cols {cols}: {got} vs {want}");
                }
            }
        }
    }

    /// The integer paths agree with dequantise-then-f32 to within activation rounding.
    #[test]
    fn integer_dots_match_the_float_reference() {
        let mut seed = 7;
        for cols in [32usize, 64, 576] {
            let w: Vec<f32> = (0..cols).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..cols * 3).map(|_| lcg(&mut seed)).collect();
            // Q5 blocks from the Q4 ones, with alternating fifth bits; Q5_0 centres on 16.
            let q4_1 = quantize_q4_1(&w);
            let q5_1: Vec<u8> = q4_1.chunks(20).flat_map(|b| [&b[..4], &[0x55; 4], &b[4..]].concat()).collect();
            let q5_0: Vec<u8> = q4_1.chunks(20).flat_map(|b| [&b[..2], &[0xAA; 4], &b[4..]].concat()).collect();
            let cases = [
                (GgmlType::Q8_0, quantize_q8_0(&w)),
                (GgmlType::Q4_1, q4_1),
                (GgmlType::Q5_1, q5_1),
                (GgmlType::Q5_0, q5_0),
            ];
            for (ty, bytes) in cases {
                let mut deq = vec![0f32; cols];
                dequantize(ty, &bytes, &mut deq);
                let acts = QuantizedActivations::new(ActivationFormat::for_weights(ty), &x, 3, cols);
                for t in 0..3 {
                    let want = dot_f32(&deq, &x[t * cols..(t + 1) * cols]);
                    let got = vec_dot(ty, &bytes, &acts, t);
                    let tol = 0.02 * (cols as f32).sqrt() * deq.iter().fold(1f32, |m, v| m.max(v.abs()));
                    assert!((want - got).abs() < tol, "{ty} cols {cols}: {got} vs {want}");
                }
            }
        }
    }

    /// Every x86 level's tile kernels give the portable reference's bits, for every integer
    /// format, on random data, in shapes with ragged row blocks and token groups.
    #[test]
    fn simd_kernels_match_the_portable_ones_bit_for_bit() {
        use super::super::{Acts, Layout};
        use std::ops::Range;
        type Kernel = Box<dyn Fn(GgmlType, &[u8], usize, Acts<'_>, Range<usize>, &mut [f32], Layout) -> bool>;
        // Every SIMD kernel this CPU runs, each saying whether it covers the type.
        let mut kernels: Vec<(String, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::x86;
            let levels = match x86::level() {
                Some(x86::Level::Vnni) => vec![x86::Level::Avx2, x86::Level::Vnni],
                Some(level) => vec![level],
                None => Vec::new(),
            };
            for level in levels {
                let kernel: Kernel = Box::new(move |ty, w, rows, acts, tokens, out, layout| {
                    x86::matmul_tiles(level, ty, w, rows, acts, tokens, out, layout);
                    true
                });
                kernels.push((format!("{level:?}"), kernel));
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            use super::super::neon;
            let kernel: Kernel = Box::new(|ty, w, rows, acts, tokens, out, layout| {
                neon::supports(ty) && {
                    neon::matmul_tiles(ty, w, rows, acts, tokens, out, layout);
                    true
                }
            });
            kernels.push(("NEON".into(), kernel));
        }
        let mut seed = 11;
        let shapes = [
            (1usize, 32usize, 1usize),
            (17, 96, 3),
            (33, 576, 7),
            (5, 1536, 9),
            (16, 64, 4),
            (19, 768, 6),
            (7, 320, 23),
        ];
        for (rows, cols, n) in shapes {
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed) * 3.0).collect();
            let x: Vec<f32> = (0..cols * n).map(|_| lcg(&mut seed) * 50.0).collect();
            // Q4_0 blocks from Q8_0 ones: keep the scale, take the low nibbles of the first half.
            let q4_0: Vec<u8> = quantize_q8_0(&w).chunks(34).flat_map(|b| [&b[..2], &b[2..18]].concat()).collect();
            // Q5 blocks: random high bits spliced into the Q4 blocks.
            let mut high_bits = || (0..4).map(|_| (lcg(&mut seed) * 128.0 + 128.0) as u8).collect::<Vec<u8>>();
            let q5_0: Vec<u8> = q4_0.chunks(18).flat_map(|b| [&b[..2], &high_bits()[..], &b[2..]].concat()).collect();
            let q4_1 = quantize_q4_1(&w);
            let q5_1: Vec<u8> = q4_1.chunks(20).flat_map(|b| [&b[..4], &high_bits()[..], &b[4..]].concat()).collect();
            let mut cases = vec![
                (GgmlType::Q8_0, quantize_q8_0(&w)),
                (GgmlType::Q4_1, q4_1),
                (GgmlType::Q4_0, q4_0),
                (GgmlType::Q5_0, q5_0),
                (GgmlType::Q5_1, q5_1),
            ];
            if cols % QK_K == 0 {
                for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
                    cases.push((ty, random_k_blocks(ty, rows, cols, &mut seed)));
                }
            }
            for (ty, bytes) in cases {
                let acts = QuantizedActivations::new(ActivationFormat::for_weights(ty), &x, n, cols);
                let row_bytes = bytes.len() / rows;
                let mut want = vec![0f32; n * rows];
                for t in 0..n {
                    for r in 0..rows {
                        want[t * rows + r] = vec_dot(ty, &bytes[r * row_bytes..(r + 1) * row_bytes], &acts, t);
                    }
                }
                for (name, kernel) in &kernels {
                    // Token-major output, and a row-major one over a ragged token range.
                    let mut got = vec![f32::NAN; n * rows];
                    let layout = Layout { token_stride: rows, row_stride: 1 };
                    if !kernel(ty, &bytes, rows, acts.view(), 0..n, &mut got, layout) {
                        continue;
                    }
                    assert_eq!(bits(&got), bits(&want), "{name} {ty} {rows}×{cols} by {n}");
                    let mut got = vec![f32::NAN; rows * (n - 1)];
                    if n > 1 {
                        let layout = Layout { token_stride: 1, row_stride: n - 1 };
                        kernel(ty, &bytes, rows, acts.view(), 1..n, &mut got, layout);
                        for t in 1..n {
                            for r in 0..rows {
                                let (g, w) = (got[r * (n - 1) + t - 1], want[t * rows + r]);
                                assert_eq!(g.to_bits(), w.to_bits(), "{name} {ty} row {r} token {t}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// One weight row times token `t` in the order of llama.cpp's tiled K-quant kernel, written
    /// from its definition: per block, the exact integer sums of scales × codes × activations and
    /// of minimums × activation sums, scaled once, added with one fused multiply-add.
    #[cfg(target_arch = "x86_64")]
    fn tiled_reference(ty: GgmlType, w: &[u8], acts: &QuantizedActivations<'_>, t: usize) -> f32 {
        let nb = acts.blocks_per_row;
        let bytes = w.len() / nb;
        let mut acc = 0f32;
        for (i, wb) in w.chunks_exact(bytes).enumerate() {
            let block = t * nb + i;
            let q8 = &acts.qs[block * QK_K..(block + 1) * QK_K];
            let bs = &acts.bsums[block * 16..(block + 1) * 16];
            let yd = acts.d[block];
            let dot = |codes: &dyn Fn(usize) -> i32, range: std::ops::Range<usize>| -> i32 {
                range.map(|k| codes(k) * q8[k] as i32).sum()
            };
            let r = if ty == GgmlType::Q6_K {
                let (ql, qh, sc) = (&wb[0..128], &wb[128..192], &wb[192..208]);
                let code = |k: usize| {
                    let (h, l) = (k / 128, k % 128);
                    let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                    let v = match l / 32 {
                        0 => (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                        1 => (ql[l] & 0xF) | (((qh[l - 32] >> 2) & 3) << 4),
                        2 => (ql[l - 64] >> 4) | (((qh[l - 64] >> 4) & 3) << 4),
                        _ => (ql[l - 64] >> 4) | (((qh[l - 96] >> 6) & 3) << 4),
                    };
                    v as i32 - 32
                };
                let s1: i32 = (0..16).map(|s| (sc[s] as i8) as i32 * dot(&code, 16 * s..16 * s + 16)).sum();
                s1 as f32 * f16_at(wb, 208)
            } else {
                let five = ty == GgmlType::Q5_K;
                let qs = if five { &wb[48..176] } else { &wb[16..144] };
                let code = |k: usize| {
                    let (j, e) = (k / 64, k % 32);
                    let high = (k % 64) >= 32;
                    let v = if high { qs[32 * j + e] >> 4 } else { qs[32 * j + e] & 0xF };
                    let bit = if five { (wb[16 + e] >> (2 * j + usize::from(high))) & 1 } else { 0 };
                    (v | (bit << 4)) as i32
                };
                let (mut s1, mut s2) = (0i32, 0i32);
                for s in 0..8 {
                    let (sc, m) = scale_min_k4(s, &wb[4..16]);
                    s1 += sc as i32 * dot(&code, 32 * s..32 * s + 32);
                    s2 += m as i32 * (bs[2 * s] as i32 + bs[2 * s + 1] as i32);
                }
                (-f16_at(wb, 2)).mul_add(s2 as f32, s1 as f32 * f16_at(wb, 0))
            };
            acc = r.mul_add(yd, acc);
        }
        acc
    }

    /// The x86 K-quant kernels reduce the tokens marked as in a batch of 8 or more as llama.cpp's
    /// tiled kernel does, and the others as its vector dot product does, in one call.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn k_quant_kernels_follow_each_tokens_batch_size() {
        use super::super::{Layout, x86};
        let Some(level) = x86::level() else {
            // As for the attention kernels: a CPU without AVX2 tests nothing here, so say so.
            assert!(
                std::env::var_os("BERTH_ACCEPT_NO_AVX2").is_some(),
                "this CPU lacks AVX2/FMA/F16C, so the K-quant kernels cannot be tested here; set BERTH_ACCEPT_NO_AVX2=1 to accept that"
            );
            return;
        };
        let mut seed = 13;
        // Tokens 0, 2 and 5 were in large batches; then runs long enough for the outer-product
        // kernel, all in large batches (ragged rows and token groups), and one that is not.
        let mixed = [64u32, 1, 8, 7, 2, 300];
        let cases: [(usize, usize, Vec<u32>); 4] = [
            (19, 512, mixed.to_vec()),
            (7, 768, vec![64; 13]),
            (9, 256, vec![512; 24]),
            (6, 256, [vec![64; 11], vec![7], vec![64; 4]].concat()),
        ];
        for (rows, cols, peer_batch) in cases {
            let n = peer_batch.len();
            let x: Vec<f32> = (0..cols * n).map(|_| lcg(&mut seed) * 50.0).collect();
            for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
                let w = random_k_blocks(ty, rows, cols, &mut seed);
                let acts = QuantizedActivations::new(ActivationFormat::Q8K, &x, n, cols).with_peer_batch(&peer_batch);
                let row_bytes = w.len() / rows;
                let want = |t: usize, r: usize| {
                    let row = &w[r * row_bytes..(r + 1) * row_bytes];
                    if peer_batch[t] >= super::super::TILED_FROM {
                        tiled_reference(ty, row, &acts, t)
                    } else {
                        vec_dot(ty, row, &acts, t)
                    }
                };
                let mut got = vec![f32::NAN; n * rows];
                let layout = Layout { token_stride: rows, row_stride: 1 };
                x86::matmul_tiles(level, ty, &w, rows, acts.view(), 0..n, &mut got, layout);
                for t in 0..n {
                    for r in 0..rows {
                        assert_eq!(
                            got[t * rows + r].to_bits(),
                            want(t, r).to_bits(),
                            "{ty} {rows}×{cols} row {r} token {t}"
                        );
                    }
                }
                // Row-major output over a token range that does not start at 0.
                let mut got = vec![f32::NAN; rows * (n - 1)];
                let layout = Layout { token_stride: 1, row_stride: n - 1 };
                x86::matmul_tiles(level, ty, &w, rows, acts.view(), 1..n, &mut got, layout);
                for t in 1..n {
                    for r in 0..rows {
                        let g = got[r * (n - 1) + t - 1];
                        assert_eq!(g.to_bits(), want(t, r).to_bits(), "{ty} {rows}×{cols} row {r} token {t} from 1");
                    }
                }
            }
        }
    }

    /// Gathered rows are the rows quantised on their own in every integer format, and the rows
    /// themselves in F32.
    #[test]
    fn gathered_rows_are_those_rows_quantised() {
        let mut seed = 17;
        let (n, cols) = (7usize, 512usize);
        let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut seed) * 20.0).collect();
        let tokens = [5usize, 0, 3, 3];
        let picked: Vec<f32> = tokens.iter().flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied()).collect();
        for format in [ActivationFormat::Q8_0, ActivationFormat::Q8_1, ActivationFormat::Q8K] {
            let all = QuantizedActivations::new(format, &x, n, cols);
            let gathered = all.gather(&tokens);
            let alone = QuantizedActivations::new(format, &picked, tokens.len(), cols);
            assert_eq!(gathered.qs, alone.qs, "{format:?}");
            assert_eq!(bits(&gathered.d), bits(&alone.d), "{format:?}");
            assert_eq!(bits(&gathered.s), bits(&alone.s), "{format:?}");
            assert_eq!(gathered.bsums, alone.bsums, "{format:?}");
        }
        let gathered = QuantizedActivations::new(ActivationFormat::F32, &x, n, cols).gather(&tokens);
        assert_eq!(bits(&gathered.f32_rows), bits(&picked));
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn q8_0_dequantises_exactly() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 8.0).collect();
        let bytes = quantize_q8_0(&x);
        let mut out = vec![0f32; 64];
        dequantize(GgmlType::Q8_0, &bytes, &mut out);
        for (a, b) in x.iter().zip(&out) {
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
    }
}
