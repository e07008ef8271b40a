//! AVX2 decoders: 32 stored weights → four vectors of f32 (FP4 for dot products also 64 → eight),
//! exactly.
//!
//! * In input order: bf16 by a widening shuffle and a shift; FP8 e4m3 through an f16 pattern and
//!   `vcvtph2ps`; FP4 e2m1 through a `pshufb` table of f16 high bytes and `vcvtph2ps`.
//! * bf16 for dot products, in a fixed permuted order (the one-activation-row kernel permutes the
//!   activations to match, once per call): a shift keeps the even values of a 256-bit load and a
//!   mask the odd ones, half the operations of the in-order decode (decode at batch 1 +4–7 %).
//! * FP4 for dot products, in a fixed permuted order: two `pshufb` lookups build the two bytes of
//!   each value's bf16 pattern (every e2m1 value is a bf16), then the same shift or mask widens
//!   bf16 to f32. Avoiding `vcvtph2ps` streams FP4 ~11 % faster on Zen 1. Unpacking the bytes in
//!   place permutes the order further: 256-bit unpacks work within each 128-bit lane. Taking 64
//!   values (32 bytes) at once splits the nibbles of a whole 256-bit load with one shift, where
//!   32 need a byte broadcast and a variable shift.
//! * FP8 for dot products (up to 8 activation rows), in a fixed permuted order: an arithmetic
//!   shift and a mask per 8 values place sign, exponent and mantissa where an f32 has them (9
//!   operations per 32 values against 12 through `vcvtph2ps`): FP8 streams ~25 % faster on
//!   Zen 1. Byte lookups building bf16 patterns need two more lookups for the subnormal codes
//!   and measured 12 % slower.
//!
//! On Zen 1 these kernels are bound by the number of vector operations per value (measured: the
//! same product on a matrix in L2 runs no faster than from memory, and swapping `vcvtph2ps` for
//! cheaper wrong-valued operations gained ~10 %).

use std::arch::x86_64::*;

use crate::numerics::E2M1_VALUES;

/// Inputs decoded per step (one FP4 scale block; 128-wide FP8 tiles hold four of them).
pub const UNIT: usize = 32;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn bf16x8(p: *const u8) -> __m256 {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

/// 32 bf16 values as f32 in [`BF16_ORDER`]: per 16 values (one 256-bit load), a shift keeps the
/// even ones and a mask the odd ones, where the in-order decode needs a widening shuffle per 8.
///
/// # Safety
/// `p` must point to 64 readable bytes; AVX2 must be available.
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn bf16x32_ordered(p: *const u8) -> [__m256; 4] {
    let (a, b) = unsafe { (_mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.add(32) as *const __m256i)) };
    let odd = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    [
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)),
        _mm256_castsi256_ps(_mm256_and_si256(a, odd)),
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)),
        _mm256_castsi256_ps(_mm256_and_si256(b, odd)),
    ]
}

/// Which input of a 32-block each f32 lane of [`bf16x32_ordered`] holds: the even inputs of the
/// first 16, the odd ones, then the same for the second 16.
pub const BF16_ORDER: [u8; UNIT] = {
    let mut t = [0u8; UNIT];
    let mut i = 0;
    while i < UNIT {
        let (v, e) = (i / 8, i % 8);
        t[i] = (16 * (v / 2) + 2 * e + v % 2) as u8;
        i += 1;
    }
    t
};

/// 32 e4m3 codes as f32 in [`FP8_ORDER`], each value times 2^-120, by shifts and masks alone:
/// an arithmetic shift right by 4 of a 16-bit word whose high byte is the code leaves the sign
/// in bit 15 and the exponent and mantissa where a bf16 has them (bits 10..4); a mask clears the
/// sign copies and the bits below. e4m3 bias 7 vs bf16/f32 bias 127 gives the 2^-120; e4m3
/// subnormals become f32 subnormals (slow inputs on some cores, rare in amax-scaled weights).
/// The odd codes are the high bytes of a load at `p`; the even ones those of a second load one
/// byte earlier, which saves a shift (loads have ports of their own; with [`low_words_up`], +8 %
/// in cache on Zen 1). The byte before `p` only fills low bytes that the mask clears.
///
/// # Safety
/// `p - 1 .. p + 32` must be readable (FP8 weights keep a byte before their codes for the first
/// step: `WeightMatrix::from_fp8`); AVX2 must be available.
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn fp8x32_ordered(p: *const u8) -> [__m256; 4] {
    let (odd, even) =
        unsafe { (_mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.sub(1) as *const __m256i)) };
    let keep = _mm256_set1_epi32(0x87F0_0000u32 as i32);
    let odd = _mm256_srai_epi16::<4>(odd);
    let even = _mm256_srai_epi16::<4>(even);
    [
        _mm256_castsi256_ps(_mm256_and_si256(low_words_up(even), keep)),
        _mm256_castsi256_ps(_mm256_and_si256(low_words_up(odd), keep)),
        _mm256_castsi256_ps(_mm256_and_si256(even, keep)),
        _mm256_castsi256_ps(_mm256_and_si256(odd, keep)),
    ]
}

