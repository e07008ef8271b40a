//! FP4 e2m1 rows: their scales, and the kernels that take 64 inputs per step (one to four
//! activation rows on rows of a multiple of 64 inputs; the others take the generic 32-input
//! steps of the parent module with [`fp4x32`] / [`fp4x32_ordered`]).

use std::arch::x86_64::*;

use super::super::weight::FP4_BLOCK;
use super::super::x86_decode::{FP4_ORDER, FP4_ORDER64, UNIT, fp4x32, fp4x32_ordered, fp4x64_ordered};
use super::{Fp4Row, PREFETCH_BYTES, RowDecoder, dot_body, dot_single_body, fmadd_from, prefetch};
use crate::numerics::e8m0_to_f32;

impl Fp4Row {
    /// The scale of the 32-block holding input `i`.
    #[inline(always)]
    unsafe fn scale(&self, i: usize) -> __m256 {
        unsafe { _mm256_broadcast_ss(&UE8M0_F32[*self.scales.add(i / FP4_BLOCK) as usize]) }
    }

    /// The scales of the two 32-blocks from input `i`: the first in the low four lanes, the
    /// second in the high four (the lanes of [`fp4x64_ordered`]'s vectors).
    #[inline(always)]
    unsafe fn scale_pair(&self, i: usize) -> __m256 {
        unsafe {
            let sp = self.scales.add(i / FP4_BLOCK);
            _mm256_blend_ps::<0xF0>(
                _mm256_broadcast_ss(&UE8M0_F32[*sp as usize]),
                _mm256_broadcast_ss(&UE8M0_F32[*sp.add(1) as usize]),
            )
        }
    }
}

/// Every UE8M0 scale byte decoded. A broadcast from this table is a load, where placing the byte
/// in an f32's exponent field takes a shift and a shuffle on the ports the FP4 decode is short
/// of (the two-block scales of [`Fp4Row::scale_pair`]: FP4 +6 % in cache, one thread, Zen 1).
pub(super) static UE8M0_F32: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut code = 0;
    while code < 256 {
        t[code] = e8m0_to_f32(code as u8);
        code += 1;
    }
    t
};

/// Inputs per step of the FP4 kernels for one to four activation rows on row bodies that are a
/// multiple of 64: one 32-byte load splits into 64 nibbles at once, and the loop overhead is
/// shared by two scale blocks. One thread, in cache, Zen 1, against 32 per step: one activation
/// row 5.2-5.5 → 6.2-6.45 G MAC/s; two 8.8-8.9 → 9.5-9.8 (best of alternating runs); three and
/// four +1-5 %, inside the noise; from five on, where the in-order decode (`vcvtph2ps`) is
/// shared by more rows, 2-8 % slower.
const FP4_PAIR: usize = 2 * UNIT;
/// Most activation rows the FP4 64-input steps take (see [`FP4_PAIR`]).
const FP4_PAIR_MAX_ROWS: usize = 4;

/// Whether the FP4 kernels take 64 inputs per step for a row body of `body` inputs and `m`
/// activation rows.
fn fp4_paired(body: usize, m: usize) -> bool {
    body.is_multiple_of(FP4_PAIR) && m <= FP4_PAIR_MAX_ROWS
}

