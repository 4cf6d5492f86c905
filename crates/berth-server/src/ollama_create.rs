//! Ollama's way of making models on a server: upload a file as a blob (`HEAD`/`POST
//! /api/blobs/{digest}`), then `/api/create` a model from it (`files`) or from a model already in
//! the store (`from`). `ollama create -f Modelfile` does exactly this (the client reads the
//! Modelfile), as do the official libraries' `create`. Both are admin operations.
//!
//! berth's models are OCI artifacts of weights, chat template and licenses: what a Modelfile adds
//! beyond those (a system prompt, sampling parameters, preset messages, adapters, quantisation) has
//! no place in them, so a request that asks for it is refused by name rather than half done.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::error::ApiError;

/// The largest blob one upload may carry (a model's weights; the disk is the practical limit).
pub const MAX_BLOB_BYTES: u64 = 512 << 30;
/// How long an upload may pause between chunks before it is dropped.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// The path under which uploads arrive (exempt from the JSON body limit, see `request::body_limits`).
pub const BLOBS_PATH: &str = "/api/blobs/";

fn digest_of(text: &str) -> Result<berth_store::Digest, ApiError> {
    berth_store::Digest::parse(text).map_err(|e| ApiError::invalid("digest", format!("{text:?} is not a digest: {e}")))
}

fn store(state: &AppState) -> Result<berth_store::Store, ApiError> {
    berth_store::Store::open(state.models.home()).map_err(|e| ApiError::internal(e.to_string()))
}

/// `HEAD /api/blobs/{digest}`: 200 when the store holds the blob, 404 when it does not.
pub async fn has_blob(State(state): State<AppState>, Path(digest): Path<String>) -> Result<StatusCode, ApiError> {
    let digest = digest_of(&digest)?;
    let present = store(&state)?.blob_path(&digest).is_file();
    Ok(if present { StatusCode::OK } else { StatusCode::NOT_FOUND })
}

