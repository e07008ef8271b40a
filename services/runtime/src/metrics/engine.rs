//! The attention worker's engine: KV usage, steps, and its configuration (request-level
//! families are in `requests`).

use prometheus::{Gauge, Histogram, IntGaugeVec};
use std::sync::OnceLock;

use super::buckets::{BATCH, CALL_SECONDS};
use super::{gauge, histogram, int_gauge_vec};

pub struct EngineMetrics {
    /// Share of the KV-state budget reserved by running sequences, 0..1 (vLLM's name).
    pub kv_cache_usage_perc: Gauge,
    /// Sequences in one engine step.
    pub step_batch_size: Histogram,
    /// Tokens in one engine step (prefill chunks plus one per decoding sequence).
    pub step_tokens: Histogram,
    /// One engine step: attention, expert dispatch, sampling.
    pub step_seconds: Histogram,
    model_info: IntGaugeVec,
    cache_config_info: IntGaugeVec,
}

pub fn engine() -> &'static EngineMetrics {
    static M: OnceLock<EngineMetrics> = OnceLock::new();
    M.get_or_init(|| EngineMetrics {
        kv_cache_usage_perc: gauge("kv_cache_usage_perc", "Share of the KV-state budget in use, 0..1."),
        step_batch_size: histogram("step_batch_size", "Sequences per engine step.", BATCH),
        step_tokens: histogram("step_tokens", "Tokens per engine step.", BATCH),
        step_seconds: histogram("step_seconds", "Duration of one engine step.", CALL_SECONDS),
        model_info: int_gauge_vec(
            "model_info",
            "The served model's shape (value 1).",
            &["model", "layers", "dim", "vocab_size", "routed_experts", "experts_per_token"],
        ),
        cache_config_info: int_gauge_vec(
            "cache_config_info",
            "The engine's batching and KV-state limits (value 1).",
            &["kv_budget_bytes", "max_running", "max_waiting", "prefill_chunk"],
        ),
    })
}

/// What `model_info` says.
pub struct ModelDescription<'a> {
    pub model: &'a str,
    pub layers: usize,
    pub dim: usize,
    pub vocab_size: usize,
    pub routed_experts: usize,
    pub experts_per_token: usize,
}

impl EngineMetrics {
    pub fn describe(
        &self,
        m: &ModelDescription,
        kv_budget_bytes: u64,
        max_running: usize,
        max_waiting: usize,
        prefill_chunk: usize,
    ) {
        let model = [
            m.model.to_string(),
            m.layers.to_string(),
            m.dim.to_string(),
            m.vocab_size.to_string(),
            m.routed_experts.to_string(),
            m.experts_per_token.to_string(),
        ];
        self.model_info.reset();
        self.model_info.with_label_values(&model.each_ref().map(String::as_str)).set(1);
        let cache =
            [kv_budget_bytes, max_running as u64, max_waiting as u64, prefill_chunk as u64].map(|v| v.to_string());
        self.cache_config_info.reset();
        self.cache_config_info.with_label_values(&cache.each_ref().map(String::as_str)).set(1);
    }
}
