//! Starting and stopping an attention worker: listen, serve the engine service, announce the
//! worker with its load (refreshed while it runs), and on shutdown go not-ready, withdraw, let
//! running sequences finish within the drain deadline, then stop.

use expertmesh_proto::v1::engine_service_server::EngineServiceServer;
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::registry::{Load, Registry, Role, Topology, WorkerRecord};
use expertmesh_runtime::serve;
use expertmesh_runtime::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::info;

use crate::scheduler::Scheduler;
use crate::service::EngineServiceImpl;

pub struct AttentionWorkerOptions {
    pub listen: String,
    pub advertise: Option<String>,
    pub id: Option<String>,
    pub topology: Topology,
    pub drain: Duration,
    /// Bytes of attention-side weights (announced).
    pub resident_bytes: u64,
    /// Readiness beyond "listening" (e.g. every expert has a live replica); checked every tick.
    pub ready: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

pub struct RunningAttentionWorker {
    pub id: String,
    pub addr: SocketAddr,
    pub endpoint: String,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), ServiceError>>,
}

impl RunningAttentionWorker {
    pub async fn stop(self) -> Result<(), ServiceError> {
        self.shutdown.trigger();
        self.task.await.map_err(|e| ServiceError::Internal(format!("attention worker task: {e}")))?
    }
}

pub async fn start(
    scheduler: Arc<Scheduler>,
    opts: AttentionWorkerOptions,
    registry: Arc<dyn Registry>,
    shutdown: Shutdown,
) -> Result<RunningAttentionWorker, ServiceError> {
    let listener = serve::bind(&opts.listen)?;
    let addr = listener.addr;
    let endpoint = serve::advertised_endpoint(addr, opts.advertise.as_deref());
    let id = opts.id.clone().unwrap_or_else(|| format!("attention-{}", addr.port()));
    let service = EngineServiceImpl::new(scheduler.clone(), id.clone(), shutdown.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    let extra_ready = opts.ready.clone().unwrap_or_else(|| Arc::new(|| true));
    let engine = scheduler.clone();
    let is_ready = move || engine.is_alive() && extra_ready();
    // The status last published; the task below keeps it in step with `is_ready`.
    let mut ready = is_ready();
    set_health(&health, ready).await;
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(EngineServiceServer::new(service))
            .serve_with_incoming_shutdown(listener.incoming, async move {
                let _ = drain_rx.await;
            }),
    );
    let template = WorkerRecord {
        id: id.clone(),
        role: Role::Attention,
        endpoint: endpoint.clone(),
        topology: opts.topology.clone(),
        experts: None,
        resident_bytes: opts.resident_bytes,
        load: Load::default(),
    };
    let record = move |load: Load| WorkerRecord { load, ..template.clone() };
    let capacity = scheduler.options().max_running as u32;
    let load = move |s: &Scheduler| {
        let (running, waiting) = s.load();
        Load { running: running as u32, waiting: waiting as u32, capacity }
    };
    // The record is in the registry only while the worker can serve: gateways route to
    // registered workers, so one whose experts are not all covered yet (or whose engine stopped)
    // gets no requests, and a gateway with no such worker reports itself not ready.
    if ready {
        registry.announce(record(load(&scheduler))).await?;
    }
    info!(%id, %endpoint, ready, "attention worker serving");

    let task_id = id.clone();
    let drain = opts.drain;
    let stopping = shutdown.clone();
    let task = tokio::spawn(async move {
        // Refresh the announced load while serving (the gateway routes by it).
        let mut last = load(&scheduler);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stopping.wait() => break,
                _ = tick.tick() => {
                    let now = load(&scheduler);
                    if is_ready() != ready {
                        ready = !ready;
                        set_health(&health, ready).await;
                        let _ = if ready {
                            registry.announce(record(now.clone())).await
                        } else {
                            registry.withdraw(&task_id).await
                        };
                    } else if ready && now != last {
                        let _ = registry.announce(record(now.clone())).await;
                    }
                    last = now;
                }
            }
        }
        set_health(&health, false).await;
        let withdrawn = registry.withdraw(&task_id).await;
        // Let admitted and queued sequences finish, up to the deadline.
        let deadline = tokio::time::Instant::now() + drain;
        while scheduler.load() != (0, 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Whatever is left fails with UNAVAILABLE (the gateway resubmits it elsewhere); the
        // engine thread ends after its current step, while the runtime it calls experts on lives.
        let engine = scheduler.clone();
        let _ = tokio::task::spawn_blocking(move || engine.stop()).await;
        let _ = drain_tx.send(());
        if tokio::time::timeout(Duration::from_millis(500), &mut server).await.is_err() {
            server.abort();
        }
        info!(id = %task_id, "attention worker stopped");
        withdrawn
    });
    Ok(RunningAttentionWorker { id, addr, endpoint, shutdown, task })
}

/// Readiness as seen by `grpc.health.v1` clients (the overall status "" and the engine service).
async fn set_health(health: &tonic_health::server::HealthReporter, ready: bool) {
    info!(ready, "engine readiness");
    let status = if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.set_service_status("", status).await;
    health.set_service_status(ENGINE_SERVICE, status).await;
}

/// The engine service's full name (what health checks ask about).
pub const ENGINE_SERVICE: &str = "expertmesh.v1.EngineService";
