//! Moving artifacts between the local store and OCI registries, with `oci-client` speaking the
//! distribution protocol (bearer-token challenges included). berth adds what a model store needs on
//! top: blobs streamed to disk and verified before they become visible, interrupted downloads
//! resumed with HTTP Range, manifests checked before anything is fetched, credentials from Docker's
//! config, and plain HTTP only where it is safe.

mod credentials;
mod document;
mod pull;
mod push;

pub use credentials::{Credentials, credentials_for};
pub use pull::{ArtifactCheck, NoCheck, pull};
pub use push::push;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;

use crate::reference::{Reference, host_of};

/// Registry failures, phrased for the person who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "registry {registry} refused access to {reference}: log in with `docker login {registry}` (berth reads Docker's credentials), or check the name"
    )]
    Unauthorized { registry: String, reference: String },
    #[error("{reference} was not found on registry {registry}")]
    NotFound { registry: String, reference: String },
    #[error("cannot reach registry {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error(
        "registry {registry} uses plain HTTP, which berth allows only for loopback registries or ones named with --insecure-registry"
    )]
    InsecureRefused { registry: String },
    #[error(
        "the download of {digest} stopped after {done} of {total} bytes ({detail}); run the same pull again to resume it"
    )]
    Interrupted { digest: String, done: u64, total: u64, detail: String },
    #[error("registry {registry} sent more bytes for {digest} than the manifest's {size}; the download was discarded")]
    Oversized { registry: String, digest: String, size: u64 },
    #[error("Docker credentials at {path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("registry {registry}: {detail}")]
    Protocol { registry: String, detail: String },
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) that may be spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Docker's config file to read credentials from (default `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`).
    pub docker_config: Option<std::path::PathBuf>,
}

impl RegistryOptions {
    /// Options from the environment: `BERTH_INSECURE_REGISTRIES` (comma-separated).
    pub fn from_env() -> RegistryOptions {
        let insecure_registries = std::env::var("BERTH_INSECURE_REGISTRIES")
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        RegistryOptions { insecure_registries, docker_config: None }
    }

    fn allows_plain_http(&self, reference: &Reference) -> bool {
        reference.is_loopback_registry()
            || self.insecure_registries.iter().any(|r| r == reference.registry() || r == host_of(reference.registry()))
    }

    pub(crate) fn client(&self, reference: &Reference) -> oci_client::Client {
        install_crypto_provider();
        let protocol = if self.allows_plain_http(reference) {
            ClientProtocol::HttpsExcept(vec![reference.registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        oci_client::Client::new(ClientConfig {
            protocol,
            // One PUT per blob, streamed from disk: fewer round trips than 4 MiB PATCH chunks.
            use_monolithic_push: true,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..ClientConfig::default()
        })
    }
}

/// rustls needs one process-wide crypto provider; berth uses ring (no C toolchain beyond cc).
/// Every HTTPS client of the process (also the binary's own) calls this before it is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn to_oci(reference: &Reference) -> oci_client::Reference {
    let registry = reference.registry().to_string();
    let repository = reference.repository().to_string();
    match (reference.tag(), reference.digest()) {
        (Some(tag), Some(d)) => {
            oci_client::Reference::with_tag_and_digest(registry, repository, tag.into(), d.to_string())
        }
        (None, Some(d)) => oci_client::Reference::with_digest(registry, repository, d.to_string()),
        (Some(tag), None) => oci_client::Reference::with_tag(registry, repository, tag.into()),
        (None, None) => oci_client::Reference::with_tag(registry, repository, "latest".into()),
    }
}

/// Translate the client's errors into ones that say what to do.
pub(crate) fn classify(reference: &Reference, e: OciDistributionError) -> RegistryError {
    let registry = reference.registry().to_string();
    let name = reference.familiar();
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized { registry, reference: name }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound { registry, reference: name },
        OciDistributionError::ServerError { code: 401 | 403, .. } => {
            RegistryError::Unauthorized { registry, reference: name }
        }
        OciDistributionError::ServerError { code: 404, .. } => RegistryError::NotFound { registry, reference: name },
        OciDistributionError::RegistryError { envelope, url } => {
            // A registry may answer an error with an envelope that says nothing; name the request.
            let said: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?} {}", e.code, e.message).trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if said.is_empty() {
                let detail = format!("the registry refused {url} without saying why");
                return RegistryError::Protocol { registry, detail };
            }
            let text = said.join("; ");
            let lower = text.to_lowercase();
            if lower.contains("unauthorized") || lower.contains("denied") {
                RegistryError::Unauthorized { registry, reference: name }
            } else if lower.contains("unknown") {
                RegistryError::NotFound { registry, reference: name }
            } else {
                RegistryError::Protocol { registry, detail: text }
            }
        }
        OciDistributionError::RequestError(err) => match err.status().map(|s| s.as_u16()) {
            Some(401 | 403) => RegistryError::Unauthorized { registry, reference: name },
            Some(404) => RegistryError::NotFound { registry, reference: name },
            Some(_) => RegistryError::Protocol { registry, detail: err.to_string() },
            None => {
                let mut detail = err.to_string();
                let mut source = std::error::Error::source(&err);
                while let Some(s) = source {
                    detail = format!("{detail}: {s}");
                    source = s.source();
                }
                RegistryError::Unreachable { registry, detail }
            }
        },
        other => RegistryError::Protocol { registry, detail: other.to_string() },
    }
}
