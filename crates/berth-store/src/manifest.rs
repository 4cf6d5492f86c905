//! OCI image manifests as berth stores them, and the checks a manifest from outside must pass.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media;

/// The largest manifest or config blob berth will read (real ones are a few KiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The largest blob berth will accept in a manifest (a generous bound on any model file).
pub const MAX_BLOB_BYTES: u64 = 1 << 42;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The file path a layer carries, from its filepath or title annotation.
    pub fn file_path(&self) -> Option<&str> {
        self.annotations
            .get(media::ANNOTATION_FILEPATH)
            .or_else(|| self.annotations.get(media::ANNOTATION_TITLE))
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("the manifest is not valid JSON of the OCI image manifest shape: {0}")]
    Malformed(String),
    #[error("manifest schemaVersion is {0}; only 2 is supported")]
    SchemaVersion(u32),
    #[error("manifest media type {0:?} is not an OCI image manifest; berth handles {mt}", mt = media::OCI_MANIFEST)]
    ManifestMediaType(String),
    #[error("config media type {0:?} is not a Docker model config; this is not a model artifact berth can use")]
    ConfigMediaType(String),
    #[error("layer {digest} has media type {media_type:?}, which berth does not know")]
    LayerMediaType { media_type: String, digest: Digest },
    #[error("blob {digest} claims {size} bytes, more than the {MAX_BLOB_BYTES}-byte limit")]
    BlobTooLarge { digest: Digest, size: u64 },
    #[error("the manifest has no weights layer (GGUF or safetensors)")]
    NoWeights,
    #[error("layer file path {0:?} is not a safe relative path")]
    UnsafePath(String),
    #[error("blob {digest} is listed with two sizes, {first} and {second} bytes")]
    ConflictingSizes { digest: Digest, first: u64, second: u64 },
    #[error("the manifest lists {0} layers; berth accepts at most {MAX_LAYERS}")]
    TooManyLayers(usize),
}

/// The most layers a manifest may list (a safetensors model has one per shard and a few files).
pub const MAX_LAYERS: usize = 4096;

impl Manifest {
    /// Parse and check a manifest from outside. Unknown media types are refused, not ignored.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema_version != 2 {
            return Err(ManifestError::SchemaVersion(self.schema_version));
        }
        if let Some(mt) = &self.media_type
            && mt != media::OCI_MANIFEST
        {
            return Err(ManifestError::ManifestMediaType(mt.clone()));
        }
        if !media::CONFIG_TYPES.contains(&self.config.media_type.as_str()) {
            return Err(ManifestError::ConfigMediaType(self.config.media_type.clone()));
        }
        if self.config.size > MAX_MANIFEST_BYTES as u64 {
            return Err(ManifestError::BlobTooLarge { digest: self.config.digest.clone(), size: self.config.size });
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(ManifestError::TooManyLayers(self.layers.len()));
        }
        let mut sizes = BTreeMap::new();
        for d in self.blobs() {
            if let Some(&first) = sizes.get(&d.digest)
                && first != d.size
            {
                return Err(ManifestError::ConflictingSizes { digest: d.digest.clone(), first, second: d.size });
            }
            sizes.insert(d.digest.clone(), d.size);
        }
        for l in &self.layers {
            // Documents berth reads into memory (templates, licenses) have the config's bound.
            let small = l.media_type == media::CHAT_TEMPLATE || l.media_type == media::LICENSE;
            if small && l.size > MAX_MANIFEST_BYTES as u64 {
                return Err(ManifestError::BlobTooLarge { digest: l.digest.clone(), size: l.size });
            }
            if !media::LAYER_TYPES.contains(&l.media_type.as_str()) {
                return Err(ManifestError::LayerMediaType {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                });
            }
            if l.size > MAX_BLOB_BYTES {
                return Err(ManifestError::BlobTooLarge { digest: l.digest.clone(), size: l.size });
            }
            if let Some(p) = l.file_path()
                && !is_safe_relative_path(p)
            {
                return Err(ManifestError::UnsafePath(p.to_string()));
            }
        }
        if !self.layers.iter().any(|l| l.media_type == media::GGUF || l.media_type == media::SAFETENSORS) {
            return Err(ManifestError::NoWeights);
        }
        Ok(())
    }

    /// All blobs the manifest needs: config first, then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        std::iter::once(&self.config).chain(&self.layers)
    }

    /// Every blob once (a manifest may list the same layer twice): config first, then layers in
    /// their order.
    pub fn unique_blobs(&self) -> Vec<&Descriptor> {
        let mut seen = std::collections::BTreeSet::new();
        self.blobs().filter(|d| seen.insert(&d.digest)).collect()
    }

    /// Sum of config and layer sizes.
    pub fn total_size(&self) -> u64 {
        self.blobs().map(|d| d.size).fold(0, u64::saturating_add)
    }

    /// The canonical bytes berth writes for a manifest it makes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain structs with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A path that stays inside the folder it is joined to: relative, no `..`, no empty or `.` parts.
