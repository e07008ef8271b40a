//! AVX2 + FMA + F16C kernels (x86_64). Every weight format is decoded in registers, 32 inputs at
//! a time, and multiplied against up to 8 activation rows while the weights are hot:
//!
//! * bf16: zero-extend to 32 bits and shift into the high half (dot products with one
//!   activation row: a shift or a mask per 16 values, out of order; see `x86_decode`).
//! * FP8 e4m3: sign-extend to 16 bits, shift left by 7 and clear bit 14; that yields an f16 whose
//!   value is the e4m3 value times 2^-8 (e4m3 bias 7 vs f16 bias 15; e4m3 subnormals land on f16
//!   subnormals), which `vcvtph2ps` widens exactly. The 2^8 goes into the block scale (row
//!   decoding for the GEMMs). Dot products (up to 8 activation rows) decode by shifts and masks
//!   alone, out of order, each value times 2^-120 (see `x86_decode::fp8x32_ordered`), and take
//!   the 128×128 tile scales on the activations, one row tile at a time (`dot_rows_fp8`).
//! * FP4 e2m1: every e2m1 value is an f16 whose low byte is zero, so a 16-entry `pshufb` table of
//!   high bytes decodes a nibble straight to f16. Dot products with one activation row (and,
//!   on rows of a multiple of 64 inputs, up to four) instead build each value's bf16 bytes with
//!   two lookups, out of order, 64 values per step where the row allows (`x86/fp4.rs`).
//!
//! Callers check `is_x86_feature_detected!` once (see `kernels::simd_available`).
//!
//! Measured on AMD Zen 1 (2.5 GHz), one activation row, one thread, a 2.6 MiB matrix in cache:
//! about 7 (bf16), 9 (FP8) and 12.5 (FP4) cycles per 32 inputs; FP8 and FP4 no faster than from
//! memory: they are bound by the vector operations per value (decode plus multiply-add). On that
//! core 256-bit shifts run on one port only (one per two cycles, like `vcvtph2ps`), byte shuffles
//! (`vpshufb`, `vpslldq`, unpacks) on two, logic on four, multiply-adds on two; the FP8 decode is
//! arranged around the shift port (a second, one-byte-earlier load instead of a shift; `vpslldq`
//! instead of `vpslld`). Beyond the ports, the count of instructions bounds these loops: keeping
//! the activations out of the registers (memory operands of the multiply-adds, no spills) gained
//! FP8 13 %, while a variant that shares activation loads between rows but needs more instructions
//! was 9 % slower. The FP8 bit-trick decode turns e4m3 subnormals into f32 subnormals, which cost a
//! microcode assist per multiply-add on that core: no measurable cost at the 1.3e-4 share of
//! subnormal codes in amax-scaled weights (the golden FP8 checkpoint), 25 % slower than `vcvtph2ps`
//! when 5 % of the codes are subnormal (uniformly random bytes). Tried and slower on that core:
//! byte→f32 bit tricks for FP4 (its 0.5 lands on a subnormal), magic-number int→float conversion,
//! `pshufb` tables building bf16 patterns in input order and, for FP8, out of order, integer
//! multiplies standing in for the FP8 decode's shifts (also as memory-operand loads), and
//! all-128-bit variants.
//!
//! On cores with AVX-512 the FP8 and FP4 dot products run on `x86/avx512.rs` instead (16 values
//! per decode instruction). On Zen 5 these AVX2 kernels stream FP8 at 66 % and FP4 at 33 % of the
//! read bandwidth, compute-bound (as fast from memory as in cache); the AVX-512 ones at 88 % and
//! ~70 %. bf16 streams at the read bandwidth here either way.

mod avx512;
mod fp4;
mod fp8;

use std::arch::x86_64::*;

use super::Simd;
use super::weight::{FP4_BLOCK, FP8_TILE, WeightData, WeightMatrix};
pub use super::x86_decode::UNIT;
use super::x86_decode::{BF16_ORDER, bf16x8, bf16x32_ordered, permute_blocks};
use fp8::{Fp8Tiles, dot_rows_fp8};

/// How far ahead of a step the one-activation-row kernels prefetch each row's weights, in bytes.
/// The hardware prefetchers alone leave these four-stream walks short of the read bandwidth on
/// Zen 5 (FP8 from memory 68 % → 85-100 % of a one-stream read, FP4 55 % → 77-88 %; 2048
/// against 1024 and 4096).
pub(super) const PREFETCH_BYTES: usize = 2048;

