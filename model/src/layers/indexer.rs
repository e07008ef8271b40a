//! Lightning Indexer (spec §5.5): scores every visible compressed entry of a CSA layer for a query
//! token and picks the top-k whose main entries the attention then uses.

use crate::checkpoint::Checkpoint;
use crate::config::{CSA_RATIO, ModelConfig};
use crate::error::ModelError;
use crate::layers::compressor::{Compressor, INDEX_SIM_BLOCK};
use crate::layers::linear::Linear;
use crate::layers::rope::RopeAngles;
use crate::layers::rows::for_each_row;
use crate::layers::topk::torch_topk;
use crate::numerics::{fp4_sim, hadamard_in_place};

#[derive(Clone, Debug)]
pub struct Indexer {
    pub wq_b: Linear,
    pub weights_proj: Linear,
    pub compressor: Compressor,
    heads: usize,
    head_dim: usize,
    pub topk: usize,
    /// `Di^-1/2 · Hi^-1/2`, folded into the head weights as the reference does.
    weight_scale: f32,
}

impl Indexer {
    pub fn load(ckpt: &Checkpoint, prefix: &str, quantize_inputs: bool) -> Result<Self, ModelError> {
        let cfg: &ModelConfig = ckpt.config();
        let (hi, di) = (cfg.index_n_heads, cfg.index_head_dim);
        Ok(Indexer {
            wq_b: Linear::load(ckpt, &format!("{prefix}.wq_b.weight"), hi * di, cfg.q_lora_rank, quantize_inputs)?,
            weights_proj: Linear::new(ckpt.matrix(&format!("{prefix}.weights_proj.weight"), hi, cfg.dim)?, false),
            compressor: Compressor::load(ckpt, &format!("{prefix}.compressor"), CSA_RATIO, di, true)?,
            heads: hi,
            head_dim: di,
            topk: cfg.index_topk,
            weight_scale: ((di as f64).powf(-0.5) * (hi as f64).powf(-0.5)) as f32,
        })
    }

    pub fn bytes(&self) -> usize {
        self.wq_b.bytes() + self.weights_proj.bytes() + self.compressor.bytes()
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Indexer queries `[T, Hi·Di]` from `wq_b(qr)`: RoPE on each head's last channels at the
    /// token's position, Hadamard, then the FP4 simulation.
    pub fn queries(&self, mut q: Vec<f32>, angles: &[RopeAngles], simulate: bool) -> Vec<f32> {
        for_each_row(&mut q, self.heads * self.head_dim, |t, row| {
            for head in row.chunks_exact_mut(self.head_dim) {
                angles[t].rotate(head);
                hadamard_in_place(head);
                if simulate {
                    fp4_sim(head, INDEX_SIM_BLOCK);
                }
            }
        });
        q
    }

    /// Per-head weights `[T, Hi]` from `weights_proj(x)`.
    pub fn head_weights(&self, mut w: Vec<f32>) -> Vec<f32> {
        w.iter_mut().for_each(|v| *v *= self.weight_scale);
        w
    }

    /// The entries (of `keys`, all compressed so far in this call) that query `q` attends to:
    /// `I_j = Σ_h w_h · ReLU(q_h · K_j)` for the `visible` entries, `-inf` for the rest (the
    /// reference's prefill mask), then PyTorch's top-`min(topk, total)` with its tie order, and
    /// the masked picks dropped. Sorted ascending.
    pub fn select(&self, q: &[f32], w: &[f32], keys: &[f32], visible: usize) -> Vec<usize> {
        self.select_block(q, w, keys, &[visible]).remove(0)
    }

    /// [`select`](Self::select) for a block of queries (`q` is `[B, Hi·Di]`, `w` `[B, Hi]`):
    /// every head of every query is scored against every key with one GEMM.
    pub fn select_block(&self, q: &[f32], w: &[f32], keys: &[f32], visible: &[usize]) -> Vec<Vec<usize>> {
        let (hi, di) = (self.heads, self.head_dim);
        let total = keys.len() / di;
        let b = visible.len();
        if visible.iter().all(|&v| v <= self.topk) && total <= self.topk {
            return visible.iter().map(|&v| (0..v).collect()).collect();
        }
        let rows = b * hi;
        assert!(
            q.len() == rows * di && w.len() == rows && keys.len() == total * di,
            "select_block: inconsistent shapes"
        );
        let mut dots = vec![0.0f32; rows * total];
        // SAFETY: dots[r, j] = q[r, :] · keys[j, :], dense row-major buffers of these shapes.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                di,
                total,
                1.0,
                q.as_ptr(),
                di as isize,
                1,
                keys.as_ptr(),
                1,
                di as isize,
                0.0,
                dots.as_mut_ptr(),
                total as isize,
                1,
            );
        }
        (0..b)
            .map(|i| {
                let scores: Vec<f32> = (0..total)
                    .map(|j| {
                        if j >= visible[i] {
                            return f32::NEG_INFINITY;
                        }
                        (0..hi).map(|h| w[i * hi + h] * dots[(i * hi + h) * total + j].max(0.0)).sum::<f32>()
                    })
                    .collect();
                let mut picked = torch_topk(&scores, self.topk.min(total));
                picked.retain(|&j| j < visible[i]);
                picked
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::random::SplitMix64;

    fn indexer(heads: usize, head_dim: usize, topk: usize) -> Indexer {
        let unused = || Linear::new(crate::kernels::WeightMatrix::from_f32(1, 1, vec![0.0]).unwrap(), false);
        let ape = vec![0.0; 4 * 2 * head_dim];
        Indexer {
            wq_b: unused(),
            weights_proj: unused(),
            compressor: Compressor::for_tests(4, head_dim, ape),
            heads,
            head_dim,
            topk,
            weight_scale: 1.0,
        }
    }

    /// With continuous scores (no ties), the choice is the brute-force top-k of
    /// `Σ_h w_h · ReLU(q_h · K_j)` over the visible entries; entries past `visible` never appear.
    #[test]
    fn select_is_the_top_k_of_relu_weighted_scores() {
        let (heads, di) = (3, 32);
        let ix = indexer(heads, di, 5);
        let mut rng = SplitMix64::new(9);
        let keys: Vec<f32> = (0..40 * di).map(|_| rng.symmetric()).collect();
        let q: Vec<f32> = (0..heads * di).map(|_| rng.symmetric()).collect();
        let w = [0.7f32, -0.2, 1.3];
        for visible in [3, 5, 17, 40] {
            let got = ix.select(&q, &w, &keys[..40 * di], visible);
            let mut scored: Vec<(f64, usize)> = (0..visible)
                .map(|j| {
                    let s = (0..heads)
                        .map(|h| {
                            let dot: f64 = (0..di).map(|c| q[h * di + c] as f64 * keys[j * di + c] as f64).sum();
                            w[h] as f64 * dot.max(0.0)
                        })
                        .sum();
                    (s, j)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut want: Vec<usize> = scored.iter().take(5).map(|s| s.1).collect();
            want.sort_unstable();
            assert_eq!(got, want, "visible {visible}");
        }
    }
}
