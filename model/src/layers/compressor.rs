//! KV compressor (spec §5.3): gated softmax pooling of `m` consecutive tokens into one entry.
//! CSA (m = 4) overlaps: entry j pools the "cur" halves of block j with the "prev" halves of
//! block j−1. HCA (m = 128) does not. The same per-token state machine serves prefill and decode
//! (a prefill is a run of tokens through it), which is what makes chunked prefill exact.

use crate::checkpoint::Checkpoint;
use crate::config::CSA_RATIO;
use crate::error::ModelError;
use crate::kernels::exp_in_place;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::numerics::{fp4_sim, fp8_sim, hadamard_in_place};

/// FP8 simulation block on the non-rotary channels of main entries.
pub const KV_SIM_BLOCK: usize = 64;
/// FP4 simulation block of indexer keys and queries.
pub const INDEX_SIM_BLOCK: usize = 32;

#[derive(Clone, Debug)]
pub struct Compressor {
    /// Projections kept in full precision (never input-quantised, even in FP8 checkpoints).
    pub wkv: Linear,
    pub wgate: Linear,
    /// Position bias inside the block, `[m, coff·c]`.
    ape: Vec<f32>,
    norm: RmsNorm,
    ratio: usize,
    overlap: bool,
    /// Entry width `c` (head_dim for the main compressor, index_head_dim for the indexer's).
    width: usize,
    rope_dim: usize,
    /// Indexer compressor: Hadamard + FP4 instead of FP8 on the non-rotary channels.
    indexer: bool,
}

/// Partial-block state carried between calls (fp32, official layout): with overlap, rows
/// `0..m` hold the previous complete block and rows `m..2m` the current one.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressorState {
    kv: Vec<f32>,
    score: Vec<f32>,
}

impl CompressorState {
    pub fn bytes(&self) -> usize {
        (self.kv.len() + self.score.len()) * 4
    }
}

/// Projections `A = Wkv x`, `Z = Wgate x` of a run of tokens (fp32, no input quantisation: the
/// official compressor keeps them in full precision), computed batched before the absorb.
pub struct Projected {
    pub kv: Vec<f32>,
    pub score: Vec<f32>,
}

