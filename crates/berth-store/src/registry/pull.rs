use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use futures_util::StreamExt;
use oci_client::RegistryOperation;
use oci_client::client::BlobResponse;
use sha2::{Digest as _, Sha256};

use super::{RegistryError, RegistryOptions, classify, credentials_for, to_oci};
use crate::digest::Digest;
use crate::error::StoreError;
use crate::manifest::{Descriptor, Manifest};
use crate::progress::Progress;
use crate::reference::Reference;
use crate::store::Store;

/// What a pulled artifact must pass before it enters the store, beyond its digests and its
/// manifest's shape (berth-store knows nothing of running a model; the caller does: berth vets the
/// chat template here, since a template is code that every server of the model will run).
pub trait ArtifactCheck: Sync {
    /// `files` are the artifact's layers as (media type, path of the verified bytes); an `Err`
    /// says why the artifact is refused.
    fn check(&self, manifest: &Manifest, files: &[(String, std::path::PathBuf)]) -> Result<(), String>;
}

/// No checks beyond the store's own.
pub struct NoCheck;

impl ArtifactCheck for NoCheck {
    fn check(&self, _: &Manifest, _: &[(String, std::path::PathBuf)]) -> Result<(), String> {
        Ok(())
    }
}

/// Pull a model: manifest first (streamed with its size limit, checked before any blob is
/// fetched), then every blob that is not present whole and verified (a damaged one is fetched
/// again), the config parsed and `check` passed; only then does anything enter the store, and the
/// reference is set last. A pull that fails adds nothing.
pub async fn pull(
    store: &Store,
    reference: &Reference,
    options: &RegistryOptions,
    progress: Arc<dyn Progress>,
    check: &dyn ArtifactCheck,
) -> Result<Digest, StoreError> {
    let client = options.client(reference);
    let oref = to_oci(reference);
    let credentials = credentials_for(reference.registry(), options)?;
    let token = client
        .auth(&oref, &credentials.to_auth(), RegistryOperation::Pull)
        .await
        .map_err(|e| classify(reference, e))?;
    let bytes = super::document::fetch_manifest(reference, &oref, options, &credentials, token).await?;
    let manifest_digest = Digest::of(&bytes);
    if let Some(want) = reference.digest()
        && want != &manifest_digest
    {
        return Err(StoreError::DigestMismatch { expected: want.clone(), actual: manifest_digest });
    }
    let manifest = Manifest::parse(&bytes)?;

    let _writing = store.writer_lock()?;
    // Blobs to move into the store once everything passed, and every layer's verified bytes.
    let mut fetched: Vec<Digest> = Vec::new();
    let mut files = Vec::new();
    let refuse = |fetched: &[Digest], reason: String| {
        // A refused artifact is not resumed later: its downloads go.
        for digest in fetched {
            let _ = fs::remove_file(store.partial_path(digest));
        }
        StoreError::Refused { reference: reference.familiar(), reason }
    };
    for (i, desc) in manifest.unique_blobs().into_iter().enumerate() {
        let present = match store.verify_blob(&desc.digest, desc.size) {
            Ok(()) => true,
            Err(StoreError::MissingBlob(_) | StoreError::SizeMismatch { .. }) => false,
            Err(StoreError::DigestMismatch { .. }) => {
                progress
                    .warn(&format!("blob {} is damaged in the local store; fetching it again", desc.digest.short()));
                false
            }
            Err(e) => return Err(e),
        };
        let path = if present {
            progress.note(&format!("{} already present", desc.digest.short()));
            store.blob_path(&desc.digest)
        } else {
            fetch_blob(&client, &oref, reference, store, desc, progress.as_ref()).await?;
            fetched.push(desc.digest.clone());
            store.partial_path(&desc.digest)
        };
        if i == 0 {
            // The config comes first: one that does not parse stops the pull before the weights.
            let config = crate::store::read_bounded(&path)?;
            if let Err(e) = serde_json::from_slice::<crate::config::ModelConfigFile>(&config) {
                return Err(refuse(&fetched, format!("its model config is not valid: {e}")));
            }
        } else {
            files.push((desc.media_type.clone(), path));
        }
    }
    if let Err(reason) = check.check(&manifest, &files) {
        return Err(refuse(&fetched, reason));
    }
    for digest in &fetched {
        store.publish_partial(digest)?;
    }
    store.put_bytes(&bytes)?;
    store.set_ref(reference, &manifest_digest)?;
    Ok(manifest_digest)
}

