//! MoE routing (spec §6): `s = sqrtsoftplus(Wg x)`; hash layers take their experts from the
//! token-id table, others the top-k of `s + bias` (bias for selection only); the weights are the
//! chosen scores renormalised and scaled. All of it lives in this one tested function.

use crate::checkpoint::Checkpoint;
use crate::checkpoint::layout::block_prefix;
use crate::config::{ModelConfig, ScoreFunc};
use crate::error::ModelError;
use crate::kernels::{self, WeightMatrix};
use crate::layers::rows::{for_each_row_costing, map_rows};
use crate::layers::topk::torch_topk;

#[derive(Clone, Debug)]
pub struct Router {
    gate: WeightMatrix,
    /// Selection bias (score-routed layers).
    bias: Option<Vec<f32>>,
    /// Token id → k experts (hash-routed layers), `[vocab, k]`.
    table: Option<Vec<u32>>,
    score_func: ScoreFunc,
    k: usize,
    route_scale: f32,
}

/// Routing of a batch: `k` expert ids and weights per token, row-major `[T, k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routes {
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.k.max(1)
    }
}

impl Router {
    pub fn load(ckpt: &Checkpoint, layer: usize) -> Result<Self, ModelError> {
        let cfg: &ModelConfig = ckpt.config();
        let p = format!("{}.ffn.gate", block_prefix(cfg, layer));
        let (e, k) = (cfg.n_routed_experts, cfg.n_activated_experts);
        let (bias, table) = if cfg.is_hash_layer(layer) {
            (None, Some(ckpt.hash_table(&format!("{p}.tid2eid"), cfg.vocab_size, k, e)?))
        } else {
            (Some(ckpt.vector(&format!("{p}.bias"), &[e])?), None)
        };
        Ok(Router {
            gate: ckpt.matrix(&format!("{p}.weight"), e, cfg.dim)?,
            bias,
            table,
            score_func: cfg.score_func,
            k,
            route_scale: cfg.route_scale,
        })
    }

    pub fn bytes(&self) -> usize {
        self.gate.stored_bytes()
            + self.bias.as_ref().map_or(0, |b| b.len() * 4)
            + self.table.as_ref().map_or(0, |t| t.len() * 4)
    }

    /// Routes `tokens` rows of `x` (after `ffn_norm`); `ids` are the tokens' ids.
    pub fn route(&self, x: &[f32], ids: &[u32]) -> Routes {
        let tokens = ids.len();
        let e = self.gate.rows;
        let mut scores = kernels::matmul(x, tokens, &self.gate);
        // A transcendental or two per score: costed at ~16 operations each.
        for_each_row_costing(&mut scores, e, e * 16, |_, row| match self.score_func {
            ScoreFunc::Sqrtsoftplus => row.iter_mut().for_each(|z| *z = softplus(*z).sqrt()),
            ScoreFunc::Sigmoid => row.iter_mut().for_each(|z| *z = 1.0 / (1.0 + (-*z).exp())),
            ScoreFunc::Softmax => {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|z| *z = (*z - max).exp());
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|z| *z /= sum);
            }
        });
        let per_token: Vec<(Vec<u32>, Vec<f32>)> = map_rows(tokens, e * 8, |t| {
            let row = &scores[t * e..(t + 1) * e];
            let chosen: Vec<u32> = match &self.table {
                Some(table) => table[ids[t] as usize * self.k..(ids[t] as usize + 1) * self.k].to_vec(),
                None => top_k(row, self.bias.as_deref(), self.k),
            };
            let mut w: Vec<f32> = chosen.iter().map(|&i| row[i as usize]).collect();
            if self.score_func != ScoreFunc::Softmax {
                let sum: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= sum);
            }
            w.iter_mut().for_each(|v| *v *= self.route_scale);
            (chosen, w)
        });
        let mut experts = Vec::with_capacity(tokens * self.k);
        let mut weights = Vec::with_capacity(tokens * self.k);
        for (c, w) in per_token {
            experts.extend(c);
            weights.extend(w);
        }
        Routes { k: self.k, experts, weights }
    }
}

/// PyTorch's `softplus` (β = 1, threshold 20: linear above it).
fn softplus(z: f32) -> f32 {
    if z > 20.0 { z } else { z.exp().ln_1p() }
}

/// The `k` experts with the largest `score + bias`, chosen as PyTorch's `topk` chooses them
/// (ties included); ascending ids.
fn top_k(scores: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<u32> {
    let keys: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.to_vec(),
    };
    torch_topk(&keys, k).into_iter().map(|i| i as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::WeightMatrix;

    fn router(table: Option<Vec<u32>>, bias: Option<Vec<f32>>) -> Router {
        // 4 experts over a 2-wide input: expert i's score is z_i = (i+1) * x0 - x1.
        let gate = WeightMatrix::from_f32(4, 2, vec![1.0, -1.0, 2.0, -1.0, 3.0, -1.0, 4.0, -1.0]).unwrap();
        Router { gate, bias, table, score_func: ScoreFunc::Sqrtsoftplus, k: 2, route_scale: 1.5 }
    }

    #[test]
    fn score_routing_uses_bias_for_selection_only() {
        let x = [1.0f32, 0.5];
        let s: Vec<f32> = (1..=4).map(|i| ((i as f32 - 0.5).exp().ln_1p()).sqrt()).collect();
        // Without bias the two largest scores win: experts 3 and 2.
        let plain = router(None, Some(vec![0.0; 4])).route(&x, &[0]);
        assert_eq!(plain.experts, vec![2, 3]);
        // A bias that favours expert 0 changes the selection but not the weights' source.
        let biased = router(None, Some(vec![10.0, 0.0, 0.0, 0.0])).route(&x, &[0]);
        assert_eq!(biased.experts, vec![0, 3]);
        let sum = s[0] + s[3];
        assert!((biased.weights[0] - 1.5 * s[0] / sum).abs() < 1e-6);
        assert!((biased.weights[1] - 1.5 * s[3] / sum).abs() < 1e-6);
    }

    /// Spec §11.5: hash layers choose experts from the token id alone; the hidden state only
    /// changes the weights.
    #[test]
    fn hash_routing_ignores_hidden_state_for_selection() {
        let table = vec![0, 1, 2, 3, 3, 0];
        let r = router(Some(table), None);
        let a = r.route(&[1.0, 0.5, -3.0, 2.0], &[1, 2]);
        let b = r.route(&[-5.0, 9.0, 0.1, 0.2], &[1, 2]);
        assert_eq!(a.experts, vec![2, 3, 3, 0]);
        assert_eq!(a.experts, b.experts);
        assert_ne!(a.weights, b.weights);
        for w in a.weights.chunks(2) {
            assert!((w[0] + w[1] - 1.5).abs() < 1e-6, "renormalised to route_scale");
        }
    }

    #[test]
    fn softplus_matches_pytorch_threshold() {
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert!((softplus(-30.0) - (-30f32).exp()).abs() < 1e-20);
    }
}
