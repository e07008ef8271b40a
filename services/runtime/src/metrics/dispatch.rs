//! The attention worker's side of expert parallelism: per MoE layer step, the dispatch to the
//! expert shards and the combine of their partial sums; traffic; failovers; coverage.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGaugeVec};
use std::sync::OnceLock;

use super::buckets::CALL_SECONDS;
use super::{counter, counter_vec, histogram, int_gauge_vec};

/// Why a shard call was retried on another replica (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverReason {
    /// No reply within the call deadline.
    Timeout,
    /// Connection failed or the worker refused (gone, draining, not holding the expert).
    Unavailable,
    /// The reply did not match the request (wrong shape, undecodable).
    InvalidReply,
}

impl FailoverReason {
    pub const ALL: [FailoverReason; 3] =
        [FailoverReason::Timeout, FailoverReason::Unavailable, FailoverReason::InvalidReply];
    pub fn label(self) -> &'static str {
        match self {
            FailoverReason::Timeout => "timeout",
            FailoverReason::Unavailable => "unavailable",
            FailoverReason::InvalidReply => "invalid_reply",
        }
    }
}

pub struct DispatchMetrics {
    /// One MoE layer step: from sending the shard calls to the last reply (retries included).
    pub dispatch_seconds: Histogram,
    /// One MoE layer step: adding the shards' partial sums into the layer's output.
    pub combine_seconds: Histogram,
    pub calls: IntCounter,
    /// (token, MoE layer) pairs dispatched.
    pub tokens: IntCounter,
    pub sent_bytes: IntCounter,
    pub received_bytes: IntCounter,
    failovers: IntCounterVec,
    /// Registered replicas of each expert (the fewest over the layers), as this worker sees them.
    pub live_replicas: IntGaugeVec,
}

impl DispatchMetrics {
    pub fn failover(&self, reason: FailoverReason) {
        self.failovers.with_label_values(&[reason.label()]).inc();
    }
}

pub fn dispatch() -> &'static DispatchMetrics {
    static M: OnceLock<DispatchMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = DispatchMetrics {
            dispatch_seconds: histogram(
                "dispatch_seconds",
                "One MoE layer step's expert calls, until the last reply.",
                CALL_SECONDS,
            ),
            combine_seconds: histogram(
                "combine_seconds",
                "One MoE layer step's sum of the shards' partial results.",
                CALL_SECONDS,
            ),
            calls: counter("dispatch_calls_total", "Expert shard calls sent."),
            tokens: counter("dispatch_tokens_total", "(token, MoE layer) pairs dispatched to expert shards."),
            sent_bytes: counter("dispatch_sent_bytes_total", "Bytes of expert calls sent (protobuf-encoded)."),
            received_bytes: counter("dispatch_received_bytes_total", "Bytes of expert replies received."),
            failovers: counter_vec(
                "dispatch_failovers_total",
                "Shard calls retried on another replica, by reason.",
                &["reason"],
            ),
            live_replicas: int_gauge_vec(
                "expert_live_replicas",
                "Registered replicas of each routed expert (fewest over the layers).",
                &["expert"],
            ),
        };
        for r in FailoverReason::ALL {
            m.failovers.with_label_values(&[r.label()]);
        }
        m
    })
}
