//! Packaging model files into artifacts in Docker Model Runner's format. Config values are read from
//! the files themselves: GGUF metadata, safetensors headers, a model folder's config.json.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use berth_formats::gguf::GgufFile;
use berth_formats::safetensors::{self, SafetensorsHeader};

use crate::config::{ModelConfig, ModelConfigFile, Provenance, RootFs, format_parameters, format_size};
use crate::digest::Digest;
use crate::error::StoreError;
use crate::manifest::{Descriptor, Manifest, is_safe_relative_path};
use crate::media;
use crate::progress::Progress;
use crate::reference::Reference;
use crate::store::Store;

/// Largest license or chat template file accepted.
const MAX_TEXT_FILE: u64 = 16 << 20;
/// Most files in a safetensors folder.
const MAX_FOLDER_FILES: usize = 10_000;
/// Longest GGUF metadata string copied into the config (templates and vocabularies stay out).
const MAX_CONFIG_VALUE: usize = 512;

/// What to put in a GGUF artifact.
#[derive(Debug, Clone, Default)]
pub struct GgufPackage {
    pub gguf: PathBuf,
    pub licenses: Vec<PathBuf>,
    pub chat_template: Option<PathBuf>,
    /// Licenses and a chat template given as text rather than files (an API's request).
    pub license_texts: Vec<String>,
    pub chat_template_text: Option<String>,
    pub context_size: Option<u64>,
}

/// Package a GGUF file (with optional licenses and chat template) and tag it.
pub fn package_gguf(
    store: &Store,
    pkg: &GgufPackage,
    reference: &Reference,
    progress: &dyn Progress,
) -> Result<Digest, StoreError> {
    let path = &pkg.gguf;
    let file = File::open(path).map_err(StoreError::io(format!("opening {}", path.display())))?;
    // SAFETY: the map is read-only and lives only while we parse; a file truncated underneath
    // us would fault, which is the documented risk of mapping files berth does not own.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(StoreError::io(format!("mapping {}", path.display())))?;
    let gguf = GgufFile::parse(&map).map_err(|source| StoreError::Gguf { path: path.clone(), source })?;
    let architecture = gguf.architecture().unwrap_or("unknown").to_string();
    let mut metadata = BTreeMap::new();
    for (key, value) in &gguf.metadata {
        if key.starts_with("tokenizer.") {
            continue;
        }
        if let Some(s) = value.scalar_to_string()
            && s.len() <= MAX_CONFIG_VALUE
        {
            metadata.insert(key.clone(), s);
        }
    }
    let size = map.len() as u64;
    let config = ModelConfig {
        format: "gguf".into(),
        quantization: gguf.quantization(),
        parameters: format_parameters(gguf.parameter_count()),
        architecture,
        size: format_size(size),
        context_size: pkg.context_size.or_else(|| gguf.context_length()),
        gguf: Some(metadata),
        safetensors: None,
    };
    drop(map);

    let _writing = store.writer_lock()?;
    let mut layers = vec![copy_in(store, path, media::GGUF, file_name(path), progress)?];
    for license in &pkg.licenses {
        check_text_file(license)?;
        layers.push(copy_in(store, license, media::LICENSE, file_name(license), progress)?);
    }
    for (i, text) in pkg.license_texts.iter().enumerate() {
        layers.push(text_layer(store, text, media::LICENSE, format!("LICENSE-{i}"))?);
    }
    if let Some(template) = &pkg.chat_template {
        check_text_file(template)?;
        layers.push(copy_in(store, template, media::CHAT_TEMPLATE, file_name(template), progress)?);
    } else if let Some(text) = &pkg.chat_template_text {
        layers.push(text_layer(store, text, media::CHAT_TEMPLATE, "template.jinja".into())?);
    }
    finish(store, reference, config, media::MODEL_CONFIG_V01, layers)
}

