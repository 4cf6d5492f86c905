//! API errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status
//! code that fits, so clients that speak OpenAI (and Ollama, which reads `error` too) understand them.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        let list = if available.is_empty() { "none; package or pull one".to_string() } else { available.join(", ") };
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist. Available models: {list}"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    /// The key is valid but may not do this.
    pub fn forbidden_scope(message: impl Into<String>) -> Self {
        Self { code: Some("insufficient_scope"), ..Self::forbidden(message) }
    }

    /// A key kept to other models (`berth keys create --models`).
    pub fn forbidden_model(message: impl Into<String>) -> Self {
        Self { code: Some("model_not_allowed"), ..Self::forbidden(message) }
    }

    pub fn with_code(self, code: &'static str) -> Self {
        Self { code: Some(code), ..self }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("host_not_allowed"),
            retry_after: None,
        }
    }

    /// A model does not fit the memory budget.
    /// The request conflicts with what is in progress (a rollout under way, a version already
    /// serving).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, code: Some("conflict"), ..Self::bad_request(message) }
    }

    pub fn insufficient_memory(message: impl Into<String>) -> Self {
        Self { code: Some("insufficient_memory"), ..Self::unavailable(message) }
    }

    /// Too many requests are waiting: come back after `seconds`.
    pub fn overloaded(message: impl Into<String>, seconds: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
            retry_after: Some(seconds),
        }
    }

    /// The error as the client sees it. An internal error's message can hold what only the
    /// operator should see (file paths, database errors): it goes to the log under the request's id,
    /// and the client is given that id.
    pub fn body(&self) -> serde_json::Value {
        let message = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            let id = crate::request_log::current().unwrap_or_else(|| "-".into());
            tracing::error!(request_id = %id, "internal error: {}", self.message);
            format!("internal server error; the server's log has the details under request id {id}")
        } else {
            self.message.clone()
        };
        json!({"error": {"message": message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Which API's error shape a request's errors take, chosen by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"error": {"message", "type", "param", "code"}}`
    OpenAi,
    /// `{"error": "<message>", "code"?}` (Ollama's clients read `error` as a string).
    Ollama,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
}

tokio::task_local! {
    static SHAPE: Shape;
}

impl Shape {
    pub fn of_path(path: &str) -> Shape {
        if path.starts_with("/api/") {
            Shape::Ollama
        } else if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Shape::Anthropic
        } else {
            Shape::OpenAi
        }
    }

    /// The shape of the request being handled (OpenAI's outside one).
    pub fn current() -> Shape {
        SHAPE.try_with(|s| *s).unwrap_or(Shape::OpenAi)
    }
}

/// Every error of a request, whichever layer makes it (auth, limits, the handler), in the shape of
/// the API it called.
pub async fn with_shape(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let shape = Shape::of_path(request.uri().path());
    SHAPE.scope(shape, next.run(request)).await
}

impl ApiError {
    /// Anthropic's name for this kind of error.
    pub fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The body in `shape`.
    pub fn body_in(&self, shape: Shape) -> serde_json::Value {
        let openai = self.body();
        let message = openai["error"]["message"].clone();
        match shape {
            Shape::OpenAi => openai,
            // Ollama's clients read `error` as the message; berth's code rides beside it.
            Shape::Ollama => match self.code {
                Some(code) => json!({"error": message, "code": code}),
                None => json!({"error": message}),
            },
            Shape::Anthropic => json!({"type": "error", "error": {"type": self.anthropic_type(), "message": message}}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body_in(Shape::current()))).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl ApiError {
    /// The one classification of engine errors: status, code and Retry-After. `model` and
    /// `max_running` word a full queue's answer and size its Retry-After.
    pub fn from_engine(e: berth_engine::EngineError, model: &str, max_running: usize) -> ApiError {
        use berth_engine::EngineError as E;
        match e {
            E::InvalidParameter { param, message } => ApiError::invalid(&param, message),
            E::ContextOverflow { .. } => {
                ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid("messages", e.to_string()) }
            }
            E::KvCacheTooSmall { .. } => ApiError::bad_request(e.to_string()).with_code("kv_cache_too_small"),
            E::Sampling(_) | E::Template(_) | E::Tokenizer(_) => ApiError::bad_request(e.to_string()),
            E::QueueFull { waiting } => {
                let seconds = (1 + waiting / max_running.max(1)).min(60) as u64;
                ApiError::overloaded(
                    format!(
                        "{waiting} requests are already waiting for `{model}` (the server's --max-queue); retry in {seconds} s"
                    ),
                    seconds,
                )
            }
            E::TimedOut(_) => ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                code: Some("timeout"),
                ..ApiError::unavailable(e.to_string())
            },
            E::Stopped => ApiError::unavailable(e.to_string()),
            // The client's grammar led somewhere it cannot leave (its work limit per token).
            E::Grammar(_) => ApiError::bad_request(e.to_string()).with_code("structured_output_failed"),
            _ => ApiError::internal(e.to_string()),
        }
    }

    /// The `reason` label a failed request is counted under in `berth_request_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self.status.as_u16() {
            429 if self.code == Some("insufficient_quota") => "quota",
            429 => "queue_full",
            504 => "timeout",
            400..=499 => "invalid",
            _ => "error",
        }
    }
}

impl From<berth_engine::EngineError> for ApiError {
    fn from(e: berth_engine::EngineError) -> Self {
        ApiError::from_engine(e, "the model", 1)
    }
}