impl Compressor {
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        ratio: usize,
        width: usize,
        indexer: bool,
    ) -> Result<Self, ModelError> {
        let cfg = ckpt.config();
        let overlap = ratio == CSA_RATIO;
        let coff = 1 + overlap as usize;
        Ok(Compressor {
            wkv: Linear::new(ckpt.matrix(&format!("{prefix}.wkv.weight"), coff * width, cfg.dim)?, false),
            wgate: Linear::new(ckpt.matrix(&format!("{prefix}.wgate.weight"), coff * width, cfg.dim)?, false),
            ape: ckpt.vector(&format!("{prefix}.ape"), &[ratio, coff * width])?,
            norm: RmsNorm::load(ckpt, &format!("{prefix}.norm.weight"), width, cfg.norm_eps)?,
            ratio,
            overlap,
            width,
            rope_dim: cfg.rope_head_dim,
            indexer,
        })
    }

    /// A compressor with unit norm and no projections (unit tests of code built on one).
    #[cfg(test)]
    pub(crate) fn for_tests(ratio: usize, width: usize, ape: Vec<f32>) -> Self {
        let unused = || Linear::new(crate::kernels::WeightMatrix::from_f32(1, 1, vec![0.0]).unwrap(), false);
        Compressor {
            wkv: unused(),
            wgate: unused(),
            ape,
            norm: RmsNorm::new(vec![1.0; width], 1e-6),
            ratio,
            overlap: ratio == CSA_RATIO,
            width,
            rope_dim: 2,
            indexer: true,
        }
    }

    pub fn ratio(&self) -> usize {
        self.ratio
    }

    fn coff(&self) -> usize {
        1 + self.overlap as usize
    }

    pub fn bytes(&self) -> usize {
        self.wkv.bytes() + self.wgate.bytes() + self.ape.len() * 4 + self.norm.bytes()
    }

    pub fn new_state(&self) -> CompressorState {
        let n = self.coff() * self.ratio * self.coff() * self.width;
        CompressorState { kv: vec![0.0; n], score: vec![f32::NEG_INFINITY; n] }
    }

    /// Bytes of one sequence's state (spec §8.1).
    pub fn state_bytes(&self) -> usize {
        2 * self.coff() * self.ratio * self.coff() * self.width * 4
    }

    /// Feeds tokens `t0..t0+len` (rows `rows` of `p`) through the state machine and returns the
    /// entries they complete, post-processed (norm, RoPE at the block's first position, then the
    /// FP8 or Hadamard+FP4 simulation when `simulate`).
    pub fn absorb(
        &self,
        state: &mut CompressorState,
        p: &Projected,
        rows: std::ops::Range<usize>,
        t0: usize,
        rope: &Rope,
        simulate: bool,
    ) -> Vec<f32> {
        let (mut entries, first_positions) = self.absorb_raw(state, p, rows, t0);
        for (entry, &pos) in entries.chunks_exact_mut(self.width).zip(&first_positions) {
            self.finish(entry, pos, rope, simulate);
        }
        entries
    }

    /// The state machine alone: pooled entries (before norm/RoPE/simulation) and the first
    /// position of each entry's block.
    fn absorb_raw(
        &self,
        state: &mut CompressorState,
        p: &Projected,
        rows: std::ops::Range<usize>,
        t0: usize,
    ) -> (Vec<f32>, Vec<usize>) {
        let (m, c) = (self.ratio, self.width);
        let w = self.coff() * c;
        let mut entries = Vec::new();
        let mut first_positions = Vec::new();
        for (s, row) in rows.enumerate() {
            let t = t0 + s;
            let r = t % m;
            let slot = if self.overlap { m + r } else { r };
            let kv_src = &p.kv[row * w..(row + 1) * w];
            let sc_src = &p.score[row * w..(row + 1) * w];
            state.kv[slot * w..(slot + 1) * w].copy_from_slice(kv_src);
            for ((dst, z), ape) in state.score[slot * w..(slot + 1) * w].iter_mut().zip(sc_src).zip(&self.ape[r * w..])
            {
                *dst = z + ape;
            }
            if r == m - 1 {
                entries.extend(self.pool(state));
                first_positions.push(t + 1 - m);
                if self.overlap {
                    state.kv.copy_within(m * w..2 * m * w, 0);
                    state.score.copy_within(m * w..2 * m * w, 0);
                }
            }
        }
        (entries, first_positions)
    }

    /// Per-channel softmax over the block's candidates, weighted sum of their values.
    fn pool(&self, state: &CompressorState) -> Vec<f32> {
        let (m, c) = (self.ratio, self.width);
        let w = self.coff() * c;
        // Candidate rows (as offsets into the state): with overlap, the previous block's first
        // half and the current block's second half; otherwise the block's rows.
        let candidates: Vec<usize> = if self.overlap {
            (0..m).map(|i| i * w).chain((0..m).map(|i| (m + i) * w + c)).collect()
        } else {
            (0..m).map(|i| i * w).collect()
        };
        let mut max = vec![f32::NEG_INFINITY; c];
        for &at in &candidates {
            max.iter_mut().zip(&state.score[at..at + c]).for_each(|(m, s)| *m = m.max(*s));
        }
        // Per channel: softmax weights first, then the weighted sum (the reference's order of
        // rounding); the exponentials row by row, vectorised.
        let mut weights = vec![0.0f32; candidates.len() * c];
        let mut den = vec![0.0f32; c];
        for (row, &at) in weights.chunks_exact_mut(c).zip(&candidates) {
            row.iter_mut().zip(&state.score[at..at + c]).zip(&max).for_each(|((e, s), m)| *e = s - m);
            exp_in_place(row);
            den.iter_mut().zip(row.iter()).for_each(|(d, e)| *d += e);
        }
        let mut out = vec![0.0f32; c];
        for (row, &at) in weights.chunks_exact(c).zip(&candidates) {
            for (((o, e), d), v) in out.iter_mut().zip(row).zip(&den).zip(&state.kv[at..at + c]) {
                *o += e / d * v;
            }
        }
        out
    }

    fn finish(&self, entry: &mut [f32], first_pos: usize, rope: &Rope, simulate: bool) {
        self.norm.apply(entry);
        rope.angles(first_pos).rotate(entry);
        if self.indexer {
            hadamard_in_place(entry);
            if simulate {
                fp4_sim(entry, INDEX_SIM_BLOCK);
            }
        } else if simulate {
            let nope = entry.len() - self.rope_dim;
            fp8_sim(&mut entry[..nope], KV_SIM_BLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::random::SplitMix64;

    fn compressor(ratio: usize, width: usize, rng: &mut SplitMix64) -> Compressor {
        let overlap = ratio == CSA_RATIO;
        let coff = 1 + overlap as usize;
        let unused = || Linear::new(crate::kernels::WeightMatrix::from_f32(1, 1, vec![0.0]).unwrap(), false);
        Compressor {
            wkv: unused(),
            wgate: unused(),
            ape: (0..ratio * coff * width).map(|_| rng.symmetric()).collect(),
            norm: RmsNorm::new(vec![1.0; width], 1e-6),
            ratio,
            overlap,
            width,
            rope_dim: 2,
            indexer: false,
        }
    }

    /// Spec §5.3 written out directly: entry j pools, per channel, the tokens of block j (the
    /// "cur" half with overlap) and, with overlap, the "prev" half of block j−1's tokens.
    fn brute_force(cmp: &Compressor, a: &[f32], z: &[f32], tokens: usize) -> Vec<f32> {
        let (m, c) = (cmp.ratio, cmp.width);
        let w = if cmp.overlap { 2 * c } else { c };
        let mut out = Vec::new();
        for j in 0..tokens / m {
            for ch in 0..c {
                let mut cands: Vec<(f64, f64)> = Vec::new();
                for t in j * m..(j + 1) * m {
                    let col = if cmp.overlap { c + ch } else { ch };
                    cands.push(((z[t * w + col] + cmp.ape[(t % m) * w + col]) as f64, a[t * w + col] as f64));
                }
                if cmp.overlap && j > 0 {
                    for t in (j - 1) * m..j * m {
                        cands.push(((z[t * w + ch] + cmp.ape[(t % m) * w + ch]) as f64, a[t * w + ch] as f64));
                    }
                }
                let max = cands.iter().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = cands.iter().map(|c| (c.0 - max).exp()).sum();
                out.push((cands.iter().map(|c| (c.0 - max).exp() / den * c.1).sum::<f64>()) as f32);
            }
        }
        out
    }

    /// Fed in uneven chunks (the state carries partial blocks across calls, as between prefill
    /// and decode), the state machine emits exactly the brute-force entries.
    #[test]
    fn state_machine_matches_direct_pooling() {
        for ratio in [4, 8] {
            let mut rng = SplitMix64::new(ratio as u64);
            let (c, tokens) = (6, 37);
            let cmp = compressor(ratio, c, &mut rng);
            let w = if cmp.overlap { 2 * c } else { c };
            let a: Vec<f32> = (0..tokens * w).map(|_| rng.symmetric()).collect();
            let z: Vec<f32> = (0..tokens * w).map(|_| 2.0 * rng.symmetric()).collect();
            let p = Projected { kv: a.clone(), score: z.clone() };
            let mut state = cmp.new_state();
            let mut got = Vec::new();
            let mut firsts = Vec::new();
            let mut t = 0;
            for len in [1, 3, 5, 2, 9, 4, 13] {
                let (e, f) = cmp.absorb_raw(&mut state, &p, t..t + len, t);
                got.extend(e);
                firsts.extend(f);
                t += len;
            }
            assert_eq!(t, tokens);
            let want = brute_force(&cmp, &a, &z, tokens);
            assert_eq!(got.len(), want.len(), "ratio {ratio}: entry count");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "ratio {ratio}, value {i}: {g} vs {w}");
            }
            assert_eq!(firsts, (0..tokens / ratio).map(|j| j * ratio).collect::<Vec<_>>());
        }
    }

    #[test]
    fn state_size_matches_spec() {
        let mut rng = SplitMix64::new(1);
        // Spec §8.1 with D = 512, Di = 128: CSA main 64 KiB, CSA indexer 16 KiB, HCA 512 KiB.
        assert_eq!(compressor(4, 512, &mut rng).state_bytes(), 64 * 1024);
        assert_eq!(compressor(4, 128, &mut rng).state_bytes(), 16 * 1024);
        assert_eq!(compressor(128, 512, &mut rng).state_bytes(), 512 * 1024);
        assert_eq!(compressor(4, 512, &mut rng).new_state().bytes(), 64 * 1024);
    }
}
