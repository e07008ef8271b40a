//! Matrix × few vectors (decode): weights are decoded once and applied to up to `MAX_ROWS`
//! activation rows while they are in registers. Memory-bound, so the goal is to stream the
//! weights at the machine's read bandwidth.

use std::ops::Range;

use super::Simd;
use super::weight::WeightMatrix;

/// Largest batch handled here; bigger batches go to the panel GEMM.
pub const MAX_ROWS: usize = 8;

/// `out_t[(n - rows.start) * m + i] = Σ_k x[i][k] · W[n][k]` for `n` in `rows` (transposed
/// output: each weight row's results are contiguous, so threads own disjoint slices).
pub fn gemv_transposed(x: &[f32], m: usize, w: &WeightMatrix, rows: Range<usize>, out_t: &mut [f32]) {
    gemv_transposed_with(super::simd_level(), x, m, w, rows, out_t)
}

/// [`gemv_transposed`] on the kernel family `simd` (tests compare them all), or the best the CPU
/// has below it.
pub(crate) fn gemv_transposed_with(
    simd: Simd,
    x: &[f32],
    m: usize,
    w: &WeightMatrix,
    rows: Range<usize>,
    out_t: &mut [f32],
) {
    debug_assert!((1..=MAX_ROWS).contains(&m));
    match m {
        1 => run::<1>(simd, x, w, rows, out_t),
        2 => run::<2>(simd, x, w, rows, out_t),
        3 => run::<3>(simd, x, w, rows, out_t),
        4 => run::<4>(simd, x, w, rows, out_t),
        5 => run::<5>(simd, x, w, rows, out_t),
        6 => run::<6>(simd, x, w, rows, out_t),
        7 => run::<7>(simd, x, w, rows, out_t),
        _ => run::<8>(simd, x, w, rows, out_t),
    }
}

fn run<const M: usize>(simd: Simd, x: &[f32], w: &WeightMatrix, rows: Range<usize>, out_t: &mut [f32]) {
    let k = w.cols;
    let simd = simd.min(super::detect_simd());
    #[cfg(target_arch = "x86_64")]
    if simd >= Simd::Avx2 {
        // SAFETY: detect_simd() checked the CPU features of `simd`; x holds M rows of k floats
        // and out_t one slot per (row, m).
        unsafe { super::x86::dot_rows::<M>(simd, w, rows.clone(), x, k, out_t) };
        let body = k - k % super::x86::UNIT;
        if body < k {
            let mut tail_row = vec![0.0; k];
            for (n, out) in rows.zip(out_t.chunks_exact_mut(M)) {
                w.decode_row_scalar(n, &mut tail_row);
                for (i, o) in out.iter_mut().enumerate() {
                    *o += dot_scalar(&tail_row[body..], &x[i * k + body..(i + 1) * k]);
                }
            }
        }
        return;
    }
    let _ = simd;
    let mut row = vec![0.0; k];
    for (n, out) in rows.zip(out_t.chunks_exact_mut(M)) {
        w.decode_row_scalar(n, &mut row);
        for (i, o) in out.iter_mut().enumerate() {
            *o = dot_scalar(&row, &x[i * k..(i + 1) * k]);
        }
    }
}

/// Portable dot product with independent partial sums (vectorisable without fast-math).
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ca[j] * cb[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        s += x * y;
    }
    s
}
