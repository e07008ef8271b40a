//! AVX2 + FMA micro-kernel of the prefill GEMM: a tile of 6 weight rows × 16 tokens, 12 vector
//! accumulators, one pass over the inputs.
//!
//! Orientation: the weight side is broadcast (one scalar per row and input) and the token side
//! is loaded as vectors, so the weights only need decoding to f32 rows, never transposing; the
//! activations are transposed once per call into 16-token blocks (`pack_tokens`), which every
//! weight tile then reuses. That replaces "decode the weights to f32, then let an SGEMM repack
//! both operands" with one decode and one small transpose per call.

use rayon::prelude::*;
use std::arch::x86_64::*;

/// Weight rows per tile.
pub const TILE_ROWS: usize = 6;
/// Tokens per tile (two 8-wide vectors).
pub const TILE_TOKENS: usize = 16;

/// Writes `x` (`[m, k]`) into `out` as blocks of 16 tokens, each `[k][16]` (the last block
/// zero-padded); the blocks are filled in parallel when `parallel`. `out` is reused across calls
/// (a fresh multi-hundred-KiB buffer per call costs page faults).
pub fn pack_tokens(x: &[f32], m: usize, k: usize, parallel: bool, out: &mut Vec<f32>) {
    let blocks = m.div_ceil(TILE_TOKENS);
    // Every slot is written below (padding included), so the buffer is not cleared first.
    out.resize(blocks * k * TILE_TOKENS, 0.0);
    let fill = |(b, block): (usize, &mut [f32])| {
        let first = b * TILE_TOKENS;
        let valid = TILE_TOKENS.min(m - first);
        if valid < TILE_TOKENS {
            // Padding lanes never reach a stored result; zeros keep them cheap (no stale
            // subnormals or NaNs from an earlier call).
            for slot in block.chunks_exact_mut(TILE_TOKENS) {
                slot[valid..].fill(0.0);
            }
        }
        // 64 inputs at a time, so the 4 KiB being scattered into stays in L1.
        for k0 in (0..k).step_by(64) {
            let k1 = (k0 + 64).min(k);
            for t in 0..valid {
                let row = &x[(first + t) * k + k0..(first + t) * k + k1];
                for (kk, v) in row.iter().enumerate() {
                    block[(k0 + kk) * TILE_TOKENS + t] = *v;
                }
            }
        }
    };
    if parallel && blocks > 1 {
        out.par_chunks_exact_mut(k * TILE_TOKENS).enumerate().for_each(fill);
    } else {
        out.chunks_exact_mut(k * TILE_TOKENS).enumerate().for_each(fill);
    }
}

/// `out[t * ldc + j] = Σ_kk w[j * w_stride + kk] · xt[kk * 16 + t]` for `j < rows`, `t < tokens`
/// (the valid part of the tile: edge tiles compute all 6 × 16 and store only that).
///
/// # Safety
/// AVX2/FMA must be available; `w` must hold 6 rows of `k` floats `w_stride` apart (rows past
/// `rows` may hold anything), `xt` one packed block of `k × 16` floats, and `out` the written
/// elements.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile(
    k: usize,
    w: *const f32,
    w_stride: usize,
    xt: *const f32,
    out: *mut f32,
    ldc: usize,
    (rows, tokens): (usize, usize),
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; TILE_ROWS];
    for kk in 0..k {
        // SAFETY: kk < k, so every read is inside the row / block the caller vouched for.
        unsafe {
            let x0 = _mm256_loadu_ps(xt.add(kk * TILE_TOKENS));
            let x1 = _mm256_loadu_ps(xt.add(kk * TILE_TOKENS + 8));
            for (j, a) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*w.add(j * w_stride + kk));
                a[0] = _mm256_fmadd_ps(b, x0, a[0]);
                a[1] = _mm256_fmadd_ps(b, x1, a[1]);
            }
        }
    }
    let mut sums = [[0.0f32; TILE_TOKENS]; TILE_ROWS];
    for (s, a) in sums.iter_mut().zip(&acc) {
        // SAFETY: each row of `sums` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(s.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(s.as_mut_ptr().add(8), a[1]);
        }
    }
    for t in 0..tokens {
        for (j, s) in sums.iter().enumerate().take(rows) {
            // SAFETY: the caller owns out[t * ldc + j] for t < tokens, j < rows.
            unsafe { *out.add(t * ldc + j) = s[t] };
        }
    }
}
