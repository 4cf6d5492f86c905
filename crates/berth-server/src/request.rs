//! Turning request bodies into validated engine requests: JSON parsing with OpenAI-shaped errors,
//! and the sampling fields OpenAI and Ollama share, each checked against its range.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use berth_engine::GenerationRequest;
use berth_engine::sampling::SamplingParams;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::models::LoadedModel;

/// How long a request's body may take to arrive (set for every request by [`body_limits`]).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// Before a body is read: a declared `Content-Length` over the limit is a 413 at once (a client
/// that sent `Expect: 100-continue` then never sends the body), and the body's read timeout rides
/// along for [`JsonBody`].
pub async fn body_limits(
    axum::extract::State((limit, timeout)): axum::extract::State<(usize, std::time::Duration)>,
    mut request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large().into_response();
    }
    request.extensions_mut().insert(BodyTimeout(timeout));
    next.run(request).await
}

fn too_large() -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: Some("request_too_large"),
        ..ApiError::bad_request("the request body is larger than the server's limit")
    }
}

/// Whether a body of this content type is read as JSON. JSON types are; so are curl's default
/// form type and none at all, but only from clients that are not browsers (no `Origin`, no
/// `Sec-Fetch-Mode`): a web page can send those types cross-site without a preflight.
fn json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let media = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let from_browser = headers.contains_key(axum::http::header::ORIGIN) || headers.contains_key("sec-fetch-mode");
    match media.as_deref() {
        Some("application/json") => Ok(()),
        Some(m) if m.starts_with("application/") && m.ends_with("+json") => Ok(()),
        None | Some("application/x-www-form-urlencoded") if !from_browser => Ok(()),
        _ => Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: Some("unsupported_media_type"),
            ..ApiError::bad_request("send the body as JSON, with `Content-Type: application/json`")
        }),
    }
}

/// A JSON body whose rejections are API errors: 415 for a body that is not declared JSON, 408
/// for one that does not arrive in time, 413 past the body limit, 400 otherwise.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        json_content_type(req.headers())?;
        let timeout = req.extensions().get::<BodyTimeout>().map_or(std::time::Duration::from_secs(60), |t| t.0);
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state)).await.map_err(|_| ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: Some("request_timeout"),
            ..ApiError::bad_request(format!("the request body did not arrive within {} s", timeout.as_secs()))
        })?;
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => return Err(ApiError::bad_request(format!("cannot read the request body: {}", e.body_text()))),
        };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
        match parsed {
            Ok(v) => match de.end() {
                Ok(()) => Ok(JsonBody(v)),
                Err(e) => Err(ApiError::bad_request(format!("the body is not valid JSON: {e}"))),
            },
            Err(e) => {
                let mut path = e.path().to_string();
                let inner = e.into_inner();
                if path.is_empty() || path == "." || path.contains('?') {
                    // Flattened fields lose their path; name the key the error points into.
                    path = key_before(&bytes, inner.line(), inner.column()).unwrap_or_default();
                }
                let message = if inner.is_syntax() || inner.is_eof() {
                    format!("the body is not valid JSON: {inner}")
                } else {
                    format!("invalid request: {inner}")
                };
                Err(if path.is_empty() || path == "." {
                    ApiError::bad_request(message)
                } else {
                    ApiError::invalid(&path, format!("{path}: {message}"))
                })
            }
        }
    }
}

/// The last `"key":` before a (1-based) line and column of a JSON text.
fn key_before(bytes: &[u8], line: usize, column: usize) -> Option<String> {
    let mut offset = 0;
    for (i, l) in bytes.split(|&b| b == b'\n').enumerate() {
        if i + 1 == line {
            offset += column.min(l.len());
            break;
        }
        offset += l.len() + 1;
    }
    let text = std::str::from_utf8(&bytes[..offset.min(bytes.len())]).ok()?;
    let colon = text.rfind("\":")?;
    let start = text[..colon].rfind('"')?;
    Some(text[start + 1..colon].to_string())
}

/// `stop`: one string or a list.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by the OpenAI endpoints.
#[derive(Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub logit_bias: Option<HashMap<String, f64>>,
    /// Keep generating past the end-of-sequence token up to the token limit (the extension vLLM and
    /// llama-server accept; benchmarks use it for fixed output lengths).
    #[serde(default)]
    pub ignore_eos: bool,
    #[allow(dead_code)]
    pub user: Option<String>,
}

const MAX_STOPS: usize = 4;
const MAX_STOP_LEN: usize = 256;

fn in_range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x as f32),
        Some(x) => Err(ApiError::invalid(param, format!("{param} must be between {lo} and {hi}, got {x}"))),
    }
}

impl Sampling {
    /// Check every field and build the engine request for `prompt`.
    pub fn to_request(
        &self,
        model: &LoadedModel,
        prompt: Vec<u32>,
        logprobs: Option<usize>,
    ) -> Result<GenerationRequest, ApiError> {
        let ctx = model.context;
        if prompt.len() >= ctx {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    "messages",
                    format!("the prompt is {} tokens; this model's context holds {ctx} tokens", prompt.len()),
                )
            });
        }
        let room = ctx - prompt.len();
        let (param, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match asked {
            None => room,
            Some(m) if m < 1 => return Err(ApiError::invalid(param, format!("{param} must be at least 1, got {m}"))),
            Some(m) if m as u64 > ctx as u64 => {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} is {m}, more than this model's context of {ctx} tokens"),
                ));
            }
            Some(m) => (m as usize).min(room),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_LEN) {
            return Err(ApiError::invalid(
                "stop",
                format!("stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_LEN} bytes"),
            ));
        }
        let vocab = model.engine.model.config.vocab_size;
        let mut logit_bias = Vec::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let id: u32 = k.parse().ok().filter(|&i: &u32| (i as usize) < vocab).ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias key {k:?} is not a token id of this model (0..{vocab})"),
                )
            })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias values must be between -100 and 100, got {v}"),
                ));
            }
            logit_bias.push((id, v as f32));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if (0..=vocab as i64).contains(&k) => k as usize,
            Some(k) => return Err(ApiError::invalid("top_k", format!("top_k must be between 0 and {vocab}, got {k}"))),
        };
        let sampling = SamplingParams {
            temperature: in_range("temperature", self.temperature, 0.0, 2.0, 1.0)?,
            top_k,
            top_p: {
                let p = in_range("top_p", self.top_p, 0.0, 1.0, 1.0)?;
                if p <= 0.0 {
                    return Err(ApiError::invalid("top_p", "top_p must be greater than 0"));
                }
                p
            },
            min_p: in_range("min_p", self.min_p, 0.0, 1.0, 0.0)?,
            repeat_penalty: in_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0, 1.0)?,
            repeat_last_n: 64,
            presence_penalty: in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?,
            seed: self.seed.map(|s| s as u64),
            logit_bias,
        };
        Ok(GenerationRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
            stop_token_ids: Vec::new(),
            logprobs,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// A unique id for a response (`chatcmpl-…`).
pub fn request_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut x = (t as u64) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((std::process::id() as u64) << 40);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    format!("{prefix}-{x:016x}{n:04x}")
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-28T18:43:01Z`).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().and_then(|t| u64::try_from(t.timestamp()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-28T18:43:01Z"), Some(1_795_891_381));
        assert_eq!(parse_rfc3339("nonsense"), None);
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(request_id("x"), request_id("x"));
    }
}
