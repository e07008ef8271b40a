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

/// A matrix's rows for [`walk_rows`], decoded one 32-input step at a time.
trait Rows512 {
    /// Where one row's weights start.
    type Row: Copy;
    fn row(&self, r: usize) -> Self::Row;
    /// Step `i` of a row: its 32 values as two vectors in the format's step order, after a
    /// prefetch hint for the weights [`PREFETCH_BYTES`] ahead.
    ///
    /// # Safety
    /// AVX-512F must be available; `i` a multiple of 32 inside the row.
    unsafe fn step(row: Self::Row, i: usize) -> [__m512; 2];
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
    type Row = *const u8;
    #[inline(always)]
    fn row(&self, r: usize) -> *const u8 {
        self.codes.wrapping_add(r * self.cols)
    }
    /// Codes only: values times 2^-120, in input order.
    #[inline(always)]
    unsafe fn step(codes: *const u8, i: usize) -> [__m512; 2] {
        if i.is_multiple_of(2 * UNIT) {
            prefetch(codes.wrapping_add(i + PREFETCH_BYTES));
        }
        unsafe { [fp8x16(codes.add(i)), fp8x16(codes.add(i + 16))] }
    }
}

impl Rows512 for Bf16Values {
    type Row = *const u8;
    #[inline(always)]
    fn row(&self, r: usize) -> *const u8 {
        self.values.wrapping_add(2 * r * self.cols)
    }
    /// A 64-byte line: a shift keeps the even values of each 32-bit lane, a mask the odd ones.
    #[inline(always)]
    unsafe fn step(values: *const u8, i: usize) -> [__m512; 2] {
        prefetch(values.wrapping_add(2 * i + PREFETCH_BYTES));
        unsafe {
            let v = _mm512_loadu_si512(values.add(2 * i) as *const __m512i);
            let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
            [_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)), _mm512_castsi512_ps(odd)]
        }
    }
}

impl Rows512 for Fp4Codes {
    /// The row's codes and its 1×32 scales.
    type Row = (*const u8, *const u8);
    #[inline(always)]
    fn row(&self, r: usize) -> (*const u8, *const u8) {
        (self.codes.wrapping_add(r * self.cols / 2), self.scales.wrapping_add(r * self.cols / FP4_BLOCK))
    }
    /// The value table times the block's scale, then looked up by the low nibbles (even inputs)
    /// and the high ones (odd inputs).
    #[inline(always)]
    unsafe fn step((codes, scales): (*const u8, *const u8), i: usize) -> [__m512; 2] {
        if i.is_multiple_of(128) {
            prefetch(codes.wrapping_add(i / 2 + PREFETCH_BYTES));
        }
        unsafe {
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(i / 2) as *const __m128i));
            let scale = _mm512_set1_ps(UE8M0_F32[*scales.add(i / FP4_BLOCK) as usize]);
            let scaled = _mm512_mul_ps(_mm512_loadu_ps(E2M1_VALUES.as_ptr()), scale);
            [_mm512_permutexvar_ps(bytes, scaled), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), scaled)]
        }
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
        let sums = unsafe { dot::<S, R, M>(src, part_rows, body, x, x_stride) };
        for (r, s) in part_rows.iter().zip(&sums) {
            store(*r, s);
        }
    }
    for r in rows.start + R * q..rows.end {
        let [sums] = unsafe { dot::<S, 1, M>(src, [r], body, x, x_stride) };
        store(r, &sums);
    }
}

/// Rows `rows` of `src` against `M` activation rows `x_stride` apart (in the format's step
/// order), left as vectors: each (row, activation row) in one or two chains ([`fmadd_rows`]).
///
/// # Safety
/// AVX-512F must be available; `body` a multiple of 32 inside every row; `x` must hold `M` rows
/// of `body` floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot<S: Rows512, const R: usize, const M: usize>(
    src: &S,
    rows: [usize; R],
    body: usize,
    x: *const f32,
    x_stride: usize,
) -> [[__m512; M]; R] {
    let rows = rows.map(|r| src.row(r));
    let mut acc = [[[_mm512_setzero_ps(); 2]; M]; R];
    let mut i = 0;
    while i < body {
        for (row, acc) in rows.iter().zip(acc.iter_mut()) {
            unsafe { fmadd_rows(acc, &S::step(*row, i), x.add(i), x_stride) };
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
