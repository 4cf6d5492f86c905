//! How the KV cache stores a row of keys or values: f16, or ggml's q8_0 at about half the memory.
//! The cache ([`crate::model::kv`]) writes rows through [`KvType::encode`]; attention reads them
//! back through [`KvType::decode`].

use super::f16;

/// How the cache stores a key or value row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// f16, as llama.cpp stores it by default: what berth's agreement with llama.cpp is measured on.
    #[default]
    F16,
    /// ggml's q8_0: blocks of 32 values as one f16 scale and 32 signed bytes (34 bytes, 17 words
    /// against f16's 32 words), so the same memory holds 1.88× the positions. Rows are blocks of
    /// a head, so the head size must be a multiple of 32.
    Q8_0,
}

/// Values in one q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// u16 words one q8_0 block takes: the f16 scale, then 32 bytes.
const Q8_0_WORDS: usize = 1 + Q8_0_BLOCK / 2;

impl KvType {
    /// u16 words one row of `values` values takes.
    pub fn row_words(self, values: usize) -> usize {
        match self {
            KvType::F16 => values,
            KvType::Q8_0 => values / Q8_0_BLOCK * Q8_0_WORDS,
        }
    }

    /// Whether rows of heads of `head_dim` values can be stored this way.
    pub fn fits_head(self, head_dim: usize) -> bool {
        match self {
            KvType::F16 => true,
            KvType::Q8_0 => head_dim.is_multiple_of(Q8_0_BLOCK),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Store `src` (a whole number of rows' values) into `dst` (as many rows in this type).
    pub fn encode(self, src: &[f32], dst: &mut [u16]) {
        match self {
            KvType::F16 => {
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = f16::from_f32(x);
                }
            }
            KvType::Q8_0 => {
                for (block, out) in src.chunks_exact(Q8_0_BLOCK).zip(dst.chunks_exact_mut(Q8_0_WORDS)) {
                    encode_q8_0(block, out);
                }
            }
        }
    }

    /// The f32 values of `src` (rows in this type) into `dst`.
    pub fn decode(self, src: &[u16], dst: &mut [f32]) {
        match self {
            KvType::F16 => {
                let t = f16::table();
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = t[s as usize];
                }
            }
            KvType::Q8_0 => {
                for (block, out) in src.chunks_exact(Q8_0_WORDS).zip(dst.chunks_exact_mut(Q8_0_BLOCK)) {
                    let scale = f16::to_f32(block[0]);
                    for (pair, o) in block[1..].iter().zip(out.chunks_exact_mut(2)) {
                        let [lo, hi] = pair.to_le_bytes();
                        o[0] = scale * f32::from(lo as i8);
                        o[1] = scale * f32::from(hi as i8);
                    }
                }
            }
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "q8_0" | "q8" => Ok(KvType::Q8_0),
            other => Err(format!("unknown KV cache type {other:?}: use f16 or q8_0")),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// ggml's reference q8_0 quantisation of one block: the scale maps the largest magnitude to 127,
/// each value rounds half away from zero.
fn encode_q8_0(block: &[f32], out: &mut [u16]) {
    let amax = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[0] = f16::from_f32(d);
    for (pair, o) in block.chunks_exact(2).zip(out[1..].iter_mut()) {
        let q = |x: f32| (x * id).round() as i8 as u8;
        *o = u16::from_le_bytes([q(pair[0]), q(pair[1])]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_formats::gguf::GgmlType;

    fn values(n: usize) -> Vec<f32> {
        let mut seed = 11u64;
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    /// A q8_0 row is ggml's q8_0 layout byte for byte: ggml's own dequantisation reads it back to
    /// the same values, each within half a step of the original.
    #[test]
    fn q8_0_rows_are_ggml_blocks() {
        let src = values(192);
        let mut row = vec![0u16; KvType::Q8_0.row_words(192)];
        KvType::Q8_0.encode(&src, &mut row);
        let bytes: Vec<u8> = row.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut by_ggml = vec![0f32; 192];
        crate::kernels::quant::dequantize(GgmlType::Q8_0, &bytes, &mut by_ggml);
        let mut ours = vec![0f32; 192];
        KvType::Q8_0.decode(&row, &mut ours);
        assert_eq!(ours, by_ggml);
        for (block, got) in src.chunks(32).zip(ours.chunks(32)) {
            let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (a, b) in block.iter().zip(got) {
                assert!((a - b).abs() <= 0.5 * step * 1.01 + 1e-3 * step, "{a} → {b} (step {step})");
            }
        }
    }

    #[test]
    fn zeros_and_f16_round_trip() {
        let mut row = vec![0xFFFFu16; KvType::Q8_0.row_words(32)];
        KvType::Q8_0.encode(&[0.0; 32], &mut row);
        let mut back = vec![1f32; 32];
        KvType::Q8_0.decode(&row, &mut back);
        assert!(back.iter().all(|&x| x == 0.0), "a zero block stays zero: {back:?}");

        let src = values(64);
        let mut row = vec![0u16; 64];
        KvType::F16.encode(&src, &mut row);
        let mut back = vec![0f32; 64];
        KvType::F16.decode(&row, &mut back);
        for (a, b) in src.iter().zip(&back) {
            assert_eq!(*b, f16::to_f32(f16::from_f32(*a)));
        }
        assert_eq!("Q8_0".parse::<KvType>(), Ok(KvType::Q8_0));
        assert!("q4_0".parse::<KvType>().unwrap_err().contains("f16 or q8_0"));
    }
}
