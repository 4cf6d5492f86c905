use std::sync::Arc;

use futures_util::StreamExt;
use http::HeaderValue;
use oci_client::RegistryOperation;
use oci_client::errors::OciDistributionError;

use super::{RegistryOptions, classify, credentials_for, to_oci};
use crate::digest::Digest;
use crate::error::StoreError;
use crate::media;
use crate::progress::Progress;
use crate::reference::Reference;
use crate::store::Store;

/// Push a local model: blobs the registry lacks (streamed from disk, never held in memory), then
/// the manifest under the reference's tag or digest.
pub async fn push(
    store: &Store,
    reference: &Reference,
    options: &RegistryOptions,
    progress: Arc<dyn Progress>,
) -> Result<Digest, StoreError> {
    let (digest, manifest, _) = store.load(reference)?;
    let manifest_bytes = store.read_small_blob(&digest)?;
    let client = options.client(reference);
    let oref = to_oci(reference);
    let auth = credentials_for(reference.registry(), options)?.to_auth();
    client.auth(&oref, &auth, RegistryOperation::Push).await.map_err(|e| classify(reference, e))?;

    for desc in manifest.blobs() {
        if !store.has_blob(&desc.digest, desc.size) {
            return Err(StoreError::MissingBlob(desc.digest.clone()));
        }
        let digest_str = desc.digest.to_string();
        if client.blob_exists(&oref, &digest_str).await.map_err(|e| classify(reference, e))? {
            progress.note(&format!("{} already on the registry", desc.digest.short()));
            continue;
        }
        let path = store.blob_path(&desc.digest);
        let file = tokio::fs::File::open(&path).await.map_err(StoreError::io(format!("opening {}", path.display())))?;
        let label = desc.file_path().map(str::to_string).unwrap_or_else(|| desc.digest.short().to_string());
        progress.start(&label, desc.size, 0);
        let counter = progress.clone();
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
            let chunk = chunk.map_err(OciDistributionError::IoError)?;
            counter.advance(chunk.len() as u64);
            Ok(chunk)
        });
        let pushed = client.push_blob_stream(&oref, body, &digest_str, Some(desc.size)).await;
        progress.finish();
        pushed.map_err(|e| classify(reference, e))?;
    }
    let content_type = HeaderValue::from_static(media::OCI_MANIFEST);
    client.push_manifest_raw(&oref, manifest_bytes, content_type).await.map_err(|e| classify(reference, e))?;
    Ok(digest)
}
