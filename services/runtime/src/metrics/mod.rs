//! Every metric expertmesh exports is named in this module (and only here).
//!
//! Naming policy, after Prometheus' conventions:
//! - the prefix `expertmesh_` on every family (the standard `process_*` collector excepted);
//! - `_total` only on counters; base units in the name (`_seconds`, `_bytes`); `_perc` for a
//!   0..1 ratio (vLLM's name); `_info` for a constant 1 carrying configuration in labels;
//! - closed label sets: values come from the enums and constants below or from the cluster's own
//!   bounded identities (worker ids, expert ids, layer ids), never from request content.
//!
//! The request-level families carry the names inference dashboards know from vLLM (without its
//! `vllm:` colons: Prometheus reserves colons for recording rules). The gateway and the attention
//! workers both export them, told apart by the label `role` (`gateway`: what clients see, from
//! arrival to the last byte; `attention`: the engine's own view, from submission to the last
//! token). Families live in the process-wide default registry and are registered on first use,
//! so each process exports the families of the roles it runs (a local cluster: all of them).

mod buckets;
mod dispatch;
mod engine;
mod expert;
mod http;
mod process;
mod registry;
mod requests;

pub use dispatch::{DispatchMetrics, FailoverReason, dispatch};
pub use engine::{EngineMetrics, ModelDescription, engine};
pub use expert::{ExpertMetrics, ExpertWorkerMetrics, expert};
pub use http::{MetricsServer, metrics_response, serve};
pub use process::{init, render, spans_dropped, spans_exported};
pub use registry::watch_registry;
pub use requests::{
    ErrorKind, FinishedReason, RequestMetrics, Role as RequestRole, RoleRequestMetrics, TokenClock, requests,
    role_metrics,
};

use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

const NAMESPACE: &str = "expertmesh";

/// Registers `c` in the process-wide registry. Families are created once per process (each
/// behind a `OnceLock`), so a second registration is a bug in this module.
fn register<C: Collector + Clone + 'static>(c: C) -> C {
    prometheus::default_registry().register(Box::new(c.clone())).expect("a metric family registered twice");
    c
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::with_opts(opts(name, help)).expect("valid counter"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(opts(name, help), labels).expect("valid counter"))
}

fn gauge(name: &str, help: &str) -> Gauge {
    register(Gauge::with_opts(opts(name, help)).expect("valid gauge"))
}

fn int_gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::with_opts(opts(name, help)).expect("valid gauge"))
}

fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(opts(name, help), labels).expect("valid gauge"))
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let o = HistogramOpts::new(name, help).namespace(NAMESPACE).buckets(buckets.to_vec());
    register(Histogram::with_opts(o).expect("valid histogram"))
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let o = HistogramOpts::new(name, help).namespace(NAMESPACE).buckets(buckets.to_vec());
    register(HistogramVec::new(o, labels).expect("valid histogram"))
}
