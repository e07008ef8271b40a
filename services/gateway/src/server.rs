//! Starting the HTTP gateway: bind, serve the OpenAI API, stop gracefully on shutdown (in-flight
//! responses finish; new connections are refused).

use axum::serve::ListenerExt;
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

use expertmesh_proto::v1::inference_server::InferenceServer;

use crate::grpc::InferenceService;
use crate::openai::{AppState, router};

pub struct RunningGateway {
    pub addr: SocketAddr,
    pub url: String,
    pub task: JoinHandle<Result<(), ServiceError>>,
}

/// Serves `expertmesh.v1.Inference` (and `grpc.health.v1`) on `listen`.
pub async fn start_grpc(
    state: Arc<AppState>,
    listen: &str,
    shutdown: Shutdown,
) -> Result<RunningGateway, ServiceError> {
    let listener = expertmesh_runtime::serve::bind(listen)?;
    let addr = listener.addr;
    let url = expertmesh_runtime::serve::advertised_endpoint(addr, None);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<InferenceServer<InferenceService>>().await;
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(InferenceServer::new(InferenceService::new(state)))
            .serve_with_incoming_shutdown(listener.incoming, async move { shutdown.wait().await })
            .await
            .map_err(|e| ServiceError::Internal(format!("grpc server: {e}")))
    });
    Ok(RunningGateway { addr, url, task })
}

pub async fn start(state: Arc<AppState>, listen: &str, shutdown: Shutdown) -> Result<RunningGateway, ServiceError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServiceError::Unavailable(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| ServiceError::Internal(e.to_string()))?;
    let ip = if addr.ip().is_unspecified() { "127.0.0.1".parse().unwrap() } else { addr.ip() };
    let url = format!("http://{}", SocketAddr::new(ip, addr.port()));
    let app = router(state);
    // Small SSE events must not wait for Nagle's timer.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .map_err(|e| ServiceError::Internal(format!("http server: {e}")))
    });
    Ok(RunningGateway { addr, url, task })
}
