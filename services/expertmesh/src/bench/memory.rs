//! The machine's memory-read bandwidth: the ceiling a memory-bound matrix-vector product can
//! reach, measured on a buffer far larger than the last-level cache.

use rayon::prelude::*;

/// A buffer filled with real data (untouched pages would read as the shared zero page).
pub fn filled_buffer(bytes: usize) -> Vec<u64> {
    let mut v = vec![0u64; bytes / 8];
    v.par_iter_mut().enumerate().for_each(|(i, x)| *x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    v
}

/// Sums the buffer with independent accumulators (so the loop is load-bound, not add-bound),
/// each thread's share read as `streams` equal parts side by side, one 64-byte line of each per
/// step. One stream per core leaves the cores' prefetchers short of requests on some machines;
/// the benchmark takes the best of one and four, so the ceiling it reports is what the machine
/// reads at its best (the kernels walk four streams per thread).
pub fn read_all(buf: &[u64], streams: usize) -> u64 {
    let share = buf.len().div_ceil(rayon::current_num_threads());
    buf.par_chunks(share)
        .map(|c| {
            let part = c.len() / streams / 8 * 8;
            let mut acc = [0u64; 8];
            for line in (0..part).step_by(8) {
                for s in 0..streams {
                    #[cfg(target_arch = "x86_64")]
                    if let Some(ahead) = c.get(s * part + line + 256) {
                        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                        // SAFETY: SSE is part of x86_64; a prefetch reads nothing and never faults.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead as *const u64 as *const i8) };
                    }
                    let block = &c[s * part + line..s * part + line + 8];
                    for j in 0..8 {
                        acc[j] = acc[j].wrapping_add(block[j]);
                    }
                }
            }
            let rest = c[streams * part..].iter();
            rest.chain(&acc).fold(0u64, |a, b| a.wrapping_add(*b))
        })
        .reduce(|| 0, |a, b| a.wrapping_add(b))
}
