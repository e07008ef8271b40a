//! Weight matrices in their stored formats. A matrix is `[rows, cols]` = `[out, in]`, row-major,
//! and `y = W x` contracts over `cols`.

use super::bytes::Bytes;
use crate::numerics::{E2M1_VALUES, e4m3_to_f32, e8m0_to_f32};

/// Side of the square FP8 weight-scale tiles.
pub const FP8_TILE: usize = 128;
/// FP4 scales cover 1×32 blocks along the input axis.
pub const FP4_BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
    /// e4m3 codes with one UE8M0 scale per 128×128 tile.
    Fp8,
    /// e2m1 codes, two per byte (even input index in the low nibble), one UE8M0 scale per 1×32.
    Fp4,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Fp8 => "fp8-e4m3",
            WeightFormat::Fp4 => "fp4-e2m1",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum WeightData {
    F32(Vec<f32>),
    Bf16(Bytes),
    /// Scales decoded to f32, `[ceil(rows/128), ceil(cols/128)]` (1/16384 of the weight bytes).
    /// `row0` is the first row's offset inside its 128-row tile (non-zero for row-block views).
    /// The codes' owner always holds one byte before them: the dot kernels load each 32-code step
    /// from one byte early too (see `x86_decode::fp8x32_ordered`).
    Fp8 {
        codes: Bytes,
        scales: Vec<f32>,
        row0: usize,
    },
    /// Scales kept as UE8M0 bytes `[rows, cols/32]`: as f32 they would add a quarter to the size.
    Fp4 {
        codes: Bytes,
        scales: Bytes,
    },
}

/// The kernels index the stored bytes through `rows`/`cols` without re-checking, so those are
/// crate-private and fixed at construction, where they are checked against the data length.
#[derive(Clone, Debug)]
pub struct WeightMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: WeightData,
}

fn check_len(what: &str, got: usize, want: Option<usize>) -> Result<(), String> {
    match want {
        Some(w) if w == got => Ok(()),
        Some(w) => Err(format!("{what}: {got} bytes, expected {w}")),
        None => Err(format!("{what}: the shape's byte size overflows")),
    }
}

/// `a · b · c` without overflow.
fn bytes_of(a: usize, b: usize, c: usize) -> Option<usize> {
    a.checked_mul(b)?.checked_mul(c)
}

impl WeightMatrix {
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self, String> {
        check_len("f32 weight", values.len() * 4, bytes_of(rows, cols, 4))?;
        Ok(WeightMatrix { rows, cols, data: WeightData::F32(values) })
    }

    /// bf16 little-endian values.
    pub fn from_bf16(rows: usize, cols: usize, bytes: Bytes) -> Result<Self, String> {
        check_len("bf16 weight", bytes.len(), bytes_of(rows, cols, 2))?;
        Ok(WeightMatrix { rows, cols, data: WeightData::Bf16(bytes) })
    }

    /// e4m3 codes `[rows, cols]` and the decoded block scales `[ceil(rows/128), ceil(cols/128)]`.
    /// Codes at the very start of their owner (a `Vec`, not a checkpoint's mapping) are copied
    /// after a padding byte: see `WeightData::Fp8`.
    pub fn from_fp8(rows: usize, cols: usize, codes: Bytes, scales: Vec<f32>) -> Result<Self, String> {
        check_len("fp8 weight", codes.len(), bytes_of(rows, cols, 1))?;
        check_len("fp8 scale", scales.len() * 4, bytes_of(rows.div_ceil(FP8_TILE), cols.div_ceil(FP8_TILE), 4))?;
        let codes = codes.with_byte_before();
        Ok(WeightMatrix { rows, cols, data: WeightData::Fp8 { codes, scales, row0: 0 } })
    }

    /// Packed e2m1 codes `[rows, cols/2]` and UE8M0 scale bytes `[rows, cols/32]`.
    pub fn from_fp4(rows: usize, cols: usize, codes: Bytes, scales: Bytes) -> Result<Self, String> {
        if !cols.is_multiple_of(FP4_BLOCK) {
            return Err(format!("fp4 weight: input width {cols} is not a multiple of {FP4_BLOCK}"));
        }
        check_len("fp4 weight", codes.len(), bytes_of(rows, cols / 2, 1))?;
        check_len("fp4 scale", scales.len(), bytes_of(rows, cols / FP4_BLOCK, 1))?;
        Ok(WeightMatrix { rows, cols, data: WeightData::Fp4 { codes, scales } })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        match self.data {
            WeightData::F32(_) => WeightFormat::F32,
            WeightData::Bf16(_) => WeightFormat::Bf16,
            WeightData::Fp8 { .. } => WeightFormat::Fp8,
            WeightData::Fp4 { .. } => WeightFormat::Fp4,
        }
    }

