//! Typed access to checkpoint tensors with the shape and dtype checks the layout implies. Every
//! error names the tensor and, for shapes, the expected and the actual shape.

use safetensors::Dtype;
use std::collections::HashSet;

use super::layout::{TensorRole, is_ignored_tensor, model_tensors};
use super::reader::{Checkpoint, TensorEntry};
use crate::error::ModelError;
use crate::kernels::{FP4_BLOCK, FP8_TILE, WeightMatrix};
use crate::numerics::e8m0_to_f32;

fn bad(name: &str, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("tensor {name}: {msg}"))
}

fn check_shape(name: &str, entry: &TensorEntry, want: &[usize]) -> Result<(), ModelError> {
    if entry.shape == want { Ok(()) } else { Err(bad(name, format!("shape {:?}, expected {want:?}", entry.shape))) }
}

/// Name of the block-scale companion of a quantised weight (`x.weight` → `x.scale`).
pub fn scale_name(weight_name: &str) -> String {
    match weight_name.strip_suffix(".weight") {
        Some(base) => format!("{base}.scale"),
        None => format!("{weight_name}.scale"),
    }
}

impl Checkpoint {
    /// A linear weight `[rows, cols]` in any supported storage: bf16/f32, FP8 e4m3 with 128×128
    /// scales, or FP4 e2m1 packed two per byte with 1×32 scales.
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, ModelError> {
        let entry = self.require(name)?;
        let data = self.bytes(entry);
        let wrap = |r: Result<WeightMatrix, String>| r.map_err(|m| bad(name, m));
        match entry.dtype {
            Dtype::BF16 | Dtype::F32 => self.matrix(name, rows, cols),
            Dtype::F8_E4M3 => {
                check_shape(name, entry, &[rows, cols])?;
                let scales = self.scales_f32(name, &[rows.div_ceil(FP8_TILE), cols.div_ceil(FP8_TILE)])?;
                wrap(WeightMatrix::from_fp8(rows, cols, data, scales))
            }
            Dtype::I8 | Dtype::U8 | Dtype::F4 => {
                let packed = if entry.dtype == Dtype::F4 { vec![rows, cols] } else { vec![rows, cols / 2] };
                if !cols.is_multiple_of(FP4_BLOCK) {
                    return Err(bad(name, format!("FP4 input width {cols} is not a multiple of {FP4_BLOCK}")));
                }
                check_shape(name, entry, &packed)?;
                let sname = scale_name(name);
                let se = self.require(&sname)?;
                check_shape(&sname, se, &[rows, cols / FP4_BLOCK])?;
                if se.dtype != Dtype::F8_E8M0 && se.dtype != Dtype::U8 {
                    return Err(bad(&sname, format!("dtype {:?}, expected F8_E8M0", se.dtype)));
                }
                wrap(WeightMatrix::from_fp4(rows, cols, data, self.bytes(se)))
            }
            other => Err(bad(
                name,
                format!(
                    "dtype {other:?} is not a supported linear weight (BF16, F32, F8_E4M3 + scale, I8-packed FP4 + scale)"
                ),
            )),
        }
    }

    /// FP8 block scales as f32: UE8M0 (the releases) or F32.
    fn scales_f32(&self, weight: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let sname = scale_name(weight);
        let se = self.require(&sname)?;
        check_shape(&sname, se, shape)?;
        let raw = self.bytes(se);
        let scales = match se.dtype {
            Dtype::F8_E8M0 | Dtype::U8 => raw.as_slice().iter().map(|&b| e8m0_to_f32(b)).collect::<Vec<_>>(),
            Dtype::F32 => f32s(raw.as_slice()),
            other => return Err(bad(&sname, format!("dtype {other:?}, expected F8_E8M0 or F32"))),
        };
        // A NaN scale (UE8M0 code 255) would poison every product of its tile; scales are
        // 1/16384 of the weight bytes, so checking them all is cheap.
        match scales.iter().position(|s| !s.is_finite() || *s <= 0.0) {
            Some(i) => Err(bad(&sname, format!("scale [{i}] is {}, not a positive power of two", scales[i]))),
            None => Ok(scales),
        }
    }

    /// A matrix the official code keeps in bf16/fp32 (embedding, head, gate, compressor).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, ModelError> {
        let entry = self.require(name)?;
        check_shape(name, entry, &[rows, cols])?;
        let data = self.bytes(entry);
        let m = match entry.dtype {
            Dtype::BF16 => WeightMatrix::from_bf16(rows, cols, data),
            Dtype::F32 => WeightMatrix::from_f32(rows, cols, f32s(data.as_slice())),
            other => return Err(bad(name, format!("dtype {other:?}, expected BF16 or F32"))),
        };
        m.map_err(|msg| bad(name, msg))
    }

    /// A small parameter (norm weight, mHC, sink, ape, bias) as f32, from F32 or BF16.
    pub fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let entry = self.require(name)?;
        check_shape(name, entry, shape)?;
        let raw = self.bytes(entry);
        match entry.dtype {
            Dtype::F32 => Ok(f32s(raw.as_slice())),
            Dtype::BF16 => Ok(raw
                .as_slice()
                .chunks_exact(2)
                .map(|p| f32::from_bits((u16::from_le_bytes([p[0], p[1]]) as u32) << 16))
                .collect()),
            other => Err(bad(name, format!("dtype {other:?}, expected F32 or BF16"))),
        }
    }

    /// The token → expert table of a hash-routed layer, checked against the expert count.
    pub fn hash_table(&self, name: &str, rows: usize, cols: usize, n_experts: usize) -> Result<Vec<u32>, ModelError> {
        let entry = self.require(name)?;
        check_shape(name, entry, &[rows, cols])?;
        let raw = self.bytes(entry);
        let values: Vec<i64> = match entry.dtype {
            Dtype::I64 => raw.as_slice().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::I32 => {
                raw.as_slice().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
            }
            other => return Err(bad(name, format!("dtype {other:?}, expected I64 or I32"))),
        };
        values
            .into_iter()
            .map(|v| {
                u32::try_from(v)
                    .ok()
                    .filter(|&e| (e as usize) < n_experts)
                    .ok_or_else(|| bad(name, format!("expert id {v} outside 0..{n_experts}")))
            })
            .collect()
    }

    /// Fails on any tensor the config's layout does not have (a checkpoint for another config,
    /// or a corrupted index). Quantised weights may bring a `.scale` companion.
    pub fn check_no_unexpected_tensors(&self) -> Result<(), ModelError> {
        let mut known: HashSet<String> = HashSet::new();
        for spec in model_tensors(self.config()) {
            if matches!(spec.role, TensorRole::DenseLinear | TensorRole::ExpertLinear) {
                known.insert(scale_name(&spec.name));
            }
            known.insert(spec.name);
        }
        match self.names().find(|n| !known.contains(*n) && !is_ignored_tensor(n)) {
            Some(name) => Err(ModelError::Checkpoint(format!(
                "unexpected tensor {name}: not part of the layout of this config ({})",
                self.origin()
            ))),
            None => Ok(()),
        }
    }
}

fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
