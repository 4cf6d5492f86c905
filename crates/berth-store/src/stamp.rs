//! Proof that a blob was hashed and found right, kept beside the store as `verified/<hex>`: the
//! blob file's size, modification and change times, inode and device at that moment. A later load
//! whose blob still shows the same figures skips hashing it again — the difference between
//! starting a 4 GB model at once and after seconds of reading, and between `/api/tags` answering
//! at once and hashing every model it lists.
//!
//! Why this is safe: any write to the file moves its change time (ctime), which no program can set
//! back (`utime` sets only the access and modification times), and replacing the file changes its
//! inode. A file changed by other means than writing through the file system (a disk that rots)
//! is what `berth verify` is for: it always hashes. A stamp that cannot be read or written only
//! costs a hash.

use std::fs::{self, Metadata};
use std::path::{Path, PathBuf};

/// The figures of a file that change whenever its bytes do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp(String);

impl FileStamp {
    #[cfg(unix)]
    pub(crate) fn of(meta: &Metadata) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        Some(FileStamp(format!(
            "v1 {} {}.{} {}.{} {} {}",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.ino(),
            meta.dev()
        )))
    }

    /// Without a change time that programs cannot set, every load hashes.
    #[cfg(not(unix))]
    pub(crate) fn of(_meta: &Metadata) -> Option<FileStamp> {
        None
    }
}

/// The stamps of one store: `verified/<hex>` under its root.
pub(crate) struct Stamps {
    dir: PathBuf,
}

impl Stamps {
    pub(crate) fn new(store_root: &Path) -> Stamps {
        Stamps { dir: store_root.join("verified") }
    }

    fn path(&self, hex: &str) -> PathBuf {
        self.dir.join(hex)
    }

    /// Whether the blob named `hex` was found right when it looked as it does now.
    pub(crate) fn holds(&self, hex: &str, now: &FileStamp) -> bool {
        // A stamp is one short line; anything longer is not ours.
        match fs::read(self.path(hex)) {
            Ok(bytes) if bytes.len() <= 256 => bytes == now.0.as_bytes(),
            _ => false,
        }
    }

    /// Record that the blob named `hex` was found right while it looked like `stamp`. Written to a
    /// temporary name and renamed, so a reader sees the whole stamp or none.
    pub(crate) fn record(&self, hex: &str, stamp: &FileStamp) {
        let written = fs::create_dir_all(&self.dir).and_then(|()| {
            let tmp = self.dir.join(format!(".{hex}.{}", std::process::id()));
            fs::write(&tmp, stamp.0.as_bytes())?;
            fs::rename(&tmp, self.path(hex))
        });
        // A store on a read-only medium keeps no stamps: each load hashes, as before.
        let _ = written;
    }

    /// Forget a blob's stamp (its file is gone or was found wrong).
    pub(crate) fn forget(&self, hex: &str) {
        let _ = fs::remove_file(self.path(hex));
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreError};

    fn store() -> (tempfile::TempDir, Store) {
        let home = tempfile::tempdir().expect("temp dir");
        let store = Store::open(home.path()).expect("store");
        (home, store)
    }

    #[test]
    fn a_blob_found_right_is_stamped_and_a_changed_one_is_hashed_again() {
        let (_home, store) = store();
        let bytes = vec![7u8; 4096];
        let digest = store.put_bytes(&bytes).expect("blob");
        let stamp = store.root().join("verified").join(digest.hex());
        store.verify_blob_once(&digest, 4096).expect("a right blob");
        assert!(stamp.is_file(), "a blob found right is stamped");
        store.verify_blob_once(&digest, 4096).expect("unchanged: still right");

        // Same length, other bytes: the write moves the change time, so the hash runs and fails.
        let path = store.blob_path(&digest);
        let mut perms = std::fs::metadata(&path).expect("meta").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).expect("writable");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, vec![8u8; 4096]).expect("damage");
        let err = store.verify_blob_once(&digest, 4096).expect_err("a damaged blob is caught");
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err:?}");
        assert!(!stamp.exists(), "a damaged blob's stamp is forgotten");
    }

    #[test]
    fn a_stamp_that_does_not_match_the_file_is_not_trusted() {
        let (_home, store) = store();
        let digest = store.put_bytes(b"weights").expect("blob");
        store.verify_blob_once(&digest, 7).expect("right");
        // A stamp written for some other file (or edited by hand) is ignored: the hash runs.
        let stamp = store.root().join("verified").join(digest.hex());
        std::fs::write(&stamp, "v1 7 0.0 0.0 1 1").expect("stamp");
        let path = store.blob_path(&digest);
        let mut perms = std::fs::metadata(&path).expect("meta").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).expect("writable");
        std::fs::write(&path, b"WEIGHTS").expect("damage");
        assert!(store.verify_blob_once(&digest, 7).is_err(), "the hash ran and found the damage");
    }
}