/// Hint: `p`'s cache line will be read soon.
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: SSE is part of x86_64; a prefetch reads nothing and never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One 32-input step of a weight row: the decoded values and the scale that multiplies them.
/// Implementations hold the row's base pointers, so the per-step work is loads and arithmetic
/// only (no format dispatch, no bounds checks): that is what lets the kernel run at memory speed.
/// Keeping the scale apart lets the dot product apply it once per step, with the accumulation's
/// own FMA, instead of once per vector.
trait RowDecoder {
    /// Whether `unit` returns a scale other than 1.
    const SCALED: bool;
    /// The order of the inputs in each of `unit_for_dot`'s steps (`None`: input order); the dot
    /// kernels permute the activations to match.
    const DOT_ORDER: Option<&'static [u8; UNIT]> = None;
    /// The order in which [`RowDecoder::dot_single`] takes a row body of `body` inputs, in blocks
    /// of the order's length (`None`: input order).
    #[inline(always)]
    fn single_order(_body: usize) -> Option<&'static [u8]> {
        Self::DOT_ORDER.map(|order| order.as_slice())
    }
    /// Asks the cache for this row's weights [`PREFETCH_BYTES`] past step `i` (one activation
    /// row; a hint, so any address will do).
    #[inline(always)]
    fn prefetch(&self, _i: usize) {}
    /// The step in input order.
    ///
    /// # Safety
    /// `i` must be a multiple of 32 inside the row; the pointers must cover the row.
    unsafe fn unit(&self, i: usize) -> ([__m256; 4], __m256);
    /// The step in `DOT_ORDER`, for formats that decode faster out of order.
    ///
    /// # Safety
    /// As for `unit`.
    #[inline(always)]
    unsafe fn unit_for_dot(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe { self.unit(i) }
    }
    /// `R` rows against one activation row laid out in [`RowDecoder::single_order`], left as
    /// vectors.
    ///
    /// # Safety
    /// `body` must be a multiple of 32 inside every row; `x` must hold `body` floats.
    #[inline(always)]
    unsafe fn dot_single<const R: usize>(rows: [&Self; R], body: usize, x: *const f32) -> [__m256; R]
    where
        Self: Sized,
    {
        unsafe { dot_single_body(rows, body, x) }
    }
    /// The order in which [`RowDecoder::dot_multi`] takes a row body of `body` inputs against `m`
    /// activation rows, in blocks of the order's length (`None`: input order). FP8 codes, whose
    /// activations carry the tile scales, are permuted by [`dot_rows_fp8`] itself.
    #[inline(always)]
    fn multi_order(_body: usize, _m: usize) -> Option<&'static [u8]> {
        None
    }
    /// This row against `M` activation rows `x_stride` apart, laid out in
    /// [`RowDecoder::multi_order`], left as vectors.
    ///
    /// # Safety
    /// As for [`RowDecoder::dot_single`], for each of the `M` rows of `x`.
    #[inline(always)]
    unsafe fn dot_multi<const M: usize>(&self, body: usize, x: *const f32, x_stride: usize) -> [__m256; M]
    where
        Self: Sized,
    {
        unsafe { dot_body::<Self, M, false>(self, body, x, x_stride) }
    }
}

struct F32Row(*const f32);
struct Bf16Row(*const u8);
struct Fp8Row {
    codes: *const u8,
    /// Scales of this row's 128×128 tiles (`unit` adds the 2^8 of `fp8x16`).
    scales: *const f32,
}
/// FP8 codes without their scales, for dot products whose activations carry the tile scales
/// (see [`dot_rows_fp8`]). Values come out times 2^-120 in either order.
struct Fp8CodesRow(*const u8);
struct Fp4Row {
    codes: *const u8,
    scales: *const u8,
}

impl RowDecoder for F32Row {
    const SCALED: bool = false;
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        prefetch(self.0.wrapping_add(i).cast::<u8>().wrapping_add(PREFETCH_BYTES));
    }
    #[inline(always)]
    unsafe fn unit(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe {
            let p = self.0.add(i);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            (v, _mm256_set1_ps(1.0))
        }
    }
}

