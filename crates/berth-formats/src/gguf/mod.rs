//! GGUF, llama.cpp's model file: a header, typed metadata, tensor descriptions, then aligned tensor data.
//!
//! [`GgufFile::parse`] reads the header, metadata and tensor table from a byte slice (usually a
//! memory map of the whole file) and checks every tensor's data lies inside the slice. It borrows
//! nothing: tensor data is addressed by offsets into the same slice.

mod ggml_type;
mod reader;
mod value;
mod writer;

pub use ggml_type::{GgmlType, file_type_name};
pub use reader::Limits;
pub use value::{Array, Value};
pub use writer::GgufBuilder;

use std::collections::HashMap;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Why a byte string is not a GGUF file berth can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: it does not start with the bytes \"GGUF\"")]
    BadMagic,
    #[error("GGUF version {0} is not supported (berth reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("the file ends early: {what} needs {needed} bytes at offset {offset}, but the file has {len}")]
    Truncated { what: &'static str, offset: u64, needed: u64, len: u64 },
    #[error("{what} is {value}, more than the limit of {limit}")]
    TooLarge { what: &'static str, value: u64, limit: u64 },
    #[error("metadata key {key:?} appears twice")]
    DuplicateKey { key: String },
    #[error("tensor {name:?} appears twice")]
    DuplicateTensor { name: String },
    #[error("metadata key at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },
    #[error("unknown metadata value type {0}")]
    UnknownValueType(u32),
    #[error("metadata arrays nest deeper than {0} levels")]
    NestingTooDeep(usize),
    #[error("tensor {name:?} has {n_dims} dimensions; GGUF allows 1 to 4")]
    BadDimensionCount { name: String, n_dims: u32 },
    #[error("tensor {name:?} has a zero-sized dimension")]
    ZeroDimension { name: String },
    #[error("tensor {name:?} has unknown tensor type {type_id}")]
    UnknownTensorType { name: String, type_id: u32 },
    #[error("tensor {name:?} of type {ggml_type} has {ne0} columns, not a multiple of the block size {block}")]
    RaggedBlocks { name: String, ggml_type: GgmlType, ne0: u64, block: u64 },
    #[error("general.alignment is {0}; it must be a non-zero power of two")]
    BadAlignment(u64),
    #[error("general.alignment must be an unsigned 32-bit integer")]
    BadAlignmentType,
    #[error("tensor {name:?} at offset {offset} is not aligned to {alignment} bytes")]
    MisalignedTensor { name: String, offset: u64, alignment: u64 },
    #[error(
        "tensor {name:?} ({size} bytes at data offset {offset}) extends past the end of the file ({available} data bytes)"
    )]
    TensorOutOfBounds { name: String, offset: u64, size: u64, available: u64 },
    #[error("size arithmetic overflowed while reading {0}")]
    Overflow(&'static str),
}

/// One tensor's description: where its bytes are and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (GGML's `ne`): a `[rows, cols]` matrix is stored as `[cols, rows]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the tensor's bytes from the start of the file (already absolute).
    pub offset: u64,
    /// Length of the tensor's bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements (the product of the dimensions).
    pub fn element_count(&self) -> u64 {
        // Checked at parse time: the product fits, because its bytes fit in the file.
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and the tensor table. Tensor data stays in the caller's bytes.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset where tensor data begins.
    pub data_offset: u64,
    index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Parse with the default [`Limits`].
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::parse_with(bytes, &Limits::default())
    }

    /// Parse with explicit limits.
    pub fn parse_with(bytes: &[u8], limits: &Limits) -> Result<Self, GgufError> {
        reader::parse(bytes, limits)
    }

    pub(crate) fn new(
        version: u32,
        metadata: Vec<(String, Value)>,
        tensors: Vec<TensorInfo>,
        alignment: u64,
        data_offset: u64,
    ) -> Self {
        let index = metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        let tensor_index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Self { version, metadata, tensors, alignment, data_offset, index, tensor_index }
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A string metadata value by key.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// An integer metadata value by key, whatever its integer width.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// A tensor's description by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Total number of weights in all tensors.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::element_count).fold(0u64, u64::saturating_add)
    }

    /// The quantisation in llama.cpp's words ("Q4_1", "Q4_K_M"): from `general.file_type` when
    /// present, otherwise the type holding most of the weights.
    pub fn quantization(&self) -> String {
        if let Some(name) = self.get_u64("general.file_type").and_then(file_type_name) {
            return name.to_string();
        }
        let mut by_type: HashMap<GgmlType, u64> = HashMap::new();
        for t in &self.tensors {
            *by_type.entry(t.ggml_type).or_default() += t.size;
        }
        by_type
            .into_iter()
            .max_by_key(|&(ty, size)| (size, ty.id()))
            .map(|(ty, _)| ty.to_string())
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// The model's trained context length, `<arch>.context_length`.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.get_u64(&format!("{arch}.context_length"))
    }
}
