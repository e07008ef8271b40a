//! Compute kernels. The one entry point the layers use is [`matmul`]: `y = x · Wᵀ` for a weight
//! in any stored format, choosing the fused decode-and-dot path for small batches (memory-bound)
//! and a panel SGEMM for large ones (compute-bound), split across the current rayon pool.

mod awake;
mod bytes;
mod exp;
mod gemm;
mod gemv;
mod weight;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_decode;
#[cfg(target_arch = "x86_64")]
mod x86_gemm;

pub use awake::with_awake_pool;
pub use bytes::Bytes;
pub use exp::exp_in_place;
pub use weight::{FP4_BLOCK, FP8_TILE, WeightFormat, WeightMatrix};

use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

/// Below this many weight elements a lone matrix-vector product runs on one thread. A split costs
/// a few microseconds of synchronisation, about what a 64K-element bf16 matvec takes; measured on
/// tiny-model decode, 64K beat 16K and 32K by ~10 %. (`matmul_many` still spreads several small
/// matrices over the threads.)
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;
/// Below this many multiply-adds a GEMM runs on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// The kernel family the products run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Plain Rust (any CPU; the benchmark's baseline).
    Portable,
    /// AVX2 + FMA + F16C (x86_64 since Haswell / Zen 1).
    Avx2,
    /// AVX2 plus AVX-512F: the FP8 and FP4 dot products decode 16 values per instruction
    /// (`x86/avx512.rs`); everything else stays on the AVX2 kernels.
    Avx512,
}

const SIMD_UNKNOWN: u8 = u8::MAX;
static SIMD: AtomicU8 = AtomicU8::new(SIMD_UNKNOWN);

/// The kernel family in use (the best the CPU has, detected once; see [`set_simd_cap`]).
pub fn simd_level() -> Simd {
    match SIMD.load(Ordering::Relaxed) {
        0 => Simd::Portable,
        1 => Simd::Avx2,
        2 => Simd::Avx512,
        _ => {
            let level = detect_simd();
            SIMD.store(level as u8, Ordering::Relaxed);
            level
        }
    }
}

/// Whether the AVX2/FMA/F16C kernels (or better) are in use.
pub fn simd_available() -> bool {
    simd_level() >= Simd::Avx2
}

/// The best kernel family this CPU runs.
fn detect_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        match avx2 {
            true if is_x86_feature_detected!("avx512f") => Simd::Avx512,
            true => Simd::Avx2,
            false => Simd::Portable,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Simd::Portable
    }
}

/// The kernel families this CPU runs, best last (tests run every one).
pub fn simd_levels() -> Vec<Simd> {
    let best = detect_simd();
    [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|l| *l <= best).collect()
}

thread_local! {
    static SEQUENTIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the kernels kept on the calling thread: for callers that already spread
/// independent work over the pool (one task per expert), where splitting each product again
/// only adds synchronisation and duplicate packing.
pub fn sequential<R>(f: impl FnOnce() -> R) -> R {
    let before = SEQUENTIAL.with(|s| s.replace(true));
    let out = f();
    SEQUENTIAL.with(|s| s.set(before));
    out
}

/// Threads the kernels may use from here.
fn threads_here() -> usize {
    if SEQUENTIAL.with(|s| s.get()) { 1 } else { rayon::current_num_threads() }
}

/// Caps the kernel family of the whole process at `cap` (the benchmark's portable baseline and
/// its `--simd` flag); `None` goes back to the best the CPU runs.
pub fn set_simd_cap(cap: Option<Simd>) {
    let level = match cap {
        Some(cap) => cap.min(detect_simd()) as u8,
        None => SIMD_UNKNOWN,
    };
    SIMD.store(level, Ordering::Relaxed);
}

impl std::str::FromStr for Simd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "portable" => Ok(Simd::Portable),
            "avx2" => Ok(Simd::Avx2),
            "avx512" => Ok(Simd::Avx512),
            _ => Err(format!("unknown kernel family {s:?} (portable, avx2 or avx512)")),
        }
    }
}

/// Decodes one weight row to f32.
pub fn decode_row(w: &WeightMatrix, row: usize, out: &mut [f32]) {
    assert!(
        row < w.rows && out.len() >= w.cols,
        "decode_row: row {row} of a {}×{} matrix into {} values",
        w.rows,
        w.cols,
        out.len()
    );
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
    if m == 0 || n == 0 {
        return vec![0.0f32; m * n];
    }
    let threads = threads_here();
    if m <= gemv::MAX_ROWS {
        let mut out = vec![0.0f32; m * n];
        let parallel = threads > 1 && n * w.cols >= PARALLEL_MIN_WEIGHTS;
        let mut out_t = if m == 1 { Vec::new() } else { vec![0.0f32; m * n] };
        let target: &mut [f32] = if m == 1 { &mut out } else { &mut out_t };
        if parallel {
            // One contiguous share per thread: each runs the multi-stream kernel over its share,
            // which keeps every core's memory streams long.
            let chunk = n.div_ceil(threads).max(8);
            target.par_chunks_mut(chunk * m).enumerate().for_each(|(c, slice)| {
                let start = rows.start + c * chunk;
                gemv::gemv_transposed(x, m, w, start..start + slice.len() / m, slice);
            });
        } else {
            gemv::gemv_transposed(x, m, w, rows.clone(), target);
        }
        if m > 1 {
            scatter_transposed(&out_t, m, n, 0, &mut out);
        }
        return out;
    }
    let parallel = threads > 1 && m * n * w.cols >= PARALLEL_MIN_MACS;
    gemm::gemm(x, m, &[gemm::Segment { w, rows }], parallel)
}

