//! The machine's memory-read bandwidth: the ceiling a memory-bound matrix-vector product can
//! reach, measured on a buffer far larger than the last-level cache.

use rayon::prelude::*;

/// A buffer filled with real data (untouched pages would read as the shared zero page).
pub fn filled_buffer(bytes: usize) -> Vec<u64> {
    let mut v = vec![0u64; bytes / 8];
    v.par_iter_mut().enumerate().for_each(|(i, x)| *x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    v
}

/// Sums the buffer with independent accumulators (so the loop is load-bound, not add-bound).
pub fn read_all(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0u64; 8];
            for block in c.chunks_exact(8) {
                for j in 0..8 {
                    acc[j] = acc[j].wrapping_add(block[j]);
                }
            }
            acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
        })
        .reduce(|| 0, |a, b| a.wrapping_add(b))
}
