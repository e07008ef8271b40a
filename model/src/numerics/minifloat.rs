//! The small floating-point formats of the released checkpoints and of the quantisation
//! simulations: FP8 e4m3 (`float8_e4m3fn`), FP4 e2m1 (`float4_e2m1fn`) and the UE8M0
//! power-of-two scale (`float8_e8m0fnu`).
//!
//! Rounding follows the official TileLang kernels (`T.Cast` to the narrow type): round to nearest,
//! ties to even, on the real e4m3 / e2m1 grids. The callers clamp to the format's range first, as
//! the kernels do, so saturation never has to be decided here.

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest e2m1 value.
pub const E2M1_MAX: f32 = 6.0;

/// The e2m1 value of each 4-bit code (bit 3 = sign). Same table as PyTorch `float4_e2m1fn_x2`.
pub const E2M1_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Rounds `|a|` to a binary grid with `mantissa_bits` explicit mantissa bits whose smallest normal
/// exponent is `min_normal_exp` (below it the grid is uniform: subnormals). Ties go to even.
#[inline]
fn round_magnitude(a: f32, mantissa_bits: i32, min_normal_exp: i32) -> f32 {
    if a == 0.0 || !a.is_finite() {
        return a;
    }
    let exp = exponent_of(a).max(min_normal_exp);
    let quantum = pow2(exp - mantissa_bits);
    round_ties_even_small(a / quantum) * quantum
}

/// Round to nearest, ties to even, for 0 ≤ x < 2^22 (here x ≤ 2^(mantissa_bits+1)): adding and
/// subtracting 1.5·2^23 leaves exactly the rounded integer under the default rounding mode. On a
/// baseline x86-64 target `f32::round_ties_even` is a libm call, which made the FP8 simulation of
/// every GEMM input a visible share of FP8-checkpoint prefill.
#[inline]
fn round_ties_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (x + MAGIC) - MAGIC
}

/// floor(log2(a)) for a finite positive `a`, read from the float's bits.
#[inline]
fn exponent_of(a: f32) -> i32 {
    let bits = a.to_bits();
    let field = ((bits >> 23) & 0xff) as i32;
    if field == 0 {
        // f32 subnormal: far below any grid used here, treat as the smallest normal exponent.
        -126
    } else {
        field - 127
    }
}

/// 2^e as f32 for e in the normal range (-126..=127), built from the exponent bits.
#[inline]
pub const fn pow2(e: i32) -> f32 {
    debug_assert!(-126 <= e && e <= 127, "pow2 exponent out of range");
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Rounds `x` (already within ±448) to the nearest e4m3 value, ties to even.
#[inline]
pub fn round_to_e4m3(x: f32) -> f32 {
    // e4m3: 3 mantissa bits, exponent bias 7, smallest normal 2^-6, subnormal quantum 2^-9.
    round_magnitude(x.abs(), 3, -6).copysign(x)
}

/// Rounds `x` (already within ±6) to the nearest e2m1 value, ties to even.
#[inline]
pub fn round_to_e2m1(x: f32) -> f32 {
    // e2m1: 1 mantissa bit, smallest normal 2^0, subnormal quantum 0.5.
    round_magnitude(x.abs(), 1, 0).copysign(x)
}

/// Decodes one e4m3 byte (`float8_e4m3fn`: no infinities, 0x7f/0xff are NaN).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code >> 3) & 0x0f) as i32;
    let man = (code & 0x07) as f32;
    if exp == 0x0f && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 { man * pow2(-9) } else { (1.0 + man / 8.0) * pow2(exp - 7) };
    sign * magnitude
}

/// Encodes `x` as e4m3 (round to nearest even, saturating to ±448).
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = round_to_e4m3(x.abs().min(E4M3_MAX));
    if a == 0.0 {
        return sign;
    }
    let exp = exponent_of(a);
    let code = if exp < -6 {
        (a / pow2(-9)) as u8 // subnormal: mantissa counts quanta of 2^-9
    } else {
        let man = ((a / pow2(exp) - 1.0) * 8.0) as u8;
        (((exp + 7) as u8) << 3) | man
    };
    sign | code
}

/// Encodes `x` (within ±6) as a 4-bit e2m1 code, round to nearest even.
pub fn f32_to_e2m1(x: f32) -> u8 {
    let a = round_to_e2m1(x.abs().min(E2M1_MAX));
    let magnitude_code =
        E2M1_VALUES[..8].iter().position(|&v| v == a).expect("rounded value lies on the e2m1 grid") as u8;
    if x.is_sign_negative() && magnitude_code != 0 { magnitude_code | 0x8 } else { magnitude_code }
}

