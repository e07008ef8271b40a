//! `expertmesh`: one binary for every role and tool.

mod bench;
mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "expertmesh",
    version,
    about = "Serve DeepSeek-V4-class MoE models as a cluster of attention and expert workers"
)]
struct Cli {
    /// Compute threads (model math runs on a dedicated pool of this size).
    #[arg(long, global = true, env = "EXPERTMESH_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, create and run model checkpoints.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Greedy-generate from a prompt of token ids with the in-process engine.
    Generate(commands::generate::GenerateArgs),
    /// Throughput and memory-bandwidth benchmarks (ratios against baselines measured in the same run).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool =
        match rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("compute-{i}")).build() {
            Ok(pool) => pool,
            Err(e) => {
                eprintln!("error: cannot start {threads} compute threads: {e}");
                std::process::exit(2);
            }
        };
    // The command runs on a compute thread: the model's parallel kernels then split work with
    // the pool's other threads directly instead of waking them from a foreign thread each time.
    let result = pool.install(|| match cli.command {
        Command::Model(cmd) => commands::model::run(cmd),
        Command::Generate(args) => commands::generate::run(args),
        Command::Bench(args) => bench::run(args),
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
