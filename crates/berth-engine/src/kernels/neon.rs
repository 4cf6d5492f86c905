//! aarch64 NEON versions of the 32-value block kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//!
//! They compute the same eight lanes as the x86 kernels and the portable reference — lane `l` of a
//! block is the exact integer sum of elements 4l..4l+3 — with widening byte multiplies and pairwise
//! adds, then one fused multiply-add per block and lane and llama.cpp's x86 `hsum_float_8` order.
//! So an ARM machine produces the same bits as the x86 build the golden data came from. NEON is
//! part of every aarch64 CPU, so there is nothing to detect; the K-quants take the portable integer
//! kernels here.

use std::arch::aarch64::*;
use std::ops::Range;

use berth_formats::gguf::GgmlType;

use super::{Acts, Layout};

/// Whether these kernels cover `ty`.
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1)
}

/// Multiply `rows` consecutive weight rows of `ty` by the activations of `tokens`, writing into
/// `out` as `layout` says (token and row counted from the starts of their ranges).
///
/// # Panics
/// If the slices are too short for the shapes (checked once, before any unchecked access), or
/// `ty` is not [`supports`]ed.
pub fn matmul_tiles(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    acts: Acts<'_>,
    tokens: Range<usize>,
    out: &mut [f32],
    layout: Layout,
) {
    let block_bytes = match ty {
        GgmlType::Q8_0 => Q8_0::BYTES,
        GgmlType::Q4_0 => Q4_0::BYTES,
        GgmlType::Q4_1 => Q4_1::BYTES,
        GgmlType::Q5_0 => Q5_0::BYTES,
        GgmlType::Q5_1 => Q5_1::BYTES,
        other => panic!("no NEON kernel for {other}"),
    };
    let nb = acts.nb;
    assert!(w.len() >= rows * nb * block_bytes);
    assert!(acts.qs.len() >= tokens.end * nb * 32 && acts.d.len() >= tokens.end * nb);
    assert!(!matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) || acts.s.len() >= tokens.end * nb);
    if rows == 0 || tokens.is_empty() {
        return;
    }
    let last = (tokens.len() - 1) * layout.token_stride + (rows - 1) * layout.row_stride;
    assert!(last < out.len());
    // SAFETY: every access below stays inside the bounds asserted above.
    unsafe {
        match ty {
            GgmlType::Q8_0 => tiles::<Q8_0>(w.as_ptr(), rows, &acts, tokens, out.as_mut_ptr(), layout),
            GgmlType::Q4_0 => tiles::<Q4_0>(w.as_ptr(), rows, &acts, tokens, out.as_mut_ptr(), layout),
            GgmlType::Q4_1 => tiles::<Q4_1>(w.as_ptr(), rows, &acts, tokens, out.as_mut_ptr(), layout),
            GgmlType::Q5_0 => tiles::<Q5_0>(w.as_ptr(), rows, &acts, tokens, out.as_mut_ptr(), layout),
            _ => tiles::<Q5_1>(w.as_ptr(), rows, &acts, tokens, out.as_mut_ptr(), layout),
        }
    }
}

/// Rows in blocks of 16, tokens in groups of 4, as in the x86 kernels.
unsafe fn tiles<B: Block>(
    w: *const u8,
    rows: usize,
    acts: &Acts<'_>,
    tokens: Range<usize>,
    out: *mut f32,
    layout: Layout,
) {
    let row_bytes = acts.nb * B::BYTES;
    for r0 in (0..rows).step_by(16) {
        let mut t = tokens.start;
        while t < tokens.end {
            let group = (tokens.end - t).min(4);
            for r in r0..(r0 + 16).min(rows) {
                // SAFETY: r < rows and t + group <= tokens.end, inside the caller's bounds.
                unsafe {
                    let wr = w.add(r * row_bytes);
                    let o = out.add((t - tokens.start) * layout.token_stride + r * layout.row_stride);
                    let ts = layout.token_stride;
                    match group {
                        4 => tile::<B, 4>(wr, acts, t, o, ts),
                        3 => tile::<B, 3>(wr, acts, t, o, ts),
                        2 => tile::<B, 2>(wr, acts, t, o, ts),
                        _ => tile::<B, 1>(wr, acts, t, o, ts),
                    }
                }
            }
            t += group;
        }
    }
}

