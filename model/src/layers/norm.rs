//! RMSNorm over the last axis, in f32 (spec §2).

use super::rows::for_each_row;
use crate::checkpoint::Checkpoint;
use crate::error::ModelError;

/// `x · (mean(x²) + ε)^-1/2`, per row of `width` values, in place.
pub fn rms_normalize(x: &mut [f32], width: usize, eps: f32) {
    for row in x.chunks_exact_mut(width) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let r = 1.0 / (mean + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= r);
    }
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Vec<f32>, eps: f32) -> Self {
        RmsNorm { weight, eps }
    }

    pub fn load(ckpt: &Checkpoint, name: &str, width: usize, eps: f32) -> Result<Self, ModelError> {
        Ok(Self::new(ckpt.vector(name, &[width])?, eps))
    }

    pub fn width(&self) -> usize {
        self.weight.len()
    }

    /// Normalises every row of `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        let w = self.width();
        for_each_row(x, w, |_, row| {
            rms_normalize(row, w, self.eps);
            row.iter_mut().zip(&self.weight).for_each(|(v, g)| *v *= g);
        });
    }

    pub fn bytes(&self) -> usize {
        self.weight.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_rows_have_unit_rms_then_scale() {
        let norm = RmsNorm::new(vec![2.0, 1.0, 0.5, 1.0], 0.0);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0];
        norm.apply(&mut x);
        let rms1 = (30.0f32 / 4.0).sqrt();
        assert!((x[0] - 2.0 / rms1).abs() < 1e-6);
        assert!((x[2] - 0.5 * 3.0 / rms1).abs() < 1e-6);
        assert!((x[4] + 2.0).abs() < 1e-6);
    }
}
