//! The SwiGLU expert FFN shared by routed and shared experts (spec §2, §6):
//! `y = W2 (g ⊙ silu(min(W1 x, L)) ⊙ clamp(W3 x, −L, L))`, with the routing weight `g` applied
//! before the down projection, as the official code does.

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::kernels::exp_in_place;
use crate::layers::linear::Linear;
use crate::layers::rows::for_each_row;

/// Activations whose exponentials are taken in one pass.
const EXP_CHUNK: usize = 64;

#[derive(Clone, Debug)]
pub struct Ffn {
    w1: Linear,
    w2: Linear,
    w3: Linear,
    limit: f32,
}

impl Ffn {
    /// `prefix` is e.g. `layers.4.ffn.experts.7` or `layers.4.ffn.shared_experts`.
    pub fn load(ckpt: &Checkpoint, prefix: &str, quantize_inputs: bool) -> Result<Self, ModelError> {
        let cfg = ckpt.config();
        let (d, i) = (cfg.dim, cfg.moe_inter_dim);
        Ok(Ffn {
            w1: Linear::load(ckpt, &format!("{prefix}.w1.weight"), i, d, quantize_inputs)?,
            w2: Linear::load(ckpt, &format!("{prefix}.w2.weight"), d, i, quantize_inputs)?,
            w3: Linear::load(ckpt, &format!("{prefix}.w3.weight"), i, d, quantize_inputs)?,
            limit: cfg.swiglu_limit,
        })
    }

    pub fn bytes(&self) -> usize {
        self.w1.bytes() + self.w2.bytes() + self.w3.bytes()
    }

    /// `x` is `[m, dim]`; `row_weights` (one per row) scale the activation before `W2`.
    pub fn forward(&self, x: &[f32], m: usize, row_weights: Option<&[f32]>) -> Vec<f32> {
        let mut both = Linear::forward_many(&[(&self.w1, x), (&self.w3, x)], m);
        let up = both.pop().expect("two outputs");
        let mut gate = both.pop().expect("two outputs");
        let inter = self.w1.out_features();
        for_each_row(&mut gate, inter, |r, g_row| {
            let scale = row_weights.map_or(1.0, |w| w[r]);
            let u_row = &up[r * inter..(r + 1) * inter];
            // silu(g) = g / (1 + e^-g): the exponentials in vectorised passes over a stack buffer
            // (no allocation per row).
            for (g_part, u_part) in g_row.chunks_mut(EXP_CHUNK).zip(u_row.chunks(EXP_CHUNK)) {
                let mut e = [0.0f32; EXP_CHUNK];
                let e = &mut e[..g_part.len()];
                for (e, g) in e.iter_mut().zip(g_part.iter()) {
                    *e = -if self.limit > 0.0 { g.min(self.limit) } else { *g };
                }
                exp_in_place(e);
                for ((g, &u), e) in g_part.iter_mut().zip(u_part).zip(e.iter()) {
                    let (g_in, u_in) =
                        if self.limit > 0.0 { (g.min(self.limit), u.clamp(-self.limit, self.limit)) } else { (*g, u) };
                    *g = g_in / (1.0 + e) * u_in;
                    if row_weights.is_some() {
                        *g *= scale;
                    }
                }
            }
        });
        self.w2.forward(&gate, m)
    }
}
