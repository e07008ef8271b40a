//! Starting and stopping an expert worker: listen, announce in the registry, serve, and on
//! shutdown go not-ready, withdraw, then drain in-flight calls within one deadline.

use expertmesh_model::engine::{ExpertSelection, ExpertStore};
use expertmesh_proto::v1::expert_service_server::ExpertServiceServer;
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::registry::{HeldExperts, Registry, Role, Topology, WorkerRecord};
use expertmesh_runtime::serve;
use expertmesh_runtime::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::info;

use crate::service::ExpertServiceImpl;

/// Largest message accepted or sent (a big prefill chunk of a large model's hidden vectors).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

pub struct ExpertWorkerOptions {
    pub listen: String,
    /// URL announced to others (default: the bound address).
    pub advertise: Option<String>,
    /// Registry id (default `expert-<port>`).
    pub id: Option<String>,
    pub topology: Topology,
    pub selection: ExpertSelection,
    pub max_tokens: usize,
    /// How long shutdown waits for in-flight calls.
    pub drain: Duration,
    /// Compute pool for this worker's math (`None`: the process's global pool).
    pub pool: Option<Arc<rayon::ThreadPool>>,
    /// Export routed-token counts per (layer, expert) as well as per expert.
    pub per_layer_metrics: bool,
}

pub struct RunningExpertWorker {
    pub id: String,
    pub addr: SocketAddr,
    pub endpoint: String,
    pub service: ExpertServiceImpl,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), ServiceError>>,
}

impl RunningExpertWorker {
    /// Triggers shutdown and waits for the drain to finish.
    pub async fn stop(self) -> Result<(), ServiceError> {
        self.shutdown.trigger();
        self.task.await.map_err(|e| ServiceError::Internal(format!("expert worker task: {e}")))?
    }
}

fn held(selection: &ExpertSelection) -> HeldExperts {
    let ids = |s: &Option<std::collections::BTreeSet<usize>>| s.as_ref().map(|s| s.iter().map(|&v| v as u32).collect());
    HeldExperts {
        layers: ids(&selection.layers),
        experts: ids(&selection.experts),
        pairs: selection.pairs.as_ref().map(|p| p.iter().map(|&(l, e)| (l as u32, e as u32)).collect()),
    }
}

/// Binds, announces and starts serving; returns once the worker is reachable and registered.
pub async fn start(
    store: Arc<ExpertStore>,
    opts: ExpertWorkerOptions,
    registry: Arc<dyn Registry>,
    shutdown: Shutdown,
) -> Result<RunningExpertWorker, ServiceError> {
    let listener = serve::bind(&opts.listen)?;
    let addr = listener.addr;
    let endpoint = serve::advertised_endpoint(addr, opts.advertise.as_deref());
    let id = opts.id.clone().unwrap_or_else(|| format!("expert-{}", addr.port()));
    let service = ExpertServiceImpl::new(
        store.clone(),
        id.clone(),
        opts.max_tokens,
        opts.pool.clone(),
        shutdown.clone(),
        opts.per_layer_metrics,
    );
    let record = WorkerRecord {
        id: id.clone(),
        role: Role::Expert,
        endpoint: endpoint.clone(),
        topology: opts.topology.clone(),
        experts: Some(held(&opts.selection)),
        resident_bytes: store.resident_bytes() as u64,
        load: Default::default(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ExpertServiceServer<ExpertServiceImpl>>().await;
    let grpc = ExpertServiceServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let stopping = shutdown.clone();
    let router = tonic::transport::Server::builder().add_service(health_service).add_service(grpc);
    let (drain_start_tx, drain_start_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(listener.incoming, async move {
        let _ = drain_start_rx.await;
    }));
    registry.announce(record).await?;
    info!(%id, %endpoint, experts = store.held().count(), resident_bytes = store.resident_bytes(), "expert worker serving");

    let task_id = id.clone();
    let task = tokio::spawn(async move {
        stopping.wait().await;
        // Not ready first (load balancers and engines stop sending), then leave the registry,
        // then drain what is in flight within the deadline.
        health.set_not_serving::<ExpertServiceServer<ExpertServiceImpl>>().await;
        let withdrawn = registry.withdraw(&task_id).await;
        let _ = drain_start_tx.send(());
        match tokio::time::timeout(opts.drain, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(ServiceError::Internal(format!("server: {e}"))),
            Ok(Err(e)) => return Err(ServiceError::Internal(format!("server task: {e}"))),
            Err(_) => {
                tracing::warn!(id = %task_id, "drain deadline passed with calls in flight; closing");
                server.abort();
            }
        }
        info!(id = %task_id, "expert worker stopped");
        withdrawn
    });
    Ok(RunningExpertWorker { id, addr, endpoint, service, shutdown, task })
}
