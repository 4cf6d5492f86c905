//! What a model pulled from a registry must pass besides its digests: its chat template is code
//! every server of the model will run, so one that does not compile, or cannot render a plain
//! conversation within berth's limits, is refused before the model enters the store.

use std::path::PathBuf;

use berth_store::manifest::Manifest;
use berth_store::media;

/// The checks `berth pull` and `/api/pull` run on an artifact before it is stored.
pub struct ModelVetting;

impl berth_store::registry::ArtifactCheck for ModelVetting {
    fn check(&self, _: &Manifest, files: &[(String, PathBuf)]) -> Result<(), String> {
        let path_of = |kind: &str| files.iter().find(|(t, _)| t == kind).map(|(_, p)| p.clone());
        let layer = match path_of(media::CHAT_TEMPLATE) {
            Some(p) => Some(std::fs::read(&p).map_err(|e| format!("cannot read its chat template layer: {e}"))?),
            None => None,
        };
        let gguf = path_of(media::GGUF);
        berth_engine::vet_artifact_template(gguf.as_deref(), layer.as_deref()).map_err(|e| match e {
            // The paths are the store's own; they stay out of messages a client may see.
            berth_engine::EngineError::Gguf { source, .. } => format!("its GGUF file is not usable: {source}"),
            berth_engine::EngineError::Io { source, .. } => format!("its GGUF file cannot be read: {source}"),
            other => format!("its chat template cannot be used ({other})"),
        })
    }
}
