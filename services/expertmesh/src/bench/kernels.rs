//! Achieved weight bandwidth of the matrix-vector kernels (one activation row, the decode case)
//! for bf16, FP8 and FP4 matrices of several hundred MiB to GiB, against the memory-read bandwidth
//! measured with the same thread count in turns with the product, and against the same product on a
//! matrix held in cache (the kernel's compute ceiling: a ratio short of 100 % with the ceiling
//! close to the achieved figure means the decode is compute-bound, not memory-bound).

use anyhow::Result;
use expertmesh_model::kernels::{self, Bytes, WeightMatrix};
use expertmesh_model::numerics::f32_to_e4m3;
use rayon::prelude::*;
use std::hint::black_box;

use super::memory::{filled_buffer, read_all};
use super::{BenchArgs, best_of, pool};

const REPS: usize = 5;
/// A matrix that fits in the L2 caches (512 KiB per core on Zen 1, 1 MiB on Zen 5): the
/// same product on it runs at the kernel's compute ceiling, which bounds what it can reach from
/// memory.
const CACHED_BYTES: usize = 384 << 10;
/// Products per timed run on the cached matrix (about 48 MiB of weights, tens of ms).
const CACHED_PRODUCTS: usize = 128;

/// Pseudo-random bytes, each through `map`, filled in parallel.
fn fill(n: usize, map: impl Fn(u64) -> u8 + Sync) -> Vec<u8> {
    let mut v = vec![0u8; n];
    v.par_chunks_mut(1 << 20).enumerate().for_each(|(c, chunk)| {
        let mut s = (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in chunk.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = map(s);
        }
    });
    v
}

/// e4m3 codes as released FP8 weights have them: normally distributed values quantised with the
/// largest magnitude at 448 (a 128×128 tile's scale does that), drawn from a table of 2^16. About
/// 1 code in 8000 is then subnormal, as in the golden FP8 checkpoint; the FP8 dot kernel is
/// slower on subnormal codes, so uniformly random bytes (1 in 18) would misstate it.
fn fp8_weight_codes() -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    // Box–Muller.
    let normal: Vec<f64> =
        (0..1 << 16).map(|_| (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()).collect();
    let amax = normal.iter().fold(0f64, |m, v| m.max(v.abs()));
    normal.iter().map(|v| f32_to_e4m3((v * 448.0 / amax) as f32)).collect()
}

fn matrix(format: &str, bytes: usize, cols: usize) -> Result<WeightMatrix> {
    // Finite bf16 values (and FP4 codes): normal floats only, no subnormal slow paths.
    let small = |s: u64| ((s as u8) & 0x1f) | 0x20;
    let m = match format {
        "bf16" => {
            let rows = bytes / (2 * cols);
            WeightMatrix::from_bf16(rows, cols, Bytes::from_vec(fill(rows * cols * 2, small)))
        }
        "fp8" => {
            let rows = bytes / cols;
            let scales = vec![1.0f32; rows.div_ceil(128) * cols.div_ceil(128)];
            let codes = fp8_weight_codes();
            // One byte more in front: FP8 codes keep a byte before them (the dot kernels load it),
            // which `from_fp8` would otherwise make room for by copying the whole matrix.
            let owner = fill(rows * cols + 1, |s| codes[(s >> 16) as u16 as usize]);
            WeightMatrix::from_fp8(rows, cols, Bytes::new(std::sync::Arc::new(owner), 1..rows * cols + 1), scales)
        }
        _ => {
            let rows = bytes * 2 / cols;
            let scales = vec![127u8; rows * cols / 32];
            WeightMatrix::from_fp4(rows, cols, Bytes::from_vec(fill(rows * cols / 2, small)), Bytes::from_vec(scales))
        }
    };
    m.map_err(anyhow::Error::msg)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let bytes = args.kernel_mib << 20;
    // 7168 inputs: V4-Pro's hidden size, the width of most of its decode-time GEMVs.
    let cols = 7168;
    println!("\n## Kernels: matrix × vector weight bandwidth ({} MiB matrices, {cols} inputs)", args.kernel_mib);
    let head = ["format", "threads", "weights GB/s", "memory GB/s", "ratio", "in-cache GB/s"];
    println!("{:<10} {:>8} {:>14} {:>14} {:>10} {:>14}", head[0], head[1], head[2], head[3], head[4], head[5]);
    let buf = filled_buffer(bytes);
    for format in ["bf16", "fp8", "fp4"] {
        let w = matrix(format, bytes, cols)?;
        let cached = matrix(format, CACHED_BYTES, cols)?;
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.01).sin()).collect();
        for threads in [1, 2] {
            let pool = pool(threads)?;
            // The memory read and the product take turns, best of each: the bandwidth other
            // tenants leave this machine drifts within seconds, and then moves both alike.
            let (mut t_memory, mut t) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..REPS {
                for streams in [1, 4] {
                    t_memory = t_memory.min(pool.install(|| {
                        best_of(1, || {
                            black_box(read_all(&buf, streams));
                        })
                    }));
                }
                t = t.min(pool.install(|| best_of(1, || drop(black_box(kernels::matmul(&x, 1, &w))))));
            }
            let memory = bytes as f64 / t_memory / 1e9;
            let gbs = w.stored_bytes() as f64 / t / 1e9;
            let t_cached = pool.install(|| {
                best_of(REPS, || {
                    for _ in 0..CACHED_PRODUCTS {
                        drop(black_box(kernels::matmul(&x, 1, &cached)));
                    }
                })
            });
            let ceiling = (CACHED_PRODUCTS * cached.stored_bytes()) as f64 / t_cached / 1e9;
            println!(
                "{:<10} {:>8} {:>14.2} {:>14.2} {:>9.0}% {:>14.2}",
                format,
                threads,
                gbs,
                memory,
                100.0 * gbs / memory,
                ceiling
            );
        }
    }
    Ok(())
}
