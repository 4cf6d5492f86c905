use std::path::PathBuf;

use berth_formats::gguf::GgufError;
use berth_formats::safetensors::SafetensorsError;

use crate::digest::{Digest, DigestError};
use crate::manifest::ManifestError;
use crate::reference::ReferenceError;
use crate::registry::RegistryError;

/// Everything that can go wrong in the store, each with a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("model {0} is not in the local store (see `berth list`, or fetch it with `berth pull {0}`)")]
    NotFound(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("blob {expected} has the wrong content: its bytes hash to {actual}; nothing was added to the store")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} should be {expected} bytes but is {actual}; nothing was added to the store")]
    SizeMismatch { digest: Digest, expected: u64, actual: u64 },
    #[error("blob {0} is missing from the local store; pull the model again")]
    MissingBlob(Digest),
    #[error("the store index {path} is damaged ({reason}); move it aside and pull or package the models again")]
    CorruptIndex { path: PathBuf, reason: String },
    #[error("{path} is not a usable GGUF file: {source}")]
    Gguf { path: PathBuf, source: GgufError },
    #[error("{path} is not a usable safetensors file: {source}")]
    Safetensors { path: PathBuf, source: SafetensorsError },
    #[error("cannot package {path}: {reason}")]
    Package { path: PathBuf, reason: String },
    #[error("the model config blob is not valid: {0}")]
    Config(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{reference} was refused and nothing was added to the store: {reason}")]
    Refused { reference: String, reason: String },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}