#[inline(always)]
unsafe fn tile<B: Block, const T: usize>(
    w: *const u8,
    acts: &Acts<'_>,
    first: usize,
    out: *mut f32,
    token_stride: usize,
) {
    let nb = acts.nb;
    // SAFETY (whole body): the caller guarantees `nb` weight blocks at `w`, `nb` activation blocks
    // for tokens first..first+T, and T outputs `token_stride` apart at `out`.
    unsafe {
        let mut lo = [vdupq_n_f32(0.0); T];
        let mut hi = [vdupq_n_f32(0.0); T];
        let mut summs = [0f32; T];
        for b in 0..nb {
            let wb = w.add(b * B::BYTES);
            let (dw, x0, x1) = B::load(wb);
            for t in 0..T {
                let block = (first + t) * nb + b;
                let q = acts.qs.as_ptr().add(block * 32);
                let (y0, y1) = (vld1q_s8(q), vld1q_s8(q.add(16)));
                if B::HAS_MIN {
                    summs[t] = B::min(wb).mul_add(*acts.s.as_ptr().add(block), summs[t]);
                }
                let scale = dw * *acts.d.as_ptr().add(block);
                lo[t] = vfmaq_n_f32(lo[t], vcvtq_f32_s32(quad_sums(x0, y0)), scale);
                hi[t] = vfmaq_n_f32(hi[t], vcvtq_f32_s32(quad_sums(x1, y1)), scale);
            }
        }
        for t in 0..T {
            // hsum_float_8: ((x4 + x0) + (x6 + x2)) + ((x5 + x1) + (x7 + x3)).
            let r = vaddq_f32(hi[t], lo[t]);
            let sum =
                (vgetq_lane_f32::<0>(r) + vgetq_lane_f32::<2>(r)) + (vgetq_lane_f32::<1>(r) + vgetq_lane_f32::<3>(r));
            *out.add(t * token_stride) = if B::HAS_MIN { sum + summs[t] } else { sum };
        }
    }
}

/// Four lanes, each the exact sum of four consecutive byte products (|products| ≤ 128·127 fit i16).
#[inline(always)]
unsafe fn quad_sums(x: int8x16_t, y: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is part of every aarch64 CPU.
    unsafe {
        let low = vpaddlq_s16(vmull_s8(vget_low_s8(x), vget_low_s8(y)));
        let high = vpaddlq_s16(vmull_high_s8(x, y));
        vpaddq_s32(low, high)
    }
}

/// A 32-value weight block format.
trait Block {
    const BYTES: usize;
    const HAS_MIN: bool;
    /// The block's scale and its 32 values as signed bytes (elements 0..16, 16..32).
    unsafe fn load(p: *const u8) -> (f32, int8x16_t, int8x16_t);
    unsafe fn min(_p: *const u8) -> f32 {
        0.0
    }
}

struct Q8_0;
struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;

fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the callers pass a pointer into a whole block.
    super::f16::to_f32(unsafe { u16::from_le_bytes([*p, *p.add(1)]) })
}

/// 16 bytes of nibbles → (low nibbles, high nibbles), elements 0..16 and 16..32.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe {
        let bytes = vld1q_u8(p);
        (vandq_u8(bytes, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(bytes))
    }
}

/// The fifth bits of a Q5 block (32 bits at `p`) as 0x10 per set bit, elements 0..16 and 16..32.
#[inline(always)]
unsafe fn fifth_bits(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller guarantees 4 readable bytes.
    let qh = unsafe { u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]) };
    let bits: [u8; 32] = std::array::from_fn(|j| (((qh >> j) & 1) as u8) << 4);
    // SAFETY: `bits` holds 32 bytes.
    unsafe { (vld1q_u8(bits.as_ptr()), vld1q_u8(bits.as_ptr().add(16))) }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, int8x16_t, int8x16_t) {
        // SAFETY: a whole block at `p`.
        unsafe { (f16_at(p), vld1q_s8(p.add(2) as *const i8), vld1q_s8(p.add(18) as *const i8)) }
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, int8x16_t, int8x16_t) {
        // SAFETY: a whole block at `p`.
        unsafe {
            let (l, h) = nibbles(p.add(2));
            let eight = vdupq_n_s8(8);
            (f16_at(p), vsubq_s8(vreinterpretq_s8_u8(l), eight), vsubq_s8(vreinterpretq_s8_u8(h), eight))
        }
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, int8x16_t, int8x16_t) {
        // SAFETY: a whole block at `p`.
        unsafe {
            let (l, h) = nibbles(p.add(4));
            (f16_at(p), vreinterpretq_s8_u8(l), vreinterpretq_s8_u8(h))
        }
    }
    unsafe fn min(p: *const u8) -> f32 {
        // SAFETY: a whole block at `p`.
        f16_at(unsafe { p.add(2) })
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, int8x16_t, int8x16_t) {
        // SAFETY: a whole block at `p`.
        unsafe {
            let (l, h) = nibbles(p.add(6));
            let (bl, bh) = fifth_bits(p.add(2));
            let sixteen = vdupq_n_s8(16);
            let lo = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, bl)), sixteen);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(h, bh)), sixteen);
            (f16_at(p), lo, hi)
        }
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (f32, int8x16_t, int8x16_t) {
        // SAFETY: a whole block at `p`.
        unsafe {
            let (l, h) = nibbles(p.add(8));
            let (bl, bh) = fifth_bits(p.add(4));
            (f16_at(p), vreinterpretq_s8_u8(vorrq_u8(l, bl)), vreinterpretq_s8_u8(vorrq_u8(h, bh)))
        }
    }
    unsafe fn min(p: *const u8) -> f32 {
        // SAFETY: a whole block at `p`.
        f16_at(unsafe { p.add(2) })
    }
}
