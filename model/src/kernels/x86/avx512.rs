//! AVX-512 dot products (decode: weights against up to 8 activation rows). On a core with
//! 512-bit datapaths (Zen 5 measured) the AVX2 decoders leave FP8 and FP4 bound by vector
//! operations well below the memory bandwidth; here one instruction decodes 16 values:
//!
//! * FP4 e2m1: the 16 codes, sign included, index the 16 lanes of one register, and `vpermps`
//!   reads only the low four bits of each index lane. So a byte-to-lane widen of 16 code bytes
//!   and one `vpermps` decode their 16 low nibbles (the even inputs), a shift and a second
//!   `vpermps` the high ones (the odd inputs). The table is multiplied by the block's scale
//!   first, so the products need no scaling, as the scalar decode does (value × scale, then ×
//!   input; e2m1 values have two significant bits, so the scaled values are exact).
//! * FP8 e4m3: a sign-extending byte-to-lane widen, a shift by 20 and a mask put sign, exponent
//!   and mantissa where an f32 has them: each value times 2^-120, in input order. The tile scales
//!   ride on the activations as on the AVX2 path ([`tile_scaled_products`]).
//! * bf16, at two or more activation rows: a shift keeps the even values of a 64-byte load, a
//!   mask the odd ones.
//!
//! Several activation rows also walk several weight rows side by side ([`walk_rows`]): one
//! thread, 7168 inputs, against the AVX2 kernels (row by row), FP8 at 2 / 4 / 8 activation rows
//! 7.4 / 5.7 / 3.8 → 29 / 21 / 6.1 GB/s of weights, FP4 5.8 / 4.2 / 2.8 → 18.6 / 11.7 / 4.3, bf16
//! 9.6 / 8.2 / 6.3 → 22.6 / 20.5 / 9.2. From about five rows the activations no longer fit the
//! first-level cache beside the weights, and the products slow down.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::weight::{FP4_BLOCK, WeightData, WeightMatrix};
use super::fp4::UE8M0_F32;
use super::fp8::{Fp8Tiles, tile_scaled_products};
use super::{PERMUTED, PREFETCH_BYTES, UNIT, permute_blocks, prefetch};
use crate::numerics::E2M1_VALUES;

/// Computes `out_t` as [`dot_rows`](super::dot_rows) does, for FP8 and FP4 weights, and bf16 at
/// two or more activation rows; returns false (and writes nothing) otherwise.
///
/// # Safety
/// AVX-512F (and the AVX2 family) must be available; the arguments as for `dot_rows`.
pub(super) unsafe fn dot_rows<const M: usize>(
    w: &WeightMatrix,
    rows: Range<usize>,
    body: usize,
    x: &[f32],
    x_stride: usize,
    out_t: &mut [f32],
) -> bool {
    match &w.data {
        WeightData::Fp8 { codes, scales, row0 } => {
            let tiles = Fp8Tiles { scales, cols: w.cols, row0: *row0 };
            let src = Fp8Codes { codes: codes.as_slice().as_ptr(), cols: w.cols };
            tile_scaled_products::<M>(
                &tiles,
                rows,
                body,
                x,
                x_stride,
                &INPUT_ORDER,
                out_t,
                |tile_rows, scaled, out| unsafe {
                    walk_rows::<_, M>(&src, tile_rows, body, scaled.as_ptr(), body, out)
                },
            );
            true
        }
        WeightData::Fp4 { codes, scales } => {
            let src = Fp4Codes { codes: codes.as_slice().as_ptr(), scales: scales.as_slice().as_ptr(), cols: w.cols };
            unsafe { walk_rows_even_odd::<_, M>(&src, rows, body, x, x_stride, out_t) };
            true
        }
        // One activation row: the AVX2 kernel already streams bf16 at the read bandwidth (and
        // measured 5-10 % ahead of this one there).
        WeightData::Bf16(values) if M > 1 => {
            let src = Bf16Values { values: values.as_slice().as_ptr(), cols: w.cols };
            unsafe { walk_rows_even_odd::<_, M>(&src, rows, body, x, x_stride, out_t) };
            true
        }
        WeightData::F32(_) | WeightData::Bf16(_) => false,
    }
}