/// Each 32-bit lane's low 16 bits moved to its high 16 by a byte shift of each 128-bit half
/// (`vpslldq`; the low 16 bits receive the lane below's high ones), which runs on two ports where
/// a 32-bit shift runs on one. Written as assembly because LLVM turns a byte shift whose low
/// bytes are masked off afterwards into `vpslld`, which needs the one vector-shift port the
/// decode is short of.
#[target_feature(enable = "avx2")]
#[inline]
fn low_words_up(v: __m256i) -> __m256i {
    let out;
    // SAFETY: register-only AVX2 instruction, enabled by this function's target feature.
    unsafe {
        std::arch::asm!("vpslldq {out}, {v}, 2", out = lateout(ymm_reg) out, v = in(ymm_reg) v,
            options(pure, nomem, nostack, preserves_flags));
    }
    out
}

/// Which input of a 32-block each f32 lane of [`fp8x32_ordered`] holds: vector `k` holds byte
/// `k` of each of the eight 4-byte groups.
pub const FP8_ORDER: [u8; UNIT] = {
    let mut t = [0u8; UNIT];
    let mut i = 0;
    while i < UNIT {
        t[i] = (4 * (i % 8) + i / 8) as u8;
        i += 1;
    }
    t
};

/// Sixteen e4m3 codes as two vectors of f32, each value times 2^-8: sign-extend to 16 bits,
/// shift left by 7 and clear bit 14, which yields the f16 with the same bits (e4m3 bias 7 vs f16
/// bias 15; e4m3 subnormals land on f16 subnormals).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn fp8x16(p: *const u8) -> (__m256, __m256) {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let wide = _mm256_cvtepi8_epi16(raw);
    let half = _mm256_and_si256(_mm256_slli_epi16::<7>(wide), _mm256_set1_epi16(0xBFFFu16 as i16));
    (_mm256_cvtph_ps(_mm256_castsi256_si128(half)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(half)))
}

/// High byte of the f16 encoding of the e2m1 values 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives.
const E2M1_F16_HIGH: [u8; 16] =
    [0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, 0x80, 0xB8, 0xBC, 0xBE, 0xC0, 0xC2, 0xC4, 0xC6];

/// 32 packed e2m1 codes (16 bytes, even index in the low nibble) as f32, in input order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn fp4x32(p: *const u8) -> [__m256; 4] {
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let nibble = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(raw, nibble);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), nibble);
    let table = unsafe { _mm_loadu_si128(E2M1_F16_HIGH.as_ptr() as *const __m128i) };
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

/// bf16 bit pattern of `v` (exact for the values used here).
const fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// e2m1 → bf16 low and high bytes, from the format's value table.
const fn e2m1_bf16(high: bool) -> [u8; 16] {
    let mut t = [0u8; 16];
    let mut n = 0;
    while n < 16 {
        let bits = bf16_bits(E2M1_VALUES[n]);
        t[n] = if high { (bits >> 8) as u8 } else { bits as u8 };
        n += 1;
    }
    t
}
const E2M1_BF16_LOW: [u8; 16] = e2m1_bf16(false);
const E2M1_BF16_HIGH: [u8; 16] = e2m1_bf16(true);

/// A 16-byte table in both lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn table(t: &[u8; 16]) -> __m256i {
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(t.as_ptr() as *const __m128i) })
}

