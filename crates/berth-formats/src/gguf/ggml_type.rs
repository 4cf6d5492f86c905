use std::fmt;

/// A tensor element type as GGML numbers it, with its block geometry.
///
/// Quantised types store `block_size` weights in `type_size` bytes; a row's length must be a
/// multiple of `block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    id: u32,
    name: &'static str,
    block_size: u64,
    type_size: u64,
}

/// (id, name, weights per block, bytes per block), from ggml.h / ggml.c.
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType::known(0);
    pub const F16: GgmlType = GgmlType::known(1);
    pub const Q4_0: GgmlType = GgmlType::known(2);
    pub const Q4_1: GgmlType = GgmlType::known(3);
    pub const Q5_0: GgmlType = GgmlType::known(6);
    pub const Q5_1: GgmlType = GgmlType::known(7);
    pub const Q8_0: GgmlType = GgmlType::known(8);
    pub const Q4_K: GgmlType = GgmlType::known(12);
    pub const Q5_K: GgmlType = GgmlType::known(13);
    pub const Q6_K: GgmlType = GgmlType::known(14);
    pub const BF16: GgmlType = GgmlType::known(30);

    const fn known(id: u32) -> GgmlType {
        let mut i = 0;
        while i < TYPES.len() {
            if TYPES[i].0 == id {
                let (id, name, block_size, type_size) = TYPES[i];
                return GgmlType { id, name, block_size, type_size };
            }
            i += 1;
        }
        panic!("not a known GGML type id")
    }

    /// The type with this id, if berth knows its layout.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.0 == id).map(|&(id, name, block_size, type_size)| GgmlType {
            id,
            name,
            block_size,
            type_size,
        })
    }

    pub fn id(self) -> u32 {
        self.id
    }
    pub fn name(self) -> &'static str {
        self.name
    }
    /// Weights per block.
    pub fn block_size(self) -> u64 {
        self.block_size
    }
    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.type_size
    }

    /// Bytes needed for `elements` weights, or `None` when `elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        if !elements.is_multiple_of(self.block_size) {
            return None;
        }
        (elements / self.block_size).checked_mul(self.type_size)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// llama.cpp's name for a `general.file_type` value (`enum llama_ftype`).
pub fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_type_round_trips_by_id() {
        for &(id, name, _, _) in TYPES {
            let t = GgmlType::from_id(id).expect("listed");
            assert_eq!(t.name(), name);
            assert_eq!(t.id(), id);
        }
        assert!(GgmlType::from_id(4).is_none(), "4 was Q4_2, removed from GGML");
    }

    #[test]
    fn sizes_follow_the_block_layout() {
        assert_eq!(GgmlType::Q4_1.bytes_for(576), Some(18 * 20));
        assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None, "overflow is refused");
    }
}
