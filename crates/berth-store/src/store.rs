//! The local store under `$BERTH_HOME/models`:
//!
//! ```text
//! blobs/sha256/<hex>        every blob (weights, configs, manifests), named by its verified digest
//! incoming/<hex>.partial    downloads in progress, kept so an interrupted pull resumes
//! tmp/                      files being written; never read
//! verified/<hex>            stamps of blobs found right at load, so unchanged ones are not hashed again
//! index.json                references (tags and pinned digests) → manifest digest
//! index.lock, gc.lock       advisory locks between berth processes
//! ```
//!
//! Writers (pull, package) hold `gc.lock` shared until their manifest is tagged, and garbage
//! collection holds it exclusively, so a blob written but not yet referenced is never collected.
//! For the same reason, whatever garbage collection finds in `tmp/` was left by a process that
//! died; it goes. Partial downloads in `incoming/` go when no pull touched them for a week.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::blobs::{BlobWriter, publish};
use crate::config::ModelConfigFile;
use crate::digest::Digest;
use crate::error::StoreError;
use crate::manifest::{MAX_MANIFEST_BYTES, Manifest};
use crate::reference::Reference;
use crate::stamp::{FileStamp, Stamps};

pub struct Store {
    root: PathBuf,
}

/// A model in the store, as `berth list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub reference: String,
    pub digest: Digest,
    pub format: String,
    pub architecture: String,
    pub parameters: String,
    pub quantization: String,
    pub size: u64,
    pub created: Option<String>,
}

/// What `berth inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDetails {
    pub reference: String,
    pub digest: Digest,
    pub manifest: Manifest,
    pub config: ModelConfigFile,
}

/// A runnable GGUF model from the store.
#[derive(Debug, Clone)]
pub struct GgufModel {
    pub path: PathBuf,
    pub chat_template: Option<String>,
    pub context_size: Option<u64>,
}

/// What garbage collection removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub blobs_removed: u64,
    /// Partial downloads and temporary files removed.
    pub leftovers_removed: u64,
    pub bytes_freed: u64,
}

/// What `berth df` shows.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DiskUsage {
    pub models: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Bytes in blobs no reference reaches (freed by the next `berth rm` or gc).
    pub unreferenced_bytes: u64,
    /// Bytes of interrupted downloads waiting to be resumed.
    pub partial_bytes: u64,
    /// Bytes of files being written, or left by a writer that died (`tmp/`).
    pub temporary_bytes: u64,
}

/// What `berth verify` found for one blob.
#[derive(Debug, Clone, Serialize)]
pub struct BlobCheck {
    pub digest: Digest,
    pub size: u64,
    /// `ok`, `missing`, `wrong size` or `damaged`.
    pub state: &'static str,
}

/// How long a partial download waits to be resumed before garbage collection removes it.
pub const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    /// Canonical reference → manifest digest.
    refs: BTreeMap<String, Digest>,
}

/// An advisory file lock, released on drop.
pub struct LockGuard {
    _file: File,
}

impl Store {
    /// `$BERTH_HOME`, else `~/.berth`.
    pub fn default_home() -> PathBuf {
        if let Some(h) = std::env::var_os("BERTH_HOME") {
            return PathBuf::from(h);
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".berth")
    }

