//! The services' one error type and its one mapping to `tonic::Status` (and back, so a code
//! survives a hop: an expert's `INVALID_ARGUMENT` reaches the gateway as `INVALID_ARGUMENT`).

use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// A request field is malformed; `field` is its path (`hidden.shape`, `sampling.top_p`).
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    /// No live worker can do this (e.g. no replica of an expert); retrying elsewhere may help.
    #[error("{0}")]
    Unavailable(String),
    /// Over a limit (queue full, batch too large for the budget).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServiceError::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// Stable snake_case kind (log field and metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            ServiceError::InvalidArgument { .. } => "invalid_argument",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::Unavailable(_) => "unavailable",
            ServiceError::ResourceExhausted(_) => "resource_exhausted",
            ServiceError::Cancelled(_) => "cancelled",
            ServiceError::DeadlineExceeded(_) => "deadline_exceeded",
            ServiceError::Internal(_) => "internal",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServiceError::Cancelled(_) => Code::Cancelled,
            ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServiceError::Internal(_) => Code::Internal,
        }
    }

    /// Rebuilds an error from a peer's status, keeping its code.
    pub fn from_code(code: Code, message: impl Into<String>) -> Self {
        let m = message.into();
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                // Our services write `field: message` (this type's Display): keep the field.
                match m.split_once(": ") {
                    Some((field, message)) if is_field_path(field) => ServiceError::invalid(field, message),
                    _ => ServiceError::InvalidArgument { field: "request".into(), message: m },
                }
            }
            Code::NotFound => ServiceError::NotFound(m),
            Code::Unavailable => ServiceError::Unavailable(m),
            Code::ResourceExhausted => ServiceError::ResourceExhausted(m),
            Code::Cancelled => ServiceError::Cancelled(m),
            Code::DeadlineExceeded => ServiceError::DeadlineExceeded(m),
            _ => ServiceError::Internal(m),
        }
    }
}

/// A request field's path as errors name it: `sampling.top_p`, `prompt_tokens[3]`.
fn is_field_path(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl From<Status> for ServiceError {
    fn from(s: Status) -> Self {
        ServiceError::from_code(s.code(), s.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_a_hop() {
        for e in [
            ServiceError::invalid("hidden.shape", "bad"),
            ServiceError::NotFound("x".into()),
            ServiceError::Unavailable("x".into()),
            ServiceError::ResourceExhausted("x".into()),
            ServiceError::Cancelled("x".into()),
            ServiceError::DeadlineExceeded("x".into()),
            ServiceError::Internal("x".into()),
        ] {
            let status = Status::from(e.clone());
            assert_eq!(status.code(), e.code());
            assert_eq!(ServiceError::from(status).code(), e.code());
        }
        assert_eq!(Status::from(ServiceError::invalid("hidden.shape", "bad")).message(), "hidden.shape: bad");
        // The field survives too; a message that does not start with one names the request.
        let hop = |e: ServiceError| ServiceError::from(Status::from(e));
        assert_eq!(
            hop(ServiceError::invalid("prompt_tokens[3]", "x: y")),
            ServiceError::invalid("prompt_tokens[3]", "x: y")
        );
        assert_eq!(
            ServiceError::from(Status::invalid_argument("no field here: x")),
            ServiceError::invalid("request", "no field here: x")
        );
    }
}
