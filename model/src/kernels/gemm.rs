//! Matrix × many vectors (prefill, large decode batches): compute-bound. Each task decodes a
//! panel of weight rows to f32 once (cost ∝ weights, amortised over the batch) and hands it to
//! `matrixmultiply`'s packed SGEMM.

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

/// Outputs narrower than this are split across threads by input rows instead of by output
/// columns: cutting 24 columns (the mHC mixes) in two leaves each thread a ragged sliver.
const NARROW: usize = 128;

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
    let per = m.div_ceil(threads * 2);
    let blocks: Vec<Range<usize>> = (0..m).step_by(per).map(|s| s..(s + per).min(m)).collect();
    blocks.par_iter().for_each(|b| {
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
    let n = *starts.last().unwrap();
    // SGEMM with beta = 0 never reads C, and the panels cover every column of every row, so the
    // output is written straight into the vector's spare capacity: no zero-fill pass first.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    if threads > 1 && n < NARROW && m >= 16 * threads {
        gemm_split_rows(
            x,
            m,
            k,
            segments,
            &starts,
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
                let i = starts.partition_point(|&s| s <= v) - 1;
                let seg = &segments[i];
                super::decode_row(seg.w, seg.rows.start + v - starts[i], &mut buf[j * k..(j + 1) * k]);
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
    if threads > 1 && panels.len() > 1 {
        panels.par_iter().for_each(run);
    } else {
        panels.iter().for_each(run);
    }
    // SAFETY: every one of the m·n elements was written by exactly one panel above.
    unsafe { out.set_len(m * n) };
    out
}
