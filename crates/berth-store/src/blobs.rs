//! Writing blobs so that a blob is visible under its digest only once its bytes are verified:
//! bytes go to a temporary file, are hashed as they are written, flushed to disk, then renamed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::StoreError;

/// A blob being written. Dropping it without `commit` removes the temporary file.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    blobs_dir: PathBuf,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    pub(crate) fn create(tmp_dir: &Path, blobs_dir: &Path) -> Result<BlobWriter, StoreError> {
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(tmp_dir)
            .map_err(StoreError::io(format!("creating a temporary file in {}", tmp_dir.display())))?;
        let (file, tmp) =
            tmp.keep().map_err(|e| StoreError::Io { context: "keeping a temporary file".into(), source: e.error })?;
        Ok(BlobWriter { file: Some(file), tmp, blobs_dir: blobs_dir.to_path_buf(), hasher: Sha256::new(), len: 0 })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Verify against `expected` (when given), flush, and make the blob visible under its digest.
    pub fn commit(mut self, expected: Option<(&Digest, u64)>) -> Result<Digest, StoreError> {
        let digest = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if let Some((want, size)) = expected {
            if self.len != size {
                return Err(StoreError::SizeMismatch { digest: want.clone(), expected: size, actual: self.len });
            }
            if &digest != want {
                return Err(StoreError::DigestMismatch { expected: want.clone(), actual: digest });
            }
        }
        let file = self.file.take().ok_or_else(|| StoreError::Io {
            context: "committing a blob twice".into(),
            source: io::Error::other("already committed"),
        })?;
        file.sync_all().map_err(StoreError::io("flushing a blob to disk"))?;
        drop(file);
        let dest = self.blobs_dir.join(digest.hex());
        publish(&self.tmp, &dest)?;
        Ok(digest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("blob already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Uncommitted or failed: the temporary file goes. Committed: it was renamed away already.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Rename a verified, flushed file to its final name and flush the directory entry.
pub(crate) fn publish(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(StoreError::io(format!("moving a verified blob into {}", to.display())))?;
    if let Some(dir) = to.parent() {
        // Flushing the directory makes the rename itself durable; where a filesystem cannot, the
        // blob is still whole, only maybe not yet visible after a power cut.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
