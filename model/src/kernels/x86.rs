//! AVX2 + FMA + F16C kernels (x86_64). Every weight format is decoded in registers, 32 inputs at
//! a time, and multiplied against up to 8 activation rows while the weights are hot:
//!
//! * bf16: zero-extend to 32 bits and shift into the high half.
//! * FP8 e4m3: sign-extend to 16 bits, shift left by 7 and clear bit 14; that yields an f16 whose
//!   value is the e4m3 value times 2^-8 (e4m3 bias 7 vs f16 bias 15; e4m3 subnormals land on f16
//!   subnormals), which `vcvtph2ps` widens exactly. The 2^8 goes into the block scale.
//! * FP4 e2m1: every e2m1 value is an f16 whose low byte is zero, so a 16-entry `pshufb` table of
//!   high bytes decodes a nibble straight to f16.
//!
//! Callers check `is_x86_feature_detected!` once (see `kernels::simd_available`).

use std::arch::x86_64::*;

use super::weight::{FP4_BLOCK, FP8_TILE, WeightData, WeightMatrix};

/// Inputs decoded per step (one FP4 scale block; 128-wide FP8 tiles hold four of them).
pub const UNIT: usize = 32;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bf16x8(p: *const u8) -> __m256 {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

/// Eight e4m3 codes as f32, times 2^-8.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fp8x8(p: *const u8) -> __m256 {
    let raw = unsafe { _mm_loadl_epi64(p as *const __m128i) };
    let wide = _mm_cvtepi8_epi16(raw);
    let half = _mm_and_si128(_mm_slli_epi16::<7>(wide), _mm_set1_epi16(0xBFFFu16 as i16));
    _mm256_cvtph_ps(half)
}

/// 32 packed e2m1 codes (16 bytes, even index in the low nibble) as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fp4x32(p: *const u8) -> [__m256; 4] {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let nibble = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(raw, nibble);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), nibble);
    // High byte of the f16 encoding of 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives.
    let table = _mm_setr_epi8(
        0x00,
        0x38,
        0x3C,
        0x3E,
        0x40,
        0x42,
        0x44,
        0x46, //
        0x80u8 as i8,
        0xB8u8 as i8,
        0xBCu8 as i8,
        0xBEu8 as i8, //
        0xC0u8 as i8,
        0xC2u8 as i8,
        0xC4u8 as i8,
        0xC6u8 as i8,
    );
    let vlo = _mm_shuffle_epi8(table, lo);
    let vhi = _mm_shuffle_epi8(table, hi);
    let first = _mm_unpacklo_epi8(vlo, vhi); // inputs 0..16, in order
    let second = _mm_unpackhi_epi8(vlo, vhi); // inputs 16..32
    let zero = _mm_setzero_si128();
    [
        _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, first)),
        _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, first)),
        _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, second)),
        _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, second)),
    ]
}

/// Decodes inputs `i..i + 32` of `row` (a multiple of 32) into four f32 vectors, scaled.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_unit(w: &WeightMatrix, row: usize, i: usize) -> [__m256; 4] {
    let k = w.cols;
    unsafe {
        match &w.data {
            WeightData::F32(v) => {
                let p = v.as_ptr().add(row * k + i);
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
            }
            WeightData::Bf16(b) => {
                let p = b.as_slice().as_ptr().add(2 * (row * k + i));
                [bf16x8(p), bf16x8(p.add(16)), bf16x8(p.add(32)), bf16x8(p.add(48))]
            }
            WeightData::Fp8 { codes, scales } => {
                let p = codes.as_slice().as_ptr().add(row * k + i);
                let s = _mm256_set1_ps(WeightMatrix::fp8_scale(scales, k, row, i / FP8_TILE) * 256.0);
                [
                    _mm256_mul_ps(fp8x8(p), s),
                    _mm256_mul_ps(fp8x8(p.add(8)), s),
                    _mm256_mul_ps(fp8x8(p.add(16)), s),
                    _mm256_mul_ps(fp8x8(p.add(24)), s),
                ]
            }
            WeightData::Fp4 { codes, scales } => {
                let p = codes.as_slice().as_ptr().add((row * k + i) / 2);
                let code = *scales.as_slice().get_unchecked((row * k + i) / FP4_BLOCK);
                let s = _mm256_set1_ps(crate::numerics::e8m0_to_f32(code));
                let v = fp4x32(p);
                [_mm256_mul_ps(v[0], s), _mm256_mul_ps(v[1], s), _mm256_mul_ps(v[2], s), _mm256_mul_ps(v[3], s)]
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Dot products of `row` with `M` activation rows (`x[m * x_stride ..]`, each `cols` long) over
/// the inputs `0..cols - cols % 32`; the caller adds the remainder.
///
/// # Safety
/// AVX2/FMA/F16C must be available; `x` must hold `M` rows of `x_stride >= cols` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows<const M: usize>(w: &WeightMatrix, row: usize, x: &[f32], x_stride: usize) -> [f32; M] {
    let body = w.cols - w.cols % UNIT;
    let mut acc = [_mm256_setzero_ps(); M];
    let xp = x.as_ptr();
    let mut i = 0;
    while i < body {
        let wv = unsafe { decode_unit(w, row, i) };
        for (m, a) in acc.iter_mut().enumerate() {
            // One short chain per unit keeps the loop-carried dependency to a single add.
            unsafe {
                let xm = xp.add(m * x_stride + i);
                let mut t = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xm));
                t = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xm.add(8)), t);
                t = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xm.add(16)), t);
                t = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xm.add(24)), t);
                *a = _mm256_add_ps(*a, t);
            }
        }
        i += UNIT;
    }
    let mut out = [0.0f32; M];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum(a);
    }
    out
}

/// Decodes `row` into `out` (`cols` floats).
///
/// # Safety
/// AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_row(w: &WeightMatrix, row: usize, out: &mut [f32]) {
    let body = w.cols - w.cols % UNIT;
    let op = out.as_mut_ptr();
    let mut i = 0;
    while i < body {
        unsafe {
            let v = decode_unit(w, row, i);
            for (j, vec) in v.into_iter().enumerate() {
                _mm256_storeu_ps(op.add(i + 8 * j), vec);
            }
        }
        i += UNIT;
    }
    if body < w.cols {
        let mut tmp = vec![0.0; w.cols];
        w.decode_row_scalar(row, &mut tmp);
        out[body..].copy_from_slice(&tmp[body..]);
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