impl RowDecoder for Bf16Row {
    const SCALED: bool = false;
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        prefetch(self.0.wrapping_add(2 * i + PREFETCH_BYTES));
    }
    const DOT_ORDER: Option<&'static [u8; UNIT]> = Some(&BF16_ORDER);
    #[inline(always)]
    unsafe fn unit_for_dot(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe { (bf16x32_ordered(self.0.add(2 * i)), _mm256_set1_ps(1.0)) }
    }
    #[inline(always)]
    unsafe fn unit(&self, i: usize) -> ([__m256; 4], __m256) {
        unsafe {
            let p = self.0.add(2 * i);
            ([bf16x8(p), bf16x8(p.add(16)), bf16x8(p.add(32)), bf16x8(p.add(48))], _mm256_set1_ps(1.0))
        }
    }
}

/// Dot products over the 32-aligned body of a row, for `M` activation rows, left as vectors
/// (the caller reduces eight rows at a time). `DOT_ORDER`: the weights are decoded (and `x` is
/// laid out) in the format's dot order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_body<D: RowDecoder, const M: usize, const DOT_ORDER: bool>(
    d: &D,
    body: usize,
    x: *const f32,
    x_stride: usize,
) -> [__m256; M] {
    if !D::SCALED {
        return unsafe { dot_body_unscaled::<D, M, DOT_ORDER>(d, body, x, x_stride) };
    }
    let mut acc = [_mm256_setzero_ps(); M];
    let mut i = 0;
    while i < body {
        let (wv, scale) = unsafe { if DOT_ORDER { d.unit_for_dot(i) } else { d.unit(i) } };
        for (m, a) in acc.iter_mut().enumerate() {
            // One short chain per unit keeps the loop-carried dependency to a single add/FMA.
            unsafe {
                let xm = x.add(m * x_stride + i);
                let mut t = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xm));
                t = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xm.add(8)), t);
                t = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xm.add(16)), t);
                t = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xm.add(24)), t);
                *a = if D::SCALED { _mm256_fmadd_ps(t, scale, *a) } else { _mm256_add_ps(*a, t) };
            }
        }
        i += UNIT;
    }
    acc
}

/// [`dot_body`] for unscaled steps (f32, bf16, and FP8 codes whose scales ride on the
/// activations): sums per activation row over the whole row, with no add per step. One sum per
/// row from 3 rows (in cache, one thread: bf16 +12-16 % at 4 and 8 rows and +2 % at 3); two at
/// 1 or 2 rows (a step's even and odd vectors), whose chains would otherwise be too few to hide
/// the multiply-add latency.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_body_unscaled<D: RowDecoder, const M: usize, const DOT_ORDER: bool>(
    d: &D,
    body: usize,
    x: *const f32,
    x_stride: usize,
) -> [__m256; M] {
    let chains = if M <= 2 { 2 } else { 1 };
    let mut sums = [[_mm256_setzero_ps(); 2]; M];
    let mut i = 0;
    while i < body {
        let (wv, _) = unsafe { if DOT_ORDER { d.unit_for_dot(i) } else { d.unit(i) } };
        for (m, t) in sums.iter_mut().enumerate() {
            for (j, w) in wv.iter().enumerate() {
                let t = &mut t[j % chains];
                *t = _mm256_fmadd_ps(*w, unsafe { _mm256_loadu_ps(x.add(m * x_stride + i + 8 * j)) }, *t);
            }
        }
        i += UNIT;
    }
    sums.map(|[a, b]| _mm256_add_ps(a, b))
}

/// Horizontal sums of eight vectors at once (a transpose-and-add tree): per row this costs about
/// one instruction instead of a full reduction, which matters for short rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum8(v: &[__m256; 8]) -> __m256 {
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    let lo = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
    let hi = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
    _mm256_add_ps(lo, hi)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_body<D: RowDecoder>(d: &D, body: usize, out: *mut f32) {
    let mut i = 0;
    while i < body {
        unsafe {
            let (v, scale) = d.unit(i);
            for (j, vec) in v.into_iter().enumerate() {
                _mm256_storeu_ps(out.add(i + 8 * j), if D::SCALED { _mm256_mul_ps(vec, scale) } else { vec });
            }
        }
        i += UNIT;
    }
}

/// Row decoders of one matrix: built once per call, so the format dispatch happens once per call
/// rather than once per row.
trait RowSource {
    type Row: RowDecoder;
    fn row(&self, r: usize) -> Self::Row;
}

struct F32Rows(*const f32, usize);
struct Bf16Rows(*const u8, usize);
struct Fp8Rows {
    codes: *const u8,
    scales: *const f32,
    cols: usize,
    row0: usize,
}
struct Fp8CodesRows(*const u8, usize);
struct Fp4Rows {
    codes: *const u8,
    scales: *const u8,
    cols: usize,
}

