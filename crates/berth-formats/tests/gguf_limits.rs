//! The GGUF reader against hostile files: each one a clear error, never a panic or a huge allocation.

use berth_formats::gguf::{GgmlType, GgufBuilder, GgufError, GgufFile, Value};

fn small_model() -> GgufBuilder {
    GgufBuilder::new()
        .metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.context_length", Value::U32(2048))
        .tensor("a", &[32, 2], GgmlType::Q8_0, vec![7u8; 68])
        .tensor("b", &[4], GgmlType::F32, vec![1u8; 16])
}

/// Offset of the first metadata string's length field: magic, version, two counts, key.
fn first_value_len_offset(key: &str) -> usize {
    4 + 4 + 8 + 8 + 8 + key.len() + 4
}

#[test]
fn a_valid_file_round_trips() {
    let bytes = small_model().build();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.context_length(), Some(2048));
    assert_eq!(f.tensors.len(), 2);
    let a = f.tensor("a").unwrap();
    assert_eq!(&bytes[a.offset as usize..(a.offset + a.size) as usize], &[7u8; 68][..]);
    assert_eq!(f.parameter_count(), 68);
    assert_eq!(f.quantization(), "Q8_0");
}

#[test]
fn a_truncated_file_is_refused_at_every_length() {
    let bytes = small_model().build();
    for len in 0..bytes.len() {
        let result = GgufFile::parse(&bytes[..len]);
        assert!(result.is_err(), "a file cut to {len} of {} bytes must be refused", bytes.len());
    }
}

#[test]
fn only_the_magic() {
    let err = GgufFile::parse(b"GGUF").unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("ends early"), "{err}");
    assert_eq!(GgufFile::parse(b"GGML\x03\0\0\0").unwrap_err(), GgufError::BadMagic);
}

#[test]
fn a_string_length_of_two_to_the_sixtieth() {
    let key = "general.name";
    let mut bytes = GgufBuilder::new().metadata(key, Value::String("x".into())).build();
    let at = first_value_len_offset(key);
    bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let err = GgufFile::parse(&bytes).unwrap_err();
    assert!(matches!(err, GgufError::TooLarge { value, .. } if value == 1 << 60), "{err}");
}

#[test]
fn two_to_the_fortieth_tensors() {
    let mut bytes = small_model().build();
    bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = GgufFile::parse(&bytes).unwrap_err();
    assert!(matches!(err, GgufError::TooLarge { what: "the tensor count", .. }), "{err}");
}

#[test]
fn a_huge_metadata_count_and_array() {
    let mut bytes = small_model().build();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::TooLarge { .. })));

    let key = "tokenizer.ggml.tokens";
    let mut bytes =
        GgufBuilder::new().metadata(key, Value::Array(berth_formats::gguf::Array::String(vec!["a".into()]))).build();
    let len_at = first_value_len_offset(key) + 4; // after the element type
    bytes[len_at..len_at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::TooLarge { .. })));
}

#[test]
fn nine_dimensions() {
    let bytes = GgufBuilder::new().raw_tensor("t", &[1; 9], 0, 0).build();
    let err = GgufFile::parse(&bytes).unwrap_err();
    assert!(matches!(err, GgufError::BadDimensionCount { n_dims: 9, .. }), "{err}");
}

#[test]
fn alignment_zero_and_not_a_power_of_two() {
    for (a, want) in [(0u32, 0u64), (48, 48)] {
        let bytes = small_model().metadata("general.alignment", Value::U32(a)).build();
        assert_eq!(GgufFile::parse(&bytes).unwrap_err(), GgufError::BadAlignment(want));
    }
    let bytes = small_model().metadata("general.alignment", Value::U64(32)).build();
    assert_eq!(GgufFile::parse(&bytes).unwrap_err(), GgufError::BadAlignmentType);
}

#[test]
fn a_tensor_offset_past_the_end() {
    let bytes = GgufBuilder::new().raw_tensor("w", &[4], 0, 1 << 20).build();
    let err = GgufFile::parse(&bytes).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    let bytes = GgufBuilder::new().raw_tensor("w", &[4], 0, u64::MAX - 31).build();
    assert!(GgufFile::parse(&bytes).is_err());
}

#[test]
fn overflowing_shapes_unknown_types_and_duplicates() {
    let bytes = GgufBuilder::new().raw_tensor("w", &[u64::MAX, u64::MAX], 0, 0).build();
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::Overflow(_))));
    let bytes = GgufBuilder::new().raw_tensor("w", &[4], 99, 0).build();
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::UnknownTensorType { type_id: 99, .. })));
    let bytes = GgufBuilder::new().raw_tensor("w", &[33], GgmlType::Q4_0.id(), 0).build();
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::RaggedBlocks { .. })));
    let bytes = GgufBuilder::new().raw_tensor("w", &[4], 0, 0).raw_tensor("w", &[4], 0, 32).build();
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::DuplicateTensor { .. })));
    let bytes = small_model().metadata("general.architecture", Value::String("x".into())).build();
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::DuplicateKey { .. })));
    let bytes = GgufBuilder::new().raw_tensor("w", &[4, 0], 0, 0).build();
    assert!(matches!(GgufFile::parse(&bytes), Err(GgufError::ZeroDimension { .. })));
}

#[test]
fn unsupported_versions_and_value_types() {
    let mut bytes = small_model().build();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(GgufFile::parse(&bytes).unwrap_err(), GgufError::UnsupportedVersion(1));
    let key = "k";
    let mut bytes = GgufBuilder::new().metadata(key, Value::U8(1)).build();
    let at = first_value_len_offset(key) - 4;
    bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert_eq!(GgufFile::parse(&bytes).unwrap_err(), GgufError::UnknownValueType(77));
}

#[test]
fn the_real_smollm2_file() {
    let path = berth_testkit::models::smollm2_gguf();
    let bytes = std::fs::read(&path).unwrap();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.metadata.len(), 33, "FINDINGS.md: 33 metadata keys");
    assert_eq!(f.tensors.len(), 272, "FINDINGS.md: 272 tensors");
    let q41 = f.tensors.iter().filter(|t| t.ggml_type == GgmlType::Q4_1).count();
    assert_eq!(q41, 210);
    assert_eq!(f.tensor("token_embd.weight").map(|t| t.ggml_type), Some(GgmlType::Q8_0));
    assert!(f.tensor("output.weight").is_none(), "SmolLM2 ties its output to the embedding");
    assert_eq!(f.context_length(), Some(8192));
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("smollm"));
    assert_eq!(f.quantization(), "Q4_1");
}