/// bf16 low and high bytes (32 each, or 16 per lane) → f32. The unpacks pair the bytes into
/// words (per lane: values 0..8 of the lane's 16, then 8..16); the shift keeps the even words,
/// the mask the odd ones, as in [`bf16x32_ordered`]. (A shared helper for that widening
/// measured ~5 % slower FP4 here: the compiler scheduled the inlined copy worse.)
#[target_feature(enable = "avx2")]
#[inline]
fn bf16_bytes_to_f32(low: __m256i, high: __m256i) -> [__m256; 4] {
    let first = _mm256_unpacklo_epi8(low, high);
    let second = _mm256_unpackhi_epi8(low, high);
    let odd = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    [
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(first)),
        _mm256_castsi256_ps(_mm256_and_si256(first, odd)),
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(second)),
        _mm256_castsi256_ps(_mm256_and_si256(second, odd)),
    ]
}

/// 32 packed e2m1 codes (16 bytes) as f32 in [`FP4_ORDER`], exactly. The 16 bytes go to both
/// lanes; the low lane decodes the low nibbles (even inputs), the high lane the high nibbles.
///
/// # Safety
/// `p` must point to 16 readable bytes; AVX2 must be available.
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn fp4x32_ordered(p: *const u8) -> [__m256; 4] {
    let bytes = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p as *const __m128i) });
    let index =
        _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0f));
    let low = _mm256_shuffle_epi8(table(&E2M1_BF16_LOW), index);
    let high = _mm256_shuffle_epi8(table(&E2M1_BF16_HIGH), index);
    bf16_bytes_to_f32(low, high)
}

/// 64 packed e2m1 codes (32 bytes) as f32 in [`FP4_ORDER64`]: the low nibbles of all 32 bytes,
/// then the high ones, each through the two lookups of [`fp4x32_ordered`]. Each 128-bit half of
/// every vector holds inputs of one 32-block (the low half the first, the high half the second).
///
/// # Safety
/// `p` must point to 32 readable bytes; AVX2 must be available.
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn fp4x64_ordered(p: *const u8) -> [__m256; 8] {
    let bytes = unsafe { _mm256_loadu_si256(p as *const __m256i) };
    let nibble = _mm256_set1_epi8(0x0f);
    let low = _mm256_and_si256(bytes, nibble);
    let high = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), nibble);
    let (lo_t, hi_t) = (table(&E2M1_BF16_LOW), table(&E2M1_BF16_HIGH));
    let [a, b, c, d] = bf16_bytes_to_f32(_mm256_shuffle_epi8(lo_t, low), _mm256_shuffle_epi8(hi_t, low));
    let [e, f, g, h] = bf16_bytes_to_f32(_mm256_shuffle_epi8(lo_t, high), _mm256_shuffle_epi8(hi_t, high));
    [a, b, c, d, e, f, g, h]
}

/// Which input of a 64-block each f32 lane of [`fp4x64_ordered`] holds. Vectors 0..4 hold even
/// inputs (low nibbles), 4..8 odd ones; within each, as in [`FP4_ORDER`], the first unpack holds
/// bytes 0..8 of a lane and the second 8..16, the shift the even ones and the mask the odd ones.
pub const FP4_ORDER64: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (g, e) = (i / 8, i % 8);
        let (p, q) = (g / 4, g % 4);
        let (half, d) = (e / 4, e % 4);
        let byte = (q / 2) * 8 + 2 * d + q % 2;
        t[i] = (32 * half + 2 * byte + p) as u8;
        i += 1;
    }
    t
};

/// Which input of a 32-block each f32 lane of [`fp4x32_ordered`] holds. Lane half `h` holds the
/// inputs of parity `h` (byte `b` of the 16 holds inputs 2b and 2b + 1); per half, the first
/// unpack holds bytes 0..8 and the second 8..16, the shift the even ones, the mask the odd ones.
pub const FP4_ORDER: [u8; UNIT] = {
    let mut t = [0u8; UNIT];
    let mut i = 0;
    while i < UNIT {
        let (v, e) = (i / 8, i % 8);
        let (half, j) = (e / 4, e % 4);
        let byte = 8 * (v / 2) + 2 * j + v % 2;
        t[i] = (2 * byte + half) as u8;
        i += 1;
    }
    t
};

/// `out[b + i] = scale · x[b + order[i]]` for every block `b` of `order.len()` inputs of `x` (an
/// order holds `0..order.len()`).
pub fn permute_blocks(x: &[f32], order: &[u8], scale: f32, out: &mut [f32]) {
    let n = order.len();
    for (o, b) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        for (oi, &src) in o.iter_mut().zip(order) {
            *oi = scale * b[src as usize % n];
        }
    }
}