    /// Open (creating if needed) the store under a berth home folder.
    pub fn open(home: &Path) -> Result<Store, StoreError> {
        let root = home.join("models");
        for dir in ["blobs/sha256", "incoming", "tmp"] {
            let d = root.join(dir);
            fs::create_dir_all(&d).map_err(StoreError::io(format!("creating {}", d.display())))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    /// Where a blob lives. The digest was validated when it was made, so the path stays inside.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("incoming").join(format!("{}.partial", digest.hex()))
    }

    /// Whether a blob is present with the expected size.
    pub fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Check a blob's bytes against its digest (about 1 GB/s; cheap next to loading a model).
    /// `MissingBlob`, `SizeMismatch` or `DigestMismatch` say what is wrong.
    pub fn verify_blob(&self, digest: &Digest, size: u64) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::Io { context: format!("reading {}", path.display()), source: e },
        })?;
        let len = file.metadata().map_err(StoreError::io(format!("reading {}", path.display())))?.len();
        if len != size {
            return Err(StoreError::SizeMismatch { digest: digest.clone(), expected: size, actual: len });
        }
        let actual = Digest::of_reader(file).map_err(StoreError::io(format!("reading {}", path.display())))?;
        if &actual != digest {
            return Err(StoreError::DigestMismatch { expected: digest.clone(), actual });
        }
        Ok(())
    }

    /// [`Store::verify_blob`], skipping the hash when this blob was found right before and its
    /// file has not changed since (see [`crate::stamp`]). What loads a model calls.
    pub fn verify_blob_once(&self, digest: &Digest, size: u64) -> Result<(), StoreError> {
        let before = self.file_stamp(digest);
        if before.as_ref().is_some_and(|b| Stamps::new(&self.root).holds(digest.hex(), b)) {
            return Ok(());
        }
        self.verify_blob_and_stamp(digest, size, before)
    }

    /// How a blob's file looks now (for its stamp); `None` when it cannot be read.
    fn file_stamp(&self, digest: &Digest) -> Option<FileStamp> {
        fs::metadata(self.blob_path(digest)).ok().and_then(|m| FileStamp::of(&m))
    }

    /// Hash a blob; found right, stamp it (so loads need not hash it again); found wrong, forget
    /// its stamp. `before` is how the file looked before the hash.
    fn verify_blob_and_stamp(&self, digest: &Digest, size: u64, before: Option<FileStamp>) -> Result<(), StoreError> {
        let stamps = Stamps::new(&self.root);
        if let Err(e) = self.verify_blob(digest, size) {
            stamps.forget(digest.hex());
            return Err(e);
        }
        // Recorded only when the file looked the same before and after the hash: a write while
        // it was being read leaves no stamp.
        let after = self.file_stamp(digest);
        if let (Some(b), Some(a)) = (before, after)
            && a == b
        {
            stamps.record(digest.hex(), &a);
        }
        Ok(())
    }

    /// Check every blob of a model; the list says what state each is in.
    pub fn verify(&self, reference: &Reference) -> Result<Vec<BlobCheck>, StoreError> {
        let digest = self.resolve(reference)?;
        let manifest = self.manifest(&digest)?;
        let mut out = Vec::new();
        for d in manifest.unique_blobs() {
            // Always hashed; what is found right is stamped, so a store verified before it is
            // shared read-only loads without hashing again.
            let before = self.file_stamp(&d.digest);
            let state = match self.verify_blob_and_stamp(&d.digest, d.size, before) {
                Ok(()) => "ok",
                Err(StoreError::MissingBlob(_)) => "missing",
                Err(StoreError::SizeMismatch { .. }) => "wrong size",
                Err(StoreError::DigestMismatch { .. }) => "damaged",
                Err(e) => return Err(e),
            };
            out.push(BlobCheck { digest: d.digest.clone(), size: d.size, state });
        }
        Ok(out)
    }

    /// Start writing a new blob.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        BlobWriter::create(&self.root.join("tmp"), &self.blobs_dir())
    }

    /// Store bytes as a blob.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let mut w = self.blob_writer()?;
        std::io::Write::write_all(&mut w, bytes).map_err(StoreError::io("writing a blob"))?;
        w.commit(None)
    }

    /// Move a fully downloaded, verified partial file into place.
    pub(crate) fn publish_partial(&self, digest: &Digest) -> Result<(), StoreError> {
        publish(&self.partial_path(digest), &self.blob_path(digest))
    }

    /// Read a small blob (manifest, config) and check its bytes against its digest.
    pub fn read_small_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::Io { context: format!("reading {}", path.display()), source: e },
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(StoreError::io(format!("reading {}", path.display())))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch { expected: digest.clone(), actual });
        }
        Ok(bytes)
    }

    /// Hold off garbage collection while writing blobs that are not referenced yet.
    pub fn writer_lock(&self) -> Result<LockGuard, StoreError> {
        self.lock("gc.lock", false)
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<LockGuard, StoreError> {
        let path = self.root.join(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(StoreError::io(format!("opening {}", path.display())))?;
        let locked = if exclusive { file.lock() } else { file.lock_shared() };
        locked.map_err(StoreError::io(format!("locking {}", path.display())))?;
        Ok(LockGuard { _file: file })
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let path = self.index_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Index { version: 1, ..Index::default() });
            }
            Err(e) => {
                return Err(StoreError::Io { context: format!("reading {}", path.display()), source: e });
            }
        };
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::CorruptIndex { path: path.clone(), reason: e.to_string() })?;
        for key in index.refs.keys() {
            Reference::parse(key)
                .map_err(|e| StoreError::CorruptIndex { path: path.clone(), reason: e.to_string() })?;
        }
        Ok(index)
    }

    /// Read-modify-write the index under its lock; the new index replaces the old atomically.
    fn update_index<T>(&self, f: impl FnOnce(&mut Index) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let _lock = self.lock("index.lock", true)?;
        let mut index = self.read_index()?;
        let out = f(&mut index)?;
        index.version = 1;
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| StoreError::Config(e.to_string()))?;
        let tmp = self.root.join("tmp/index.json.new");
        {
            let mut file = File::create(&tmp).map_err(StoreError::io(format!("writing {}", tmp.display())))?;
            std::io::Write::write_all(&mut file, &bytes).map_err(StoreError::io("writing the index"))?;
            file.sync_all().map_err(StoreError::io("flushing the index"))?;
        }
        publish(&tmp, &self.index_path())?;
        Ok(out)
    }

    /// Point a reference at a manifest that is in the store.
    pub fn set_ref(&self, reference: &Reference, manifest: &Digest) -> Result<(), StoreError> {
        self.update_index(|index| {
            index.refs.insert(reference.to_string(), manifest.clone());
            Ok(())
        })
    }

    /// The manifest digest a reference names locally.
    pub fn resolve(&self, reference: &Reference) -> Result<Digest, StoreError> {
        let index = self.read_index()?;
        if let Some(d) = index.refs.get(&reference.to_string()) {
            return Ok(d.clone());
        }
        // `name@digest` also finds a manifest stored under a tag of the same repository.
        if let Some(d) = reference.digest() {
            let name = reference.name();
            let hit = index.refs.iter().any(|(k, v)| v == d && Reference::parse(k).is_ok_and(|r| r.name() == name));
            if hit {
                return Ok(d.clone());
            }
        }
        Err(StoreError::NotFound(reference.familiar()))
    }

    /// The manifest and config of a local model.
    pub fn load(&self, reference: &Reference) -> Result<(Digest, Manifest, ModelConfigFile), StoreError> {
        let digest = self.resolve(reference)?;
        let manifest = self.manifest(&digest)?;
        let config = self.config(&manifest)?;
        Ok((digest, manifest, config))
    }

    pub fn manifest(&self, digest: &Digest) -> Result<Manifest, StoreError> {
        Ok(Manifest::parse(&self.read_small_blob(digest)?)?)
    }

    pub fn config(&self, manifest: &Manifest) -> Result<ModelConfigFile, StoreError> {
        let bytes = self.read_small_blob(&manifest.config.digest)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Config(e.to_string()))
    }

    pub fn inspect(&self, reference: &Reference) -> Result<ModelDetails, StoreError> {
        let (digest, manifest, config) = self.load(reference)?;
        Ok(ModelDetails { reference: reference.familiar(), digest, manifest, config })
    }

    /// Give a local model a second name.
    pub fn tag(&self, source: &Reference, target: &Reference) -> Result<Digest, StoreError> {
        let digest = self.resolve(source)?;
        self.set_ref(target, &digest)?;
        Ok(digest)
    }

    /// Whether this exact reference is in the index (a `name@digest` is not found through a tag).
    pub fn has_ref(&self, reference: &Reference) -> Result<bool, StoreError> {
        Ok(self.read_index()?.refs.contains_key(&reference.to_string()))
    }

    /// Remove exactly this reference (no other tag of its name), then collect blobs nothing
    /// references any more. Whether it was there.
    pub fn remove_ref(&self, reference: &Reference) -> Result<bool, StoreError> {
        let removed = self.update_index(|index| Ok(index.refs.remove(&reference.to_string()).is_some()))?;
        if removed {
            self.gc()?;
        }
        Ok(removed)
    }

    /// Every reference in the store, sorted.
    pub fn list(&self) -> Result<Vec<ModelSummary>, StoreError> {
        let index = self.read_index()?;
        let mut out = Vec::with_capacity(index.refs.len());
        for (key, digest) in &index.refs {
            let reference = Reference::parse(key)?;
            let manifest = self.manifest(digest)?;
            let config = self.config(&manifest)?;
            out.push(ModelSummary {
                reference: reference.familiar(),
                digest: digest.clone(),
                format: config.config.format,
                architecture: config.config.architecture,
                parameters: config.config.parameters,
                quantization: config.config.quantization,
                size: manifest.total_size(),
                created: config.descriptor.created,
            });
        }
        Ok(out)
    }

    /// Remove a reference (a `name@digest` removes every tag of that name pointing there), then
    /// collect blobs nothing references any more. Returns the removed references.
    pub fn remove(&self, reference: &Reference) -> Result<(Vec<String>, GcReport), StoreError> {
        let removed = self.update_index(|index| {
            let key = reference.to_string();
            let mut removed = Vec::new();
            if index.refs.remove(&key).is_some() {
                removed.push(key);
            } else if let Some(d) = reference.digest() {
                let name = reference.name();
                let keys: Vec<String> = index
                    .refs
                    .iter()
                    .filter(|(k, v)| *v == d && Reference::parse(k).is_ok_and(|r| r.name() == name))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    index.refs.remove(&k);
                    removed.push(k);
                }
            }
            if removed.is_empty() {
                return Err(StoreError::NotFound(reference.familiar()));
            }
            Ok(removed)
        })?;
        let report = self.gc()?;
        Ok((removed, report))
    }

    /// Blobs reachable from some reference.
    fn reachable(&self, index: &Index) -> Result<BTreeSet<Digest>, StoreError> {
        let mut live = BTreeSet::new();
        for digest in index.refs.values() {
            live.insert(digest.clone());
            // A damaged manifest keeps only itself alive; its blobs go, and `berth pull` restores them.
            if let Ok(m) = self.manifest(digest) {
                live.extend(m.blobs().map(|d| d.digest.clone()));
            }
        }
        Ok(live)
    }

    /// Remove every blob no reference reaches, temporary files no writer holds, and partial
    /// downloads older than `partial_max_age` (all of them with `Duration::ZERO`).
    pub fn gc_with(&self, partial_max_age: std::time::Duration) -> Result<GcReport, StoreError> {
        let _gc = self.lock("gc.lock", true)?;
        let mut report = self.collect_blobs()?;
        // No blob writer holds gc.lock now, and index writers hold index.lock: with both, what is
        // in tmp/ was left by a process that died.
        let _index = self.lock("index.lock", true)?;
        for (path, len, _) in leftovers(&self.root.join("tmp"))? {
            if fs::remove_file(&path).is_ok() {
                report.leftovers_removed += 1;
                report.bytes_freed += len;
            }
        }
        for (path, len, age) in leftovers(&self.root.join("incoming"))? {
            if age >= partial_max_age && fs::remove_file(&path).is_ok() {
                report.leftovers_removed += 1;
                report.bytes_freed += len;
            }
        }
        Ok(report)
    }

    /// [`Store::gc_with`] keeping partial downloads younger than [`PARTIAL_MAX_AGE`].
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        self.gc_with(PARTIAL_MAX_AGE)
    }

    fn collect_blobs(&self) -> Result<GcReport, StoreError> {
        let live = self.reachable(&self.read_index()?)?;
        let mut report = GcReport::default();
        for (path, digest, len) in self.blob_files()? {
            if !live.contains(&digest) {
                Stamps::new(&self.root).forget(digest.hex());
                fs::remove_file(&path).map_err(StoreError::io(format!("removing {}", path.display())))?;
                report.blobs_removed += 1;
                report.bytes_freed += len;
            }
        }
        Ok(report)
    }

    /// Every blob file with a valid name (other files in the folder are left alone).
    fn blob_files(&self) -> Result<Vec<(PathBuf, Digest, u64)>, StoreError> {
        let dir = self.blobs_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(StoreError::io(format!("listing {}", dir.display())))?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|n| Digest::parse(&format!("sha256:{n}")).ok()) else {
                continue;
            };
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((entry.path(), digest, len));
        }
        Ok(out)
    }

    pub fn disk_usage(&self) -> Result<DiskUsage, StoreError> {
        let index = self.read_index()?;
        let live = self.reachable(&index)?;
        let mut du = DiskUsage { models: index.refs.len() as u64, ..DiskUsage::default() };
        for (_, digest, len) in self.blob_files()? {
            du.blobs += 1;
            du.blob_bytes += len;
            if !live.contains(&digest) {
                du.unreferenced_bytes += len;
            }
        }
        du.partial_bytes = leftovers(&self.root.join("incoming"))?.iter().map(|f| f.1).sum();
        du.temporary_bytes = leftovers(&self.root.join("tmp"))?.iter().map(|f| f.1).sum();
        Ok(du)
    }

    /// What an engine needs to run a local GGUF model: the weights' path and the artifact's chat
    /// template, if it carries one (it overrides the template inside the GGUF file).
    pub fn gguf_model(&self, reference: &Reference) -> Result<GgufModel, StoreError> {
        let (_, manifest, config) = self.load(reference)?;
        let weights = manifest.layers.iter().find(|l| l.media_type == crate::media::GGUF).ok_or_else(|| {
            StoreError::Config(format!("{} has no GGUF layer; berth runs GGUF models", reference.familiar()))
        })?;
        // A damaged file would run and answer garbage: its bytes are checked before every load.
        self.verify_blob_once(&weights.digest, weights.size)?;
        let chat_template = match manifest.layers.iter().find(|l| l.media_type == crate::media::CHAT_TEMPLATE) {
            Some(l) => {
                let bytes = self.read_small_blob(&l.digest)?;
                Some(
                    String::from_utf8(bytes)
                        .map_err(|_| StoreError::Config("the chat template layer is not UTF-8".into()))?,
                )
            }
            None => None,
        };
        Ok(GgufModel { path: self.blob_path(&weights.digest), chat_template, context_size: config.config.context_size })
    }

    /// Check every layer of a manifest against its digest (before a model is loaded from them).
    pub fn verify_layers(&self, manifest: &Manifest) -> Result<(), StoreError> {
        manifest.layers.iter().try_for_each(|l| self.verify_blob_once(&l.digest, l.size))
    }

    /// The files of a model, as (path inside the model folder, blob path), for engines to open.
    pub fn model_files(&self, manifest: &Manifest) -> Vec<(String, String, PathBuf)> {
        manifest
            .layers
            .iter()
            .map(|l| {
                let name = l.file_path().map(str::to_string).unwrap_or_else(|| default_file_name(&l.media_type));
                (l.media_type.clone(), name, self.blob_path(&l.digest))
            })
            .collect()
    }
}

/// The plain files of a folder with their sizes and how long ago each was last written.
fn leftovers(dir: &Path) -> Result<Vec<(PathBuf, u64, std::time::Duration)>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::Io { context: format!("listing {}", dir.display()), source: e }),
    };
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
        out.push((entry.path(), meta.len(), age));
    }
    Ok(out)
}

/// A small file (a config being pulled) read whole, at most [`MAX_MANIFEST_BYTES`].
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, StoreError> {
    let file = File::open(path).map_err(StoreError::io(format!("reading {}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(StoreError::io(format!("reading {}", path.display())))?;
    Ok(bytes)
}

fn default_file_name(media_type: &str) -> String {
    match media_type {
        crate::media::GGUF => "model.gguf",
        crate::media::LICENSE => "LICENSE",
        crate::media::CHAT_TEMPLATE => "template.jinja",
        crate::media::SAFETENSORS => "model.safetensors",
        _ => "file",
    }
    .to_string()
}
