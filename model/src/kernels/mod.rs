//! Compute kernels. The one entry point the layers use is [`matmul`]: `y = x · Wᵀ` for a weight
//! in any stored format, choosing the fused decode-and-dot path for small batches (memory-bound)
//! and a panel SGEMM for large ones (compute-bound), split across the current rayon pool.

mod bytes;
mod gemm;
mod gemv;
mod weight;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use bytes::Bytes;
pub use weight::{FP4_BLOCK, FP8_TILE, WeightFormat, WeightMatrix};

use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

/// Below this many weight elements a matrix-vector product runs on one thread: splitting costs
/// more than it saves (a 64K-element bf16 matvec takes a few microseconds).
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;
/// Below this many multiply-adds a GEMM runs on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;

const SIMD_UNKNOWN: u8 = 0;
const SIMD_ON: u8 = 1;
const SIMD_OFF: u8 = 2;
static SIMD: AtomicU8 = AtomicU8::new(SIMD_UNKNOWN);

/// Whether the AVX2/FMA/F16C kernels are in use (detected once; see [`force_portable`]).
pub fn simd_available() -> bool {
    match SIMD.load(Ordering::Relaxed) {
        SIMD_ON => true,
        SIMD_OFF => false,
        _ => {
            let on = detect_simd();
            SIMD.store(if on { SIMD_ON } else { SIMD_OFF }, Ordering::Relaxed);
            on
        }
    }
}

fn detect_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Switches the process to the portable kernels (benchmark baseline, and tests that compare the
/// two paths). Switching back re-detects the CPU.
pub fn force_portable(portable: bool) {
    SIMD.store(if portable { SIMD_OFF } else { SIMD_UNKNOWN }, Ordering::Relaxed);
}

/// Decodes one weight row to f32.
pub fn decode_row(w: &WeightMatrix, row: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: features checked above.
        unsafe { x86::decode_row(w, row, out) };
        return;
    }
    w.decode_row_scalar(row, out);
}

/// `Σ a[i]·b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: features checked above.
        return unsafe { x86::dot(a, b) };
    }
    gemv::dot_scalar(a, b)
}

/// `y[m, n] = Σ_k x[m, k] · W[n, k]` for all rows of `W`: `x` is `[m, W.cols]`, `y` is
/// `[m, W.rows]`.
pub fn matmul(x: &[f32], m: usize, w: &WeightMatrix) -> Vec<f32> {
    matmul_rows(x, m, w, 0..w.rows)
}

/// Like [`matmul`] for the weight rows in `rows` only (e.g. one output group); `y` is
/// `[m, rows.len()]`.
pub fn matmul_rows(x: &[f32], m: usize, w: &WeightMatrix, rows: Range<usize>) -> Vec<f32> {
    assert_eq!(x.len(), m * w.cols, "matmul input is not [{m}, {}]", w.cols);
    assert!(rows.end <= w.rows);
    let n = rows.len();
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let threads = rayon::current_num_threads();
    if m <= gemv::MAX_ROWS {
        let parallel = threads > 1 && n * w.cols >= PARALLEL_MIN_WEIGHTS;
        let mut out_t = if m == 1 { Vec::new() } else { vec![0.0f32; m * n] };
        let target: &mut [f32] = if m == 1 { &mut out } else { &mut out_t };
        if parallel {
            let chunk = n.div_ceil(threads * 4).max(16);
            target.par_chunks_mut(chunk * m).enumerate().for_each(|(c, slice)| {
                let start = rows.start + c * chunk;
                gemv::gemv_transposed(x, m, w, start..start + slice.len() / m, slice);
            });
        } else {
            gemv::gemv_transposed(x, m, w, rows.clone(), target);
        }
        if m > 1 {
            for (j, col) in out_t.chunks_exact(m).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    out[i * n + j] = *v;
                }
            }
        }
        return out;
    }
    let ptr = gemm::OutPtr(out.as_mut_ptr());
    let panels: Vec<Range<usize>> =
        (rows.start..rows.end).step_by(gemm::PANEL_ROWS).map(|s| s..(s + gemm::PANEL_ROWS).min(rows.end)).collect();
    let run = |p: &Range<usize>| {
        // SAFETY: panels are disjoint column ranges of `out`, which outlives the call.
        unsafe { gemm::gemm_panel(x, m, w, &rows, p.clone(), ptr) }
    };
    if threads > 1 && m * n * w.cols >= PARALLEL_MIN_MACS && panels.len() > 1 {
        panels.par_iter().for_each(run);
    } else {
        panels.iter().for_each(run);
    }
    out
}

#[cfg(test)]
mod tests;
