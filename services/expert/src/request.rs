//! Turning a `ForwardRequest` into validated inputs for the expert store. Every check names the
//! field it concerns, so a client knows what to fix.

use expertmesh_model::engine::{ExpertStore, NO_EXPERT};
use expertmesh_model::layers::router::Routes;
use expertmesh_proto::v1::ForwardRequest;
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::wire::{self, WireDType};

/// Default cap on tokens per call (a decode batch of 512 sequences with every token on this
/// shard; prefill chunks are split by the sender).
pub const DEFAULT_MAX_TOKENS: usize = 8192;

/// A validated call.
pub struct ForwardCall {
    pub layer: usize,
    pub tokens: usize,
    pub hidden: Vec<f32>,
    pub routes: Routes,
    pub output_dtype: WireDType,
}

impl ForwardCall {
    pub fn parse(
        r: ForwardRequest,
        store: &ExpertStore,
        worker: &str,
        max_tokens: usize,
    ) -> Result<Self, ServiceError> {
        let (n_blocks, dim, n_experts) = (store.n_blocks(), store.dim(), store.n_experts());
        let layer = r.layer as usize;
        if layer >= n_blocks {
            return Err(ServiceError::invalid(
                "layer",
                format!("{layer} does not exist (the model has {n_blocks} blocks)"),
            ));
        }
        let k = r.experts_per_token as usize;
        if k == 0 || k > n_experts {
            return Err(ServiceError::invalid("experts_per_token", format!("{k} is not in 1..={n_experts}")));
        }
        let hidden = wire::decode(r.hidden.as_ref(), dim, "hidden")?;
        let tokens = hidden.rows;
        if tokens == 0 {
            return Err(ServiceError::invalid("hidden.shape", "no tokens"));
        }
        if tokens > max_tokens {
            return Err(ServiceError::invalid(
                "hidden.shape",
                format!("{tokens} tokens exceed this worker's limit of {max_tokens} per call"),
            ));
        }
        if r.expert_ids.len() != tokens * k {
            return Err(ServiceError::invalid(
                "expert_ids",
                format!("{} ids, expected tokens ({tokens}) × experts_per_token ({k})", r.expert_ids.len()),
            ));
        }
        if r.weights.len() != r.expert_ids.len() {
            return Err(ServiceError::invalid(
                "weights",
                format!("{} weights for {} expert ids", r.weights.len(), r.expert_ids.len()),
            ));
        }
        for (i, (&e, &w)) in r.expert_ids.iter().zip(&r.weights).enumerate() {
            if e == NO_EXPERT {
                continue;
            }
            if e as usize >= n_experts {
                return Err(ServiceError::invalid(format!("expert_ids[{i}]"), format!("{e} is not in 0..{n_experts}")));
            }
            if !w.is_finite() {
                return Err(ServiceError::invalid(format!("weights[{i}]"), format!("{w} is not finite")));
            }
            if !store.holds(layer, e as usize) {
                return Err(ServiceError::NotFound(format!("layer {layer} expert {e} is not held by {worker}")));
            }
        }
        let output_dtype = WireDType::from_proto(r.output_dtype, "output_dtype")?.unwrap_or(hidden.dtype);
        Ok(ForwardCall {
            layer,
            tokens,
            hidden: hidden.values,
            routes: Routes { k, experts: r.expert_ids, weights: r.weights },
            output_dtype,
        })
    }
}
