//! A linear layer over a stored weight. FP8/FP4 weights quantise their input to FP8 in 1×128
//! blocks first, as the official `linear()` does before `fp8_gemm`/`fp4_gemm` (spec §9.2).

use std::borrow::Cow;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::kernels::{self, WeightMatrix};
use crate::numerics::fp8_sim;

/// Activation block of the FP8 GEMM input quantisation.
pub const ACT_BLOCK: usize = 128;

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: WeightMatrix,
    quantize_input: bool,
}

impl Linear {
    /// `quantize_input` applies only when the weight really is FP8/FP4.
    pub fn new(weight: WeightMatrix, quantize_input: bool) -> Self {
        let quantize_input = quantize_input && weight.is_quantized();
        Linear { weight, quantize_input }
    }

    /// Loads `name`. An FP8/FP4 weight whose input is quantised must have an input width that
    /// splits into the 128-wide activation blocks; checked here because the file, not the config,
    /// decides the format.
    pub fn load(
        ckpt: &Checkpoint,
        name: &str,
        rows: usize,
        cols: usize,
        quantize_input: bool,
    ) -> Result<Self, ModelError> {
        let w = ckpt.linear(name, rows, cols)?;
        if quantize_input && w.is_quantized() && !cols.is_multiple_of(ACT_BLOCK) {
            return Err(ModelError::Checkpoint(format!(
                "tensor {name}: {} input width {cols} is not a multiple of {ACT_BLOCK} (FP8 activation blocks)",
                w.format().name()
            )));
        }
        Ok(Self::new(w, quantize_input))
    }

    pub fn in_features(&self) -> usize {
        self.weight.cols
    }

    pub fn out_features(&self) -> usize {
        self.weight.rows
    }

    /// `y = x Wᵀ` for `m` rows of input.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        kernels::matmul(&self.input(x), m, &self.weight)
    }

    /// The GEMM's input: `x` itself, or its FP8 rounding for FP8/FP4 weights.
    fn input<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        if self.quantize_input {
            let mut q = x.to_vec();
            fp8_sim(&mut q, ACT_BLOCK.min(self.in_features()));
            Cow::Owned(q)
        } else {
            Cow::Borrowed(x)
        }
    }

    /// Several linears over inputs of `m` rows each, computed together (see
    /// [`kernels::matmul_many`]).
    pub fn forward_many(pairs: &[(&Linear, &[f32])], m: usize) -> Vec<Vec<f32>> {
        // Each distinct input is FP8-rounded once: projections of one input then still share one
        // input slice, which is what lets the kernels stack them into one GEMM.
        let same = |a: &[f32], b: &[f32]| std::ptr::eq(a, b);
        let mut rounded: Vec<(&[f32], Cow<'_, [f32]>)> = Vec::new();
        for (l, x) in pairs {
            if l.quantize_input && !rounded.iter().any(|(src, _)| same(src, x)) {
                rounded.push((x, l.input(x)));
            }
        }
        let jobs: Vec<kernels::MatmulJob<'_>> = pairs
            .iter()
            .map(|(l, x)| {
                let x: &[f32] = match rounded.iter().find(|(src, _)| l.quantize_input && same(src, x)) {
                    Some((_, q)) => q,
                    None => x,
                };
                kernels::MatmulJob { x, m, w: &l.weight }
            })
            .collect();
        kernels::matmul_many(&jobs)
    }

    pub fn bytes(&self) -> usize {
        self.weight.stored_bytes()
    }
}
