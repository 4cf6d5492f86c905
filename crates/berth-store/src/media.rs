//! The OCI and Docker Model Runner media types berth reads and writes.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker Model Runner's model config, flat file layout (what berth writes for GGUF models).
pub const MODEL_CONFIG_V01: &str = "application/vnd.docker.ai.model.config.v0.1+json";
/// Docker Model Runner's model config with file paths kept in layer annotations (safetensors folders).
pub const MODEL_CONFIG_V02: &str = "application/vnd.docker.ai.model.config.v0.2+json";
pub const GGUF: &str = "application/vnd.docker.ai.gguf.v3";
pub const SAFETENSORS: &str = "application/vnd.docker.ai.safetensors";
pub const LICENSE: &str = "application/vnd.docker.ai.license";
pub const CHAT_TEMPLATE: &str = "application/vnd.docker.ai.chat.template.jinja";
/// Any other file of a model (config.json, tokenizer.json, ...), named by its filepath annotation.
pub const MODEL_FILE: &str = "application/vnd.docker.ai.model.file";
pub const MMPROJ: &str = "application/vnd.docker.ai.mmproj";
pub const VLLM_CONFIG_TAR: &str = "application/vnd.docker.ai.vllm.config.tar";
pub const DIR_TAR: &str = "application/vnd.docker.ai.dir.tar";

/// The annotation holding a layer's path inside the model folder (Docker Model Runner, CNCF ModelPack).
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
/// The annotation holding a layer's file name (OCI).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

pub const CONFIG_TYPES: &[&str] = &[MODEL_CONFIG_V01, MODEL_CONFIG_V02];
pub const LAYER_TYPES: &[&str] =
    &[GGUF, SAFETENSORS, LICENSE, CHAT_TEMPLATE, MODEL_FILE, MMPROJ, VLLM_CONFIG_TAR, DIR_TAR];
