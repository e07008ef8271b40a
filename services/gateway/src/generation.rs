//! One generation that survives the loss of its attention worker: if the worker dies or goes
//! away mid-stream, the prompt plus the tokens generated so far are resubmitted to another worker
//! with the remaining budget, and the stream continues — no token lost, none repeated.

use expertmesh_proto::v1::generate_event::Event;
use expertmesh_proto::v1::{FinishReason, GenerateRequest, SamplingParams};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::trace::TraceContext;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Code;
use tracing::Instrument;

use crate::observe::Observer;
use crate::router::EngineRouter;

/// Resubmissions after worker failures, at most.
const MAX_RESUBMITS: usize = 3;

#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    Token { id: u32, logprob: Option<f32> },
    Finished { reason: FinishReason, prompt_tokens: u32, completion_tokens: u32 },
}

#[derive(Clone, Debug)]
pub struct GenRequest {
    /// Sent to the engine (its logs and `Cancel` use it).
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// This generation's span (sent to the engine as its `traceparent`).
    pub trace: TraceContext,
    /// The client's span, if it sent one.
    pub parent: Option<[u8; 8]>,
}

pub type GenItem = Result<GenEvent, ServiceError>;

/// What `drive` reports to the generation's observer: its events; when an attention worker
/// accepted it (validated and queued it: see [`Generation::accepted`]); and when the worker
/// admitted it (it left the queue), which only the metrics use.
enum Update {
    Accepted,
    Admitted,
    Item(GenItem),
}

/// A running generation: a stream of its events, observed for metrics and logs as the caller
/// takes them. Dropping it cancels the work (the engine stream is dropped, which the engine
/// notices).
pub struct Generation {
    rx: mpsc::Receiver<Update>,
    observer: Observer,
    /// An event [`Generation::accepted`] read ahead.
    early: Option<GenItem>,
}

impl Generation {
    /// Waits until an attention worker has accepted the request (validated and queued it), so
    /// that a caller about to stream can still answer a rejection with its own status (400 for a
    /// prompt beyond the context, 429, 503) rather than in a stream that already said 200.
    pub async fn accepted(&mut self) -> Result<(), ServiceError> {
        loop {
            match self.rx.recv().await {
                Some(Update::Accepted) => return Ok(()),
                Some(Update::Admitted) => self.observer.admitted(),
                Some(Update::Item(item)) => {
                    self.observer.see(&item);
                    return match item {
                        Err(e) => Err(e),
                        ok => {
                            self.early = Some(ok);
                            Ok(())
                        }
                    };
                }
                None => return Err(ServiceError::Unavailable("the generation ended before it started".into())),
            }
        }
    }

    pub async fn recv(&mut self) -> Option<GenItem> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The next event, noting admissions on the way.
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<GenItem>> {
        if let Some(item) = self.early.take() {
            return Poll::Ready(Some(item)); // already seen by the observer
        }
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Update::Accepted)) => {}
                Poll::Ready(Some(Update::Admitted)) => self.observer.admitted(),
                Poll::Ready(Some(Update::Item(item))) => {
                    self.observer.see(&item);
                    return Poll::Ready(Some(item));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The caller ended the generation on a stop string (a finish, not an abort).
    pub fn stopped_by_text(mut self) {
        self.observer.stopped();
    }
}

impl tokio_stream::Stream for Generation {
    type Item = GenItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GenItem>> {
        self.poll_item(cx)
    }
}

/// Starts the generation (within the caller's tracing span).
pub fn start(router: Arc<EngineRouter>, req: GenRequest) -> Generation {
    let (tx, rx) = mpsc::channel(64);
    let observer = Observer::start(&req);
    tokio::spawn(
        async move {
            let result = drive(&router, req, &tx).await;
            if let Err(e) = result {
                let _ = tx.send(Update::Item(Err(e))).await;
            }
        }
        .in_current_span(),
    );
    Generation { rx, observer, early: None }
}

/// Worth trying another worker: the worker is gone or going, not the request being wrong.
fn worker_failure(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal)
}

async fn drive(router: &EngineRouter, req: GenRequest, tx: &mpsc::Sender<Update>) -> Result<(), ServiceError> {
    let send = |event: GenEvent| tx.send(Update::Item(Ok(event)));
    let max_tokens = req.sampling.max_tokens;
    let mut generated: Vec<u32> = Vec::new();
    let mut failed: HashSet<String> = HashSet::new();
    let mut last_error = None;
    for _attempt in 0..=MAX_RESUBMITS {
        if generated.len() as u32 >= max_tokens {
            // Every token arrived before the worker failed; only its final event was lost.
            let finished = GenEvent::Finished {
                reason: FinishReason::Length,
                prompt_tokens: req.prompt.len() as u32,
                completion_tokens: generated.len() as u32,
            };
            let _ = send(finished).await;
            return Ok(());
        }
        let Some(mut lease) = router.pick(&failed) else {
            return Err(
                last_error.unwrap_or_else(|| ServiceError::Unavailable("no attention worker is available".into()))
            );
        };
        let mut prompt = req.prompt.clone();
        prompt.extend_from_slice(&generated);
        let sampling = SamplingParams { max_tokens: max_tokens - generated.len() as u32, ..req.sampling.clone() };
        let mut request = tonic::Request::new(GenerateRequest {
            request_id: req.id.clone(),
            prompt_tokens: prompt,
            sampling: Some(sampling),
        });
        req.trace.inject(request.metadata_mut());
        let call = tokio::select! {
            call = lease.client.generate(request) => call,
            () = tx.closed() => return Ok(()), // the caller went away
        };
        let mut stream = match call {
            Ok(s) => {
                let _ = tx.send(Update::Accepted).await;
                s.into_inner()
            }
            Err(status) if worker_failure(&status) => {
                tracing::warn!(worker = %lease.id, %status, "attention worker refused; trying another");
                failed.insert(lease.id.clone());
                last_error = Some(ServiceError::from(status));
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                // The caller went away while no token was due (queued, prefilling): dropping the
                // stream cancels the engine's work now, not at its first token.
                () = tx.closed() => return Ok(()),
            };
            match message {
                Ok(Some(ev)) => match ev.event {
                    Some(Event::Admitted(_)) => {
                        let _ = tx.send(Update::Admitted).await; // a gone caller shows at the next wait
                    }
                    Some(Event::Token(t)) => {
                        generated.push(t.token_id);
                        if send(GenEvent::Token { id: t.token_id, logprob: t.logprob }).await.is_err() {
                            return Ok(()); // the caller went away; dropping the stream cancels
                        }
                    }
                    Some(Event::Finished(f)) => {
                        let finished = GenEvent::Finished {
                            reason: f.reason(),
                            prompt_tokens: req.prompt.len() as u32,
                            completion_tokens: generated.len() as u32,
                        };
                        let _ = send(finished).await;
                        return Ok(());
                    }
                    None => {}
                },
                Ok(None) => {
                    last_error = Some(ServiceError::Unavailable(format!("{} ended the stream early", lease.id)));
                    break;
                }
                Err(status) if worker_failure(&status) => {
                    tracing::warn!(worker = %lease.id, %status, tokens = generated.len(), "attention worker failed mid-stream; resubmitting");
                    last_error = Some(ServiceError::from(status));
                    break;
                }
                Err(status) => return Err(status.into()),
            }
        }
        failed.insert(lease.id.clone());
        drop(lease);
    }
    Err(last_error.unwrap_or_else(|| ServiceError::Unavailable("no attention worker is available".into())))
}
