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
    /// Export spans of sampled traces to this OTLP/gRPC collector (e.g. http://otel-collector:4317).
    #[arg(long, global = true, env = "EXPERTMESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
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
    if let Err(e) = expertmesh_runtime::allocator::tune() {
        eprintln!("warning: allocator settings not applied: {e}");
    }
    let cli = Cli::parse();
    expertmesh_runtime::logging::init(cli.log_format);
    if let Some(endpoint) = &cli.otlp_endpoint {
        let service = format!("expertmesh-{}", cli.command.role());
        if let Err(e) = expertmesh_runtime::trace::export::start(endpoint, &service) {
            eprintln!("error: --otlp-endpoint: {e}");
            std::process::exit(2);
        }
    }
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
    // Spans still queued go out before the process ends.
    expertmesh_runtime::trace::export::flush(std::time::Duration::from_secs(2));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

impl Command {
    /// The service name of this process in traces.
    fn role(&self) -> &'static str {
        match self {
            Command::Gateway(_) => "gateway",
            Command::Attention(_) => "attention",
            Command::Expert(_) => "expert",
            Command::Local(_) => "local",
            _ => "tool",
        }
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