/// [`walk_rows`] for formats that take each 32-block's even inputs, then its odd ones
/// ([`EVEN_ODD_ORDER`]): the activations are permuted to match first, once per call.
///
/// # Safety
/// As for [`walk_rows`], with `x` holding `M` rows `x_stride` apart in input order.
#[target_feature(enable = "avx512f")]
unsafe fn walk_rows_even_odd<S: Rows512, const M: usize>(
    src: &S,
    rows: Range<usize>,
    body: usize,
    x: &[f32],
    x_stride: usize,
    out_t: &mut [f32],
) {
    PERMUTED.with_borrow_mut(|permuted| {
        permuted.resize(M * body, 0.0);
        for m in 0..M {
            let input = &x[m * x_stride..m * x_stride + body];
            permute_blocks(input, &EVEN_ODD_ORDER, 1.0, &mut permuted[m * body..(m + 1) * body]);
        }
        unsafe { walk_rows::<_, M>(src, rows, body, permuted.as_ptr(), body, out_t) }
    })
}

/// Inputs in order (FP8: the widen keeps the codes' order).
const INPUT_ORDER: [u8; UNIT] = {
    let mut t = [0u8; UNIT];
    let mut i = 0;
    while i < UNIT {
        t[i] = i as u8;
        i += 1;
    }
    t
};

/// Which input of a 32-block each lane of an FP4 or bf16 step holds: the even inputs, then the
/// odd ones (FP4: the low nibbles of the step's 16 bytes, then the high ones; bf16: the low
/// halves of its 16 32-bit lanes, then the high ones).
const EVEN_ODD_ORDER: [u8; UNIT] = {
    let mut t = [0u8; UNIT];
    let mut i = 0;
    while i < UNIT {
        t[i] = (2 * (i % 16) + i / 16) as u8;
        i += 1;
    }
    t
};

/// A matrix's rows for [`walk_rows`].
trait Rows512 {
    /// `R` rows (indices into the matrix) against `M` activation rows `x_stride` apart, in the
    /// format's step order, left as vectors.
    ///
    /// # Safety
    /// AVX-512F must be available; `body` a multiple of 32 inside every row; `x` must hold `M`
    /// rows of `body` floats.
    unsafe fn dot<const R: usize, const M: usize>(
        &self,
        rows: [usize; R],
        body: usize,
        x: *const f32,
        x_stride: usize,
    ) -> [[__m512; M]; R];
}

struct Fp8Codes {
    codes: *const u8,
    cols: usize,
}

struct Bf16Values {
    values: *const u8,
    cols: usize,
}

struct Fp4Codes {
    codes: *const u8,
    scales: *const u8,
    cols: usize,
}

impl Rows512 for Fp8Codes {
    #[inline(always)]
    unsafe fn dot<const R: usize, const M: usize>(
        &self,
        rows: [usize; R],
        body: usize,
        x: *const f32,
        x_stride: usize,
    ) -> [[__m512; M]; R] {
        unsafe { fp8_dot(rows.map(|r| self.codes.wrapping_add(r * self.cols)), body, x, x_stride) }
    }
}

impl Rows512 for Bf16Values {
    #[inline(always)]
    unsafe fn dot<const R: usize, const M: usize>(
        &self,
        rows: [usize; R],
        body: usize,
        x: *const f32,
        x_stride: usize,
    ) -> [[__m512; M]; R] {
        unsafe { bf16_dot(rows.map(|r| self.values.wrapping_add(2 * r * self.cols)), body, x, x_stride) }
    }
}

