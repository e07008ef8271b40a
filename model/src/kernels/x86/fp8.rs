//! FP8 e4m3 rows: in input order with their tile scales (the GEMMs' row decode), and the dot
//! products whose activations carry the 128×128 tile scales ([`dot_rows_fp8`]).

use std::arch::x86_64::*;

use super::super::weight::FP8_TILE;
use super::super::x86_decode::{FP8_ORDER, UNIT, fp8x16, fp8x32_ordered, permute_blocks};
use super::{
    Fp8CodesRow, Fp8CodesRows, Fp8Row, PERMUTED, PREFETCH_BYTES, RowDecoder, dot_body, prefetch, rows_body,
    rows_body_single,
};
use crate::numerics::minifloat::pow2;

thread_local! {
    /// [`dot_rows_fp8`]'s activations with one row tile's scales.
    static TILE_SCALED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `fp8x32_ordered` yields each value times 2^-120; the activations are taken times 2^64, so the
/// products stay clear of f32 subnormals (exact for |x| < 2^64 and |w·x| ≥ 2^-70 at the tile's
/// largest scale), and the results are multiplied by the remaining 2^56.
const FP8_DOT_INPUT_EXP: i32 = 64;

impl RowDecoder for Fp8Row {
    const SCALED: bool = true;
    #[inline(always)]
    unsafe fn unit(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe {
            let p = self.codes.add(i);
            let (a, b) = fp8x16(p);
            let (c, d) = fp8x16(p.add(16));
            ([a, b, c, d], _mm256_set1_ps(*self.scales.add(i / FP8_TILE) * 256.0))
        }
    }
}

impl RowDecoder for Fp8CodesRow {
    const SCALED: bool = false;
    const DOT_ORDER: Option<&'static [u8; UNIT]> = Some(&FP8_ORDER);
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        prefetch(self.0.wrapping_add(i + PREFETCH_BYTES));
    }
    #[inline(always)]
    unsafe fn dot_multi<const M: usize>(&self, body: usize, x: *const f32, x_stride: usize) -> [__m256; M] {
        unsafe { dot_body::<Self, M, true>(self, body, x, x_stride) }
    }
    #[inline(always)]
    unsafe fn unit_for_dot(&self, i: usize) -> ([__m256; 4], __m256) {
        // The byte before the step: the row's own, the previous row's, or the one `from_fp8` keeps.
        unsafe { (fp8x32_ordered(self.0.add(i)), _mm256_set1_ps(1.0)) }
    }
    /// Input order (unused by the dot kernels, which take the dot order): `fp8x16`'s 2^-8 times
    /// 2^-112, the same factor as the dot order's.
    #[inline(always)]
    unsafe fn unit(&self, i: usize) -> ([__m256; 4], __m256) {
        const TO_DOT_FACTOR: f32 = pow2(-112);
        unsafe {
            let p = self.0.add(i);
            let (a, b) = fp8x16(p);
            let (c, d) = fp8x16(p.add(16));
            ([a, b, c, d].map(|v| _mm256_mul_ps(v, _mm256_set1_ps(TO_DOT_FACTOR))), _mm256_set1_ps(1.0))
        }
    }
}

/// The scale tiles of an FP8 matrix (`row0` as in `WeightData::Fp8`).
pub(super) struct Fp8Tiles<'a> {
    pub(super) scales: &'a [f32],
    pub(super) cols: usize,
    pub(super) row0: usize,
}

impl Fp8Tiles<'_> {
    /// The rows from `r` up to the end of `r`'s 128-row tile (at most `end`), and that tile's
    /// scales along the inputs.
    fn tile_of(&self, r: usize, end: usize) -> (std::ops::Range<usize>, &[f32]) {
        let tile = (r + self.row0) / FP8_TILE;
        let per_row = self.cols.div_ceil(FP8_TILE);
        (r..end.min((tile + 1) * FP8_TILE - self.row0), &self.scales[tile * per_row..(tile + 1) * per_row])
    }
}

