//! Registry credentials from Docker's config file (`docker login` writes it): inline `auths`
//! entries, and credential helpers (`credHelpers`, `credsStore`) run as Docker runs them.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

use super::{RegistryError, RegistryOptions};
use crate::reference::DEFAULT_REGISTRY;

/// What berth presents to a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <hidden>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<hidden>)"),
        }
    }
}

impl Credentials {
    pub(crate) fn to_auth(&self) -> RegistryAuth {
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

const MAX_CONFIG_BYTES: u64 = 4 << 20;
const MAX_HELPER_OUTPUT: u64 = 1 << 20;

fn config_path(options: &RegistryOptions) -> Option<PathBuf> {
    if let Some(p) = &options.docker_config {
        return Some(p.clone());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The names Docker files a registry's credentials under.
fn server_keys(registry: &str) -> Vec<String> {
    if registry == DEFAULT_REGISTRY {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ]
    } else {
        vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")]
    }
}

/// Normalise an `auths` key (`https://host:port/v1/` → `host:port`).
fn key_host(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// The credentials Docker's config holds for a registry, or anonymous access.
pub fn credentials_for(registry: &str, options: &RegistryOptions) -> Result<Credentials, RegistryError> {
    let Some(path) = config_path(options) else {
        return Ok(Credentials::Anonymous);
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => return Err(cred_err(&path, e.to_string())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES).read_to_end(&mut bytes).map_err(|e| cred_err(&path, e.to_string()))?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| cred_err(&path, format!("not valid JSON: {e}")))?;
    let keys = server_keys(registry);
    let wanted_host = key_host(&keys[0]).to_string();

    let helper = config
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| keys.iter().find_map(|k| h.get(k)).or_else(|| h.get(&wanted_host)))
        .and_then(|v| v.as_str())
        .or_else(|| config.get("credsStore").and_then(|v| v.as_str()));

    if let Some(auths) = config.get("auths").and_then(|a| a.as_object()) {
        let entry = auths
            .iter()
            .find(|(k, _)| keys.iter().any(|want| want == *k) || key_host(k) == wanted_host)
            .map(|(_, v)| v);
        if let Some(entry) = entry {
            if let Some(token) = entry.get("registrytoken").and_then(|t| t.as_str()) {
                return Ok(Credentials::Bearer(token.to_string()));
            }
            if let (Some(u), Some(p)) =
                (entry.get("username").and_then(|v| v.as_str()), entry.get("password").and_then(|v| v.as_str()))
            {
                return Ok(Credentials::Basic { username: u.into(), password: p.into() });
            }
            if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .map_err(|_| cred_err(&path, format!("the auth entry for {registry} is not base64")))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| cred_err(&path, format!("the auth entry for {registry} is not UTF-8")))?;
                let (u, p) = text
                    .split_once(':')
                    .ok_or_else(|| cred_err(&path, format!("the auth entry for {registry} is not user:password")))?;
                return Ok(Credentials::Basic { username: u.into(), password: p.into() });
            }
        }
    }
    if let Some(helper) = helper {
        return run_helper(helper, &keys[0], &path);
    }
    Ok(Credentials::Anonymous)
}

fn cred_err(path: &std::path::Path, reason: String) -> RegistryError {
    RegistryError::Credentials { path: path.display().to_string(), reason }
}

/// Ask `docker-credential-<helper> get`, as Docker does.
fn run_helper(helper: &str, server: &str, path: &std::path::Path) -> Result<Credentials, RegistryError> {
    if !helper.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(cred_err(path, format!("credential helper name {helper:?} is not a plain name")));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = match Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        // Docker treats a missing helper as "no credentials"; so does berth.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => return Err(cred_err(path, format!("running {program}: {e}"))),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_HELPER_OUTPUT).read_to_end(&mut out);
    }
    let status = child.wait().map_err(|e| cred_err(path, format!("running {program}: {e}")))?;
    if !status.success() {
        // "credentials not found" is an ordinary answer: go anonymous.
        return Ok(Credentials::Anonymous);
    }
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| cred_err(path, format!("{program} answered with invalid JSON: {e}")))?;
    let user = v.get("Username").and_then(|u| u.as_str()).unwrap_or_default();
    let secret = v.get("Secret").and_then(|s| s.as_str()).unwrap_or_default();
    Ok(match (user, secret) {
        (_, "") => Credentials::Anonymous,
        ("<token>", token) => Credentials::Bearer(token.to_string()),
        (u, s) => Credentials::Basic { username: u.to_string(), password: s.to_string() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_config(json: &str, registry: &str) -> Result<Credentials, RegistryError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        credentials_for(registry, &RegistryOptions { docker_config: Some(path), ..Default::default() })
    }

    #[test]
    fn reads_docker_login_entries() {
        let auth = base64::engine::general_purpose::STANDARD.encode("ada:s3cret");
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"auth":"{auth}"}}}}}}"#
        );
        let want = Credentials::Basic { username: "ada".into(), password: "s3cret".into() };
        assert_eq!(with_config(&json, "docker.io").unwrap(), want);
        assert_eq!(with_config(&json, "127.0.0.1:5000").unwrap(), want);
        assert_eq!(with_config(&json, "ghcr.io").unwrap(), Credentials::Anonymous);
    }

    #[test]
    fn missing_or_broken_configs() {
        assert_eq!(with_config("{}", "docker.io").unwrap(), Credentials::Anonymous);
        assert!(with_config("not json", "docker.io").is_err());
        assert!(with_config(r#"{"auths":{"docker.io":{"auth":"!!"}}}"#, "docker.io").is_err());
        let missing_helper = r#"{"credsStore":"berth-test-no-such-helper"}"#;
        assert_eq!(with_config(missing_helper, "docker.io").unwrap(), Credentials::Anonymous);
    }
}