/// Download one blob into `incoming/<hex>.partial`, resuming what an earlier pull left there, and
/// verify it there.
async fn fetch_blob(
    client: &oci_client::Client,
    oref: &oci_client::Reference,
    reference: &Reference,
    store: &Store,
    desc: &Descriptor,
    progress: &dyn Progress,
) -> Result<(), StoreError> {
    let partial = store.partial_path(&desc.digest);
    let io_err = |what: &str| StoreError::io(format!("{what} {}", partial.display()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .map_err(io_err("opening"))?;
    let mut have = file.metadata().map_err(io_err("reading"))?.len();
    let mut hasher = Sha256::new();
    if have > desc.size {
        file.set_len(0).map_err(io_err("truncating"))?;
        have = 0;
    }
    if have > 0 {
        // Re-hash what is there: the digest must cover every byte, old and new.
        let mut buf = vec![0u8; 1 << 20];
        file.seek(SeekFrom::Start(0)).map_err(io_err("reading"))?;
        let mut left = have;
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20) as usize]).map_err(io_err("reading"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
    }
    file.seek(SeekFrom::Start(have)).map_err(io_err("seeking in"))?;

    let label = desc.file_path().map(str::to_string).unwrap_or_else(|| desc.digest.short().to_string());
    progress.start(&label, desc.size, have);
    let digest_str = desc.digest.to_string();
    let mut stream_error = None;
    if have < desc.size {
        let response = if have > 0 {
            client.pull_blob_stream_partial(oref, digest_str.as_str(), have, None).await
        } else {
            client.pull_blob_stream(oref, digest_str.as_str()).await.map(BlobResponse::Full)
        };
        let mut stream = match response.map_err(|e| classify(reference, e))? {
            BlobResponse::Partial(s) => s.stream,
            BlobResponse::Full(s) => {
                // The registry ignored the Range request: start over from byte zero.
                if have > 0 {
                    file.set_len(0).map_err(io_err("truncating"))?;
                    file.seek(SeekFrom::Start(0)).map_err(io_err("seeking in"))?;
                    hasher = Sha256::new();
                    have = 0;
                    progress.start(&label, desc.size, 0);
                }
                s.stream
            }
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    stream_error = Some(e.to_string());
                    break;
                }
            };
            if have + chunk.len() as u64 > desc.size {
                drop(file);
                let _ = fs::remove_file(&partial);
                progress.finish();
                return Err(RegistryError::Oversized {
                    registry: reference.registry().to_string(),
                    digest: digest_str,
                    size: desc.size,
                }
                .into());
            }
            file.write_all(&chunk).map_err(io_err("writing"))?;
            hasher.update(&chunk);
            have += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
    }
    progress.finish();
    file.sync_all().map_err(io_err("flushing"))?;
    drop(file);
    if have < desc.size {
        // Keep the partial file: the next pull continues from here.
        return Err(RegistryError::Interrupted {
            digest: digest_str,
            done: have,
            total: desc.size,
            detail: stream_error.unwrap_or_else(|| "the connection closed early".into()),
        }
        .into());
    }
    let actual = Digest::from_hasher(hasher);
    if actual != desc.digest {
        let _ = fs::remove_file(&partial);
        return Err(StoreError::DigestMismatch { expected: desc.digest.clone(), actual });
    }
    Ok(())
}
