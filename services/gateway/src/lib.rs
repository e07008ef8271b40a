//! The gateway's text layer: turning chat requests into DeepSeek-V4 prompts and tokens, and
//! generated tokens back into text that streams cleanly (never half a character, never a string
//! a later token rewrites, stop strings caught across token boundaries).

pub mod chat;
pub mod detok;
pub mod generation;
pub mod grpc;
pub mod observe;
pub mod openai;
pub mod router;
pub mod server;
pub mod tokenizer;

pub use chat::{ChatOptions, Message, ThinkingMode, encode_chat};
pub use detok::{IncrementalDecoder, StopMatcher};
pub use tokenizer::{TextError, Tokenizer};