/// `POST /api/blobs/{digest}`: the body becomes a blob of the store if its bytes have that digest
/// (201), streamed to disk as it arrives and checked before anyone can see it. A blob no model
/// references yet is garbage to `berth prune` until `/api/create` uses it.
pub async fn put_blob(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let digest = digest_of(&digest)?;
    let store = store(&state)?;
    if store.blob_path(&digest).is_file() {
        return Ok(StatusCode::CREATED);
    }
    // The file is written on a blocking thread; chunks reach it through a short queue, so a slow
    // disk slows the upload instead of filling memory.
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let expected = digest.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let _writing = store.writer_lock()?;
        let mut blob = store.blob_writer()?;
        while let Some(chunk) = rx.blocking_recv() {
            std::io::Write::write_all(&mut blob, &chunk)
                .map_err(|source| berth_store::StoreError::Io { context: "writing a blob".into(), source })?;
        }
        let size = blob.len();
        blob.commit(Some((&expected, size)))
    });
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    let refused = loop {
        let chunk = match tokio::time::timeout(UPLOAD_IDLE, stream.next()).await {
            Err(_) => {
                break Some(ApiError {
                    status: StatusCode::REQUEST_TIMEOUT,
                    ..ApiError::bad_request("the upload stalled")
                });
            }
            Ok(None) => break None,
            Ok(Some(Err(e))) => break Some(ApiError::bad_request(format!("the upload broke off: {e}"))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        received += chunk.len() as u64;
        if received > MAX_BLOB_BYTES {
            break Some(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                ..ApiError::bad_request(format!("a blob may have at most {MAX_BLOB_BYTES} bytes"))
            });
        }
        if tx.send(chunk).await.is_err() {
            break None; // the writer failed; its error is below
        }
    };
    drop(tx);
    if let Some(e) = refused {
        // The writer sees the queue close and commits nothing that does not match the digest.
        let _ = writer.await;
        return Err(e);
    }
    match writer.await.map_err(|e| ApiError::internal(format!("the upload stopped: {e}")))? {
        Ok(_) => Ok(StatusCode::CREATED),
        Err(berth_store::StoreError::DigestMismatch { actual, .. }) => {
            Err(ApiError::invalid("digest", format!("the uploaded bytes have digest {actual}, not {digest}")))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

#[derive(Deserialize)]
pub struct CreateRequest {
    #[serde(alias = "name")]
    model: String,
    from: Option<String>,
    /// File name → digest of an uploaded blob.
    #[serde(default)]
    files: BTreeMap<String, String>,
    template: Option<String>,
    license: Option<Value>,
    system: Option<Value>,
    parameters: Option<Value>,
    messages: Option<Value>,
    adapters: Option<Value>,
    quantize: Option<Value>,
    modelfile: Option<Value>,
    stream: Option<bool>,
}

/// `POST /api/create`: a model from an uploaded GGUF (`files`, with an optional `template` and
/// `license`) or another name for a model of the store (`from`).
pub async fn create(
    State(state): State<AppState>,
    crate::request::JsonBody(req): crate::request::JsonBody<CreateRequest>,
) -> Response {
    let stream = req.stream.unwrap_or(true);
    let made = async move {
        let plan = plan(&req)?;
        let reference =
            berth_store::Reference::parse(&req.model).map_err(|e| ApiError::invalid("model", e.to_string()))?;
        let store = store(&state)?;
        tokio::task::spawn_blocking(move || make(&store, plan, &reference))
            .await
            .map_err(|e| ApiError::internal(format!("creating the model stopped: {e}")))?
    };
    if !stream {
        return match made.await {
            Ok(()) => Json(json!({"status": "success"})).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let (tx, rx) = mpsc::channel::<String>(4);
    tokio::spawn(async move {
        let _ = tx.send(format!("{}\n", json!({"status": "creating model"}))).await;
        let last = match made.await {
            Ok(()) => json!({"status": "success"}),
            Err(e) => json!({"error": e.message}),
        };
        let _ = tx.send(format!("{last}\n")).await;
    });
    let body = ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response()
}

/// What a create request asks for, checked before anything is written.
enum Plan {
    /// Another name for a model of the store.
    Copy(berth_store::Reference),
    /// A new model from an uploaded GGUF.
    Package { weights: berth_store::Digest, template: Option<String>, licenses: Vec<String> },
}

fn plan(req: &CreateRequest) -> Result<Plan, ApiError> {
    let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null() && *v != json!({}) && *v != json!([]));
    if given(&req.modelfile) {
        return Err(ApiError::invalid(
            "modelfile",
            "send `from` or `files` (Ollama's current create API; `ollama create` reads the Modelfile itself)",
        ));
    }
    for (field, value) in [("system", &req.system), ("parameters", &req.parameters), ("messages", &req.messages)] {
        if given(value) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "berth models carry weights, a chat template and licenses, not `{field}`: send it with each request"
                ),
            ));
        }
    }
    if given(&req.adapters) {
        return Err(ApiError::invalid("adapters", "berth does not apply adapters; package a merged GGUF"));
    }
    if given(&req.quantize) {
        return Err(ApiError::invalid("quantize", "berth does not quantise; package a quantised GGUF"));
    }
    let licenses =
        match &req.license {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::invalid("license", "license must be a string or a list of strings"))?,
            Some(_) => return Err(ApiError::invalid("license", "license must be a string or a list of strings")),
        };
    match (&req.from, req.files.is_empty()) {
        (Some(from), true) => {
            if req.template.is_some() || !licenses.is_empty() {
                return Err(ApiError::invalid(
                    "template",
                    "with `from`, berth gives the model another name; a new template or license needs the weights (`files`)",
                ));
            }
            Ok(Plan::Copy(berth_store::Reference::parse(from).map_err(|e| ApiError::invalid("from", e.to_string()))?))
        }
        (None, false) => {
            let ggufs: Vec<&String> = req
                .files
                .iter()
                .filter(|(name, _)| name.to_ascii_lowercase().ends_with(".gguf"))
                .map(|(_, d)| d)
                .collect();
            if ggufs.len() != 1 || req.files.len() != 1 {
                return Err(ApiError::invalid(
                    "files",
                    "files must name exactly one .gguf file (berth serves GGUF models)",
                ));
            }
            Ok(Plan::Package { weights: digest_of(ggufs[0])?, template: req.template.clone(), licenses })
        }
        _ => Err(ApiError::invalid("from", "send either `from` (a model of the store) or `files` (uploaded blobs)")),
    }
}

fn make(store: &berth_store::Store, plan: Plan, reference: &berth_store::Reference) -> Result<(), ApiError> {
    match plan {
        Plan::Copy(from) => match store.tag(&from, reference) {
            Ok(_) => Ok(()),
            Err(berth_store::StoreError::NotFound(_)) => {
                Err(ApiError::not_found(format!("model '{}' not found", from.familiar())))
            }
            Err(e) => Err(ApiError::internal(e.to_string())),
        },
        Plan::Package { weights, template, licenses } => {
            let path = store.blob_path(&weights);
            if !path.is_file() {
                return Err(ApiError::invalid(
                    "files",
                    format!("no blob {weights} on the server: upload it first with POST /api/blobs/{weights}"),
                ));
            }
            // The template is code every server of the model will run: vetted as a pull vets it.
            berth_engine::vet_artifact_template(Some(&path), template.as_deref().map(str::as_bytes)).map_err(|e| {
                let message = match e {
                    // The paths are the store's own; they stay out of what the client sees.
                    berth_engine::EngineError::Gguf { source, .. } => {
                        format!("the uploaded file is not a usable GGUF: {source}")
                    }
                    berth_engine::EngineError::Io { source, .. } => {
                        format!("the uploaded file cannot be read: {source}")
                    }
                    other => format!("the chat template cannot be used ({other})"),
                };
                ApiError::invalid("files", message)
            })?;
            let pkg = berth_store::package::GgufPackage {
                gguf: path,
                chat_template_text: template,
                license_texts: licenses,
                ..Default::default()
            };
            berth_store::package::package_gguf(store, &pkg, reference, &berth_store::progress::NoProgress)
                .map(|_| ())
                .map_err(|e| match e {
                    berth_store::StoreError::Config(m) => ApiError::invalid("files", m),
                    other => ApiError::internal(other.to_string()),
                })
        }
    }
}
