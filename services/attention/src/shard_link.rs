//! The engine's connection to one expert worker. Calls go either as unary `Forward` RPCs or,
//! by default, as messages on one long-lived `ForwardStream` per worker, matched to their replies
//! by `call_id`: no per-call HTTP/2 stream setup or headers, and any number of calls (several
//! layers', several steps') in flight at once. A broken stream fails its pending calls (the
//! caller then retries on another replica) and is reopened on the next call.

use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{ForwardRequest, ForwardResponse};
use expertmesh_runtime::serve::lazy_channel;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Largest gRPC message either way (must match the expert workers' limit).
const MAX_MESSAGE_BYTES: usize = 512 << 20;

type Reply = Result<ForwardResponse, Status>;

pub struct ShardLink {
    client: ExpertServiceClient<Channel>,
    streaming: bool,
    stream: Mutex<Option<Arc<CallStream>>>,
}

struct CallStream {
    /// Taken (dropped) to end the request stream: the worker then finishes and closes its side.
    tx: Mutex<Option<mpsc::UnboundedSender<ForwardRequest>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    dead: AtomicBool,
    /// The task reading replies. Aborting it drops the reply stream, which cancels the HTTP/2
    /// stream: the worker then drops the calls still on it rather than compute them for nobody.
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl CallStream {
    fn fail_all(&self, status: Status) {
        self.dead.store(true, Ordering::SeqCst);
        self.tx.lock().unwrap().take();
        for (_, tx) in self.pending.lock().unwrap().drain() {
            let _ = tx.send(Err(status.clone()));
        }
    }
}

/// Removes a call's pending entry when the call ends any way (reply, timeout, cancellation).
struct PendingGuard<'a>(&'a CallStream, u64);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().unwrap().remove(&self.1);
    }
}

impl ShardLink {
    /// A link that connects on first use. Call within the runtime's context.
    pub fn new(endpoint: &str, streaming: bool) -> Result<Self, String> {
        let client = ExpertServiceClient::new(lazy_channel(endpoint)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(ShardLink { client, streaming, stream: Mutex::new(None) })
    }

    /// One call; a failed streamed call carries the worker's status code.
    pub async fn call(&self, mut req: ForwardRequest) -> Reply {
        if !self.streaming {
            return self.client.clone().forward(req).await.map(|r| r.into_inner());
        }
        let stream = self.stream();
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        req.call_id = id;
        let (tx, rx) = oneshot::channel();
        stream.pending.lock().unwrap().insert(id, tx);
        let _guard = PendingGuard(&stream, id);
        // Checked after registering: a stream that died in between has already drained.
        let sent = stream.tx.lock().unwrap().as_ref().is_some_and(|tx| tx.send(req).is_ok());
        if stream.dead.load(Ordering::SeqCst) || !sent {
            return Err(Status::unavailable("call stream closed"));
        }
        rx.await.unwrap_or_else(|_| Err(Status::unavailable("call stream closed")))
    }

    /// Cancels the current stream (after a timeout: a wedged stream must not take more calls,
    /// and the worker should not finish what was sent on it); its pending calls fail and the next
    /// call opens a new one.
    pub fn reset(&self) {
        if let Some(s) = self.stream.lock().unwrap().take() {
            s.fail_all(Status::unavailable("call stream reset"));
            if let Some(reader) = s.reader.lock().unwrap().take() {
                reader.abort();
            }
        }
    }

    fn stream(&self) -> Arc<CallStream> {
        let mut slot = self.stream.lock().unwrap();
        if let Some(s) = slot.as_ref().filter(|s| !s.dead.load(Ordering::SeqCst)) {
            return s.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = Arc::new(CallStream {
            tx: Mutex::new(Some(tx)),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            reader: Mutex::new(None),
        });
        let reader = stream.clone();
        let mut client = self.client.clone();
        let task = tokio::spawn(async move {
            let mut replies = match client.forward_stream(UnboundedReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(status) => return reader.fail_all(status),
            };
            loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        let waiter = reader.pending.lock().unwrap().remove(&r.call_id);
                        if let Some(tx) = waiter {
                            let reply = match &r.error {
                                Some(e) => Err(Status::new(Code::from(e.code), e.message.clone())),
                                None => Ok(r),
                            };
                            let _ = tx.send(reply);
                        }
                    }
                    Ok(None) => return reader.fail_all(Status::unavailable("call stream ended")),
                    Err(status) => return reader.fail_all(status),
                }
            }
        });
        *stream.reader.lock().unwrap() = Some(task.abort_handle());
        *slot = Some(stream.clone());
        stream
    }
}

impl Drop for ShardLink {
    fn drop(&mut self) {
        self.reset();
    }
}
