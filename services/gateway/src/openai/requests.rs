//! The OpenAI request bodies we accept, parsed with the failing field's path in the error.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;
use crate::chat::Message;

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion prompt in any of OpenAI's four shapes. Lists hold a batch of prompts (LangChain's
/// `OpenAI` sends even one prompt as a one-element list).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by completions and chat completions.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Sampling {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u32>,
    /// Chat: `true`; completions: a number (of alternatives, of which we return none). Either way
    /// each generated token's log-probability is returned (non-streaming responses).
    #[serde(default)]
    pub logprobs: Option<Value>,
}

/// The completion-specific fields (the sampling fields are parsed from the same body as
/// [`Sampling`]: two plain structs keep exact field paths in errors, which `flatten` loses).
#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
}

/// DeepSeek's switch: `"thinking": {"type": "enabled" | "disabled"}` (or a plain bool).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Thinking {
    Flag(bool),
    Typed {
        #[serde(rename = "type")]
        kind: String,
    },
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub thinking: Option<Thinking>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    #[serde(default)]
    pub response_format: Option<Value>,
}

/// Parses a JSON body; the error names the field (`messages[2].role`, `max_tokens`).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // "." (the whole body) or "?" (not JSON at all): the body itself is at fault.
        let param = if path == "." || path.starts_with('?') { "body".to_string() } else { path };
        ApiError::invalid(param, e.into_inner().to_string())
    })
}
