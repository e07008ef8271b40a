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
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub unsafe fn pack_tokens(x: &[f32], m: usize, k: usize, parallel: bool, out: &mut Vec<f32>) {
    assert_eq!(x.len(), m * k, "pack_tokens: x is not [{m}, {k}]");
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
        // Whole 8 × 8 squares through registers; the ragged rest (last inputs, last tokens) one
        // value at a time.
        let k8 = k / 8 * 8;
        for half in 0..valid / 8 {
            let t0 = first + half * 8;
            for k0 in (0..k8).step_by(8) {
                // SAFETY: rows t0..t0 + 8 of x hold inputs k0..k0 + 8 (t0 + 8 <= m, k0 + 8 <= k);
                // the block holds rows k0..k0 + 8 of 16 floats.
                unsafe {
                    transpose_8x8(
                        x.as_ptr().add(t0 * k + k0),
                        k,
                        block.as_mut_ptr().add(k0 * TILE_TOKENS + half * 8),
                        TILE_TOKENS,
                    )
                };
            }
        }
        for t in 0..valid {
            let row = &x[(first + t) * k..(first + t + 1) * k];
            let from = if t < valid / 8 * 8 { k8 } else { 0 };
            for (kk, v) in row.iter().enumerate().skip(from) {
                block[kk * TILE_TOKENS + t] = *v;
            }
        }
    };
    if parallel && blocks > 1 {
        out.par_chunks_exact_mut(k * TILE_TOKENS).enumerate().for_each(fill);
    } else {
        out.chunks_exact_mut(k * TILE_TOKENS).enumerate().for_each(fill);
    }
}

/// `dst[i * dst_stride + j] = src[j * src_stride + i]` for an 8 × 8 square.
///
/// # Safety
/// AVX must be available; `src` must hold 8 rows of 8 floats `src_stride` apart and `dst` 8 rows
/// of 8 floats `dst_stride` apart.
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    // SAFETY: the reads and writes stay inside the squares the caller vouched for.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let rows = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, row) in rows.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * dst_stride), *row);
        }
    }
}

/// Where a tile's results go: its 6 broadcast rows × 16 vector lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileStore {
    /// `out[lane * ldc + row]`: the rows are weight rows (outputs), the lanes tokens.
    Transposed,
    /// `out[row * ldc + lane]`: the rows are tokens, the lanes outputs (the narrow-output GEMM,
    /// whose weights are the packed side).
    Direct,
}

/// `Σ_kk w[j * w_stride + kk] · xt[kk * 16 + l]` for the 6 broadcast rows `j` and 16 lanes `l`,
/// stored (as `store` says) for `j < rows`, `l < lanes`: edge tiles compute all 6 × 16 and
/// store only the valid part.
///
/// # Safety
/// AVX2/FMA must be available; `w` must hold 6 rows of `k` floats `w_stride` apart (rows past
/// `rows` may hold anything), `xt` one packed block of `k × 16` floats, and `out` the written
/// elements.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)] // a micro-kernel: raw operands, no struct in the hot path
pub unsafe fn tile(
    k: usize,
    w: *const f32,
    w_stride: usize,
    xt: *const f32,
    out: *mut f32,
    ldc: usize,
    (rows, lanes): (usize, usize),
    store: TileStore,
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
    match store {
        TileStore::Transposed => {
            for l in 0..lanes {
                for (j, s) in sums.iter().enumerate().take(rows) {
                    // SAFETY: the caller owns out[l * ldc + j] for l < lanes, j < rows.
                    unsafe { *out.add(l * ldc + j) = s[l] };
                }
            }
        }
        TileStore::Direct => {
            for (j, s) in sums.iter().enumerate().take(rows) {
                // SAFETY: the caller owns out[j * ldc + l] for j < rows, l < lanes.
                unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), out.add(j * ldc), lanes) };
            }
        }
    }
}
