//! Model references as Docker writes them: `[registry/]namespace/name[:tag][@sha256:…]`.
//!
//! As in Docker Model Runner, a reference without a registry means Docker Hub, and a bare name
//! (`smollm2`) means the `ai/` namespace there: `smollm2` is `docker.io/ai/smollm2:latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_NAMESPACE: &str = "ai";
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("the reference is empty; write it as [registry/]namespace/name[:tag], e.g. ai/smollm2:latest")]
    Empty,
    #[error("reference {0:?} is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
    #[error(
        "{reference:?}: {component:?} is not a valid name component (lowercase letters, digits, and single '.', '_', '__' or '-' between them)"
    )]
    BadComponent { reference: String, component: String },
    #[error(
        "{reference:?}: tag {tag:?} is not valid (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')"
    )]
    BadTag { reference: String, tag: String },
    #[error("{reference:?}: registry {registry:?} is not a valid host[:port]")]
    BadRegistry { reference: String, registry: String },
    #[error("{reference:?}: {source}")]
    BadDigest { reference: String, source: DigestError },
}

/// A parsed, normalised model reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.len() > MAX_NAME_LEN + 1 + MAX_TAG_LEN + 72 {
            return Err(ReferenceError::TooLong(input.chars().take(64).collect()));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::parse(d)
                    .map_err(|source| ReferenceError::BadDigest { reference: input.to_string(), source })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(ReferenceError::BadTag { reference: input.to_string(), tag: tag.to_string() });
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        if !valid_registry(&registry) {
            return Err(ReferenceError::BadRegistry { reference: input.to_string(), registry });
        }
        if path.is_empty() {
            return Err(ReferenceError::BadComponent { reference: input.to_string(), component: String::new() });
        }
        for component in path.split('/') {
            if !valid_component(component) {
                return Err(ReferenceError::BadComponent {
                    reference: input.to_string(),
                    component: component.to_string(),
                });
            }
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("{DEFAULT_NAMESPACE}/{path}")
        } else {
            path
        };
        if repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::TooLong(repository.chars().take(64).collect()));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }
    pub fn repository(&self) -> &str {
        &self.repository
    }
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference { tag: Some(tag.to_string()), digest: None, ..self.clone() }
    }

    /// The same repository pinned to a digest, without a tag.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference { tag: None, digest: Some(digest), ..self.clone() }
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form people write: Docker Hub's host is left out (`ai/smollm2:latest`).
    pub fn familiar(&self) -> String {
        let full = self.to_string();
        match full.strip_prefix("docker.io/") {
            Some(short) => short.to_string(),
            None => full,
        }
    }

    /// Whether the registry is on this machine, where plain HTTP is allowed.
    pub fn is_loopback_registry(&self) -> bool {
        let host = host_of(&self.registry);
        host == "localhost" || host == "[::1]" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// The host part of `host[:port]` (keeping IPv6 brackets).
pub fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.find(']').map_or(registry, |i| &registry[..=i]);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = if r.starts_with('[') {
        match r.find(']') {
            Some(i) => (&r[1..i], r[i + 1..].strip_prefix(':')),
            None => return false,
        }
    } else {
        match r.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (r, None),
        }
    };
    let host_ok = if r.starts_with('[') {
        !host.is_empty() && host.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
    } else {
        host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_docker_model_runner() {
        assert_eq!(canon("smollm2"), "docker.io/ai/smollm2:latest");
        assert_eq!(canon("ai/smollm2:360M-Q4_K_M"), "docker.io/ai/smollm2:360M-Q4_K_M");
        assert_eq!(canon("index.docker.io/foo/bar"), "docker.io/foo/bar:latest");
        assert_eq!(canon("localhost:5000/smollm2"), "localhost:5000/smollm2:latest");
        assert_eq!(canon("127.0.0.1:5000/a/b/c:v1"), "127.0.0.1:5000/a/b/c:v1");
        assert_eq!(canon("ghcr.io/org/model"), "ghcr.io/org/model:latest");
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(canon(&format!("ai/x@{d}")), format!("docker.io/ai/x@{d}"));
        assert_eq!(canon(&format!("ai/x:v1@{d}")), format!("docker.io/ai/x:v1@{d}"));
        assert_eq!(Reference::parse("smollm2").unwrap().familiar(), "ai/smollm2:latest");
    }

    #[test]
    fn refuses_what_docker_refuses() {
        for bad in [
            "",
            "Ai/smollm2",
            "ai/smollm2:v1/..",
            "ai/../etc",
            "ai//x",
            "ai/x:",
            "ai/x:.hidden",
            "ai/x@sha256:../../etc/passwd",
            "ai/x@sha256:abc",
            "ai/x:-bad",
            "/ai/x",
            "ai/x/",
            "a..b/x",
            "ai/x..y",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Reference::parse(&format!("ai/{}", "a".repeat(300))).is_err());
        assert!(Reference::parse(&format!("ai/x:{}", "a".repeat(129))).is_err());
    }

    #[test]
    fn knows_loopback_registries() {
        assert!(Reference::parse("localhost:5000/a").unwrap().is_loopback_registry());
        assert!(Reference::parse("127.0.0.1:5000/a").unwrap().is_loopback_registry());
        assert!(Reference::parse("[::1]:5000/a").unwrap().is_loopback_registry());
        assert!(!Reference::parse("registry.example.com/a").unwrap().is_loopback_registry());
        assert!(!Reference::parse("a").unwrap().is_loopback_registry());
    }
}
