//! Docker Model Runner's model config blob: what the model is, read from its own files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelConfigFile {
    pub config: ModelConfig,
    #[serde(default)]
    pub descriptor: Provenance,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub format: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parameters: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safetensors: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs { kind: "rootfs".to_string(), diff_ids: Vec::new() }
    }
}

impl ModelConfigFile {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain structs with string keys always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// "134.52M", "1.24B": parameter counts as model cards write them.
pub fn format_parameters(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// "93.80 MiB": sizes in binary units.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.2} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_model_cards() {
        assert_eq!(format_parameters(134_515_008), "134.52M");
        assert_eq!(format_parameters(1_235_814_400), "1.24B");
        assert_eq!(format_size(98_362_432), "93.81 MiB");
        assert_eq!(format_size(12), "12 B");
    }

    #[test]
    fn reads_configs_with_fields_it_does_not_know() {
        let c: ModelConfigFile = serde_json::from_str(
            r#"{"config":{"format":"gguf","future":1},"descriptor":{"created":"2025-01-01T00:00:00Z"},"rootfs":{"type":"rootfs","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.config.format, "gguf");
    }
}