/// Package a safetensors model folder: every `.safetensors` file as a weights layer, every other
/// file (config.json, tokenizer.json, ...) as a model-file layer, each carrying its path.
pub fn package_safetensors(
    store: &Store,
    dir: &Path,
    reference: &Reference,
    progress: &dyn Progress,
) -> Result<Digest, StoreError> {
    let files = walk(dir)?;
    let has = |name: &str| files.iter().any(|(rel, _)| rel == name);
    if !has("config.json") {
        return Err(package_error(dir, "it has no config.json"));
    }
    let weights: Vec<_> = files.iter().filter(|(rel, _)| rel.ends_with(".safetensors")).collect();
    if weights.is_empty() {
        return Err(package_error(dir, "it has no .safetensors file"));
    }

    let mut parameters = 0u64;
    let mut dtypes = Vec::new();
    let mut tensors = 0usize;
    let mut size = 0u64;
    for (_, path) in &weights {
        let header = read_safetensors_header(path)?;
        parameters = parameters.saturating_add(header.parameter_count());
        tensors += header.tensors.len();
        for d in header.dtypes() {
            if !dtypes.contains(&d) {
                dtypes.push(d);
            }
        }
    }
    for (_, path) in &files {
        size += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    let hf_config = read_json(&dir.join("config.json"))?;
    let architecture = hf_config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| hf_config.get("model_type").and_then(|m| m.as_str()))
        .unwrap_or("unknown")
        .to_string();
    let context_size = hf_config.get("max_position_embeddings").and_then(|v| v.as_u64());
    let mut st_meta = BTreeMap::new();
    st_meta.insert("tensors".to_string(), tensors.to_string());
    st_meta.insert("files".to_string(), weights.len().to_string());
    if let Some(mt) = hf_config.get("model_type").and_then(|m| m.as_str()) {
        st_meta.insert("model_type".to_string(), mt.to_string());
    }
    let config = ModelConfig {
        format: "safetensors".into(),
        quantization: dtypes.join(","),
        parameters: format_parameters(parameters),
        architecture,
        size: format_size(size),
        context_size,
        gguf: None,
        safetensors: Some(st_meta),
    };

    let _writing = store.writer_lock()?;
    let mut layers = Vec::with_capacity(files.len());
    for (rel, path) in &files {
        let media_type = if rel.ends_with(".safetensors") { media::SAFETENSORS } else { media::MODEL_FILE };
        let mut layer = copy_in(store, path, media_type, file_name(path), progress)?;
        layer.annotations.insert(media::ANNOTATION_FILEPATH.to_string(), rel.clone());
        layers.push(layer);
    }
    finish(store, reference, config, media::MODEL_CONFIG_V02, layers)
}

fn finish(
    store: &Store,
    reference: &Reference,
    config: ModelConfig,
    config_type: &str,
    layers: Vec<Descriptor>,
) -> Result<Digest, StoreError> {
    let config_file = ModelConfigFile {
        config,
        descriptor: Provenance { created: Some(created_now()) },
        rootfs: RootFs { kind: "rootfs".into(), diff_ids: layers.iter().map(|l| l.digest.clone()).collect() },
    };
    let config_bytes = config_file.to_bytes();
    let config_digest = store.put_bytes(&config_bytes)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_string()),
        config: Descriptor {
            media_type: config_type.to_string(),
            digest: config_digest,
            size: config_bytes.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers,
        annotations: BTreeMap::new(),
    };
    manifest.validate()?;
    let manifest_digest = store.put_bytes(&manifest.to_bytes())?;
    store.set_ref(reference, &manifest_digest)?;
    Ok(manifest_digest)
}

