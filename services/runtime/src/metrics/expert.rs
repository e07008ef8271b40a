//! Expert workers, per shard (label `worker`: a local cluster runs several in one process).

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use std::sync::OnceLock;

use super::buckets::CALL_SECONDS;
use super::{counter_vec, histogram_vec, int_gauge_vec};

pub struct ExpertMetrics {
    calls: IntCounterVec,
    tokens: IntCounterVec,
    received_bytes: IntCounterVec,
    sent_bytes: IntCounterVec,
    forward_seconds: HistogramVec,
    queue_seconds: HistogramVec,
    resident_bytes: IntGaugeVec,
    routed_tokens: IntCounterVec,
    layer_routed_tokens: IntCounterVec,
    errors: IntCounterVec,
}

pub fn expert() -> &'static ExpertMetrics {
    static M: OnceLock<ExpertMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let w = &["worker"];
        ExpertMetrics {
            calls: counter_vec("expert_forward_calls_total", "Forward calls served.", w),
            tokens: counter_vec("expert_forward_tokens_total", "Token rows received in forward calls.", w),
            received_bytes: counter_vec("expert_received_bytes_total", "Bytes of forward calls received.", w),
            sent_bytes: counter_vec("expert_sent_bytes_total", "Bytes of forward replies sent.", w),
            forward_seconds: histogram_vec(
                "expert_forward_seconds",
                "One forward call, from arrival to the encoded reply.",
                w,
                CALL_SECONDS,
            ),
            queue_seconds: histogram_vec(
                "expert_queue_seconds",
                "From a call's arrival until its math starts on the compute pool.",
                w,
                CALL_SECONDS,
            ),
            resident_bytes: int_gauge_vec("expert_resident_weight_bytes", "Weight bytes this shard holds.", w),
            routed_tokens: counter_vec(
                "expert_routed_tokens_total",
                "Tokens routed to each held expert (summed over layers).",
                &["worker", "expert"],
            ),
            layer_routed_tokens: counter_vec(
                "expert_layer_routed_tokens_total",
                "Tokens routed to each held expert per layer (with --metrics-per-layer).",
                &["worker", "layer", "expert"],
            ),
            errors: counter_vec(
                "expert_forward_errors_total",
                "Forward calls refused or failed, by kind.",
                &["worker", "kind"],
            ),
        }
    })
}

/// One worker's resolved families.
pub struct ExpertWorkerMetrics {
    pub calls: IntCounter,
    pub tokens: IntCounter,
    pub received_bytes: IntCounter,
    pub sent_bytes: IntCounter,
    pub forward_seconds: Histogram,
    pub queue_seconds: Histogram,
    pub resident_bytes: IntGauge,
    worker: String,
    /// By expert id; `None` for experts not held.
    routed: Vec<Option<IntCounter>>,
    /// By layer, then expert id; empty unless per-layer detail is on.
    layer_routed: Vec<Vec<Option<IntCounter>>>,
}

impl ExpertMetrics {
    /// `held`: the (layer, expert) pairs the worker holds; every series is created at zero.
    pub fn worker(&self, worker: &str, held: &[(usize, usize)], per_layer: bool) -> ExpertWorkerMetrics {
        let w = &[worker];
        let n_experts = held.iter().map(|&(_, e)| e + 1).max().unwrap_or(0);
        let n_layers = held.iter().map(|&(l, _)| l + 1).max().unwrap_or(0);
        let mut routed = vec![None; n_experts];
        let mut layer_routed = if per_layer { vec![vec![None; n_experts]; n_layers] } else { Vec::new() };
        for &(l, e) in held {
            routed[e].get_or_insert_with(|| self.routed_tokens.with_label_values(&[worker, &e.to_string()]));
            if per_layer {
                layer_routed[l][e] =
                    Some(self.layer_routed_tokens.with_label_values(&[worker, &l.to_string(), &e.to_string()]));
            }
        }
        for k in super::ErrorKind::ALL {
            self.errors.with_label_values(&[worker, k.label()]);
        }
        ExpertWorkerMetrics {
            calls: self.calls.with_label_values(w),
            tokens: self.tokens.with_label_values(w),
            received_bytes: self.received_bytes.with_label_values(w),
            sent_bytes: self.sent_bytes.with_label_values(w),
            forward_seconds: self.forward_seconds.with_label_values(w),
            queue_seconds: self.queue_seconds.with_label_values(w),
            resident_bytes: self.resident_bytes.with_label_values(w),
            worker: worker.to_string(),
            routed,
            layer_routed,
        }
    }
}

impl ExpertWorkerMetrics {
    /// Counts one call's routing slots (`NO_EXPERT` and unknown ids are skipped).
    pub fn routed(&self, layer: usize, expert_ids: &[u32]) {
        let per_layer = self.layer_routed.get(layer);
        for &e in expert_ids {
            if let Some(Some(c)) = self.routed.get(e as usize) {
                c.inc();
            }
            if let Some(Some(c)) = per_layer.and_then(|l| l.get(e as usize)) {
                c.inc();
            }
        }
    }

    pub fn failed(&self, kind: super::ErrorKind) {
        expert().errors.with_label_values(&[&self.worker, kind.label()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(name: &str, labels: &[(&str, &str)]) -> f64 {
        prometheus::gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)))
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    #[test]
    fn routed_tokens_count_held_experts_per_expert_and_per_layer() {
        // Layers 0-1 hold experts 2 and 5; layer 3 holds 5.
        let held = [(0, 2), (0, 5), (1, 2), (1, 5), (3, 5)];
        let w = expert().worker("unit-per-layer", &held, true);
        w.routed(0, &[2, 5, 5, u32::MAX, 9]);
        w.routed(3, &[5, 5]);
        let per_expert =
            |e: &str| exported("expertmesh_expert_routed_tokens_total", &[("worker", "unit-per-layer"), ("expert", e)]);
        assert_eq!(per_expert("2"), 1.0);
        assert_eq!(per_expert("5"), 4.0);
        let per_layer = |l: &str, e: &str| {
            exported(
                "expertmesh_expert_layer_routed_tokens_total",
                &[("worker", "unit-per-layer"), ("layer", l), ("expert", e)],
            )
        };
        assert_eq!(per_layer("0", "5"), 2.0);
        assert_eq!(per_layer("3", "5"), 2.0);
        assert_eq!(per_layer("1", "2"), 0.0);
        // Not held: no series at all (the label set stays bounded by what the worker holds).
        assert_eq!(
            exported("expertmesh_expert_routed_tokens_total", &[("worker", "unit-per-layer"), ("expert", "9")]),
            0.0
        );
        let series = prometheus::gather()
            .iter()
            .filter(|f| f.name() == "expertmesh_expert_layer_routed_tokens_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == "unit-per-layer"))
            .count();
        assert_eq!(series, held.len());

        let plain = expert().worker("unit-plain", &held, false);
        plain.routed(0, &[2]);
        assert_eq!(
            exported("expertmesh_expert_routed_tokens_total", &[("worker", "unit-plain"), ("expert", "2")]),
            1.0
        );
        assert_eq!(exported("expertmesh_expert_layer_routed_tokens_total", &[("worker", "unit-plain")]), 0.0);
    }
}
