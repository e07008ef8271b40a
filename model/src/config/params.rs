//! Parameter counting from the checkpoint layout (spec §1.3): reproduces the published sizes,
//! which confirms that the layout is complete.

use super::ModelConfig;
use crate::checkpoint::layout::{Owner, model_tensors};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterCount {
    /// Main model (embedding, all layers, head), without MTP blocks.
    pub main_total: u64,
    /// The MTP blocks (their own tensors; embed and head are shared with the main model).
    pub mtp_total: u64,
    /// Parameters one token touches in the main model: everything except the routed experts it
    /// is not sent to.
    pub main_active: u64,
    /// Parameters of one routed expert (w1 + w2 + w3).
    pub per_expert: u64,
}

impl ModelConfig {
    pub fn parameter_count(&self) -> ParameterCount {
        let mut main_total = 0;
        let mut mtp_total = 0;
        for t in model_tensors(self) {
            let layer = match t.owner {
                Owner::Expert { layer, .. } => Some(layer),
                Owner::Attention => None,
            };
            let in_mtp = t.name.starts_with("mtp.") || layer.is_some_and(|l| l >= self.n_layers);
            if in_mtp {
                mtp_total += t.elements();
            } else {
                main_total += t.elements();
            }
        }
        let per_expert = 3 * (self.moe_inter_dim * self.dim) as u64;
        let idle_experts = (self.n_routed_experts - self.n_activated_experts) as u64;
        ParameterCount {
            main_total,
            mtp_total,
            main_active: main_total - self.n_layers as u64 * idle_experts * per_expert,
            per_expert,
        }
    }
}
