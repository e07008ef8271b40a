//! `expertmesh.v1.ExpertService` over an [`ExpertStore`].

use expertmesh_model::engine::ExpertStore;
use expertmesh_proto::v1::expert_service_server::ExpertService;
use expertmesh_proto::v1::{CallError, ForwardRequest, ForwardResponse, ShardInfo, ShardInfoRequest};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::metrics::{ErrorKind, ExpertWorkerMetrics};
use expertmesh_runtime::shutdown::Shutdown;
use expertmesh_runtime::trace::to_hex;
use expertmesh_runtime::wire;
use prost::Message;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::request::ForwardCall;

/// Calls of at most this many tokens whose routed experts hold at most this many weight bytes run
/// on the task that received them, not on the compute pool. The hand-offs to the pool and back
/// (two thread wake-ups) cost more than such a product (tens of µs: 1 MiB of bf16 weights at
/// ~12 GB/s is ~85 µs), and a batch-1 decode of a small model makes one such call per shard per
/// MoE layer: +8–24 % distributed batch-1 decode on the tiny model. Larger calls (any expert of a
/// real V4 model, or many tokens: batch 32 measured 4–11 % slower inline, on one thread) keep the
/// pool, so a receiving thread never blocks for long.
const INLINE_MAX_TOKENS: usize = 4;
const INLINE_MAX_WEIGHT_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct ExpertServiceImpl {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<ExpertStore>,
    /// Where the math runs (`None`: the global pool). Local mode gives expert workers their own
    /// pool: the engine's threads block while they wait for expert replies.
    pool: Option<Arc<rayon::ThreadPool>>,
    shutdown: Shutdown,
    worker_id: String,
    max_tokens: usize,
    metrics: ExpertWorkerMetrics,
}

impl ExpertServiceImpl {
    pub fn new(
        store: Arc<ExpertStore>,
        worker_id: String,
        max_tokens: usize,
        pool: Option<Arc<rayon::ThreadPool>>,
        shutdown: Shutdown,
        per_layer_metrics: bool,
    ) -> Self {
        let held: Vec<(usize, usize)> = store.held().collect();
        let metrics = expertmesh_runtime::metrics::expert().worker(&worker_id, &held, per_layer_metrics);
        metrics.resident_bytes.set(store.resident_bytes() as i64);
        let inner = Inner { store, pool, shutdown, worker_id, max_tokens, metrics };
        ExpertServiceImpl { inner: Arc::new(inner) }
    }

    /// One call, counted in the worker's metrics whichever way it ends.
    async fn call(&self, r: ForwardRequest) -> Result<ForwardResponse, ServiceError> {
        let arrived = Instant::now();
        let m = &self.inner.metrics;
        m.received_bytes.inc_by(r.encoded_len() as u64);
        let result = self.compute(r, arrived).await;
        match &result {
            Ok(reply) => {
                m.sent_bytes.inc_by(reply.encoded_len() as u64);
                m.forward_seconds.observe(arrived.elapsed().as_secs_f64());
            }
            Err(e) => m.failed(ErrorKind::of_code(e.code())),
        }
        result
    }

    async fn compute(&self, r: ForwardRequest, arrived: Instant) -> Result<ForwardResponse, ServiceError> {
        let inner = &self.inner;
        let call_id = r.call_id;
        if !r.trace_ids.is_empty() {
            let traces: Vec<String> = r.trace_ids.iter().map(|t| to_hex(t)).collect();
            tracing::debug!(worker = %inner.worker_id, layer = r.layer, trace_ids = ?traces, "forward call");
        }
        let call = ForwardCall::parse(r, &inner.store, &inner.worker_id, inner.max_tokens)?;
        let (layer, tokens, dtype) = (call.layer, call.tokens, call.output_dtype);
        let inline = call.tokens <= INLINE_MAX_TOKENS
            && inner.store.call_weight_bytes(call.layer, &call.routes) <= INLINE_MAX_WEIGHT_BYTES;
        let compute = if inline { ExpertStore::compute_here } else { ExpertStore::compute };
        let this = self.inner.clone();
        let run = move || {
            this.metrics.queue_seconds.observe(arrived.elapsed().as_secs_f64());
            let out = compute(&this.store, call.layer, &call.hidden, &call.routes);
            if out.is_ok() {
                this.metrics.routed(call.layer, &call.routes.experts);
            }
            out
        };
        let out = if inline {
            run()
        } else {
            // The math runs on the compute pool; this task only waits. A call whose caller has
            // gone by the time the pool reaches it (the engine timed out, or cancelled the
            // stream) is skipped: an overloaded worker must not spend itself on abandoned work.
            let (tx, rx) = oneshot::channel();
            let worker = self.inner.clone();
            let job = move || {
                if tx.is_closed() {
                    return worker.metrics.failed(ErrorKind::Cancelled);
                }
                let _ = tx.send(run());
            };
            match &inner.pool {
                Some(pool) => pool.spawn(job),
                None => rayon::spawn(job),
            }
            rx.await.map_err(|_| ServiceError::Internal("compute task ended without a result".into()))?
        };
        let out = out.map_err(|e| ServiceError::Internal(format!("layer {layer}: {e}")))?;
        inner.metrics.calls.inc();
        inner.metrics.tokens.inc_by(tokens as u64);
        Ok(ForwardResponse { call_id, output: Some(wire::encode(&out, tokens, inner.store.dim(), dtype)), error: None })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ForwardResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for ExpertServiceImpl {
    async fn forward(&self, request: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        Ok(Response::new(self.call(request.into_inner()).await?))
    }

    type ForwardStreamStream = ResponseStream;

    /// Each call on the stream runs as soon as it arrives; replies come back as they finish,
    /// matched by `call_id`. A bad call fails only its own reply. On shutdown the stream stops
    /// taking calls, answers those in flight, and ends (the engine reopens it elsewhere).
    async fn forward_stream(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let stopping = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = incoming.next() => m,
                    _ = stopping.wait() => None,
                };
                let Some(Ok(r)) = msg else { break };
                let (this, tx) = (this.clone(), tx.clone());
                tokio::spawn(async move {
                    let call_id = r.call_id;
                    // The caller cancelling the stream drops its replies: the calls on it end too
                    // (those still waiting for the pool are then skipped there).
                    let reply = tokio::select! {
                        reply = this.call(r) => reply,
                        _ = tx.closed() => return,
                    };
                    let reply = reply.unwrap_or_else(|e| ForwardResponse {
                        call_id,
                        output: None,
                        error: Some(CallError { code: e.code() as i32, message: e.to_string() }),
                    });
                    let _ = tx.send(Ok(reply)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_shard_info(&self, _: Request<ShardInfoRequest>) -> Result<Response<ShardInfo>, Status> {
        let s = &self.inner.store;
        let (layers, experts) = s.held().map(|(l, e)| (l as u32, e as u32)).unzip();
        Ok(Response::new(ShardInfo {
            worker_id: self.inner.worker_id.clone(),
            dim: s.dim() as u32,
            n_blocks: s.n_blocks() as u32,
            n_routed_experts: s.n_experts() as u32,
            layers,
            experts,
            resident_bytes: s.resident_bytes() as u64,
        }))
    }
}
