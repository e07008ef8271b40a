//! `expertmesh.v1.EngineService`: validated requests into the scheduler, events back as a stream.

use expertmesh_model::engine::SamplingParams;
use expertmesh_proto::v1::engine_service_server::EngineService;
use expertmesh_proto::v1::generate_event::Event;
use expertmesh_proto::v1::{
    Admitted, CancelRequest, CancelResponse, EngineStats, Finished, GenerateEvent, GenerateRequest, StatsRequest,
    TokenEvent,
};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::metrics::{ErrorKind, RequestRole, role_metrics};
use expertmesh_runtime::shutdown::Shutdown;
use expertmesh_runtime::trace::TraceContext;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::scheduler::{EngineEvent, FinishReason, GenerateParams, Scheduler};

#[derive(Clone)]
pub struct EngineServiceImpl {
    scheduler: Arc<Scheduler>,
    /// Once triggered, new requests are refused (the worker is draining).
    shutdown: Shutdown,
    next_id: Arc<AtomicU64>,
    worker_id: String,
}

impl EngineServiceImpl {
    pub fn new(scheduler: Arc<Scheduler>, worker_id: String, shutdown: Shutdown) -> Self {
        EngineServiceImpl { scheduler, shutdown, next_id: Arc::new(AtomicU64::new(0)), worker_id }
    }

    fn params(&self, r: GenerateRequest, trace: Option<TraceContext>) -> Result<GenerateParams, ServiceError> {
        let s = r.sampling.ok_or_else(|| ServiceError::invalid("sampling", "missing (max_tokens is required)"))?;
        let id = if r.request_id.is_empty() {
            format!("{}-{}", self.worker_id, self.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            r.request_id
        };
        // An unset top_p (0) means no nucleus cut, as in most APIs.
        let top_p = if s.top_p == 0.0 { 1.0 } else { s.top_p };
        let seed = s.seed.unwrap_or_else(|| fnv(&id));
        Ok(GenerateParams {
            id,
            prompt: r.prompt_tokens,
            sampling: SamplingParams { temperature: s.temperature, top_k: s.top_k as usize, top_p },
            seed,
            max_tokens: s.max_tokens as usize,
            stop_tokens: s.stop_token_ids,
            logprobs: s.logprobs,
            trace,
        })
    }
}

/// A default seed per request id (distinct requests sample independently).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn to_proto(e: EngineEvent, request_id: &str) -> Result<GenerateEvent, Status> {
    let event = match e {
        EngineEvent::Admitted { queue_seconds } => {
            Event::Admitted(Admitted { request_id: request_id.into(), queue_seconds })
        }
        EngineEvent::Token { token, index, logprob } => {
            Event::Token(TokenEvent { token_id: token, index: index as u32, logprob })
        }
        EngineEvent::Finished { reason, prompt_tokens, completion_tokens } => Event::Finished(Finished {
            reason: match reason {
                FinishReason::Stop => expertmesh_proto::v1::FinishReason::Stop,
                FinishReason::Length => expertmesh_proto::v1::FinishReason::Length,
                FinishReason::Cancelled => expertmesh_proto::v1::FinishReason::Cancelled,
            } as i32,
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: completion_tokens as u32,
        }),
        EngineEvent::Failed(e) => return Err(e.into()),
    };
    Ok(GenerateEvent { event: Some(event) })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl EngineService for EngineServiceImpl {
    type GenerateStream = EventStream;

    /// Dropping the returned stream (the caller went away) drops the receiver, which the engine
    /// notices before its next step and cancels the sequence.
    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let trace = TraceContext::from_metadata(request.metadata());
        let submitted = if self.shutdown.is_triggered() {
            Err(ServiceError::Unavailable(format!("{} is shutting down", self.worker_id)))
        } else {
            self.params(request.into_inner(), trace).and_then(|p| {
                let id = p.id.clone();
                Ok((id, self.scheduler.submit(p)?))
            })
        };
        let (id, mut rx) = submitted.inspect_err(|e| {
            role_metrics(RequestRole::Attention).failed(ErrorKind::of_code(e.code()));
            let trace_id = trace.map_or_else(|| "-".into(), |t| t.trace_id_hex());
            tracing::info!(%trace_id, error = %e, "request refused");
        })?;
        let stream = async_stream(move |tx| async move {
            loop {
                let e = tokio::select! {
                    e = rx.recv() => e,
                    // The caller went away: dropping `rx` tells the engine to cancel.
                    _ = tx.closed() => break,
                };
                let Some(e) = e else {
                    // The engine dropped the sequence without a final event (it stopped).
                    let _ = tx.send(Err(Status::unavailable("the engine stopped before finishing the request"))).await;
                    break;
                };
                let last = matches!(e, EngineEvent::Finished { .. } | EngineEvent::Failed(_));
                if tx.send(to_proto(e, &id)).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(ServiceError::invalid("request_id", "empty").into());
        }
        let found = self.scheduler.cancel(&id).await.unwrap_or(false);
        Ok(Response::new(CancelResponse { found }))
    }

    async fn get_stats(&self, _: Request<StatsRequest>) -> Result<Response<EngineStats>, Status> {
        let s = &self.scheduler.stats;
        let o = self.scheduler.options();
        Ok(Response::new(EngineStats {
            running: s.running.load(Ordering::Relaxed) as u32,
            waiting: s.waiting.load(Ordering::Relaxed) as u32,
            kv_bytes_used: s.kv_bytes_used.load(Ordering::Relaxed),
            kv_bytes_budget: o.kv_budget_bytes,
            steps: s.steps.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            max_batch: o.max_running as u32,
        }))
    }
}

/// A stream fed by a task; the task ends when the stream is dropped (its sends fail).
fn async_stream<F, Fut>(producer: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<GenerateEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
