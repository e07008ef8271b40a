//! Deterministic random weights for generated checkpoints. Each tensor's values depend only on
//! the seed and the tensor's name (so a shard or a subset can be regenerated alone), and are made
//! with integer arithmetic plus correctly rounded IEEE operations, so the same seed gives the same
//! bytes on every machine.

use super::layout::{TensorRole, TensorSpec};
use crate::config::ModelConfig;

/// SplitMix64: tiny, well-distributed, and fully specified (unlike `rand`'s algorithms, which
/// may change between versions).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) with 24 bits of resolution (exact in f32).
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 23) as f32 - 1.0
    }
}

/// FNV-1a of the name: the per-tensor stream id.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn uniform(rng: &mut SplitMix64, n: usize, center: f32, half_width: f32) -> Vec<f32> {
    (0..n).map(|_| center + half_width * rng.symmetric()).collect()
}

/// Master values of one tensor (f32; the writer rounds/quantises them to the stored format).
/// Scales are chosen so that a random model stays numerically healthy: unit-variance
/// activations through every linear, mHC mixing close to an identity-preserving residual.
pub fn tensor_values(cfg: &ModelConfig, spec: &TensorSpec, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ name_hash(&spec.name));
    let n = spec.elements() as usize;
    let name = spec.name.as_str();
    let cols = *spec.shape.last().unwrap_or(&1);
    // Uniform on [-a, a] has standard deviation a/√3.
    let std_to_width = |std: f32| std * 3f32.sqrt();
    match spec.role {
        TensorRole::DenseLinear | TensorRole::ExpertLinear | TensorRole::Matrix => {
            let std = if name == "embed.weight" { 1.0 } else { 1.0 / (cols as f32).sqrt() };
            uniform(&mut rng, n, 0.0, std_to_width(std))
        }
        TensorRole::Norm => uniform(&mut rng, n, 1.0, 0.1),
        TensorRole::HashTable => Vec::new(), // see hash_table()
        TensorRole::F32 => {
            if name.ends_with("_fn") {
                uniform(&mut rng, n, 0.0, std_to_width(1.0 / (cols as f32).sqrt()))
            } else if name.ends_with("_scale") {
                uniform(&mut rng, n, 1.0, 0.5)
            } else if name.ends_with("_base") {
                let mut v = uniform(&mut rng, n, 0.0, 0.5);
                let hc = cfg.hc_mult;
                if n == cfg.hc_mix() {
                    // Favour keeping each stream on itself in the residual mix.
                    for i in 0..hc {
                        v[2 * hc + i * hc + i] += 2.0;
                    }
                }
                v
            } else if name.ends_with("attn_sink") {
                uniform(&mut rng, n, 0.0, 1.0)
            } else if name.ends_with(".ape") {
                uniform(&mut rng, n, 0.0, 0.5)
            } else {
                // Router selection bias.
                uniform(&mut rng, n, 0.0, 0.1)
            }
        }
    }
}

/// `tid2eid[t][j] = (h(t) + j·⌊E/k⌋) mod E`: k distinct experts per token (spec §1.1).
pub fn hash_table(cfg: &ModelConfig, spec: &TensorSpec, seed: u64) -> Vec<i64> {
    let (e, k) = (cfg.n_routed_experts as u64, cfg.n_activated_experts as u64);
    let stride = e / k;
    let base = seed ^ name_hash(&spec.name);
    (0..cfg.vocab_size as u64)
        .flat_map(|t| {
            let h = SplitMix64::new(base ^ t.wrapping_mul(0x9E37_79B9)).next_u64() % e;
            (0..k).map(move |j| ((h + j * stride) % e) as i64)
        })
        .collect()
}
