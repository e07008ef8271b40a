//! The model crate's one error type. Messages name the offending field, tensor or file so that a
//! user can act on them without reading code.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    /// An invalid or inconsistent `config.json` (the message names the field).
    #[error("invalid config: {0}")]
    Config(String),
    /// A checkpoint that does not match the config: missing/extra/mis-shaped tensors, bad files.
    #[error("invalid checkpoint: {0}")]
    Checkpoint(String),
    /// A file could not be read or written.
    #[error("i/o error: {0}")]
    Io(String),
    /// Bad input to the forward pass (token out of range, sequence too long, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A routed-expert backend failed (the message names the expert and the reason).
    #[error("expert backend: {0}")]
    Expert(#[from] ExpertError),
}

impl ModelError {
    /// Prefixes the message with where it happened (a file, a tensor).
    pub fn context(self, what: &str) -> Self {
        match self {
            ModelError::Config(m) => ModelError::Config(format!("{what}: {m}")),
            ModelError::Checkpoint(m) => ModelError::Checkpoint(format!("{what}: {m}")),
            ModelError::Io(m) => ModelError::Io(format!("{what}: {m}")),
            ModelError::InvalidInput(m) => ModelError::InvalidInput(format!("{what}: {m}")),
            e @ ModelError::Expert(_) => e,
        }
    }
}

/// Why a routed-expert computation failed. Kept separate so that a remote backend can map its
/// transport failures onto the same kinds the in-process backend reports.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ExpertError {
    /// No live holder of this expert (e.g. every replica is down).
    #[error("layer {layer} expert {expert} is unavailable: {reason}")]
    Unavailable { layer: usize, expert: usize, reason: String },
    /// The backend does not hold this expert at all.
    #[error("layer {layer} expert {expert} is not held by this backend")]
    NotHeld { layer: usize, expert: usize },
    /// A malformed request (shape, ids, non-finite values).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A backend answered with something that is not a valid result (wrong size, non-finite).
    #[error("invalid response: {0}")]
    InvalidResponse(String),
}