impl RowSource for F32Rows {
    type Row = F32Row;
    #[inline(always)]
    fn row(&self, r: usize) -> F32Row {
        F32Row(self.0.wrapping_add(r * self.1))
    }
}
impl RowSource for Bf16Rows {
    type Row = Bf16Row;
    #[inline(always)]
    fn row(&self, r: usize) -> Bf16Row {
        Bf16Row(self.0.wrapping_add(2 * r * self.1))
    }
}
impl RowSource for Fp8Rows {
    type Row = Fp8Row;
    #[inline(always)]
    fn row(&self, r: usize) -> Fp8Row {
        let tiles = self.cols.div_ceil(FP8_TILE);
        Fp8Row {
            codes: self.codes.wrapping_add(r * self.cols),
            scales: self.scales.wrapping_add(((r + self.row0) / FP8_TILE) * tiles),
        }
    }
}
impl RowSource for Fp8CodesRows {
    type Row = Fp8CodesRow;
    #[inline(always)]
    fn row(&self, r: usize) -> Fp8CodesRow {
        Fp8CodesRow(self.0.wrapping_add(r * self.1))
    }
}
impl RowSource for Fp4Rows {
    type Row = Fp4Row;
    #[inline(always)]
    fn row(&self, r: usize) -> Fp4Row {
        Fp4Row {
            codes: self.codes.wrapping_add(r * self.cols / 2),
            scales: self.scales.wrapping_add(r * self.cols / FP4_BLOCK),
        }
    }
}

/// Calls `$body` with `$src` bound to the static row-source type of `w`'s format.
macro_rules! with_source {
    ($w:expr, |$src:ident| $body:expr) => {{
        let w = $w;
        let k = w.cols;
        match &w.data {
            WeightData::F32(v) => {
                let $src = F32Rows(v.as_ptr(), k);
                $body
            }
            WeightData::Bf16(b) => {
                let $src = Bf16Rows(b.as_slice().as_ptr(), k);
                $body
            }
            WeightData::Fp8 { codes, scales, row0 } => {
                let $src = Fp8Rows { codes: codes.as_slice().as_ptr(), scales: scales.as_ptr(), cols: k, row0: *row0 };
                $body
            }
            WeightData::Fp4 { codes, scales } => {
                let $src = Fp4Rows { codes: codes.as_slice().as_ptr(), scales: scales.as_slice().as_ptr(), cols: k };
                $body
            }
        }
    }};
}

/// `R` rows against one activation row in the format's dot order, the activation chunk loaded
/// once for the rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_single_body<D: RowDecoder, const R: usize>(rows: [&D; R], body: usize, x: *const f32) -> [__m256; R] {
    if !D::SCALED {
        return unsafe { dot_single_body_unscaled(rows, body, x) };
    }
    let mut acc = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i < body {
        unsafe {
            let xv = load_x(x.add(i));
            for (d, a) in rows.iter().zip(acc.iter_mut()) {
                d.prefetch(i);
                let (wv, scale) = d.unit_for_dot(i);
                let mut t = _mm256_mul_ps(wv[0], xv[0]);
                t = _mm256_fmadd_ps(wv[1], xv[1], t);
                t = _mm256_fmadd_ps(wv[2], xv[2], t);
                t = _mm256_fmadd_ps(wv[3], xv[3], t);
                *a = if D::SCALED { _mm256_fmadd_ps(t, scale, *a) } else { _mm256_add_ps(*a, t) };
            }
        }
        i += UNIT;
    }
    acc
}

/// [`dot_single_body`] for unscaled steps: each row's products go into two sums (a step's even and
/// odd vectors) over the whole row, with no add per step (two chains: +4 % for FP8 in cache
/// against one). The activations are memory operands of the multiply-adds ([`fmadd_from`]),
/// which leaves the registers to the eight sums and the decode.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_single_body_unscaled<D: RowDecoder, const R: usize>(
    rows: [&D; R],
    body: usize,
    x: *const f32,
) -> [__m256; R] {
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    let mut i = 0;
    while i < body {
        for (d, [even, odd]) in rows.iter().zip(sums.iter_mut()) {
            d.prefetch(i);
            unsafe {
                let (wv, _) = d.unit_for_dot(i);
                let xi = x.add(i);
                *even = fmadd_from::<0>(wv[0], xi, *even);
                *odd = fmadd_from::<32>(wv[1], xi, *odd);
                *even = fmadd_from::<64>(wv[2], xi, *even);
                *odd = fmadd_from::<96>(wv[3], xi, *odd);
            }
        }
        i += UNIT;
    }
    sums.map(|[a, b]| _mm256_add_ps(a, b))
}