impl RowDecoder for Fp4Row {
    const SCALED: bool = true;
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        // A step takes 16 bytes: one hint per cache line.
        if i.is_multiple_of(128) {
            prefetch(self.codes.wrapping_add(i / 2 + PREFETCH_BYTES));
        }
    }
    const DOT_ORDER: Option<&'static [u8; UNIT]> = Some(&FP4_ORDER);
    #[inline(always)]
    fn single_order(body: usize) -> Option<&'static [u8]> {
        Some(if fp4_paired(body, 1) { &FP4_ORDER64 } else { &FP4_ORDER })
    }
    #[inline(always)]
    fn multi_order(body: usize, m: usize) -> Option<&'static [u8]> {
        fp4_paired(body, m).then_some(&FP4_ORDER64)
    }
    #[inline(always)]
    unsafe fn dot_multi<const M: usize>(&self, body: usize, x: *const f32, x_stride: usize) -> [__m256; M] {
        if fp4_paired(body, M) {
            unsafe { dot_multi_fp4_pairs(self, body, x, x_stride) }
        } else {
            unsafe { dot_body::<Self, M, false>(self, body, x, x_stride) }
        }
    }
    #[inline(always)]
    unsafe fn dot_single<const R: usize>(rows: [&Self; R], body: usize, x: *const f32) -> [__m256; R] {
        if !fp4_paired(body, 1) {
            return unsafe { dot_single_body(rows, body, x) };
        }
        // Two rows at a time: with four, the registers run out (sums spilled every step, 4 %
        // slower).
        let mut out = [unsafe { _mm256_setzero_ps() }; R];
        for (o, r) in out.chunks_mut(2).zip(rows.chunks(2)) {
            match r {
                [a, b] => o.copy_from_slice(&unsafe { dot_single_fp4_pairs([*a, *b], body, x) }),
                _ => o.copy_from_slice(&unsafe { dot_single_fp4_pairs([r[0]], body, x) }),
            }
        }
        out
    }
    #[inline(always)]
    unsafe fn unit(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe { (fp4x32(self.codes.add(i / 2)), self.scale(i)) }
    }
    #[inline(always)]
    unsafe fn unit_for_dot(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe { (fp4x32_ordered(self.codes.add(i / 2)), self.scale(i)) }
    }
}

/// FP4 rows against one activation row in [`FP4_ORDER64`], 64 inputs per step: per row and step
/// one 32-byte load, eight vectors of values ([`fp4x64_ordered`]) in two short chains, and one
/// multiply-add by the two blocks' scales (low lanes the first block, high lanes the second).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_single_fp4_pairs<const R: usize>(rows: [&Fp4Row; R], body: usize, x: *const f32) -> [__m256; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i < body {
        for (d, a) in rows.iter().zip(acc.iter_mut()) {
            d.prefetch(i);
            unsafe {
                let w = fp4x64_ordered(d.codes.add(i / 2));
                *a = _mm256_fmadd_ps(fp4_pair_products(&w, x.add(i)), d.scale_pair(i), *a);
            }
        }
        i += FP4_PAIR;
    }
    acc
}

/// One FP4 row against `M` activation rows in [`FP4_ORDER64`], 64 inputs per step: the step's
/// values and scales decoded once for the `M` rows, each row's products in two short chains.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_multi_fp4_pairs<const M: usize>(d: &Fp4Row, body: usize, x: *const f32, x_stride: usize) -> [__m256; M] {
    let mut acc = [_mm256_setzero_ps(); M];
    let mut i = 0;
    while i < body {
        unsafe {
            let w = fp4x64_ordered(d.codes.add(i / 2));
            let scales = d.scale_pair(i);
            for (m, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(fp4_pair_products(&w, x.add(m * x_stride + i)), scales, *a);
            }
        }
        i += FP4_PAIR;
    }
    acc
}

/// `Σ w[v] · x[8v..8v + 8]` over the eight vectors of a 64-input step, in two chains (even and
/// odd vectors), the activations as memory operands.
///
/// # Safety
/// `x` must point to 64 readable floats; FMA must be available.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn fp4_pair_products(w: &[__m256; 8], x: *const f32) -> __m256 {
    unsafe {
        let mut even = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
        let mut odd = _mm256_mul_ps(w[1], _mm256_loadu_ps(x.add(8)));
        even = fmadd_from::<64>(w[2], x, even);
        odd = fmadd_from::<96>(w[3], x, odd);
        even = fmadd_from::<128>(w[4], x, even);
        odd = fmadd_from::<160>(w[5], x, odd);
        even = fmadd_from::<192>(w[6], x, even);
        odd = fmadd_from::<224>(w[7], x, odd);
        _mm256_add_ps(even, odd)
    }
}
