//! Matrix × many vectors (prefill, large decode batches): compute-bound. Two paths:
//!
//! * up to `TILED_MAX_TOKENS` tokens with the SIMD kernels: the tiled GEMM of `x86_gemm` (weights
//!   decoded once into rows, activations packed once into 16-token blocks); for narrow outputs
//!   the same kernel with the roles swapped (`gemm_narrow`: the weights packed, tokens in place);
//! * otherwise (and for the portable kernels): each task decodes a panel of weight rows to f32
//!   once (cost ∝ weights, amortised over the batch) and hands it to `matrixmultiply`'s packed
//!   SGEMM, whose cache blocking of the activations wins for thousands of tokens.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::weight::WeightMatrix;

/// Upper bound on a decoded panel (f32 bytes). SGEMM repacks the activations for every panel, so
/// panels should be as large as this allows: one per thread when the matrix is small.
pub const PANEL_BYTES: usize = 1 << 21;

/// Weight rows per panel for `n` rows of `k` inputs on `threads` threads.
pub fn panel_rows(n: usize, k: usize, threads: usize) -> usize {
    let by_bytes = (PANEL_BYTES / (4 * k.max(1))).max(16);
    n.div_ceil(threads.max(1)).clamp(1, by_bytes)
}

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED_TOKENS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Raw output pointer shared by tasks that write disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the output; the caller keeps it alive for the call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so that closures capture the (Sync) wrapper, not the raw field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Largest token count for the tiled SIMD GEMM. Measured on the tiny model (2 threads): equal to
/// the panel SGEMM at 256 tokens, +24 % on 16-sequence decode steps, 10 % behind it at 4096.
const TILED_MAX_TOKENS: usize = 256;

/// Packed activations a task walks at once (see `gemm_tiled`): half of a 512 KiB L2.
const XT_CHUNK_BYTES: usize = 1 << 17;

/// Outputs narrower than this are split across threads by input rows instead of by output
/// columns: cutting 24 columns (the mHC mixes) in two leaves each thread a ragged sliver.
const NARROW: usize = 128;

/// `0..total` cut into at most `parts` contiguous ranges of near-equal length.
fn even_ranges(total: usize, parts: usize) -> Vec<Range<usize>> {
    let per = total.div_ceil(parts.max(1)).max(1);
    (0..total).step_by(per).map(|s| s..(s + per).min(total)).collect()
}

