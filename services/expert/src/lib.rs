//! The expert worker: holds a shard of the routed experts and answers `Forward` (and its stream
//! variant) for batches of tokens of one MoE layer. Requests are validated field by field before
//! any math; the math runs on the compute pool, never on the async runtime.

mod request;
mod service;
mod worker;

pub use request::{DEFAULT_MAX_TOKENS, ForwardCall};
pub use service::ExpertServiceImpl;
pub use worker::{ExpertWorkerOptions, RunningExpertWorker, start};
