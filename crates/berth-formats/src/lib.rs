//! Model file formats, read safely.
//!
//! Model files come from strangers: registries, downloads, users' disks. The readers here treat every
//! byte as hostile: every length is bounded by the bytes that are left and by a hard cap, every
//! offset is checked against the file, arithmetic is checked, and no input makes them panic or
//! allocate more than a small multiple of the input's size.
//!
//! ```
//! use berth_formats::gguf::{GgufBuilder, GgufFile, Value};
//!
//! let bytes = GgufBuilder::new()
//!     .metadata("general.architecture", Value::String("llama".into()))
//!     .build();
//! let file = GgufFile::parse(&bytes).unwrap();
//! assert_eq!(file.architecture(), Some("llama"));
//! ```

pub mod gguf;
pub mod safetensors;