/// [`dot_rows`](super::dot_rows) for FP8: the tile scales ride on the activations instead of
/// being applied inside the loop (see [`tile_scaled_products`]), and each row's products go
/// straight into its sums over the whole row (`dot_single_body_unscaled`, `dot_body_unscaled`;
/// at one activation row +7 % against scaling each tile's sum).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_fp8<const M: usize>(
    src: &Fp8CodesRows,
    tiles: &Fp8Tiles,
    rows: std::ops::Range<usize>,
    body: usize,
    x: &[f32],
    x_stride: usize,
    out_t: &mut [f32],
) {
    tile_scaled_products::<M>(tiles, rows, body, x, x_stride, &FP8_ORDER, out_t, |tile_rows, scaled, out| {
        if M > 1 {
            unsafe { rows_body::<_, M>(src, tile_rows, body, scaled.as_ptr(), body, out) }
        } else {
            unsafe { rows_body_single(src, tile_rows, body, scaled.as_ptr(), out) }
        }
    })
}

/// FP8 products whose 128×128 tile scales ride on the activations. For each 128-row tile the
/// rows cross, the activations (laid out in `order`, times 2^64) are multiplied by that tile's
/// scales, one per 128 inputs, relative to the tile's largest (so nothing overflows for
/// |x| < 2^64), and `products(tile_rows, scaled, out)` writes the rows' sums of codes decoded
/// times 2^-120 against them; the results are then multiplied by the rest of the factors. The
/// scales are powers of two, so each product is exactly the scaled one; only the order of a
/// row's sum differs from scaling each tile's.
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_scaled_products<const M: usize>(
    tiles: &Fp8Tiles,
    rows: std::ops::Range<usize>,
    body: usize,
    x: &[f32],
    x_stride: usize,
    order: &[u8],
    out_t: &mut [f32],
    mut products: impl FnMut(std::ops::Range<usize>, &[f32], &mut [f32]),
) {
    if body == 0 {
        return out_t[..rows.len() * M].fill(0.0);
    }
    PERMUTED.with_borrow_mut(|permuted| {
        TILE_SCALED.with_borrow_mut(|scaled| {
            permuted.resize(M * body, 0.0);
            scaled.resize(M * body, 0.0);
            for m in 0..M {
                let input = &x[m * x_stride..m * x_stride + body];
                permute_blocks(input, order, pow2(FP8_DOT_INPUT_EXP), &mut permuted[m * body..(m + 1) * body]);
            }
            let mut r = rows.start;
            while r < rows.end {
                let (tile_rows, scales) = tiles.tile_of(r, rows.end);
                let top = scales[..body.div_ceil(FP8_TILE)].iter().map(|s| exponent(*s)).max().unwrap_or(0);
                for (out, input) in scaled.chunks_exact_mut(body).zip(permuted.chunks_exact(body)) {
                    for ((o, i), s) in out.chunks_mut(FP8_TILE).zip(input.chunks(FP8_TILE)).zip(scales) {
                        let s = s * pow2(-top);
                        for (o, i) in o.iter_mut().zip(i) {
                            *o = i * s;
                        }
                    }
                }
                let out = &mut out_t[(r - rows.start) * M..(tile_rows.end - rows.start) * M];
                products(tile_rows.clone(), scaled, out);
                // The decode's 2^-120 against the activations' 2^64, and the tile's largest scale.
                let restore = (pow2(120 - FP8_DOT_INPUT_EXP), pow2(top));
                for o in out.iter_mut() {
                    *o = *o * restore.0 * restore.1;
                }
                r = tile_rows.end;
            }
        })
    })
}

/// The power of two of a UE8M0 scale, kept where [`pow2`] of it and of its negation are normal.
fn exponent(scale: f32) -> i32 {
    (((scale.to_bits() >> 23) & 0xff) as i32 - 127).clamp(-126, 126)
}
