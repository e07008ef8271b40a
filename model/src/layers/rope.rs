//! Rotary position embedding on the last `rope_head_dim` channels, interleaved pairs
//! `(2i, 2i+1)`, with YaRN frequency blending on compressed (CSA/HCA) layers (spec §2). The
//! frequency table is built exactly as the official `precompute_freqs_cis` builds it, in f32.

use crate::config::{AttentionKind, ModelConfig};

#[derive(Clone, Debug)]
pub struct Rope {
    /// θ_i per channel pair, already YaRN-blended where the layer uses it.
    freqs: Vec<f32>,
}

/// cos/sin of every pair's angle at one position.
#[derive(Clone, Debug)]
pub struct RopeAngles {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    /// The table of layer `layer`: window-only layers use `rope_theta` without YaRN; compressed
    /// layers use `compress_rope_theta` with YaRN, for every rotary op in the layer.
    pub fn for_layer(cfg: &ModelConfig, layer: usize) -> Self {
        match cfg.attention_kind(layer) {
            AttentionKind::Window => Self::new(cfg.rope_head_dim, cfg.rope_theta, None),
            _ => {
                let yarn = cfg.rope_scaling.as_ref().map(|s| (s.original_seq_len, s.factor, s.beta_fast, s.beta_slow));
                Self::new(cfg.rope_head_dim, cfg.compress_rope_theta, yarn)
            }
        }
    }

    /// `yarn` = (original_seq_len, factor, beta_fast, beta_slow).
    pub fn new(dim: usize, base: f64, yarn: Option<(usize, f64, f64, f64)>) -> Self {
        let half = dim / 2;
        let mut freqs: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                1.0 / (base as f32).powf(exponent)
            })
            .collect();
        if let Some((original, factor, beta_fast, beta_slow)) = yarn.filter(|y| y.0 > 0) {
            let correction = |rotations: f64| {
                dim as f64 * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
            };
            let low = correction(beta_fast).floor().max(0.0);
            let high = correction(beta_slow).ceil().min(dim as f64 - 1.0);
            let (low, high) = (low as f32, if low == high { high as f32 + 0.001 } else { high as f32 });
            let factor = factor as f32;
            for (i, f) in freqs.iter_mut().enumerate() {
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                *f = *f / factor * (1.0 - smooth) + *f * smooth;
            }
        }
        Rope { freqs }
    }

    pub fn freqs(&self) -> &[f32] {
        &self.freqs
    }

    /// Angles at `pos`: the f32 product `pos · θ_i`, as the reference forms it, then cos/sin.
    pub fn angles(&self, pos: usize) -> RopeAngles {
        let t = pos as f32;
        let (cos, sin) = self
            .freqs
            .iter()
            .map(|&f| {
                let a = (t * f) as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        RopeAngles { cos, sin }
    }
}

impl RopeAngles {
    /// Rotates the last `2·pairs` channels of `x` in place.
    pub fn rotate(&self, x: &mut [f32]) {
        let off = x.len() - 2 * self.cos.len();
        for (i, (c, s)) in self.cos.iter().zip(&self.sin).enumerate() {
            let (a, b) = (x[off + 2 * i], x[off + 2 * i + 1]);
            x[off + 2 * i] = a * c - b * s;
            x[off + 2 * i + 1] = a * s + b * c;
        }
    }

    /// The inverse rotation (angle −pos·θ), used to de-rotate attention outputs.
    pub fn unrotate(&self, x: &mut [f32]) {
        let off = x.len() - 2 * self.cos.len();
        for (i, (c, s)) in self.cos.iter().zip(&self.sin).enumerate() {
            let (a, b) = (x[off + 2 * i], x[off + 2 * i + 1]);
            x[off + 2 * i] = a * c + b * s;
            x[off + 2 * i + 1] = b * c - a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    /// Spec §2: for R = 64 and base 160000 the YaRN ramp runs from pair 15 to pair 25.
    #[test]
    fn yarn_keeps_fast_pairs_and_divides_slow_ones() {
        let cfg = Preset::V4Flash.config();
        let plain = Rope::new(64, 160000.0, None);
        let yarn = Rope::for_layer(&cfg, 2); // a CSA layer
        for i in 0..=15 {
            assert_eq!(yarn.freqs()[i], plain.freqs()[i], "pair {i}");
        }
        for i in 25..32 {
            assert!((yarn.freqs()[i] - plain.freqs()[i] / 16.0).abs() <= 1e-6 * plain.freqs()[i], "pair {i}");
        }
        assert!(yarn.freqs()[20] < plain.freqs()[20] && yarn.freqs()[20] > plain.freqs()[20] / 16.0);
        // Window-only layers use base 10000 without YaRN.
        let window = Rope::for_layer(&cfg, 0);
        assert!((window.freqs()[1] - 10000f32.powf(-2.0 / 64.0)).abs() < 1e-7);
    }

    #[test]
    fn rotation_is_interleaved_and_invertible() {
        let rope = Rope::new(4, 10000.0, None);
        let ang = rope.angles(3);
        // Channels 0,1 are "nope" and untouched; pairs (2,3) and (4,5) rotate.
        let mut x = vec![9.0, 8.0, 1.0, 0.0, 0.0, 1.0];
        ang.rotate(&mut x);
        assert_eq!(&x[..2], &[9.0, 8.0]);
        assert!((x[2] - 3f32.cos()).abs() < 1e-6 && (x[3] - 3f32.sin()).abs() < 1e-6);
        let f1 = 10000f32.powf(-0.5);
        assert!((x[4] + (3.0 * f1).sin()).abs() < 1e-6 && (x[5] - (3.0 * f1).cos()).abs() < 1e-6);
        ang.unrotate(&mut x);
        for (a, b) in x.iter().zip([9.0, 8.0, 1.0, 0.0, 0.0, 1.0]) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
