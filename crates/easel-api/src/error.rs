//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.

use serde::{Deserialize, Serialize};

/// The body of an error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// An API error: an HTTP status and an OpenAI-shaped body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {}", body.message)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorBody,
    /// Seconds for a Retry-After header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, kind: &str, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Self {
        Self {
            status,
            body: ErrorBody { message: message.into(), kind: kind.into(), param: param.map(Into::into), code: code.map(Into::into) },
            retry_after: None,
        }
    }

    /// 400 naming the offending parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message, Some(param), Some("invalid_value"))
    }

    /// 400 when a provider's moderation refused the prompt or its result.
    pub fn content_policy(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message, Some("prompt"), Some("content_policy_violation"))
    }

    /// 400 for a body that is not the JSON we expect.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message, None, Some("invalid_json"))
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "invalid_request_error", message, None, Some("invalid_api_key"))
    }

    /// 403: a signed URL that is wrong or expired.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "invalid_request_error", message, None, Some("forbidden"))
    }

    /// 409: the job a synchronous request waited for was canceled (by its owner).
    pub fn canceled(job_id: &str) -> Self {
        Self::new(409, "invalid_request_error", format!("job {job_id} was canceled before it finished"), None, Some("job_canceled"))
    }

    /// 409: an idempotency key sent again with a different request.
    pub fn idempotency_key_reused(job_id: &str) -> Self {
        Self::new(
            409,
            "invalid_request_error",
            format!("this Idempotency-Key was already used for job {job_id} with a different request; use a new key"),
            Some("Idempotency-Key"),
            Some("idempotency_key_reused"),
        )
    }

    /// 404 for an unknown model.
    pub fn unknown_model(model: &str) -> Self {
        Self::new(404, "invalid_request_error", format!("The model `{model}` does not exist"), Some("model"), Some("model_not_found"))
    }

    /// 404 for anything else.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "invalid_request_error", message, None, Some("not_found"))
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(413, "invalid_request_error", format!("request body is larger than {limit} bytes"), None, Some("request_too_large"))
    }

    /// 429 with Retry-After.
    pub fn overloaded(message: impl Into<String>, retry_after: u64) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(429, "rate_limit_error", message, None, Some("rate_limit_exceeded")) }
    }

    /// 503 with Retry-After.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(5), ..Self::new(503, "server_error", message, None, Some("unavailable")) }
    }

    /// 500: a bug or an internal fault, never bad input.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message, None, Some("internal_error"))
    }

    /// The JSON body `{"error": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.body })
    }
}