/// Decodes a UE8M0 scale byte: 2^(code - 127). Code 255 is NaN in the format; it never appears in
/// valid checkpoints and decodes to NaN so that a corrupt scale is visible rather than silent.
#[inline]
pub const fn e8m0_to_f32(code: u8) -> f32 {
    match code {
        255 => f32::NAN,
        0 => f32::from_bits(1 << 22), // 2^-127, an f32 subnormal
        c => f32::from_bits((c as u32) << 23),
    }
}

/// Encodes a power of two as UE8M0. `scale` must be a power of two in [2^-127, 2^127].
pub fn f32_to_e8m0(scale: f32) -> u8 {
    let bits = scale.to_bits();
    debug_assert!(bits & 0x007f_ffff == 0 || bits == 1 << 22, "scale {scale} is not a power of two");
    if bits == 1 << 22 { 0 } else { (bits >> 23) as u8 }
}

/// The power-of-two block scale of the official kernels (`fast_round_scale`):
/// `2^ceil(log2(amax * inv_max))`, with the ceiling taken from the float's bits (an exact ceiling,
/// unlike a floating-point `log2` that lands one binade low just above a power of two).
#[inline]
pub fn pow2_scale(amax: f32, inv_max: f32) -> f32 {
    let bits = (amax * inv_max).to_bits();
    let field = ((bits >> 23) & 0xff) as i32;
    let has_mantissa = bits & 0x007f_ffff != 0;
    let e = field - 127 + has_mantissa as i32;
    f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every e4m3 code decodes to a value that encodes back to the same code (NaN excluded).
    #[test]
    fn e4m3_code_round_trip() {
        for code in 0u8..=255 {
            if code & 0x7f == 0x7f {
                assert!(e4m3_to_f32(code).is_nan());
                continue;
            }
            let v = e4m3_to_f32(code);
            let back = f32_to_e4m3(v);
            // -0 and +0 both decode to zero; compare values, not codes, for them.
            assert_eq!(e4m3_to_f32(back), v, "code {code:#04x} value {v}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    }

    /// Rounding picks the nearest grid value, and on an exact midpoint the even mantissa.
    #[test]
    fn e4m3_rounding_is_nearest_even() {
        // Independent check: brute force over the positive grid.
        let grid: Vec<f32> = (0u8..0x7f).map(e4m3_to_f32).collect();
        let mut x = 0.0f32;
        while x < 448.0 {
            let r = round_to_e4m3(x);
            let best = grid.iter().map(|&g| (g - x).abs()).fold(f32::INFINITY, f32::min);
            assert_eq!((r - x).abs(), best, "x={x} rounded to {r}");
            x += 0.0173;
        }
        // Midpoints: 1 + 1/16 lies between 1 (even mantissa 000) and 1.125 (001).
        assert_eq!(round_to_e4m3(1.0625), 1.0);
        // 1.1875 lies between 1.125 (001) and 1.25 (010): goes to 1.25.
        assert_eq!(round_to_e4m3(1.1875), 1.25);
        // Subnormal midpoint: 1.5 quanta of 2^-9 rounds to 2 quanta.
        assert_eq!(round_to_e4m3(1.5 * 2f32.powi(-9)), 2.0 * 2f32.powi(-9));
        assert_eq!(round_to_e4m3(-0.5 * 2f32.powi(-9)), 0.0);
    }

    #[test]
    fn e2m1_rounding_matches_table() {
        let cases = [
            (0.2, 0.0),
            (0.25, 0.0), // tie between 0 and 0.5: 0 has the even code
            (0.3, 0.5),
            (0.75, 1.0), // tie between 0.5 (odd) and 1.0 (even)
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.1, 6.0),
            (6.0, 6.0),
            (-2.6, -3.0),
        ];
        for (x, want) in cases {
            assert_eq!(round_to_e2m1(x), want, "x={x}");
            assert_eq!(E2M1_VALUES[f32_to_e2m1(x) as usize], want, "code of x={x}");
        }
    }

    #[test]
    fn pow2_scale_is_exact_ceiling() {
        // amax/448 exactly a power of two stays; one ulp above moves up a binade.
        assert_eq!(pow2_scale(448.0, 1.0 / 448.0), 1.0);
        assert_eq!(pow2_scale(0.5, 1.0), 0.5);
        assert_eq!(pow2_scale(f32::from_bits(0.5f32.to_bits() + 1), 1.0), 1.0);
        assert_eq!(pow2_scale(3.0, 1.0), 4.0);
        for e in -100..100 {
            let s = pow2_scale(2f32.powi(e) * 1.3, 1.0);
            assert_eq!(s, 2f32.powi(e + 1));
        }
    }

    #[test]
    fn e8m0_round_trip() {
        for code in 1u8..255 {
            assert_eq!(f32_to_e8m0(e8m0_to_f32(code)), code);
        }
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert!(e8m0_to_f32(255).is_nan());
    }
}
