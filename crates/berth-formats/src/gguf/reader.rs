//! The GGUF parser. Every read is bounds-checked against the slice; every count is bounded by the
//! bytes that remain (an element takes at least one byte) and by a cap in [`Limits`], so a lying
//! header cannot make the parser allocate more than a small multiple of the input.

use std::collections::HashSet;

use super::value::{Array, Value};
use super::{DEFAULT_ALIGNMENT, GgmlType, GgufError, GgufFile, MAGIC, TensorInfo};

/// Hard caps on what a GGUF header may claim, beyond "fits in the file".
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest metadata string (chat templates are the longest in practice, a few KiB).
    pub max_string_len: u64,
    /// Longest metadata key or tensor name (the GGUF spec caps names at 65,535 bytes).
    pub max_key_len: u64,
    /// Most elements in one metadata array (vocabularies hold a few hundred thousand).
    pub max_array_len: u64,
    /// Most metadata entries.
    pub max_metadata_count: u64,
    /// Most tensors.
    pub max_tensor_count: u64,
    /// Deepest nesting of arrays in arrays.
    pub max_array_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_string_len: 16 << 20,
            max_key_len: 65_535,
            max_array_len: 1 << 26,
            max_metadata_count: 1 << 16,
            max_tensor_count: 1 << 20,
            max_array_depth: 3,
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        // n <= remaining, which fits in usize.
        let n = n as usize;
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must be plausible: at most `cap`, and at most the bytes left divided by the
    /// smallest size one element can take.
    fn count(&mut self, what: &'static str, cap: u64, min_element_size: u64) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        let limit = cap.min(self.remaining() / min_element_size.max(1));
        if n > limit {
            return Err(GgufError::TooLarge { what, value: n, limit });
        }
        Ok(n)
    }

    fn string(&mut self, what: &'static str, cap: u64) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > cap {
            return Err(GgufError::TooLarge { what, value: len, limit: cap });
        }
        let offset = self.pos as u64;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::InvalidUtf8 { offset })
    }
}

/// Smallest encoded size of one element of the given value type, for bounding counts.
fn min_size(value_type: u32) -> u64 {
    match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,  // a string is at least its u64 length
        9 => 12, // an array is at least its u32 type and u64 length
        _ => 8,  // u64, i64, f64
    }
}

pub(super) fn parse(bytes: &[u8], limits: &Limits) -> Result<GgufFile, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.array::<4>("the magic").map_err(|_| GgufError::BadMagic)? != MAGIC {
        return Err(GgufError::BadMagic);
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    // Bound the counts by the bytes that must follow each entry at minimum.
    let tensor_count = c.count("the tensor count", limits.max_tensor_count, 8 + 1 + 4 + 8 + 4 + 8)?;
    let kv_count = c.count("the metadata count", limits.max_metadata_count, 8 + 1 + 4 + 1)?;

    let mut metadata = Vec::with_capacity(kv_count as usize);
    let mut keys = HashSet::with_capacity(kv_count as usize);
    for _ in 0..kv_count {
        let key = c.string("a metadata key", limits.max_key_len)?;
        let value_type = c.u32("a metadata value type")?;
        let value = read_value(&mut c, value_type, limits)?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey { key });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) => u64::from(*a),
        Some(_) => return Err(GgufError::BadAlignmentType),
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment(alignment));
    }

    let mut raw_tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        let name = c.string("a tensor name", limits.max_key_len)?;
        let n_dims = c.u32("a tensor's dimension count")?;
        if !(1..=4).contains(&n_dims) {
            return Err(GgufError::BadDimensionCount { name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("a tensor dimension")?);
        }
        let type_id = c.u32("a tensor type")?;
        let offset = c.u64("a tensor offset")?;
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor { name });
        }
        raw_tensors.push((name, dims, type_id, offset));
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.checked_next_multiple_of(alignment).ok_or(GgufError::Overflow("the data offset"))?;
    let file_len = bytes.len() as u64;
    let available = file_len.saturating_sub(data_offset);

    let mut tensors = Vec::with_capacity(raw_tensors.len());
    for (name, dims, type_id, offset) in raw_tensors {
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownTensorType { name, type_id });
        };
        if dims.contains(&0) {
            return Err(GgufError::ZeroDimension { name });
        }
        if dims[0] % ggml_type.block_size() != 0 {
            return Err(GgufError::RaggedBlocks { name, ggml_type, ne0: dims[0], block: ggml_type.block_size() });
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or(GgufError::Overflow("a tensor's element count"))?;
        let size = ggml_type.bytes_for(elements).ok_or(GgufError::Overflow("a tensor's byte size"))?;
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor { name, offset, alignment });
        }
        let end = offset.checked_add(size).ok_or(GgufError::Overflow("a tensor's end"))?;
        if end > available {
            return Err(GgufError::TensorOutOfBounds { name, offset, size, available });
        }
        tensors.push(TensorInfo { name, dims, ggml_type, offset: data_offset + offset, size });
    }

    Ok(GgufFile::new(version, metadata, tensors, alignment, data_offset))
}

