//! Quantisation simulations of the official reference (`act_quant(..., inplace=True)` and
//! `fp4_act_quant(..., inplace=True)`): values are rounded to the FP8 / FP4 grid with a per-block
//! power-of-two scale and written back as floats. The model was trained with them, so they are part
//! of the model's math, not an optimisation (spec §2).

use super::minifloat::{E2M1_MAX, E4M3_MAX, pow2_scale, round_to_e2m1, round_to_e4m3};

/// The kernels clamp each block's absolute maximum from below before deriving the scale.
const FP8_AMAX_FLOOR: f32 = 1e-4;
/// 6 · 2^-126: keeps the FP4 scale a normal float.
const FP4_AMAX_FLOOR: f32 = 6.0 * 1.175_494_4e-38;

/// `1/448` and `1/6` as the kernels hold them: a float32 constant multiplied, not a division.
fn inv(max: f32) -> f32 {
    (1.0f64 / max as f64) as f32
}

fn block_amax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, &v| m.max(v.abs()))
}

/// FP8 e4m3 simulation in place over consecutive blocks of `block` values (the last axis of
/// `x` must be a multiple of `block`; callers pass whole rows).
pub fn fp8_sim(x: &mut [f32], block: usize) {
    debug_assert_eq!(x.len() % block, 0);
    let inv_max = inv(E4M3_MAX);
    for chunk in x.chunks_exact_mut(block) {
        let scale = pow2_scale(block_amax(chunk).max(FP8_AMAX_FLOOR), inv_max);
        let inv_scale = 1.0 / scale; // exact: the scale is a power of two
        for v in chunk.iter_mut() {
            *v = round_to_e4m3((*v * inv_scale).clamp(-E4M3_MAX, E4M3_MAX)) * scale;
        }
    }
}

/// FP4 e2m1 simulation in place over consecutive blocks of `block` values.
pub fn fp4_sim(x: &mut [f32], block: usize) {
    debug_assert_eq!(x.len() % block, 0);
    let inv_max = inv(E2M1_MAX);
    for chunk in x.chunks_exact_mut(block) {
        let scale = pow2_scale(block_amax(chunk).max(FP4_AMAX_FLOOR), inv_max);
        let inv_scale = 1.0 / scale;
        for v in chunk.iter_mut() {
            *v = round_to_e2m1((*v * inv_scale).clamp(-E2M1_MAX, E2M1_MAX)) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_sim_keeps_grid_values_and_bounds_error() {
        // A block whose values already lie on the e4m3 grid with amax 448 (scale 1) is unchanged.
        let mut exact: Vec<f32> = (0u8..64).map(|i| crate::numerics::e4m3_to_f32(i * 2)).collect();
        exact[0] = 448.0;
        let before = exact.clone();
        fp8_sim(&mut exact, 64);
        assert_eq!(exact, before);

        // Relative error of normal values is at most half an ulp of a 3-bit mantissa: 1/16.
        let mut x: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.731).collect();
        let orig = x.clone();
        fp8_sim(&mut x, 64);
        for (a, b) in orig.iter().zip(&x) {
            if a.abs() > 1e-2 {
                assert!(((a - b) / a).abs() <= 1.0 / 16.0 + 1e-6, "{a} -> {b}");
            }
        }
    }

    #[test]
    fn fp8_sim_scale_is_per_block() {
        // Two blocks with very different magnitudes: the small one keeps its precision.
        let mut x = vec![0.0f32; 128];
        x[..64].iter_mut().for_each(|v| *v = 1000.0);
        x[64..].iter_mut().enumerate().for_each(|(i, v)| *v = 1e-3 * (1.0 + i as f32 / 64.0));
        let orig = x.clone();
        fp8_sim(&mut x, 64);
        for i in 64..128 {
            assert!(((x[i] - orig[i]) / orig[i]).abs() <= 1.0 / 16.0);
        }
    }

    #[test]
    fn fp4_sim_maps_block_max_to_at_most_six_quanta() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 * 0.09).collect(); // amax 2.79
        fp4_sim(&mut x, 32);
        // scale = 2^ceil(log2(2.79/6)) = 0.5 -> grid {0, .25, .5, .75, 1, 1.5, 2, 3}
        let grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0];
        for v in &x {
            assert!(grid.contains(v), "{v} not on the scaled e2m1 grid");
        }
        assert_eq!(x[31], 3.0); // 2.79 / 0.5 = 5.58 -> 6 quanta
        assert_eq!(x[1], 0.0); // 0.09 / 0.5 = 0.18 -> 0
        assert_eq!(x[3], 0.25); // 0.27 / 0.5 = 0.54 -> 0.5 quanta
        assert_eq!(x[14], 1.5); // 1.26 / 0.5 = 2.52 -> 3 (nearer than 2)
    }
}
