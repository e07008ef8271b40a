//! Prefill and decode over per-sequence state, with routed experts behind a trait.

mod block;
pub mod experts;
mod model;
pub mod sampling;
mod state;
mod teacher;

pub use experts::{ExpertBackend, ExpertSelection, ExpertStore, LocalExperts, NO_EXPERT};
pub use model::{LoadOptions, LogitRows, Model, MtpStep, Step, StepOutput};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use state::{SequenceState, state_bytes, state_bytes_per_token};
pub use teacher::teacher_forced_logits;