fn read_value(c: &mut Cursor<'_>, value_type: u32, limits: &Limits) -> Result<Value, GgufError> {
    Ok(match value_type {
        0 => Value::U8(c.u8("a u8 value")?),
        1 => Value::I8(c.u8("an i8 value")? as i8),
        2 => Value::U16(c.u16("a u16 value")?),
        3 => Value::I16(c.u16("an i16 value")? as i16),
        4 => Value::U32(c.u32("a u32 value")?),
        5 => Value::I32(c.u32("an i32 value")? as i32),
        6 => Value::F32(f32::from_bits(c.u32("an f32 value")?)),
        7 => Value::Bool(c.u8("a bool value")? != 0),
        8 => Value::String(c.string("a string value", limits.max_string_len)?),
        9 => Value::Array(read_array(c, limits, 1)?),
        10 => Value::U64(c.u64("a u64 value")?),
        11 => Value::I64(c.u64("an i64 value")? as i64),
        12 => Value::F64(f64::from_bits(c.u64("an f64 value")?)),
        other => return Err(GgufError::UnknownValueType(other)),
    })
}

fn read_array(c: &mut Cursor<'_>, limits: &Limits, depth: usize) -> Result<Array, GgufError> {
    if depth > limits.max_array_depth {
        return Err(GgufError::NestingTooDeep(limits.max_array_depth));
    }
    let element_type = c.u32("an array's element type")?;
    if element_type > 12 {
        return Err(GgufError::UnknownValueType(element_type));
    }
    let n = c.count("an array length", limits.max_array_len, min_size(element_type))?;
    // `n` is bounded by the bytes left, so these allocations are bounded by the input's size.
    macro_rules! collect {
        ($variant:ident, $read:expr) => {{
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                v.push($read);
            }
            Array::$variant(v)
        }};
    }
    Ok(match element_type {
        0 => collect!(U8, c.u8("an array element")?),
        1 => collect!(I8, c.u8("an array element")? as i8),
        2 => collect!(U16, c.u16("an array element")?),
        3 => collect!(I16, c.u16("an array element")? as i16),
        4 => collect!(U32, c.u32("an array element")?),
        5 => collect!(I32, c.u32("an array element")? as i32),
        6 => collect!(F32, f32::from_bits(c.u32("an array element")?)),
        7 => collect!(Bool, c.u8("an array element")? != 0),
        8 => collect!(String, c.string("an array string", limits.max_string_len)?),
        9 => collect!(Array, read_array(c, limits, depth + 1)?),
        10 => collect!(U64, c.u64("an array element")?),
        11 => collect!(I64, c.u64("an array element")? as i64),
        _ => collect!(F64, f64::from_bits(c.u64("an array element")?)),
    })
}
