//! The HTTP side port of the workers: `/metrics` for Prometheus and `/health`, `/ready` for
//! Kubernetes probes (the gRPC ports speak `grpc.health.v1` too). The gateway serves the same
//! `/metrics` on its API port.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

use crate::error::ServiceError;
use crate::shutdown::Shutdown;

/// The text exposition format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
pub fn metrics_response() -> Response {
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], super::render()).into_response()
}

pub struct MetricsServer {
    pub addr: SocketAddr,
    /// `http://host:port` (loopback when bound to all interfaces).
    pub url: String,
    pub task: JoinHandle<()>,
}

/// Serves `/metrics`, `/health` (the process is up) and `/ready` (`ready()` says so) on `listen`
/// until `shutdown`.
pub async fn serve(
    listen: &str,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: Shutdown,
) -> Result<MetricsServer, ServiceError> {
    super::init();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServiceError::Unavailable(format!("cannot listen on {listen} for metrics: {e}")))?;
    let addr = listener.local_addr().map_err(|e| ServiceError::Internal(e.to_string()))?;
    let url = crate::serve::advertised_endpoint(addr, None);
    let app =
        Router::new()
            .route("/metrics", get(|| async { metrics_response() }))
            .route("/health", get(|| async { "ok" }))
            .route(
                "/ready",
                get(move || {
                    let ok = ready();
                    async move {
                        if ok { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
                    }
                }),
            );
    let task = tokio::spawn(async move {
        let serving = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await });
        if let Err(e) = serving.await {
            tracing::warn!(error = %e, "metrics server ended");
        }
    });
    Ok(MetricsServer { addr, url, task })
}