impl Rows512 for Fp4Codes {
    #[inline(always)]
    unsafe fn dot<const R: usize, const M: usize>(
        &self,
        rows: [usize; R],
        body: usize,
        x: *const f32,
        x_stride: usize,
    ) -> [[__m512; M]; R] {
        let rows = rows
            .map(|r| (self.codes.wrapping_add(r * self.cols / 2), self.scales.wrapping_add(r * self.cols / FP4_BLOCK)));
        unsafe { fp4_dot(rows, body, x, x_stride) }
    }
}

/// `out_t[(r - rows.start) * M + m]` for every row. The rows are cut into parts walked side by
/// side: several long memory streams in flight (one stream per core stays short of the read
/// bandwidth), and independent multiply-add chains. Four parts up to four activation rows, two
/// from five, where the sums of four would not fit the registers: one FP8 row at a time took 2
/// activation rows to 14 GB/s, one thread, against 35 at one.
#[target_feature(enable = "avx512f")]
unsafe fn walk_rows<S: Rows512, const M: usize>(
    src: &S,
    rows: Range<usize>,
    body: usize,
    x: *const f32,
    x_stride: usize,
    out_t: &mut [f32],
) {
    match M {
        1..=4 => unsafe { walk_parts::<S, 4, M>(src, rows, body, x, x_stride, out_t) },
        _ => unsafe { walk_parts::<S, 2, M>(src, rows, body, x, x_stride, out_t) },
    }
}

/// [`walk_rows`] with the rows cut into `R` equal parts (the rows after them one at a time).
#[target_feature(enable = "avx512f")]
unsafe fn walk_parts<S: Rows512, const R: usize, const M: usize>(
    src: &S,
    rows: Range<usize>,
    body: usize,
    x: *const f32,
    x_stride: usize,
    out_t: &mut [f32],
) {
    let q = rows.len() / R;
    let mut store = |r: usize, sums: &[__m512; M]| {
        for (m, s) in sums.iter().enumerate() {
            out_t[(r - rows.start) * M + m] = _mm512_reduce_add_ps(*s);
        }
    };
    for i in 0..q {
        let part_rows: [usize; R] = std::array::from_fn(|k| rows.start + k * q + i);
        let sums = unsafe { src.dot::<R, M>(part_rows, body, x, x_stride) };
        for (r, s) in part_rows.iter().zip(&sums) {
            store(*r, s);
        }
    }
    for r in rows.start + R * q..rows.end {
        let [sums] = unsafe { src.dot::<1, M>([r], body, x, x_stride) };
        store(r, &sums);
    }
}

/// FP8 rows (codes only: values times 2^-120) against activations in input order, 64 inputs per
/// step, each (row, activation row) in two chains.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fp8_dot<const R: usize, const M: usize>(
    rows: [*const u8; R],
    body: usize,
    x: *const f32,
    x_stride: usize,
) -> [[__m512; M]; R] {
    let mut acc = [[[_mm512_setzero_ps(); 2]; M]; R];
    let mut i = 0;
    while i + 2 * UNIT <= body {
        for (codes, acc) in rows.iter().zip(acc.iter_mut()) {
            prefetch(codes.wrapping_add(i + PREFETCH_BYTES));
            let w = [0, 16, 32, 48].map(|j| unsafe { fp8x16(codes.add(i + j)) });
            unsafe { fmadd_rows(acc, &w, x.add(i), x_stride) };
        }
        i += 2 * UNIT;
    }
    if i < body {
        // A last 32-input step.
        for (codes, acc) in rows.iter().zip(acc.iter_mut()) {
            let w = [0, 16].map(|j| unsafe { fp8x16(codes.add(i + j)) });
            unsafe { fmadd_rows(acc, &w, x.add(i), x_stride) };
        }
    }
    acc.map(|row| row.map(|[even, odd]| _mm512_add_ps(even, odd)))
}

