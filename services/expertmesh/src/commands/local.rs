//! `expertmesh local`: the whole cluster in one process — N expert workers and an attention
//! worker talking real gRPC on loopback through the in-memory registry — answering one request
//! given on the command line and printing tokens as they come.

use anyhow::{Context, Result, bail};
use clap::Args;
use expertmesh_attention::worker::AttentionWorkerOptions;
use expertmesh_expert::{DEFAULT_MAX_TOKENS, ExpertWorkerOptions};
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions, Model};
use expertmesh_proto::v1::engine_service_client::EngineServiceClient;
use expertmesh_proto::v1::generate_event::Event;
use expertmesh_proto::v1::{GenerateRequest, SamplingParams};
use expertmesh_runtime::registry::{MemoryRegistry, Registry, Role, Topology, wait_for};
use expertmesh_runtime::shutdown::Shutdown;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::attention::EngineArgs;
use super::client::print_events;
use super::cluster::runtime;
use super::gateway::GatewayArgs;
use super::{ModelSource, parse_tokens};
use expertmesh_client::{Client, Message, Options};
use expertmesh_gateway::server;

#[derive(Args)]
pub struct LocalArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Expert workers to start (the routed experts are split evenly between them).
    #[arg(long, env = "EXPERTMESH_SHARDS", default_value_t = 4)]
    shards: usize,
    /// Prompt token ids, comma separated.
    #[arg(long, default_value = "0,17,5,300,42")]
    prompt_tokens: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// A `tokenizer.json`: also start the gateway (OpenAI HTTP API and gRPC) and send `--prompt`
    /// through it as a chat message. The model's vocabulary must cover the tokenizer's
    /// (`--vocab-size 129280` for DeepSeek's).
    #[arg(long, env = "EXPERTMESH_TOKENIZER")]
    tokenizer: Option<std::path::PathBuf>,
    /// The chat message sent through the gateway (with --tokenizer).
    #[arg(long, default_value = "Hello! What can a mixture-of-experts model do?")]
    prompt: String,
    /// With --tokenizer: keep the cluster serving (HTTP on --http-listen, gRPC on --grpc-listen)
    /// until Ctrl-C instead of answering --prompt and exiting.
    #[arg(long)]
    serve: bool,
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_listen: String,
    #[arg(long, default_value = "127.0.0.1:8001")]
    grpc_listen: String,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Starts the gateway in this process and answers `--prompt` through it over gRPC (or serves).
async fn through_gateway(
    a: &LocalArgs,
    tokenizer: &std::path::Path,
    cfg: &expertmesh_model::ModelConfig,
    registry: &dyn Registry,
    shutdown: Shutdown,
) -> Result<()> {
    let args = GatewayArgs {
        tokenizer: tokenizer.to_path_buf(),
        http_listen: a.http_listen.clone(),
        grpc_listen: a.grpc_listen.clone(),
        model_name: "deepseek-v4".into(),
        api_keys: Vec::new(),
        max_concurrent: 1024,
        max_tokens_limit: 32768,
        default_max_tokens: expertmesh_gateway::openai::Limits::default().default_max_tokens,
        max_prompt_tokens: 65536,
        trace_sample_ratio: 1.0,
        eos_token_id: cfg.eos_token_id,
    };
    let state = args.state(registry)?;
    if state.tokenizer.vocab_size() > cfg.vocab_size {
        bail!(
            "--tokenizer has {} tokens but the model's vocabulary has {}: pass --vocab-size 129280 (DeepSeek's)",
            state.tokenizer.vocab_size(),
            cfg.vocab_size
        );
    }
    let grpc = server::start_grpc(state.clone(), &args.grpc_listen, shutdown.clone()).await?;
    let http = server::start(state, &args.http_listen, shutdown.clone()).await?;
    eprintln!("gateway: OpenAI HTTP API at {}/v1, gRPC at {}", http.url, grpc.url);
    if a.serve {
        eprintln!("serving until Ctrl-C");
        shutdown.clone().on_signals().await;
    } else {
        let mut client = Client::connect(&grpc.url).await?;
        let options =
            Options { max_tokens: a.max_tokens, temperature: Some(a.temperature), seed: a.seed, ..Options::default() };
        eprintln!("> {}", a.prompt);
        print_events(client.chat(vec![Message::user(&a.prompt)], true, options).await?).await?;
    }
    shutdown.trigger();
    http.task.await??;
    grpc.task.await??;
    Ok(())
}

/// Splits `0..n` into `parts` contiguous ranges as even as possible.
pub fn even_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    (0..parts).map(|i| i * n / parts..(i + 1) * n / parts).collect()
}