/// `acc + w · x[OFFSET / 4 ..][..8]`, with the activations as the instruction's memory operand.
/// Written as assembly because LLVM loads a step's activations once into registers for all four
/// rows, and with the eight sums and the decode that needs more than the 16 vector registers:
/// spills and register shuffling, which cost FP8 13 % and bf16 8 % (one thread, in cache, Zen 1).
/// A load folded into the multiply-add is no extra instruction, and the load ports have room.
///
/// # Safety
/// `x + OFFSET .. x + OFFSET + 32` (bytes) must be readable; FMA must be available.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn fmadd_from<const OFFSET: usize>(w: __m256, x: *const f32, acc: __m256) -> __m256 {
    let mut acc = acc;
    unsafe {
        std::arch::asm!("vfmadd231ps {acc}, {w}, ymmword ptr [{x} + {offset}]", acc = inout(ymm_reg) acc,
            w = in(ymm_reg) w, x = in(reg) x, offset = const OFFSET, options(pure, readonly, nostack, preserves_flags));
    }
    acc
}

/// One step's 32 activations.
///
/// # Safety
/// `x` must point to 32 readable floats.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load_x(x: *const f32) -> [__m256; 4] {
    unsafe { [_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(x.add(24))] }
}

/// One activation row (decode): the row range is cut into four quarters walked side by side, so
/// four long sequential streams are in flight at once. One stream per core stays latency-bound
/// (about 7 GB/s here); four reach the memory bandwidth, for short rows too (the tiny model's rows
/// are 128–256 inputs). Results are reduced eight rows at a time. `x` is in the rows' dot order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_body_single<S: RowSource>(
    src: &S,
    rows: std::ops::Range<usize>,
    body: usize,
    x: *const f32,
    out: &mut [f32],
) {
    let n = rows.len();
    let q = n / 8 * 2; // rows per quarter, even so that two steps fill a group of eight
    let starts = [0, q, 2 * q, 3 * q];
    let mut i = 0;
    while i < q {
        let mut acc = [_mm256_setzero_ps(); 8];
        for step in 0..2 {
            let d = starts.map(|s| src.row(rows.start + s + i + step));
            let v = unsafe { S::Row::dot_single(d.each_ref(), body, x) };
            acc[4 * step..4 * step + 4].copy_from_slice(&v);
        }
        let mut sums = [0.0f32; 8];
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), hsum8(&acc)) };
        for step in 0..2 {
            for (k, s) in starts.iter().enumerate() {
                out[s + i + step] = sums[4 * step + k];
            }
        }
        i += 2;
    }
    // The rows after the quarters.
    let rest = rows.start + 4 * q..rows.end;
    unsafe { reduce_rows::<1>(rest, &mut out[4 * q..], |r| S::Row::dot_single([&src.row(r)], body, x)) };
}

/// Several activation rows: rows are walked in memory order and reduced eight at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_body<S: RowSource, const M: usize>(
    src: &S,
    rows: std::ops::Range<usize>,
    body: usize,
    x: *const f32,
    x_stride: usize,
    out_t: &mut [f32],
) {
    unsafe { reduce_rows(rows, out_t, |r| src.row(r).dot_multi::<M>(body, x, x_stride)) }
}

/// `out_t[(r - rows.start) * M + m]` = the sum of the lanes of `row_dot(r)[m]`, for every row
/// `r`, reduced eight rows at a time ([`hsum8`]).
///
/// # Safety
/// AVX2 must be available; `row_dot` must be safe to call on every row of `rows`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce_rows<const M: usize>(
    rows: std::ops::Range<usize>,
    out_t: &mut [f32],
    row_dot: impl Fn(usize) -> [__m256; M],
) {
    let mut r = rows.start;
    let mut o = 0;
    while r < rows.end {
        let group = (rows.end - r).min(8);
        let mut acc = [[_mm256_setzero_ps(); 8]; M];
        for j in 0..group {
            let v = row_dot(r + j);
            for (a, vm) in acc.iter_mut().zip(v) {
                a[j] = vm;
            }
        }
        let mut sums = [[0.0f32; 8]; M];
        for (s, a) in sums.iter_mut().zip(&acc) {
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), hsum8(a)) };
        }
        for j in 0..group {
            for m in 0..M {
                out_t[o + j * M + m] = sums[m][j];
            }
        }
        r += group;
        o += group * M;
    }
}

