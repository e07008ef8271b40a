//! A Hugging Face `tokenizer.json` (DeepSeek's byte-level BPE), loaded with the `tokenizers`
//! crate built without C/C++ (its fancy-regex backend handles DeepSeek's pre-tokenizer regexes).

use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum TextError {
    #[error("tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizing: {0}")]
    Encode(String),
    #[error("token id {0} is not in the vocabulary")]
    UnknownToken(u32),
    #[error("invalid chat request: {0}")]
    Chat(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TextError::Load { path: path.display().to_string(), message: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`. Special tokens written in the text (`<｜User｜>`, the BOS) map to
    /// their ids, as the chat format requires; nothing is added around the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`encode`](Self::encode) on the blocking pool: a long text (a prompt near the 4 MiB body
    /// limit takes the tokenizer seconds) would otherwise hold one of the async runtime's few
    /// threads, and every other request's streams, health checks and metrics with it.
    pub async fn encode_off_runtime(self: &Arc<Self>, text: String) -> Result<Vec<u32>, TextError> {
        let tokenizer = self.clone();
        tokio::task::spawn_blocking(move || tokenizer.encode(&text))
            .await
            .map_err(|e| TextError::Encode(format!("the tokenizer task failed: {e}")))?
    }

    /// The text of `ids`, special tokens included (they are part of what the model wrote).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TextError::UnknownToken(bad));
        }
        self.inner.decode(ids, false).map_err(|e| TextError::Encode(e.to_string()))
    }

    /// Whether `id` has a token (a model's embedding may have more rows than the vocabulary).
    pub fn knows(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
