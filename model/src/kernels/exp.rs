//! Vectorised `exp` for softmax and SiLU: the attention softmax alone evaluates millions of
//! exponentials per prefill, and libm's scalar `expf` was a few percent of prefill time.
//!
//! Method (Cephes `expf`): `e^x = 2^n · e^r` with `n = round(x / ln 2)`, `r = x − n·ln 2` split in
//! two constants for exactness, and a degree-5 polynomial for `e^r` on |r| ≤ ln2/2. Error ≤ 2 ulp
//! over the range softmax uses (x ≤ 0); results are checked against `f32::exp` in the tests.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// Below this `e^x` is 0 in f32 (and `exp(-inf)` must give 0); above it, +inf.
const MIN_X: f32 = -87.336_55;
const MAX_X: f32 = 88.376_26;

#[inline]
fn exp_scalar(x: f32) -> f32 {
    if x < MIN_X {
        return 0.0;
    }
    if x > MAX_X {
        return f32::INFINITY;
    }
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let y = p * r2 + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(v: &mut [f32]) {
    let body = v.len() - v.len() % 8;
    let p = v.as_mut_ptr();
    let mut i = 0;
    while i < body {
        unsafe {
            let x = _mm256_loadu_ps(p.add(i));
            let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(MIN_X));
            let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(MAX_X));
            let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(MIN_X)), _mm256_set1_ps(MAX_X));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                xc,
                _mm256_set1_ps(LOG2E),
            ));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc));
            let mut poly = _mm256_set1_ps(P[0]);
            for c in &P[1..] {
                poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )));
            let e = _mm256_andnot_ps(under, _mm256_mul_ps(y, pow2));
            _mm256_storeu_ps(p.add(i), _mm256_blendv_ps(e, _mm256_set1_ps(f32::INFINITY), over));
        }
        i += 8;
    }
    for x in &mut v[body..] {
        *x = exp_scalar(*x);
    }
}

/// `v[i] = e^{v[i]}` in place.
pub fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        // SAFETY: features checked.
        unsafe { exp_avx2(v) };
        return;
    }
    v.iter_mut().for_each(|x| *x = exp_scalar(*x));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn matches_libm_within_two_ulp() {
        let xs: Vec<f32> = (0..200_001).map(|i| -87.0 + i as f32 * 0.000_87).collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (x, y) in xs.iter().zip(&v) {
            let want = x.exp();
            assert!(ulps(*y, want) <= 2, "exp({x}) = {y}, libm {want}");
        }
    }

    #[test]
    fn edge_values() {
        let mut v = vec![f32::NEG_INFINITY, -1000.0, 0.0, 1.0, 100.0, -0.0, 5.0, -3.0, 0.5];
        exp_in_place(&mut v);
        assert_eq!(&v[..3], &[0.0, 0.0, 1.0]);
        assert!((v[3] - std::f32::consts::E).abs() < 1e-6);
        assert_eq!(v[4], f32::INFINITY);
        assert_eq!(v[5], 1.0);
        assert!(ulps(v[8], 0.5f32.exp()) <= 2);
    }
}
