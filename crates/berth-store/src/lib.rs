//! berth's model store: models as OCI artifacts in Docker Model Runner's format.
//!
//! - [`Store`]: the content-addressed local store under `$BERTH_HOME/models` (blobs by sha256,
//!   manifests, references), crash-safe: a blob is visible only after its bytes were verified.
//! - [`package`]: GGUF files and safetensors folders into artifacts, config read from the files.
//! - [`registry`]: pull and push against any OCI registry, resuming interrupted downloads.
//!
//! ```no_run
//! # async fn demo() -> Result<(), berth_store::StoreError> {
//! use std::sync::Arc;
//! use berth_store::{Reference, Store, progress::NoProgress, registry};
//!
//! let store = Store::open(&Store::default_home())?;
//! let reference = Reference::parse("ai/smollm2")?;
//! let options = registry::RegistryOptions::from_env();
//! registry::pull(&store, &reference, &options, Arc::new(NoProgress), &registry::NoCheck).await?;
//! for model in store.list()? {
//!     println!("{} {}", model.reference, model.parameters);
//! }
//! # Ok(()) }
//! ```

mod blobs;
pub mod config;
pub mod digest;
mod error;
pub mod manifest;
pub mod media;
pub mod package;
pub mod progress;
pub mod reference;
pub mod registry;
mod stamp;
mod store;

pub use blobs::BlobWriter;
pub use digest::Digest;
pub use error::StoreError;
pub use reference::Reference;
pub use store::{DiskUsage, GcReport, GgufModel, LockGuard, ModelDetails, ModelSummary, Store};
