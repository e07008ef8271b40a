//! The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions` (streaming as
//! server-sent events ending with `data: [DONE]`, or one JSON body), `/v1/models`, `/health`,
//! `/ready`. Requests are validated before any work; errors use OpenAI's JSON shape.

mod errors;
pub(crate) mod handlers;
pub(crate) mod requests;
pub(crate) mod text;

pub use errors::ApiError;
pub use handlers::{AppState, Limits, router};
pub use text::parse_tool_calls;