    /// FP8/FP4 weights: the official `linear()` quantises the input of these GEMMs.
    pub fn is_quantized(&self) -> bool {
        matches!(self.format(), WeightFormat::Fp8 | WeightFormat::Fp4)
    }

    /// Bytes this matrix occupies (codes + scales), i.e. what streaming it costs.
    pub fn stored_bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(b) => b.len(),
            WeightData::Fp8 { codes, scales, .. } => codes.len() + scales.len() * 4,
            WeightData::Fp4 { codes, scales } => codes.len() + scales.len(),
        }
    }

    /// A view of rows `rows` (no copy of the codes).
    pub fn row_block(&self, rows: std::ops::Range<usize>) -> WeightMatrix {
        assert!(rows.end <= self.rows);
        let k = self.cols;
        let data = match &self.data {
            WeightData::F32(v) => WeightData::F32(v[rows.start * k..rows.end * k].to_vec()),
            WeightData::Bf16(b) => WeightData::Bf16(b.slice(2 * rows.start * k..2 * rows.end * k)),
            WeightData::Fp8 { codes, scales, row0 } => {
                let tiles = k.div_ceil(FP8_TILE);
                let (a, b) = (row0 + rows.start, row0 + rows.end);
                let (t0, t1) = (a / FP8_TILE, b.div_ceil(FP8_TILE));
                WeightData::Fp8 {
                    codes: codes.slice(rows.start * k..rows.end * k),
                    scales: scales[t0 * tiles..t1 * tiles].to_vec(),
                    row0: a % FP8_TILE,
                }
            }
            WeightData::Fp4 { codes, scales } => WeightData::Fp4 {
                codes: codes.slice(rows.start * k / 2..rows.end * k / 2),
                scales: scales.slice(rows.start * k / FP4_BLOCK..rows.end * k / FP4_BLOCK),
            },
        };
        WeightMatrix { rows: rows.len(), cols: k, data }
    }

    /// FP8 scale of the tile holding (`row`, input block `kb`); `row0` as in `WeightData::Fp8`.
    #[inline]
    pub(crate) fn fp8_scale(scales: &[f32], cols: usize, row0: usize, row: usize, kb: usize) -> f32 {
        scales[((row + row0) / FP8_TILE) * cols.div_ceil(FP8_TILE) + kb]
    }

    /// Decodes row `row` to f32 with plain scalar code: the reference the SIMD paths are tested
    /// against, and the portable fallback.
    pub fn decode_row_scalar(&self, row: usize, out: &mut [f32]) {
        let k = self.cols;
        debug_assert_eq!(out.len(), k);
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[row * k..(row + 1) * k]),
            WeightData::Bf16(b) => {
                let src = &b.as_slice()[row * k * 2..(row + 1) * k * 2];
                for (o, pair) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([pair[0], pair[1]]) as u32) << 16);
                }
            }
            WeightData::Fp8 { codes, scales, row0 } => {
                let src = &codes.as_slice()[row * k..(row + 1) * k];
                for (kb, (o, c)) in out.chunks_mut(FP8_TILE).zip(src.chunks(FP8_TILE)).enumerate() {
                    let s = Self::fp8_scale(scales, k, *row0, row, kb);
                    for (o, &c) in o.iter_mut().zip(c) {
                        *o = e4m3_to_f32(c) * s;
                    }
                }
            }
            WeightData::Fp4 { codes, scales } => {
                let src = &codes.as_slice()[row * k / 2..(row + 1) * k / 2];
                let sc = &scales.as_slice()[row * k / FP4_BLOCK..(row + 1) * k / FP4_BLOCK];
                for (i, &byte) in src.iter().enumerate() {
                    let s = e8m0_to_f32(sc[2 * i / FP4_BLOCK]);
                    out[2 * i] = E2M1_VALUES[(byte & 0x0f) as usize] * s;
                    out[2 * i + 1] = E2M1_VALUES[(byte >> 4) as usize] * s;
                }
            }
        }
    }

    /// The whole matrix as f32 (tests and tools; never on a serving path).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.decode_row_scalar(r, row);
        }
        out
    }
}
