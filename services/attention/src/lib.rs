//! The attention worker: the engine (the model without its routed experts) behind a scheduler
//! with continuous batching, the remote expert backend that reaches expert workers by placement,
//! and the `expertmesh.v1.EngineService` that streams tokens to callers.

pub mod placement;
pub mod remote;
pub mod scheduler;
pub mod service;
pub mod shard_link;
pub mod worker;

pub use remote::{RemoteExperts, RemoteOptions, RemoteStats};
pub use scheduler::{EngineEvent, EngineOptions, FinishReason, GenerateParams, Scheduler};