/// Creation time: `SOURCE_DATE_EPOCH` when set (reproducible packages), else now.
fn created_now() -> String {
    let at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_else(chrono::Utc::now);
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A text layer from memory, within the limit text files have.
fn text_layer(store: &Store, text: &str, media_type: &str, title: String) -> Result<Descriptor, StoreError> {
    if text.len() as u64 > MAX_TEXT_FILE {
        return Err(StoreError::Config(format!(
            "{title} is {} bytes; text layers are limited to {MAX_TEXT_FILE}",
            text.len()
        )));
    }
    let digest = store.put_bytes(text.as_bytes())?;
    let mut annotations = BTreeMap::new();
    annotations.insert(media::ANNOTATION_TITLE.to_string(), title);
    Ok(Descriptor { media_type: media_type.to_string(), digest, size: text.len() as u64, annotations })
}

/// Copy a file into the store as a blob, hashing as it goes.
fn copy_in(
    store: &Store,
    path: &Path,
    media_type: &str,
    title: String,
    progress: &dyn Progress,
) -> Result<Descriptor, StoreError> {
    let mut file = File::open(path).map_err(StoreError::io(format!("opening {}", path.display())))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    progress.start(&title, total, 0);
    let mut writer = store.blob_writer()?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(StoreError::io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        io::Write::write_all(&mut writer, &buf[..n]).map_err(StoreError::io("writing a blob"))?;
        progress.advance(n as u64);
    }
    progress.finish();
    let size = writer.len();
    let digest = writer.commit(None)?;
    let mut annotations = BTreeMap::new();
    annotations.insert(media::ANNOTATION_TITLE.to_string(), title);
    Ok(Descriptor { media_type: media_type.to_string(), digest, size, annotations })
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into())
}

fn package_error(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Package { path: path.to_path_buf(), reason: reason.into() }
}

fn check_text_file(path: &Path) -> Result<(), StoreError> {
    let meta = fs::metadata(path).map_err(StoreError::io(format!("reading {}", path.display())))?;
    if !meta.is_file() {
        return Err(package_error(path, "it is not a regular file"));
    }
    if meta.len() > MAX_TEXT_FILE {
        return Err(package_error(
            path,
            format!("it is {} bytes; text layers are limited to {MAX_TEXT_FILE}", meta.len()),
        ));
    }
    let bytes = fs::read(path).map_err(StoreError::io(format!("reading {}", path.display())))?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(package_error(path, "it is not UTF-8 text"));
    }
    Ok(())
}

fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader, StoreError> {
    let mut file = File::open(path).map_err(StoreError::io(format!("opening {}", path.display())))?;
    let file_len = file.metadata().map_err(StoreError::io(format!("reading {}", path.display())))?.len();
    let wrap = |source| StoreError::Safetensors { path: path.to_path_buf(), source };
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| wrap(safetensors::SafetensorsError::TooShort(file_len)))?;
    let n = safetensors::header_len(&prefix, file_len).map_err(wrap)?;
    let mut json = Vec::new();
    file.take(n).read_to_end(&mut json).map_err(StoreError::io(format!("reading {}", path.display())))?;
    SafetensorsHeader::parse_header(&json, file_len).map_err(wrap)
}

fn read_json(path: &Path) -> Result<serde_json::Value, StoreError> {
    let meta = fs::metadata(path).map_err(StoreError::io(format!("reading {}", path.display())))?;
    if meta.len() > MAX_TEXT_FILE {
        return Err(package_error(path, "it is too large for a config file"));
    }
    let bytes = fs::read(path).map_err(StoreError::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| package_error(path, format!("it is not valid JSON: {e}")))
}

/// The regular files under `dir`, as (relative path with '/', full path), sorted. Hidden files are
/// skipped; links are refused, so nothing outside the folder is packaged.
fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, path)) = stack.pop() {
        let entries = fs::read_dir(&path).map_err(StoreError::io(format!("listing {}", path.display())))?;
        for entry in entries {
            let entry = entry.map_err(StoreError::io(format!("listing {}", path.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(package_error(&entry.path(), "its name is not UTF-8"));
            };
            if name.starts_with('.') {
                continue;
            }
            let rel = if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
            let kind = entry.file_type().map_err(StoreError::io(format!("reading {}", entry.path().display())))?;
            if kind.is_symlink() {
                return Err(package_error(&entry.path(), "it is a symbolic link; copy the file into the folder"));
            } else if kind.is_dir() {
                stack.push((rel, entry.path()));
            } else if kind.is_file() {
                if !is_safe_relative_path(&rel) {
                    return Err(package_error(&entry.path(), "its path cannot be stored safely"));
                }
                out.push((rel, entry.path()));
                if out.len() > MAX_FOLDER_FILES {
                    return Err(package_error(dir, format!("it holds more than {MAX_FOLDER_FILES} files")));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}