pub fn run(a: LocalArgs) -> Result<()> {
    let prompt = parse_tokens(&a.prompt_tokens)?;
    let ckpt = a.source.open()?;
    let cfg = ckpt.config().clone();
    if a.shards == 0 || a.shards > cfg.n_routed_experts {
        bail!("--shards: {} is not in 1..={}", a.shards, cfg.n_routed_experts);
    }
    let opts = LoadOptions { mtp: false, ..LoadOptions::default() };
    let model = Model::load(&ckpt, opts)?;
    let stores = even_ranges(cfg.n_routed_experts, a.shards)
        .into_iter()
        .map(|r| Ok((r.clone(), Arc::new(ExpertStore::load(&ckpt, &ExpertSelection::experts(r), opts.sim)?))))
        .collect::<Result<Vec<_>>>()?;
    drop(ckpt);
    let rt = runtime()?;
    rt.block_on(async {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        expertmesh_runtime::metrics::watch_registry(registry.clone());
        let shutdown = Shutdown::new();
        let mut experts = Vec::new();
        // The expert workers' math gets its own pool: the engine's compute threads block while
        // they wait for expert replies, and must not be the only threads that could answer.
        let threads = rayon::current_num_threads();
        let expert_pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("experts-{i}")).build()?);
        for (range, store) in stores {
            let opts = ExpertWorkerOptions {
                listen: "127.0.0.1:0".into(),
                advertise: None,
                id: None,
                topology: Topology::default(),
                selection: ExpertSelection::experts(range.clone()),
                max_tokens: DEFAULT_MAX_TOKENS,
                drain: Duration::from_secs(5),
                pool: Some(expert_pool.clone()),
                per_layer_metrics: false,
            };
            let w = expertmesh_expert::start(store, opts, registry.clone(), shutdown.clone()).await?;
            eprintln!("expert worker {} holds experts {range:?} at {}", w.id, w.endpoint);
            experts.push(w);
        }
        let resident = model.resident_bytes() as u64;
        let (scheduler, remote) =
            a.engine.scheduler(model, registry.as_ref(), Topology::default(), tokio::runtime::Handle::current(), &a.source.name())?;
        let attention_opts = AttentionWorkerOptions {
            listen: "127.0.0.1:0".into(),
            advertise: None,
            id: None,
            topology: Topology::default(),
            drain: Duration::from_secs(5),
            resident_bytes: resident,
            ready: None,
        };
        let attention =
            expertmesh_attention::worker::start(scheduler, attention_opts, registry.clone(), shutdown.clone()).await?;
        let mut view = registry.subscribe();
        let (ready, _) = wait_for(&mut view, Duration::from_secs(5), |v| v.of_role(Role::Expert).count() == a.shards).await;
        if !ready {
            bail!("expert workers did not register");
        }
        eprintln!("attention worker {} at {}", attention.id, attention.endpoint);
        if let Some(tokenizer) = &a.tokenizer {
            let result = through_gateway(&a, tokenizer, &cfg, registry.as_ref(), shutdown.clone()).await;
            shutdown.trigger();
            attention.task.await??;
            for w in experts {
                w.task.await??;
            }
            return result;
        }

        let mut client = EngineServiceClient::connect(attention.endpoint.clone()).await.context("connecting to the engine")?;
        let request = GenerateRequest {
            request_id: String::new(),
            prompt_tokens: prompt.clone(),
            sampling: Some(SamplingParams {
                temperature: a.temperature,
                max_tokens: a.max_tokens,
                seed: a.seed,
                stop_token_ids: vec![cfg.eos_token_id],
                ..Default::default()
            }),
        };
        let start = Instant::now();
        let mut stream = client.generate(request).await?.into_inner();
        let mut stdout = std::io::stdout();
        let (mut first, mut generated) = (None, 0usize);
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(Event::Token(t)) => {
                    first.get_or_insert_with(|| start.elapsed());
                    generated += 1;
                    write!(stdout, "{} ", t.token_id)?;
                    stdout.flush()?;
                }
                Some(Event::Finished(f)) => {
                    writeln!(stdout)?;
                    let total = start.elapsed();
                    let first = first.unwrap_or(total);
                    let decode = (total - first).as_secs_f64().max(1e-9);
                    let s = &remote.stats;
                    let per = |b: u64| b as f64 / s.token_layers.load(Ordering::Relaxed).max(1) as f64;
                    eprintln!(
                        "{} prompt + {} generated tokens (finish reason {:?}); first token after {:.3}s, then {:.1} tokens/s; \
                         {:.0} bytes per token per MoE layer on the wire (ideal {:.0}), {} calls",
                        f.prompt_tokens,
                        generated,
                        f.reason(),
                        first.as_secs_f64(),
                        generated.saturating_sub(1) as f64 / decode,
                        per(s.bytes_sent.load(Ordering::Relaxed) + s.bytes_received.load(Ordering::Relaxed)),
                        per(s.ideal_bytes.load(Ordering::Relaxed)),
                        s.calls.load(Ordering::Relaxed),
                    );
                }
                _ => {}
            }
        }
        shutdown.trigger();
        attention.task.await??;
        for w in experts {
            w.task.await??;
        }
        Ok(())
    })
}