/// Runs `run` on every task: across the pool when there are threads and tasks to share, else on
/// the calling thread.
fn run_tasks<T: Sync>(tasks: &[T], threads: usize, run: impl Fn(&T) + Sync + Send) {
    if threads > 1 && tasks.len() > 1 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// Decodes the (narrow) weight once and gives each thread a block of input rows.
fn gemm_split_rows(
    x: &[f32],
    m: usize,
    k: usize,
    segments: &[Segment<'_>],
    starts: &[usize],
    threads: usize,
    out: OutPtr,
) {
    let n = *starts.last().unwrap();
    let mut w = vec![0.0f32; n * k];
    for (seg, s0) in segments.iter().zip(starts) {
        for (j, r) in seg.rows.clone().enumerate() {
            super::decode_row(seg.w, r, &mut w[(s0 + j) * k..(s0 + j + 1) * k]);
        }
    }
    run_tasks(&even_ranges(m, threads * 2), threads, |b| {
        // SAFETY: C = out[b, :] (disjoint row blocks of the output); A = x[b, :]; B = wᵀ.
        unsafe {
            matrixmultiply::sgemm(
                b.len(),
                k,
                n,
                1.0,
                x.as_ptr().add(b.start * k),
                k as isize,
                1,
                w.as_ptr(),
                1,
                k as isize,
                0.0,
                out.at(b.start * n),
                n as isize,
                1,
            );
        }
    });
}

/// Decodes virtual row `v` of the stacked segments into `out`.
fn decode_virtual_row(segments: &[Segment<'_>], starts: &[usize], v: usize, out: &mut [f32]) {
    let i = starts.partition_point(|&s| s <= v) - 1;
    let seg = &segments[i];
    super::decode_row(seg.w, seg.rows.start + v - starts[i], out);
}

/// The SIMD GEMM: activations packed once into 16-token blocks, weights decoded into rows a
/// chunk at a time, 6 × 16 tiles.
///
/// With enough tokens, threads split the tokens: each decodes every weight row itself (cheap next
/// to its share of the math) and owns whole output rows, so no two threads write the same output
/// cache line. Otherwise (decode-sized batches) they split the weight rows in chunks of 48,
/// which keeps their output columns a whole number of cache lines apart.
#[cfg(target_arch = "x86_64")]
fn gemm_tiled(x: &[f32], m: usize, k: usize, segments: &[Segment<'_>], starts: &[usize], threads: usize) -> Vec<f32> {
    use super::x86_gemm::{TILE_ROWS, TILE_TOKENS, TileStore, pack_tokens, tile};
    /// Row blocks decoded at once (48 rows: a multiple of 16 floats).
    const CHUNK_BLOCKS: usize = 8;
    let n = *starts.last().unwrap();
    // Taken out of the thread-local for the call (a task run while this thread waits may be
    // another GEMM, which then simply allocates its own).
    let mut xt = PACKED_TOKENS.with(|b| std::mem::take(&mut *b.borrow_mut()));
    // SAFETY: the caller checked the SIMD features.
    unsafe { pack_tokens(x, m, k, threads > 1, &mut xt) };
    let row_blocks = n.div_ceil(TILE_ROWS);
    let token_blocks = m.div_ceil(TILE_TOKENS);
    let tasks: Vec<(Range<usize>, Range<usize>)> = if threads > 1 && token_blocks >= 2 * threads {
        even_ranges(token_blocks, threads).into_iter().map(|t| (0..row_blocks, t)).collect()
    } else {
        (0..row_blocks)
            .step_by(CHUNK_BLOCKS)
            .map(|s| (s..(s + CHUNK_BLOCKS).min(row_blocks), 0..token_blocks))
            .collect()
    };
    // Decoded rows sit `stride` floats apart: rows a power of two apart would share L1 sets.
    let stride = k + 16;
    // Token blocks per pass: they stay in L2 while every weight tile of a chunk runs over them.
    let pass = (XT_CHUNK_BYTES / (4 * TILE_TOKENS * k)).max(1);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let ptr = OutPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let run = |(blocks, token_range): &(Range<usize>, Range<usize>)| {
        PANEL.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < CHUNK_BLOCKS * TILE_ROWS * stride {
                buf.resize(CHUNK_BLOCKS * TILE_ROWS * stride, 0.0);
            }
            for c0 in blocks.clone().step_by(CHUNK_BLOCKS) {
                let c1 = (c0 + CHUNK_BLOCKS).min(blocks.end);
                let first = c0 * TILE_ROWS;
                // Rows past `n` in the last tile are read but their results are never stored.
                for v in first..(c1 * TILE_ROWS).min(n) {
                    let at = (v - first) * stride;
                    decode_virtual_row(segments, starts, v, &mut buf[at..at + k]);
                }
                for t0 in token_range.clone().step_by(pass) {
                    for b in c0..c1 {
                        let rows = (n - b * TILE_ROWS).min(TILE_ROWS);
                        let w = buf[(b - c0) * TILE_ROWS * stride..].as_ptr();
                        for t in t0..(t0 + pass).min(token_range.end) {
                            let tokens = (m - t * TILE_TOKENS).min(TILE_TOKENS);
                            // SAFETY: features checked by the caller; `w` holds 6 decoded rows of
                            // k, `xt` block t holds k × 16 floats; only this task writes the
                            // outputs of (block t, block b), and `out` outlives the tasks.
                            unsafe {
                                let dst = ptr.at(t * TILE_TOKENS * n + b * TILE_ROWS);
                                let xt = xt[t * k * TILE_TOKENS..].as_ptr();
                                tile(k, w, stride, xt, dst, n, (rows, tokens), TileStore::Transposed)
                            };
                        }
                    }
                }
            }
        })
    };
    run_tasks(&tasks, threads, run);
    PACKED_TOKENS.with(|b| *b.borrow_mut() = xt);
    // SAFETY: the tasks cover every (row block, token block) pair once, and each tile wrote all
    // of its valid rows and tokens.
    unsafe { out.set_len(m * n) };
    out
}

/// Outputs at most this wide, for at least `NARROW_MIN_TOKENS` tokens, take `gemm_narrow`.
const NARROW_OUTPUTS: usize = 64;
const NARROW_MIN_TOKENS: usize = 32;

/// The SIMD GEMM for few outputs and many tokens (the mHC mixes: 24 outputs of 1024 inputs; the
/// grouped output projection: 64): the roles of `gemm_tiled` swapped. The weights are decoded and
/// packed into 16-output blocks once (n·k values, against m·k for packing the tokens), and each
/// tile broadcasts 6 tokens read in place from `x`, storing 16 contiguous outputs per token.
/// Threads take ranges of tokens, so each owns whole output rows.
#[cfg(target_arch = "x86_64")]
fn gemm_narrow(x: &[f32], m: usize, k: usize, segments: &[Segment<'_>], starts: &[usize], threads: usize) -> Vec<f32> {
    use super::x86_gemm::{TILE_ROWS, TILE_TOKENS, TileStore, pack_tokens, tile};
    let n = *starts.last().unwrap();
    let mut decoded = vec![0.0f32; n * k];
    for (v, row) in decoded.chunks_exact_mut(k).enumerate() {
        decode_virtual_row(segments, starts, v, row);
    }
    let mut packed = Vec::new();
    // SAFETY: the caller checked the SIMD features.
    unsafe { pack_tokens(&decoded, n, k, false, &mut packed) };
    let groups = m.div_ceil(TILE_ROWS);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let ptr = OutPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let run = |range: &Range<usize>| {
        // The last group may hold fewer than 6 tokens; the kernel reads 6 rows, so that group
        // reads from a zero-padded copy.
        let mut padded = Vec::new();
        for g in range.clone() {
            let t0 = g * TILE_ROWS;
            let rows = (m - t0).min(TILE_ROWS);
            let src = if rows == TILE_ROWS {
                x[t0 * k..].as_ptr()
            } else {
                padded.resize(TILE_ROWS * k, 0.0);
                padded[..rows * k].copy_from_slice(&x[t0 * k..]);
                padded.as_ptr()
            };
            for b in 0..n.div_ceil(TILE_TOKENS) {
                let lanes = (n - b * TILE_TOKENS).min(TILE_TOKENS);
                // SAFETY: features checked by the caller; `src` holds 6 rows of k floats, block b
                // of `packed` k × 16 floats; only this task writes output rows t0..t0 + rows, and
                // `out` outlives the tasks.
                unsafe {
                    let w = packed[b * k * TILE_TOKENS..].as_ptr();
                    tile(k, src, k, w, ptr.at(t0 * n + b * TILE_TOKENS), n, (rows, lanes), TileStore::Direct)
                };
            }
        }
    };
    run_tasks(&even_ranges(groups, threads), threads, run);
    // SAFETY: the ranges cover every token group once, and each tile stored all valid outputs
    // of its tokens.
    unsafe { out.set_len(m * n) };
    out
}

/// Rows `rows` of `w`: one part of the virtual matrix a GEMM runs over.
pub struct Segment<'a> {
    pub w: &'a WeightMatrix,
    pub rows: Range<usize>,
}

/// `out = x · Wᵀ` where `W` stacks the segments' rows (all with the same input width) and `x`
/// is `[m, cols]`; `out` is `[m, Σ rows]`. Stacking the projections that share an input into one
/// GEMM packs the activations once instead of once per matrix.
pub fn gemm(x: &[f32], m: usize, segments: &[Segment<'_>], parallel: bool) -> Vec<f32> {
    let k = segments[0].w.cols;
    assert!(segments.iter().all(|s| s.w.cols == k), "stacked matrices must share the input width");
    assert_eq!(x.len(), m * k, "matmul input is not [{m}, {k}]");
    // Virtual row v lives in segment i at row starts[i]..: prefix sums of the segment lengths.
    let mut starts = Vec::with_capacity(segments.len() + 1);
    starts.push(0);
    for s in segments {
        starts.push(starts.last().unwrap() + s.rows.len());
    }
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        let n = *starts.last().unwrap();
        if n <= NARROW_OUTPUTS && m >= NARROW_MIN_TOKENS {
            return gemm_narrow(x, m, k, segments, &starts, threads);
        }
        if m <= TILED_MAX_TOKENS {
            return gemm_tiled(x, m, k, segments, &starts, threads);
        }
    }
    gemm_packed(x, m, k, segments, &starts, threads)
}

/// `matrixmultiply`'s SGEMM over decoded weight panels: the portable path, and the faster one for
/// big batches of tokens, where its cache blocking of the activations pays off.
fn gemm_packed(x: &[f32], m: usize, k: usize, segments: &[Segment<'_>], starts: &[usize], threads: usize) -> Vec<f32> {
    let n = *starts.last().unwrap();
    // SGEMM with beta = 0 never reads C, and the panels cover every column of every row, so the
    // output is written straight into the vector's spare capacity: no zero-fill pass first.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    if threads > 1 && n < NARROW && m >= 16 * threads {
        gemm_split_rows(
            x,
            m,
            k,
            segments,
            starts,
            threads,
            OutPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>()),
        );
        // SAFETY: every row block wrote all n columns of its rows.
        unsafe { out.set_len(m * n) };
        return out;
    }
    let per = panel_rows(n, k, threads);
    let panels: Vec<Range<usize>> = (0..n).step_by(per.max(1)).map(|s| s..(s + per).min(n)).collect();
    let ptr = OutPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let run = |panel: &Range<usize>| {
        PANEL.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(panel.len() * k, 0.0);
            for (j, v) in panel.clone().enumerate() {
                decode_virtual_row(segments, starts, v, &mut buf[j * k..(j + 1) * k]);
            }
            // SAFETY: C = out[:, panel] with row stride n (panels are disjoint column ranges of
            // `out`, which outlives the call); A = x [m, k]; B = panelᵀ.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    panel.len(),
                    1.0,
                    x.as_ptr(),
                    k as isize,
                    1,
                    buf.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    ptr.at(panel.start),
                    n as isize,
                    1,
                );
            }
        })
    };
    run_tasks(&panels, threads, run);
    // SAFETY: every one of the m·n elements was written by exactly one panel above.
    unsafe { out.set_len(m * n) };
    out
}
