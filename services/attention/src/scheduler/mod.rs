//! The scheduler: continuous batching over one engine thread. Requests queue until the KV-state
//! budget admits them; every step runs all admitted sequences together (prefill chunks and
//! decode tokens mixed, each at its own position); finished and cancelled sequences leave between
//! steps and queued ones join. Token events go back to each caller through its own channel; a
//! caller that goes away cancels its sequence.

mod engine_loop;
mod sequence;

use expertmesh_model::engine::{ExpertBackend, Model, SamplingParams, state_bytes};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::trace::TraceContext;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::mpsc as tokio_mpsc;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences running at once, at most.
    pub max_running: usize,
    /// Prompt tokens processed per step across all prefilling sequences (longer prompts are
    /// prefilled in chunks, interleaved with other sequences' decode steps).
    pub prefill_chunk: usize,
    /// Bytes of per-sequence state (window, compressed caches, indexer) all running sequences
    /// may hold; a sequence reserves its state at full length (prompt + max_tokens) on admission.
    pub kv_budget_bytes: u64,
    /// Requests waiting for admission, at most (more are refused with RESOURCE_EXHAUSTED).
    pub max_waiting: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_running: 256, prefill_chunk: 2048, kv_budget_bytes: 4 << 30, max_waiting: 4096 }
    }
}

/// One generation request, in tokens.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub max_tokens: usize,
    pub stop_tokens: Vec<u32>,
    pub logprobs: bool,
    /// The caller's trace (logs; sampled traces also reach the expert workers).
    pub trace: Option<TraceContext>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    Admitted { queue_seconds: f64 },
    Token { token: u32, index: usize, logprob: Option<f32> },
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    Failed(ServiceError),
}

pub type EventSender = tokio_mpsc::UnboundedSender<EngineEvent>;
pub type EventReceiver = tokio_mpsc::UnboundedReceiver<EngineEvent>;

enum Msg {
    Submit(Box<sequence::Submission>),
    /// Cancel by request id; the reply says whether it was found.
    Cancel(String, tokio::sync::oneshot::Sender<bool>),
    Stop,
}

/// Counters the engine thread publishes.
#[derive(Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_bytes_used: AtomicU64,
    /// Highest `kv_bytes_used` and running count seen (admission must keep them in bounds).
    pub peak_kv_bytes_used: AtomicU64,
    pub peak_running: AtomicU64,
    pub steps: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
}

pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    pub stats: Arc<EngineStats>,
    opts: EngineOptions,
    max_context: usize,
    vocab: usize,
    state_bytes: Box<dyn Fn(usize) -> u64 + Send + Sync>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the engine thread. Model math runs there (and on the compute pool it fans out to).
    pub fn start(model: Arc<Model>, experts: Arc<dyn ExpertBackend>, opts: EngineOptions) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let cfg = model.config().clone();
        let (max_context, vocab) = (cfg.max_position_embeddings, cfg.vocab_size);
        let thread_stats = stats.clone();
        let thread_opts = opts.clone();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || engine_loop::EngineLoop::new(model, experts, thread_opts, thread_stats).run(rx))
            .expect("starting the engine thread");
        Scheduler {
            tx,
            stats,
            opts,
            max_context,
            vocab,
            state_bytes: Box::new(move |tokens| state_bytes(&cfg, tokens, false) as u64),
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Validates and queues a request; events arrive on the returned receiver (dropping it
    /// cancels the request).
    pub fn submit(&self, p: GenerateParams) -> Result<EventReceiver, ServiceError> {
        if p.prompt.is_empty() {
            return Err(ServiceError::invalid("prompt_tokens", "empty prompt"));
        }
        if let Some((i, t)) = p.prompt.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab) {
            return Err(ServiceError::invalid(
                format!("prompt_tokens[{i}]"),
                format!("{t} is outside the vocabulary (size {})", self.vocab),
            ));
        }
        if p.prompt.len() >= self.max_context {
            return Err(ServiceError::invalid(
                "prompt_tokens",
                format!(
                    "{} tokens leave no room to generate within the context of {}",
                    p.prompt.len(),
                    self.max_context
                ),
            ));
        }
        if p.max_tokens == 0 {
            return Err(ServiceError::invalid("sampling.max_tokens", "must be at least 1"));
        }
        p.sampling.validate().map_err(|m| {
            let (field, msg) = m.split_once(": ").unwrap_or(("", &m));
            ServiceError::invalid(format!("sampling.{field}"), msg)
        })?;
        let need = (self.state_bytes)(self.full_length(&p));
        if need > self.opts.kv_budget_bytes {
            // Never admissible here, however long the client waits: a bad request, not overload.
            return Err(ServiceError::invalid(
                "sampling.max_tokens",
                format!(
                    "the prompt plus max_tokens ({} tokens) needs {need} bytes of sequence state, more than \
                     the engine's KV budget of {} bytes: lower max_tokens or shorten the prompt",
                    self.full_length(&p),
                    self.opts.kv_budget_bytes
                ),
            ));
        }
        if self.stats.waiting.load(Ordering::Relaxed) as usize >= self.opts.max_waiting {
            return Err(ServiceError::ResourceExhausted(format!("{} requests already waiting", self.opts.max_waiting)));
        }
        let (events, rx) = tokio_mpsc::unbounded_channel();
        let sub = sequence::Submission { params: p, state_bytes: need, events, submitted: Instant::now() };
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Msg::Submit(Box::new(sub))).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ServiceError::Unavailable("engine stopped".into()));
        }
        Ok(rx)
    }

    /// Tokens a request occupies at most (prompt + generation, capped by the context).
    fn full_length(&self, p: &GenerateParams) -> usize {
        (p.prompt.len() + p.max_tokens).min(self.max_context)
    }

    /// Cancels a queued or running request; resolves to whether it was found.
    pub fn cancel(&self, id: &str) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Msg::Cancel(id.to_string(), tx));
        rx
    }

    /// False once the engine thread has ended (stopped, or died of a bug).
    pub fn is_alive(&self) -> bool {
        self.thread.lock().unwrap().as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Fails whatever is still queued or running with UNAVAILABLE and ends the engine thread
    /// (after the step in progress). Blocks until it has ended; idempotent.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }

    pub fn load(&self) -> (u64, u64) {
        (self.stats.running.load(Ordering::Relaxed), self.stats.waiting.load(Ordering::Relaxed))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}
