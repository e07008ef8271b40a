//! Manifold-constrained hyper-connections (mHC, spec §4): `n` residual streams per token, mixed
//! before and after every sublayer by coefficients computed from the streams themselves.

use super::chunk::Layout;
use super::rows::{for_each_row, for_each_row_costing};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::kernels::{self, WeightMatrix};

/// One mixing site (`hc_attn_*` or `hc_ffn_*`, or the head's `hc_head_*`).
#[derive(Clone, Debug)]
pub struct HcSite {
    /// Φ, `[mix, n·d]`, f32.
    phi: WeightMatrix,
    base: Vec<f32>,
    scale: Vec<f32>,
    n: usize,
    dim: usize,
    norm_eps: f32,
    hc_eps: f32,
    sinkhorn_iters: usize,
}

/// Per-token mixing coefficients of one site: `pre[n]`, `post[n]`, `comb[n][n]` (row-major),
/// stored together as `mix` floats per token.
#[derive(Clone, Debug)]
pub struct HcMix {
    pub n: usize,
    pub values: Vec<f32>,
}

impl HcMix {
    /// The mixes of the layout's output tokens only.
    pub fn rows(self, layout: &Layout) -> HcMix {
        let width = (2 + self.n) * self.n;
        HcMix { n: self.n, values: layout.gather(&self.values, width).into_owned() }
    }

    fn token(&self, t: usize) -> (&[f32], &[f32], &[f32]) {
        let n = self.n;
        let v = &self.values[t * (2 + n) * n..(t + 1) * (2 + n) * n];
        (&v[..n], &v[n..2 * n], &v[2 * n..])
    }
}

impl HcSite {
    /// `prefix` is e.g. `layers.3.hc_attn` (the tensors are `{prefix}_fn/_base/_scale`).
    /// The head site has `n` rows and one scale; block sites have `(2+n)·n` rows and three.
    pub fn load(ckpt: &Checkpoint, prefix: &str, head: bool) -> Result<Self, ModelError> {
        let cfg: &ModelConfig = ckpt.config();
        let (rows, scales) = if head { (cfg.hc_mult, 1) } else { (cfg.hc_mix(), 3) };
        let phi = ckpt.vector(&format!("{prefix}_fn"), &[rows, cfg.hc_dim()])?;
        Ok(HcSite {
            phi: WeightMatrix::from_f32(rows, cfg.hc_dim(), phi).map_err(ModelError::Checkpoint)?,
            base: ckpt.vector(&format!("{prefix}_base"), &[rows])?,
            scale: ckpt.vector(&format!("{prefix}_scale"), &[scales])?,
            n: cfg.hc_mult,
            dim: cfg.dim,
            norm_eps: cfg.norm_eps,
            hc_eps: cfg.hc_eps,
            sinkhorn_iters: cfg.hc_sinkhorn_iters,
        })
    }

    pub fn bytes(&self) -> usize {
        self.phi.stored_bytes() + (self.base.len() + self.scale.len()) * 4
    }

    /// `μ = r · (Φ x̂)` for every token, with `r = (mean(x̂²) + ε)^-1/2` over all `n·d` values.
    fn mixes(&self, streams: &[f32], tokens: usize) -> Vec<f32> {
        let width = self.n * self.dim;
        let mut mu = kernels::matmul(streams, tokens, &self.phi);
        // Each row's cost is the norm over its token's n·d stream values, not its few mixes.
        for_each_row_costing(&mut mu, self.phi.rows, width, |t, m| {
            let x = &streams[t * width..(t + 1) * width];
            let mean = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let r = 1.0 / (mean + self.norm_eps).sqrt();
            m.iter_mut().for_each(|v| *v *= r);
        });
        mu
    }

    /// HCPre: collapses `streams` (`[T, n, d]`) into one sublayer input per token, `[T, d]`,
    /// and returns the post/comb coefficients HCPost needs.
    pub fn pre(&self, streams: &[f32], tokens: usize) -> (Vec<f32>, HcMix) {
        let n = self.n;
        let mut mu = self.mixes(streams, tokens);
        let mix = (2 + n) * n;
        let sinkhorn_cost = 4 * n * n * self.sinkhorn_iters;
        for_each_row_costing(&mut mu, mix, sinkhorn_cost, |_, m| {
            for j in 0..n {
                m[j] = sigmoid(m[j] * self.scale[0] + self.base[j]) + self.hc_eps;
                m[n + j] = 2.0 * sigmoid(m[n + j] * self.scale[1] + self.base[n + j]);
            }
            for ij in 0..n * n {
                m[2 * n + ij] = m[2 * n + ij] * self.scale[2] + self.base[2 * n + ij];
            }
            sinkhorn(&mut m[2 * n..], n, self.sinkhorn_iters, self.hc_eps);
        });
        let mixes = HcMix { n, values: mu };
        (self.collapse(streams, tokens, |t, j| mixes.token(t).0[j]), mixes)
    }

    /// HCHead: the final collapse (`a_j = σ(α μ_j + β_j) + eps`, no Sinkhorn, no post).
    pub fn head(&self, streams: &[f32], tokens: usize) -> Vec<f32> {
        let n = self.n;
        let mut mu = self.mixes(streams, tokens);
        for_each_row(&mut mu, n, |_, m| {
            for (v, b) in m.iter_mut().zip(&self.base) {
                *v = sigmoid(*v * self.scale[0] + b) + self.hc_eps;
            }
        });
        self.collapse(streams, tokens, |t, j| mu[t * n + j])
    }

