//! Row-wise elementwise work (norms, RoPE, activations, mHC mixing) over a batch of tokens.
//! Decode batches are a handful of rows and stay on the calling thread; prefill batches are
//! hundreds of rows, and left sequential they would cap the speed-up of the parallel GEMMs
//! around them (Amdahl), so they are shared out across the compute pool.

use rayon::prelude::*;

/// Below this many values the work stays on one thread (a split costs a few microseconds).
const PARALLEL_MIN_VALUES: usize = 1 << 15;

/// Calls `f(row_index, row)` for each `width`-wide row of `data`.
pub fn for_each_row(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    for_each_row_costing(data, width, width, f)
}

/// [`for_each_row`] for work whose cost per row is not proportional to its width (e.g. the mHC
/// Sinkhorn iterations over 24 values): `cost_per_row` is in elementary operations.
pub fn for_each_row_costing(
    data: &mut [f32],
    width: usize,
    cost_per_row: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if width == 0 {
        return;
    }
    let rows = data.len() / width;
    if rows > 1 && rows * cost_per_row >= PARALLEL_MIN_VALUES && rayon::current_num_threads() > 1 {
        let rows = data.len() / width;
        let per_task = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
        data.par_chunks_mut(per_task * width).enumerate().for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                f(c * per_task + i, row);
            }
        });
    } else {
        data.chunks_exact_mut(width).enumerate().for_each(|(i, row)| f(i, row));
    }
}

/// `(0..n).map(f).collect()`, in parallel for large `n` (per-token results such as top-k).
pub fn map_rows<T: Send>(n: usize, cost_per_row: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if n * cost_per_row >= PARALLEL_MIN_VALUES && rayon::current_num_threads() > 1 {
        (0..n).into_par_iter().map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}