/// `out_t[(n - rows.start) * M + m] = Σ_k W[n][k] · x[m][k]` over the inputs
/// `0..cols - cols % 32`; the caller adds the remainder.
///
/// # Safety
/// The features of `simd` (AVX2/FMA/F16C at least) must be available; `x` must hold `M` rows of
/// `x_stride >= cols` floats; `out_t` must hold `rows.len() * M` floats; `rows` must lie inside
/// the matrix.
pub unsafe fn dot_rows<const M: usize>(
    simd: Simd,
    w: &WeightMatrix,
    rows: std::ops::Range<usize>,
    x: &[f32],
    x_stride: usize,
    out_t: &mut [f32],
) {
    let body = w.cols - w.cols % UNIT;
    assert!(x.len() >= (M - 1) * x_stride + w.cols && out_t.len() >= rows.len() * M && rows.end <= w.rows);
    if simd >= Simd::Avx512 && unsafe { avx512::dot_rows::<M>(w, rows.clone(), body, x, x_stride, out_t) } {
        return;
    }
    if let WeightData::Fp8 { codes, scales, row0 } = &w.data {
        let tiles = Fp8Tiles { scales, cols: w.cols, row0: *row0 };
        let src = Fp8CodesRows(codes.as_slice().as_ptr(), w.cols);
        return unsafe { dot_rows_fp8::<M>(&src, &tiles, rows, body, x, x_stride, out_t) };
    }
    with_source!(w, |src| unsafe { dot_rows_of::<_, M>(&src, rows, body, x, x_stride, out_t) })
}

/// [`dot_rows`] for one row source (FP8 has its own, [`dot_rows_fp8`]). The activations are
/// permuted first into the order the kernels take (once per call; a call covers a thread's whole
/// share of the rows): one activation row (decode at batch 1, memory-bound) in the format's dot
/// order; several in input order, except FP4 at up to four (bf16's out-of-order decoder measured
/// no faster there: the multiply-adds dominate).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_of<S: RowSource, const M: usize>(
    src: &S,
    rows: std::ops::Range<usize>,
    body: usize,
    x: &[f32],
    x_stride: usize,
    out_t: &mut [f32],
) {
    let order = if M == 1 { S::Row::single_order(body) } else { S::Row::multi_order(body, M) };
    let Some(order) = order else {
        return match M {
            1 => unsafe { rows_body_single(src, rows, body, x.as_ptr(), out_t) },
            _ => unsafe { rows_body::<_, M>(src, rows, body, x.as_ptr(), x_stride, out_t) },
        };
    };
    PERMUTED.with_borrow_mut(|permuted| {
        permuted.resize(M * body, 0.0);
        for m in 0..M {
            let input = &x[m * x_stride..m * x_stride + body];
            permute_blocks(input, order, 1.0, &mut permuted[m * body..(m + 1) * body]);
        }
        match M {
            1 => unsafe { rows_body_single(src, rows, body, permuted.as_ptr(), out_t) },
            _ => unsafe { rows_body::<_, M>(src, rows, body, permuted.as_ptr(), body, out_t) },
        }
    })
}

thread_local! {
    /// The permuted activations, kept between calls (decode makes many small ones).
    static PERMUTED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes `row` into `out` (`cols` floats).
///
/// # Safety
/// AVX2/FMA/F16C must be available.
pub unsafe fn decode_row(w: &WeightMatrix, row: usize, out: &mut [f32]) {
    assert!(out.len() >= w.cols);
    let body = w.cols - w.cols % UNIT;
    with_source!(w, |src| unsafe { decode_body(&src.row(row), body, out.as_mut_ptr()) });
    if body < w.cols {
        let mut tmp = vec![0.0; w.cols];
        w.decode_row_scalar(row, &mut tmp);
        out[body..w.cols].copy_from_slice(&tmp[body..]);
    }
}

/// Sum of `a[i] * b[i]`.
///
/// # Safety
/// AVX2/FMA must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let body = n - n % 32;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < body {
        for (j, acc) in acc.iter_mut().enumerate() {
            unsafe {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), _mm256_loadu_ps(pb.add(i + 8 * j)), *acc);
            }
        }
        i += 32;
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum(total);
    for j in body..n {
        s += a[j] * b[j];
    }
    s
}