pub fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json(layer_type: &str, path: &str) -> String {
        let c = format!("sha256:{}", "2".repeat(64));
        let d = format!("sha256:{}", "1".repeat(64));
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{c}","size":10}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{d}","size":5,"annotations":{{"org.cncf.model.filepath":"{path}"}}}}]}}"#,
            media::OCI_MANIFEST,
            media::MODEL_CONFIG_V01
        )
    }

    #[test]
    fn accepts_a_model_manifest() {
        let m = Manifest::parse(manifest_json(media::GGUF, "model.gguf").as_bytes()).unwrap();
        assert_eq!(m.config.media_type, media::MODEL_CONFIG_V01);
        assert_eq!((m.config.digest.hex(), m.config.size), ("2".repeat(64).as_str(), 10));
        assert_eq!(m.layers.len(), 1);
        assert_eq!((m.layers[0].media_type.as_str(), m.layers[0].size), (media::GGUF, 5));
        assert_eq!(m.layers[0].file_path(), Some("model.gguf"));
        assert_eq!(m.total_size(), 15);
        // What berth writes parses back to the same manifest.
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn lists_a_repeated_layer_once_and_refuses_one_with_two_sizes() {
        let one = manifest_json(media::GGUF, "model.gguf");
        let layer = one[one.find(r#"{"mediaType":"application/vnd.docker.ai.gguf"#).unwrap()..one.rfind(']').unwrap()]
            .to_string();
        let twice = one.replace(&layer, &format!("{layer},{layer}"));
        let m = Manifest::parse(twice.as_bytes()).unwrap();
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.unique_blobs().len(), 2, "the config and the one layer");
        let resized = one.replace(&layer, &format!("{layer},{}", layer.replace(r#""size":5"#, r#""size":6"#)));
        let e = Manifest::parse(resized.as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::ConflictingSizes { first: 5, second: 6, .. }), "{e}");
    }

    #[test]
    fn refuses_unknown_types_and_escaping_paths() {
        let e = Manifest::parse(manifest_json("application/x-evil", "a").as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::LayerMediaType { .. }), "{e}");
        let e = Manifest::parse(manifest_json(media::GGUF, "../../etc/passwd").as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::UnsafePath(_)), "{e}");
        let e = Manifest::parse(manifest_json(media::LICENSE, "LICENSE").as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::NoWeights), "{e}");
        let bad_digest = manifest_json(media::GGUF, "m").replace(&"1".repeat(64), "../../etc/passwd");
        assert!(matches!(Manifest::parse(bad_digest.as_bytes()), Err(ManifestError::Malformed(_))));
        assert!(matches!(Manifest::parse(&vec![b' '; MAX_MANIFEST_BYTES + 1]), Err(ManifestError::TooLarge(_))));
    }

    #[test]
    fn safe_paths() {
        assert!(is_safe_relative_path("1_Pooling/config.json"));
        for bad in ["", "/etc/passwd", "a/../b", "..", "./a", "a//b", "a\\b"] {
            assert!(!is_safe_relative_path(bad), "{bad:?}");
        }
    }
}