/// bf16 rows against activations in [`EVEN_ODD_ORDER`], one 32-block (a 64-byte line) per step:
/// a shift keeps the even values of each 32-bit lane, a mask the odd ones.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bf16_dot<const R: usize, const M: usize>(
    rows: [*const u8; R],
    body: usize,
    x: *const f32,
    x_stride: usize,
) -> [[__m512; M]; R] {
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [[[_mm512_setzero_ps(); 2]; M]; R];
    let mut i = 0;
    while i < body {
        for (values, acc) in rows.iter().zip(acc.iter_mut()) {
            prefetch(values.wrapping_add(2 * i + PREFETCH_BYTES));
            unsafe {
                let v = _mm512_loadu_si512(values.add(2 * i) as *const __m512i);
                let w =
                    [_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)), _mm512_castsi512_ps(_mm512_and_si512(v, high))];
                fmadd_rows(acc, &w, x.add(i), x_stride);
            }
        }
        i += UNIT;
    }
    acc.map(|row| row.map(|[even, odd]| _mm512_add_ps(even, odd)))
}

/// `sums[m] += Σ_j w[j] · x[m][16j..16j + 16]` for each of `M` activation rows `x_stride` apart:
/// in two chains per row (even and odd `j`) at one or two rows, whose chains would otherwise be
/// too few to hide the multiply-add latency; in one from three, which leaves the registers to
/// more weight rows at a time ([`walk_rows`]).
///
/// # Safety
/// AVX-512F must be available; `x` must hold `M` rows of `16 * N` floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fmadd_rows<const M: usize, const N: usize>(
    sums: &mut [[__m512; 2]; M],
    w: &[__m512; N],
    x: *const f32,
    x_stride: usize,
) {
    let chains = if M <= 2 { 2 } else { 1 };
    for (m, sums) in sums.iter_mut().enumerate() {
        for (j, w) in w.iter().enumerate() {
            let s = &mut sums[j % chains];
            *s = _mm512_fmadd_ps(*w, unsafe { _mm512_loadu_ps(x.add(m * x_stride + 16 * j)) }, *s);
        }
    }
}

/// Sixteen e4m3 codes as f32, each value times 2^-120: sign-extended to 32 bits, the code's
/// exponent and mantissa shifted to bits 23..27 and 20..23, and the mask keeps them and the sign
/// (bit 31). e4m3 subnormals become f32 subnormals of the same factor.
///
/// # Safety
/// `p` must point to 16 readable bytes; AVX-512F must be available.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fp8x16(p: *const u8) -> __m512 {
    let wide = _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
    _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32::<20>(wide), _mm512_set1_epi32(0x87F0_0000u32 as i32)))
}

/// FP4 rows (codes and their 1×32 scales) against activations in [`EVEN_ODD_ORDER`], one
/// 32-block per step, each (row, activation row) in two chains (even and odd inputs).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fp4_dot<const R: usize, const M: usize>(
    rows: [(*const u8, *const u8); R],
    body: usize,
    x: *const f32,
    x_stride: usize,
) -> [[__m512; M]; R] {
    let values = unsafe { _mm512_loadu_ps(E2M1_VALUES.as_ptr()) };
    let mut acc = [[[_mm512_setzero_ps(); 2]; M]; R];
    let mut i = 0;
    while i < body {
        for ((codes, scales), acc) in rows.iter().zip(acc.iter_mut()) {
            unsafe {
                if i.is_multiple_of(128) {
                    prefetch(codes.wrapping_add(i / 2 + PREFETCH_BYTES));
                }
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(i / 2) as *const __m128i));
                let scaled = _mm512_mul_ps(values, _mm512_set1_ps(UE8M0_F32[*scales.add(i / FP4_BLOCK) as usize]));
                let even = _mm512_permutexvar_ps(bytes, scaled);
                let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), scaled);
                fmadd_rows(acc, &[even, odd], x.add(i), x_stride);
            }
        }
        i += UNIT;
    }
    acc.map(|row| row.map(|[even, odd]| _mm512_add_ps(even, odd)))
}
