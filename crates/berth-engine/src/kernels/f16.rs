//! f16 → f32 by table lookup (exact; the table is built from the bit patterns once), and
//! f32 → f16 with IEEE round-to-nearest-even, for the KV cache's hot loops.

use std::sync::LazyLock;

static TABLE: LazyLock<Box<[f32]>> =
    LazyLock::new(|| (0..=u16::MAX).map(|b| half::f16::from_bits(b).to_f32()).collect());

/// The value of an f16 bit pattern.
#[inline(always)]
pub fn to_f32(bits: u16) -> f32 {
    TABLE[bits as usize]
}

/// The table itself, for loops that convert many values.
#[inline(always)]
pub fn table() -> &'static [f32] {
    &TABLE
}

/// Round an f32 to the nearest f16 (ties to even), as hardware conversion does.
#[inline(always)]
pub fn from_f32(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}
