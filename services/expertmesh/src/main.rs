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
    /// Log lines as text or as JSON objects (one per line); `RUST_LOG` filters.
    #[arg(long, global = true, env = "EXPERTMESH_LOG_FORMAT", default_value = "text")]
    log_format: expertmesh_runtime::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, create and run model checkpoints.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// The whole cluster in one process (expert workers + attention worker over loopback gRPC),
    /// answering one request.
    Local(commands::local::LocalArgs),
    /// Complete a text prompt through a gateway (gRPC), streaming the answer.
    Complete(commands::client::ClientArgs),
    /// Send one chat message through a gateway (gRPC), streaming the answer.
    Chat(commands::client::ClientArgs),
    /// The OpenAI-compatible HTTP API in front of the attention workers.
    Gateway(commands::gateway::GatewayCommand),
    /// Serve a shard of the routed experts.
    Expert(commands::expert::ExpertArgs),
    /// Serve the engine (attention, scheduler, sampling), reaching experts through the registry.
    Attention(commands::attention::AttentionArgs),
    /// Greedy-generate from a prompt of token ids with the in-process engine.
    Generate(commands::generate::GenerateArgs),
    /// Throughput and memory-bandwidth benchmarks (ratios against baselines measured in the same run).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    expertmesh_runtime::logging::init(cli.log_format);
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if let Err(e) =
        rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("compute-{i}")).build_global()
    {
        eprintln!("error: cannot start {threads} compute threads: {e}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Model(cmd) => on_compute_pool(move || commands::model::run(cmd)),
        Command::Generate(args) => on_compute_pool(move || commands::generate::run(args)),
        Command::Bench(args) => on_compute_pool(move || bench::run(args)),
        Command::Local(args) => commands::local::run(args),
        Command::Expert(args) => commands::expert::run(args),
        Command::Gateway(args) => commands::gateway::run(args),
        Command::Complete(args) => commands::client::complete(args),
        Command::Chat(args) => commands::client::chat(args),
        Command::Attention(args) => commands::attention::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs a one-shot command on a compute thread: the model's parallel kernels then split work with
/// the pool's other threads directly instead of waking them from a foreign thread each time.
fn on_compute_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    rayon::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv().expect("the command panicked")
}