/// One product of a batch run by [`matmul_many`].
pub struct MatmulJob<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: &'a WeightMatrix,
}

/// Several independent products at once (e.g. every projection of the same hidden state). For
/// decode-sized batches the rows of all matrices are shared out in one parallel region: many of a
/// layer's matrices are too small to split alone, but together they keep every core streaming.
pub fn matmul_many(jobs: &[MatmulJob<'_>]) -> Vec<Vec<f32>> {
    let threads = threads_here();
    if jobs.iter().any(|j| j.m > gemv::MAX_ROWS || j.m == 0) {
        return stacked_gemms(jobs);
    }
    if threads == 1 {
        return jobs.iter().map(|j| matmul(j.x, j.m, j.w)).collect();
    }
    // (job, row range) tasks: large matrices split into one share per thread.
    let mut tasks = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        assert_eq!(j.x.len(), j.m * j.w.cols, "matmul input is not [{}, {}]", j.m, j.w.cols);
        let n = j.w.rows;
        let parts = if n * j.w.cols >= PARALLEL_MIN_WEIGHTS { threads.min(n.div_ceil(8)) } else { 1 };
        let per = n.div_ceil(parts.max(1));
        tasks.extend((0..n).step_by(per.max(1)).map(|s| (ji, s..(s + per).min(n))));
    }
    let outputs: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|(ji, rows)| {
            let j = &jobs[*ji];
            let mut out_t = vec![0.0f32; rows.len() * j.m];
            gemv::gemv_transposed(j.x, j.m, j.w, rows.clone(), &mut out_t);
            out_t
        })
        .collect();
    let mut results: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0.0f32; j.m * j.w.rows]).collect();
    for ((ji, rows), out_t) in tasks.iter().zip(outputs) {
        let (m, n) = (jobs[*ji].m, jobs[*ji].w.rows);
        scatter_transposed(&out_t, m, n, rows.start, &mut results[*ji]);
    }
    results
}

/// Writes `out_t` (`[rows, m]`, the GEMV kernels' layout) into columns `col0..` of `out`
/// (`[m, n]`).
fn scatter_transposed(out_t: &[f32], m: usize, n: usize, col0: usize, out: &mut [f32]) {
    for (j, vals) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in vals.iter().enumerate() {
            out[i * n + col0 + j] = *v;
        }
    }
}

/// Large batches: jobs that share an input (same slice, same width) run as one stacked GEMM.
fn stacked_gemms(jobs: &[MatmulJob<'_>]) -> Vec<Vec<f32>> {
    let same_input = |a: &MatmulJob<'_>, b: &MatmulJob<'_>| {
        std::ptr::eq(a.x.as_ptr(), b.x.as_ptr()) && a.x.len() == b.x.len() && a.m == b.m && a.w.cols == b.w.cols
    };
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match groups.iter_mut().find(|g| same_input(&jobs[g[0]], job)) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    let threads = threads_here();
    // Several inputs (the grouped output projection's groups): with a group per thread, each
    // GEMM runs whole on its thread, in one parallel region rather than one region per group.
    let per_group: Vec<Vec<(usize, Vec<f32>)>> = if threads > 1 && groups.len() >= threads {
        groups.par_iter().map(|g| sequential(|| stacked_gemm(jobs, g, 1))).collect()
    } else {
        groups.iter().map(|g| stacked_gemm(jobs, g, threads)).collect()
    };
    let mut results = vec![Vec::new(); jobs.len()];
    for (j, out) in per_group.into_iter().flatten() {
        results[j] = out;
    }
    results
}

/// The jobs of `group` (one shared input) as one GEMM over their stacked weights; returns each
/// job's index and output.
fn stacked_gemm(jobs: &[MatmulJob<'_>], group: &[usize], threads: usize) -> Vec<(usize, Vec<f32>)> {
    let (x, m) = (jobs[group[0]].x, jobs[group[0]].m);
    if m == 0 {
        return group.iter().map(|&j| (j, Vec::new())).collect();
    }
    let segments: Vec<gemm::Segment<'_>> =
        group.iter().map(|&j| gemm::Segment { w: jobs[j].w, rows: 0..jobs[j].w.rows }).collect();
    let n: usize = segments.iter().map(|s| s.rows.len()).sum();
    let parallel = threads > 1 && m * n * jobs[group[0]].w.cols >= PARALLEL_MIN_MACS;
    let stacked = gemm::gemm(x, m, &segments, parallel);
    if let [only] = group {
        return vec![(*only, stacked)];
    }
    // Each job's columns copied out, the jobs in parallel (a serial copy would leave the other
    // threads idle).
    let cols: Vec<(usize, Range<usize>)> = group
        .iter()
        .scan(0, |col, &j| {
            let nj = jobs[j].w.rows;
            *col += nj;
            Some((j, *col - nj..*col))
        })
        .collect();
    let split = |(j, c): &(usize, Range<usize>)| -> (usize, Vec<f32>) {
        let mut part = Vec::with_capacity(m * c.len());
        for r in 0..m {
            part.extend_from_slice(&stacked[r * n + c.start..r * n + c.end]);
        }
        (*j, part)
    };
    if parallel { cols.par_iter().map(split).collect() } else { cols.iter().map(split).collect() }
}

#[cfg(test)]
mod tests;
