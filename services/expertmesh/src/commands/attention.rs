//! `expertmesh attention`: serve the engine, reaching the expert workers found in the registry.

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_attention::placement::PlacementOverride;
use expertmesh_attention::worker::AttentionWorkerOptions;
use expertmesh_attention::{EngineOptions, RemoteExperts, RemoteOptions, Scheduler};
use expertmesh_model::engine::{LoadOptions, Model};
use expertmesh_runtime::metrics::{self, ModelDescription};
use expertmesh_runtime::registry::{Registry, Topology};
use expertmesh_runtime::shutdown::Shutdown;
use expertmesh_runtime::wire::WireDType;
use std::sync::Arc;
use std::time::Duration;

use super::ModelSource;
use super::cluster::{RegistryArgs, ServeArgs, runtime};

#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Element type of activations sent to expert workers (bf16 halves the bytes).
    #[arg(long, env = "EXPERTMESH_WIRE_DTYPE", default_value = "bf16")]
    pub wire_dtype: WireDType,
    /// Deadline of one expert call, milliseconds (then the tokens go to another replica).
    #[arg(long, env = "EXPERTMESH_EXPERT_TIMEOUT_MS", default_value_t = 5000)]
    pub expert_timeout_ms: u64,
    /// JSON file of placement overrides: `{"pin": {"7": ["expert-a"]}, "exclude": ["expert-c"]}`.
    #[arg(long, env = "EXPERTMESH_PLACEMENT")]
    pub placement: Option<std::path::PathBuf>,
    /// Send each expert call as its own RPC instead of on one long-lived stream per worker.
    #[arg(long, env = "EXPERTMESH_UNARY_EXPERT_CALLS")]
    pub unary_expert_calls: bool,
    /// Sequences decoded together at most.
    #[arg(long, env = "EXPERTMESH_MAX_RUNNING", default_value_t = 256)]
    pub max_running: usize,
    /// Prompt tokens prefilled per step across sequences.
    #[arg(long, env = "EXPERTMESH_PREFILL_CHUNK", default_value_t = 2048)]
    pub prefill_chunk: usize,
    /// Memory for sequence state (KV caches), MiB.
    #[arg(long, env = "EXPERTMESH_KV_BUDGET_MIB", default_value_t = 4096)]
    pub kv_budget_mib: u64,
    /// Requests queued for admission at most.
    #[arg(long, env = "EXPERTMESH_MAX_WAITING", default_value_t = 4096)]
    pub max_waiting: usize,
}

impl EngineArgs {
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            max_running: self.max_running.max(1),
            prefill_chunk: self.prefill_chunk.max(1),
            kv_budget_bytes: self.kv_budget_mib << 20,
            max_waiting: self.max_waiting,
        }
    }

    pub fn overrides(&self) -> Result<PlacementOverride> {
        let Some(path) = &self.placement else { return Ok(PlacementOverride::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("--placement {}", path.display()))?;
        PlacementOverride::from_json(&text).map_err(|e| anyhow::anyhow!("--placement {}: {e}", path.display()))
    }

    /// The engine over remote experts found through `registry`.
    pub fn scheduler(
        &self,
        model: Model,
        registry: &dyn Registry,
        topology: Topology,
        rt: tokio::runtime::Handle,
        model_name: &str,
    ) -> Result<(Arc<Scheduler>, Arc<RemoteExperts>)> {
        let overrides = self.overrides()?;
        let cfg = model.config();
        let opts = RemoteOptions {
            wire: self.wire_dtype,
            streaming: !self.unary_expert_calls,
            call_timeout: Duration::from_millis(self.expert_timeout_ms),
            topology,
            overrides,
            // The blocks this engine runs (MTP only when loaded): readiness needs exactly these.
            n_blocks: if model.has_mtp() { cfg.n_blocks() } else { cfg.n_layers },
            n_experts: cfg.n_routed_experts,
            dim: cfg.dim,
        };
        let engine = self.engine_options();
        metrics::engine().describe(
            &ModelDescription {
                model: model_name,
                layers: cfg.n_layers,
                dim: cfg.dim,
                vocab_size: cfg.vocab_size,
                routed_experts: cfg.n_routed_experts,
                experts_per_token: cfg.n_activated_experts,
            },
            engine.kv_budget_bytes,
            engine.max_running,
            engine.max_waiting,
            engine.prefill_chunk,
        );
        let remote = Arc::new(RemoteExperts::new(rt, registry.subscribe(), opts));
        let scheduler = Arc::new(Scheduler::start(Arc::new(model), remote.clone(), engine));
        Ok((scheduler, remote))
    }
}

#[derive(Args)]
pub struct AttentionArgs {
    #[command(flatten)]
    source: ModelSource,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(a: AttentionArgs) -> Result<()> {
    let ckpt = a.source.open()?;
    let model = Model::load(&ckpt, LoadOptions { mtp: false, ..LoadOptions::default() })?;
    drop(ckpt);
    let resident_bytes = model.resident_bytes() as u64;
    let rt = runtime()?;
    rt.block_on(async {
        let registry = a.registry.build()?;
        let shutdown = Shutdown::new();
        tokio::spawn(shutdown.clone().on_signals());
        let model_name = a.source.name();
        let (scheduler, remote) = a.engine.scheduler(
            model,
            registry.as_ref(),
            a.serve.topology(),
            tokio::runtime::Handle::current(),
            &model_name,
        )?;
        let (engine, placement) = (scheduler.clone(), remote.clone());
        let metrics = a
            .serve
            .metrics(&registry, &shutdown, move || engine.is_alive() && placement.placement().covers_all())
            .await?;
        let opts = AttentionWorkerOptions {
            listen: a.serve.listen.clone(),
            advertise: a.serve.advertise.clone(),
            id: a.serve.id.clone(),
            topology: a.serve.topology(),
            drain: a.serve.drain(),
            resident_bytes,
            ready: Some(Arc::new(move || remote.placement().covers_all())),
        };
        let worker = expertmesh_attention::worker::start(scheduler, opts, registry.clone(), shutdown).await?;
        println!("attention worker {} listening on {} (metrics {})", worker.id, worker.endpoint, metrics.url);
        let result = worker.task.await;
        registry.close().await;
        Ok(result??)
    })
}