    /// `y_t = Σ_j a(t, j) · X_t,j`.
    fn collapse(&self, streams: &[f32], tokens: usize, a: impl Fn(usize, usize) -> f32 + Sync + Send) -> Vec<f32> {
        let (n, d) = (self.n, self.dim);
        let mut y = vec![0.0f32; tokens * d];
        for_each_row(&mut y, d, |t, out| {
            for j in 0..n {
                let w = a(t, j);
                let x = &streams[(t * n + j) * d..(t * n + j + 1) * d];
                out.iter_mut().zip(x).for_each(|(o, v)| *o += w * v);
            }
        });
        y
    }
}

/// HCPost: `X'_j = c_j · f + Σ_i M[i][j] · X_i` (output stream `j` gathers column `j` of M),
/// updating `streams` in place (each token's old streams are copied aside first).
pub fn hc_post(sublayer_out: &[f32], streams: &mut [f32], mixes: &HcMix, dim: usize) {
    let n = mixes.n;
    for_each_row(streams, n * dim, |t, token| {
        let (_, post, comb) = mixes.token(t);
        let f = &sublayer_out[t * dim..(t + 1) * dim];
        OLD_STREAMS.with(|old| {
            let mut old = old.borrow_mut();
            old.clear();
            old.extend_from_slice(token);
            for (j, dst) in token.chunks_exact_mut(dim).enumerate() {
                dst.iter_mut().zip(f).for_each(|(o, v)| *o = post[j] * v);
                for (i, src) in old.chunks_exact(dim).enumerate() {
                    let c = comb[i * n + j];
                    dst.iter_mut().zip(src).for_each(|(o, v)| *o += c * v);
                }
            }
        });
    });
}

thread_local! {
    /// One token's streams before HCPost rewrites them (reused: a fresh allocation per token was
    /// a measurable share of prefill).
    static OLD_STREAMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Sinkhorn–Knopp as the official kernel runs it: row softmax + eps, one column
/// normalisation, then `iters − 1` rounds of row and column normalisation (each dividing by the
/// sum + eps). `m` is `n×n`, row-major.
pub fn sinkhorn(m: &mut [f32], n: usize, iters: usize, eps: f32) {
    for row in m.chunks_exact_mut(n) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v = (*v - max).exp());
        let sum: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v = *v / sum + eps);
    }
    normalize_columns(m, n, eps);
    for _ in 1..iters {
        for row in m.chunks_exact_mut(n) {
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum + eps);
        }
        normalize_columns(m, n, eps);
    }
}

fn normalize_columns(m: &mut [f32], n: usize, eps: f32) {
    for j in 0..n {
        let sum: f32 = (0..n).map(|i| m[i * n + j]).sum();
        for i in 0..n {
            m[i * n + j] /= sum + eps;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec §11.1: row and column sums within 1e-5 of 1, all entries positive. Logits span ±2,
    /// the range `α·μ + β` takes in practice (20 iterations do not converge this tightly for
    /// logit spreads of ~10, which is a property of the algorithm the model was trained with).
    #[test]
    fn sinkhorn_output_is_doubly_stochastic() {
        for seed in 0..20 {
            let mut m: Vec<f32> = (0..16).map(|i| ((i * 7 + seed * 13) % 17) as f32 * 0.25 - 2.0).collect();
            sinkhorn(&mut m, 4, 20, 1e-6);
            for i in 0..4 {
                let row: f32 = m[i * 4..i * 4 + 4].iter().sum();
                let col: f32 = (0..4).map(|r| m[r * 4 + i]).sum();
                assert!((row - 1.0).abs() < 1e-5 && (col - 1.0).abs() < 1e-5, "seed {seed}: row {row} col {col}");
            }
            assert!(m.iter().all(|&v| v > 0.0));
        }
    }

    /// Independent check of the first step: one iteration is a row softmax (+eps) followed by a
    /// column normalisation.
    #[test]
    fn sinkhorn_one_iteration_is_softmax_then_columns() {
        let logits = [0.5f32, -1.0, 2.0, 0.0];
        let mut m = logits.to_vec();
        sinkhorn(&mut m, 2, 1, 0.0);
        let soft = |a: f32, b: f32| (a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp()));
        let (r00, r01) = soft(0.5, -1.0);
        let (r10, r11) = soft(2.0, 0.0);
        let want = [r00 / (r00 + r10), r01 / (r01 + r11), r10 / (r00 + r10), r11 / (r01 + r11)];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// HCPost uses the transpose: output stream j gathers column j of M.
    #[test]
    fn hc_post_gathers_columns() {
        let n = 2;
        let dim = 1;
        // pre (unused), post = [1, 0], comb = [[0.9, 0.1], [0.2, 0.8]]
        let mixes = HcMix { n, values: vec![0.0, 0.0, 1.0, 0.0, 0.9, 0.1, 0.2, 0.8] };
        let mut out = [10.0, 100.0];
        hc_post(&[5.0], &mut out, &mixes, dim);
        assert!((out[0] - (5.0 + 0.9 * 10.0 + 0.2 * 100.0)).abs() < 1e-5);
        assert!((out[1] - (0.1 * 10.0 + 0.8 * 100.0)).abs() < 1e-5);
    }
}
