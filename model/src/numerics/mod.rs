//! Number formats and the rounding simulations the model's math depends on.

pub mod hadamard;
pub mod minifloat;
pub mod quant_sim;

pub use hadamard::hadamard_in_place;
pub use minifloat::{E2M1_VALUES, e4m3_to_f32, e8m0_to_f32, f32_to_e2m1, f32_to_e4m3, f32_to_e8m0};
pub use quant_sim::{fp4_sim, fp8_sim};

/// Rounds an f32 to the nearest bf16 value (ties to even), returned as f32.
#[inline]
pub fn round_to_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
