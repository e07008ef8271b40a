//! `expertmesh expert`: serve a shard of the routed experts.

use anyhow::Result;
use clap::Args;
use expertmesh_expert::{DEFAULT_MAX_TOKENS, ExpertWorkerOptions};
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions};
use expertmesh_runtime::shutdown::Shutdown;
use std::sync::Arc;

use super::ModelSource;
use super::cluster::{RegistryArgs, ServeArgs, runtime};

#[derive(Args)]
pub struct ExpertArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Expert ids held, e.g. 0-7,12 (default: all).
    #[arg(long, env = "EXPERTMESH_EXPERTS")]
    experts: Option<String>,
    /// Blocks held (main layers and MTP by id), e.g. 3-10 (default: all).
    #[arg(long, env = "EXPERTMESH_LAYERS")]
    layers: Option<String>,
    /// Most tokens accepted in one call.
    #[arg(long, env = "EXPERTMESH_MAX_TOKENS_PER_CALL", default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens_per_call: usize,
    /// Also count routed tokens per (layer, expert), not only per expert (layers × experts series).
    #[arg(long, env = "EXPERTMESH_METRICS_PER_LAYER")]
    metrics_per_layer: bool,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn selection(experts: &Option<String>, layers: &Option<String>) -> Result<ExpertSelection> {
    let parse = |s: &Option<String>| s.as_deref().map(ExpertSelection::parse_ids).transpose();
    Ok(ExpertSelection {
        experts: parse(experts).map_err(|e| anyhow::anyhow!("--experts: {e}"))?,
        layers: parse(layers).map_err(|e| anyhow::anyhow!("--layers: {e}"))?,
        pairs: None,
    })
}

pub fn run(a: ExpertArgs) -> Result<()> {
    let selection = selection(&a.experts, &a.layers)?;
    let ckpt = a.source.open()?;
    let store = Arc::new(ExpertStore::load(&ckpt, &selection, LoadOptions::default().sim)?);
    drop(ckpt);
    let rt = runtime()?;
    rt.block_on(async {
        let registry = a.registry.build()?;
        let shutdown = Shutdown::new();
        tokio::spawn(shutdown.clone().on_signals());
        let opts = ExpertWorkerOptions {
            listen: a.serve.listen.clone(),
            advertise: a.serve.advertise.clone(),
            id: a.serve.id.clone(),
            topology: a.serve.topology(),
            selection,
            max_tokens: a.max_tokens_per_call,
            drain: a.serve.drain(),
            pool: None,
            per_layer_metrics: a.metrics_per_layer,
        };
        let metrics = a.serve.metrics(&registry, &shutdown, || true).await?;
        let worker = expertmesh_expert::start(store.clone(), opts, registry.clone(), shutdown).await?;
        // Scripts and tests read this line to learn the ports.
        println!(
            "expert worker {} listening on {} ({} experts, {} weight bytes; metrics {})",
            worker.id,
            worker.endpoint,
            store.held().count(),
            store.resident_bytes(),
            metrics.url
        );
        let result = worker.task.await;
        registry.close().await;
        Ok(result??)
    })
}
