//! Plumbing shared by every expertmesh service: the registry (etcd and in-memory backends), the
//! wire format of activations, the one error type and its `tonic::Status` mapping, gRPC serving
//! (listeners with `TCP_NODELAY`, health) and graceful shutdown.

pub mod allocator;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod serve;
pub mod shutdown;
pub mod testkit;
pub mod trace;
pub mod wire;

pub use error::ServiceError;
