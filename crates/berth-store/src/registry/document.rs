//! Small documents from a registry (manifests), read with their size limit enforced while the
//! bytes arrive: a registry that sends an endless or oversized body is cut off at the limit, not
//! buffered first. oci-client reads a manifest whole before handing it over, so berth fetches
//! manifests itself, with the token oci-client negotiated.

use base64::Engine as _;

use super::{Credentials, RegistryError, RegistryOptions};
use crate::manifest::MAX_MANIFEST_BYTES;
use crate::reference::Reference;

/// The manifest `oref` names, at most [`MAX_MANIFEST_BYTES`] bytes.
pub(crate) async fn fetch_manifest(
    reference: &Reference,
    oref: &oci_client::Reference,
    options: &RegistryOptions,
    credentials: &Credentials,
    token: Option<String>,
) -> Result<Vec<u8>, crate::StoreError> {
    let registry = reference.registry().to_string();
    let host = oref.resolve_registry();
    let scheme = if options.allows_plain_http(reference) { "http" } else { "https" };
    let target = oref.digest().or(oref.tag()).unwrap_or("latest");
    let url = format!("{scheme}://{host}/v2/{}/manifests/{target}", oref.repository());
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(120))
        .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RegistryError::Unreachable { registry: registry.clone(), detail: e.to_string() })?;
    let mut request = client.get(&url).header(reqwest::header::ACCEPT, crate::media::OCI_MANIFEST);
    request = match (token.as_ref(), credentials) {
        (Some(t), _) | (None, Credentials::Bearer(t)) => request.bearer_auth(t),
        (None, Credentials::Basic { username, password }) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            request.header(reqwest::header::AUTHORIZATION, format!("Basic {encoded}"))
        }
        (None, Credentials::Anonymous) => request,
    };
    let mut response = request
        .send()
        .await
        .map_err(|e| RegistryError::Unreachable { registry: registry.clone(), detail: error_chain(&e) })?;
    let status = response.status();
    let name = reference.familiar();
    match status.as_u16() {
        200 => {}
        401 | 403 => return Err(RegistryError::Unauthorized { registry, reference: name }.into()),
        404 => return Err(RegistryError::NotFound { registry, reference: name }.into()),
        code => {
            let detail = format!("the manifest request was answered with HTTP {code}{}", reason(&mut response).await);
            return Err(RegistryError::Protocol { registry, detail }.into());
        }
    }
    if response.content_length().is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
        let n = response.content_length().unwrap_or_default() as usize;
        return Err(crate::manifest::ManifestError::TooLarge(n).into());
    }
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|e| RegistryError::Interrupted {
            digest: format!("the manifest of {name}"),
            done: body.len() as u64,
            total: body.len() as u64,
            detail: error_chain(&e),
        })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
            return Err(crate::manifest::ManifestError::TooLarge(body.len() + chunk.len()).into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The registry's own words for an error, when it sent any (at most a line of them).
async fn reason(response: &mut reqwest::Response) -> String {
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        text.extend_from_slice(&chunk);
        if text.len() > 512 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text[..text.len().min(512)]).trim().to_string();
    if text.is_empty() { String::new() } else { format!(": {}", text.lines().next().unwrap_or_default()) }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        source = s.source();
    }
    detail
}
