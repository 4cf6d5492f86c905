//! safetensors: an 8-byte little-endian header length, a JSON header describing each tensor's dtype,
//! shape and byte range, then the tensor bytes.
//!
//! [`SafetensorsHeader::parse`] needs only the header bytes plus the file's total length, so a
//! 90 MB file is checked by reading a few KiB. It refuses headers over [`MAX_HEADER_LEN`], byte ranges
//! that are not contiguous from zero or run past the file, shapes whose size disagrees with their
//! byte range, unknown dtypes and duplicate names.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

/// The largest header berth reads (the format's own reference reader uses the same cap).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Why bytes are not a safetensors file berth accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetensorsError {
    #[error("the file is {0} bytes, too short for the 8-byte header length")]
    TooShort(u64),
    #[error("the header claims {claimed} bytes but at most {limit} are allowed here")]
    HeaderTooLarge { claimed: u64, limit: u64 },
    #[error("the header is not valid JSON of the safetensors shape: {0}")]
    BadJson(String),
    #[error("tensor {name:?} has unknown dtype {dtype:?}")]
    UnknownDtype { name: String, dtype: String },
    #[error("tensor {name:?} appears twice")]
    DuplicateTensor { name: String },
    #[error("tensor {name:?} has byte range {begin}..{end}, which is backwards")]
    BackwardsRange { name: String, begin: u64, end: u64 },
    #[error(
        "tensor {name:?} has shape {shape:?} of {dtype}, which needs {expected} bytes, but its range holds {actual}"
    )]
    SizeMismatch { name: String, shape: Vec<u64>, dtype: String, expected: u64, actual: u64 },
    #[error("tensor data is not contiguous: tensor {name:?} starts at {begin}, expected {expected}")]
    NotContiguous { name: String, begin: u64, expected: u64 },
    #[error("the tensors cover {covered} data bytes but the file holds {available}")]
    DataLengthMismatch { covered: u64, available: u64 },
    #[error("size arithmetic overflowed for tensor {0:?}")]
    Overflow(String),
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Absolute byte offsets in the file.
    pub begin: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn element_count(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A checked safetensors header.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// Tensors in file order (sorted by offset).
    pub tensors: Vec<TensorEntry>,
    /// The optional `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset of the first data byte (8 + header length).
    pub data_offset: u64,
}

/// Bytes per element for each safetensors dtype.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// How many header bytes to read: the value of the first 8 bytes, checked against the cap and the file.
pub fn header_len(prefix: &[u8; 8], file_len: u64) -> Result<u64, SafetensorsError> {
    let n = u64::from_le_bytes(*prefix);
    let limit = MAX_HEADER_LEN.min(file_len.saturating_sub(8));
    if n > limit {
        return Err(SafetensorsError::HeaderTooLarge { claimed: n, limit });
    }
    Ok(n)
}

impl SafetensorsHeader {
    /// Parse a whole file held in memory.
    pub fn parse(bytes: &[u8]) -> Result<Self, SafetensorsError> {
        let file_len = bytes.len() as u64;
        let prefix: [u8; 8] =
            bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or(SafetensorsError::TooShort(file_len))?;
        let n = header_len(&prefix, file_len)?;
        // n <= file_len - 8, so the slice is in bounds.
        Self::parse_header(&bytes[8..8 + n as usize], file_len)
    }

    /// Parse the JSON header (the bytes after the 8-byte length) of a file of `file_len` bytes.
    pub fn parse_header(json: &[u8], file_len: u64) -> Result<Self, SafetensorsError> {
        let data_offset = 8 + json.len() as u64;
        let Entries(entries) = serde_json::from_slice(json).map_err(|e| SafetensorsError::BadJson(e.to_string()))?;
        let mut metadata = BTreeMap::new();
        let mut seen = HashSet::new();
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            if !seen.insert(name.clone()) {
                return Err(SafetensorsError::DuplicateTensor { name });
            }
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| SafetensorsError::BadJson(format!("__metadata__ must map strings to strings: {e}")))?;
                continue;
            }
            let raw: RawTensor = serde_json::from_value(value)
                .map_err(|e| SafetensorsError::BadJson(format!("tensor {name:?}: {e}")))?;
            let Some(size) = dtype_size(&raw.dtype) else {
                return Err(SafetensorsError::UnknownDtype { name, dtype: raw.dtype });
            };
            let [begin, end] = raw.data_offsets;
            if end < begin {
                return Err(SafetensorsError::BackwardsRange { name, begin, end });
            }
            let expected = raw
                .shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| SafetensorsError::Overflow(name.clone()))?;
            if expected != end - begin {
                return Err(SafetensorsError::SizeMismatch {
                    name,
                    shape: raw.shape,
                    dtype: raw.dtype,
                    expected,
                    actual: end - begin,
                });
            }
            tensors.push(TensorEntry { name, dtype: raw.dtype, shape: raw.shape, begin, end });
        }
        tensors.sort_by_key(|t| (t.begin, t.end));
        let mut expected = 0u64;
        for t in &tensors {
            if t.begin != expected {
                return Err(SafetensorsError::NotContiguous { name: t.name.clone(), begin: t.begin, expected });
            }
            expected = t.end;
        }
        let available = file_len.saturating_sub(data_offset);
        if expected != available {
            return Err(SafetensorsError::DataLengthMismatch { covered: expected, available });
        }
        for t in &mut tensors {
            // Both fit: they are at most `available`, and data_offset + available = file_len.
            t.begin += data_offset;
            t.end += data_offset;
        }
        Ok(Self { tensors, metadata, data_offset })
    }

    /// Total number of weights.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorEntry::element_count).fold(0, u64::saturating_add)
    }

    /// The dtypes present, most bytes first ("F32", or "BF16,F32" for a mixed file).
    pub fn dtypes(&self) -> Vec<String> {
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        for t in &self.tensors {
            *by.entry(&t.dtype).or_default() += t.end - t.begin;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.into_iter().map(|(d, _)| d.to_string()).collect()
    }
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's top-level object as a list, so duplicate names are seen rather than silently merged.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    #[test]
    fn reads_a_well_formed_file() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}"#;
        let st = SafetensorsHeader::parse(&file(h, 16)).unwrap();
        assert_eq!(st.tensors.len(), 2);
        assert_eq!(st.tensors[0].name, "a");
        assert_eq!(st.tensors[0].begin, 8 + h.len() as u64);
        assert_eq!(st.metadata["format"], "pt");
        assert_eq!(st.parameter_count(), 6);
    }

    #[test]
    fn refuses_lies_and_gaps() {
        let cases = [
            (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "SizeMismatch"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12, "NotContiguous"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 100, "DataLengthMismatch"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4, "DataLengthMismatch"),
            (r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, 8, "UnknownDtype"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8, "BackwardsRange"),
            (r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, 8, "Overflow"),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "DuplicateTensor",
            ),
            (r#"[1,2]"#, 0, "BadJson"),
        ];
        for (header, data, want) in cases {
            let err = SafetensorsHeader::parse(&file(header, data)).unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{header}: got {err:?}, want {want}");
        }
    }

    #[test]
    fn refuses_a_header_longer_than_the_file_or_the_cap() {
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(SafetensorsHeader::parse(&bytes), Err(SafetensorsError::HeaderTooLarge { .. })));
        assert!(matches!(SafetensorsHeader::parse(&[1, 2, 3]), Err(SafetensorsError::TooShort(3))));
        assert!(matches!(
            header_len(&(MAX_HEADER_LEN + 1).to_le_bytes(), u64::MAX),
            Err(SafetensorsError::HeaderTooLarge { .. })
        ));
    }
}
