//! Matrix × many vectors (prefill, large decode batches): compute-bound. Each task decodes a
//! panel of weight rows to f32 once (cost ∝ weights, amortised over the batch) and hands it to
//! `matrixmultiply`'s packed SGEMM.

use std::cell::RefCell;
use std::ops::Range;

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
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: tasks write disjoint columns of the output; the caller keeps it alive for the call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Computes output columns `panel` (absolute weight rows) of `out = x · W[rows]^T`, where `out`
/// is `[m, rows.len()]` row-major and `x` is `[m, cols]`.
///
/// # Safety
/// `out` must point to `m * rows.len()` floats that no other task writes in these columns.
pub(crate) unsafe fn gemm_panel(
    x: &[f32],
    m: usize,
    w: &WeightMatrix,
    rows: &Range<usize>,
    panel: Range<usize>,
    out: OutPtr,
) {
    let k = w.cols;
    let n_total = rows.len();
    let np = panel.len();
    PANEL.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.resize(np * k, 0.0);
        for (j, r) in panel.clone().enumerate() {
            super::decode_row(w, r, &mut buf[j * k..(j + 1) * k]);
        }
        let col0 = panel.start - rows.start;
        // SAFETY: C = out[:, col0..col0+np] with row stride n_total; A = x [m, k]; B = panel^T.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                np,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                buf.as_ptr(),
                1,
                k as isize,
                0.0,
                out.0.add(col0),
                n_total as isize,
                1,
            );
        }
    });
}
