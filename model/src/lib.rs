//! DeepSeek-V4 on CPU: the model half of expertmesh.
//!
//! Pure math, no async runtime: configuration (`config`), checkpoints in the released format
//! (`checkpoint`), number formats (`numerics`), kernels (`kernels`), the layers of the forward
//! pass (`layers`) and the engine that runs prefill/decode over per-sequence state (`engine`).
//! The engine reaches routed experts through [`engine::ExpertBackend`], so the same code runs with
//! experts in process or on remote expert workers.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod layers;
pub mod numerics;

pub use config::{AttentionKind, ModelConfig, Preset};
pub use error::{ExpertError, ModelError};
