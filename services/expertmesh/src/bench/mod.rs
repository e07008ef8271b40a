//! `expertmesh bench`: kernel bandwidth next to the machine's memory-read bandwidth, and model
//! throughput next to a baseline measured in the same run. These machines are noisy; compare the
//! ratios, not the absolute numbers.

mod cluster;
mod kernels;
mod memory;
mod model;

use anyhow::Result;
use clap::Args;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Smaller matrices and fewer steps (a quick smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Size of each kernel-bandwidth matrix, MiB (well beyond the last-level cache).
    #[arg(long, default_value_t = 2048)]
    pub kernel_mib: usize,
    /// Prompt length for prefill throughput.
    #[arg(long, default_value_t = 256)]
    pub prompt: usize,
    /// Decode steps for decode throughput.
    #[arg(long, default_value_t = 64)]
    pub decode: usize,
    /// Runs per model configuration (the best is reported: on these shared machines run-to-run
    /// noise is ±5 %, and the best run is the least disturbed).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Skip the kernel-bandwidth part.
    #[arg(long)]
    pub no_kernels: bool,
    /// Skip the model-throughput part.
    #[arg(long)]
    pub no_model: bool,
    /// Expert worker processes in the distributed-decode part.
    #[arg(long, default_value_t = 4)]
    pub cluster_shards: usize,
    /// Skip the distributed-decode part (expert workers as separate processes).
    #[arg(long)]
    pub no_cluster: bool,
    /// Cap the kernel family (portable, avx2, avx512; default: the best this CPU runs), e.g. to
    /// compare the AVX2 kernels with the AVX-512 ones on one machine.
    #[arg(long)]
    pub simd: Option<expertmesh_model::kernels::Simd>,
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    if args.quick {
        args.kernel_mib = args.kernel_mib.min(256);
        args.prompt = args.prompt.min(64);
        args.decode = args.decode.min(16);
        args.repeats = 1;
    }
    expertmesh_model::kernels::set_simd_cap(args.simd);
    println!(
        "expertmesh bench — {} threads available, SIMD kernels: {:?}",
        num_cpus(),
        expertmesh_model::kernels::simd_level()
    );
    if !args.no_kernels {
        kernels::run(&args)?;
    }
    if !args.no_model {
        model::run(&args)?;
    }
    if !args.no_cluster {
        cluster::run(&args)?;
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A rayon pool of `threads` threads for one measurement.
fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new().num_threads(threads).build()?)
}

/// Best (shortest) of `reps` timings of `f`, in seconds: the least disturbed run.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
