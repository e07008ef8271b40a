//! Errors in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with the
//! matching HTTP status — the one place service errors become HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::metrics::ErrorKind;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {}", message.into()),
            param: Some(param),
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), param: None }
    }

    /// The metric label of this error (`request_errors_total{kind}`).
    pub fn error_kind(&self) -> ErrorKind {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::InvalidArgument,
            StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated,
            StatusCode::NOT_FOUND => ErrorKind::NotFound,
            StatusCode::TOO_MANY_REQUESTS => ErrorKind::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16().to_string()}})
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match &e {
            ServiceError::InvalidArgument { field, message } => ApiError::invalid(api_param(field), message.clone()),
            ServiceError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found_error", m.clone()),
            ServiceError::ResourceExhausted(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", m.clone())
            }
            ServiceError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", m.clone())
            }
            ServiceError::Cancelled(m) | ServiceError::DeadlineExceeded(m) | ServiceError::Internal(m) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", m.clone())
            }
        }
    }
}

/// The HTTP API's name for a field the engine's `Generate` request names (`prompt_tokens[3]` →
/// `prompt[3]`, `sampling.max_tokens` → `max_tokens`).
fn api_param(engine_field: &str) -> String {
    if let Some(rest) = engine_field.strip_prefix("prompt_tokens") {
        format!("prompt{rest}")
    } else {
        engine_field.strip_prefix("sampling.").unwrap_or(engine_field).to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<ApiError> for tonic::Status {
    /// The gRPC face of the same errors (the one mapping for the Inference service).
    fn from(e: ApiError) -> Self {
        let code = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}
