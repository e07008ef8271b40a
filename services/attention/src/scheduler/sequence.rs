//! One request's life inside the engine: queued submission, then a running sequence with its
//! model state, sampler and progress.

use expertmesh_model::engine::{Sampler, SequenceState};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::metrics::{ErrorKind, FinishedReason, RoleRequestMetrics};
use expertmesh_runtime::trace::export::{self, SpanRecord, Value};
use std::time::{Instant, SystemTime};

use super::{EngineEvent, EventSender, FinishReason, GenerateParams};

pub struct Submission {
    pub params: GenerateParams,
    /// State bytes reserved on admission (at full length).
    pub state_bytes: u64,
    pub events: EventSender,
    pub submitted: Instant,
}

pub struct Sequence {
    pub sub: Submission,
    pub state: SequenceState,
    pub sampler: Sampler,
    /// Prompt tokens already prefilled.
    pub prefilled: usize,
    pub generated: Vec<u32>,
    pub admitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Submission {
    /// The request's trace id for logs ("-" when it came without one).
    pub fn trace_id(&self) -> String {
        self.params.trace.map_or_else(|| "-".into(), |t| t.trace_id_hex())
    }
}

impl Sequence {
    pub fn new(sub: Submission, state: SequenceState) -> Self {
        let sampler = Sampler::new(sub.params.sampling, sub.params.seed);
        let admitted = Instant::now();
        Sequence {
            sub,
            state,
            sampler,
            prefilled: 0,
            generated: Vec::new(),
            admitted,
            first_token: None,
            last_token: None,
        }
    }

    /// Records a sampled token's timing: time to first token and prefill time for the first,
    /// inter-token latency after.
    pub fn observe_token(&mut self, m: &RoleRequestMetrics) {
        let now = Instant::now();
        match self.last_token {
            None => {
                m.first_token.observe((now - self.sub.submitted).as_secs_f64());
                m.prefill.observe((now - self.admitted).as_secs_f64());
                self.first_token = Some(now);
            }
            Some(last) => m.inter_token.observe((now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
        m.generation_tokens.inc();
    }

    pub fn id(&self) -> &str {
        &self.sub.params.id
    }

    pub fn prefilling(&self) -> bool {
        self.prefilled < self.sub.params.prompt.len()
    }

    /// False once the caller has gone away.
    pub fn send(&self, e: EngineEvent) -> bool {
        self.sub.events.send(e).is_ok()
    }

    /// Ends the request: the final event (if the caller is still there), metrics and a log line.
    pub fn finish(&self, reason: FinishReason, m: &RoleRequestMetrics) {
        // Taken before the caller hears of the end: the engine's span ends inside the caller's.
        let end = SystemTime::now();
        self.send(EngineEvent::Finished {
            reason,
            prompt_tokens: self.sub.params.prompt.len(),
            completion_tokens: self.generated.len(),
        });
        let now = Instant::now();
        m.e2e.observe((now - self.sub.submitted).as_secs_f64());
        if let Some(first) = self.first_token {
            m.decode.observe((now - first).as_secs_f64());
        }
        let finished = match reason {
            FinishReason::Stop => FinishedReason::Stop,
            FinishReason::Length => FinishedReason::Length,
            FinishReason::Cancelled => FinishedReason::Abort,
        };
        m.finished(finished);
        self.span(finished.label(), None, end);
        tracing::info!(
            request_id = %self.id(),
            trace_id = %self.sub.trace_id(),
            ?reason,
            prompt_tokens = self.sub.params.prompt.len(),
            completion_tokens = self.generated.len(),
            seconds = (now - self.sub.submitted).as_secs_f64(),
            "request finished"
        );
    }

    /// The engine's span of this request: a child of the caller's (exported if sampled).
    fn span(&self, outcome: &str, error: Option<String>, end: SystemTime) {
        let Some(caller) = self.sub.params.trace else { return };
        export::record(SpanRecord {
            context: caller.child(),
            parent: Some(caller.span_id),
            name: "engine.generate",
            start: SystemTime::now() - self.sub.submitted.elapsed(),
            end,
            attributes: vec![
                ("expertmesh.request_id", Value::Str(self.id().to_string())),
                ("expertmesh.prompt_tokens", Value::Int(self.sub.params.prompt.len() as i64)),
                ("expertmesh.completion_tokens", Value::Int(self.generated.len() as i64)),
                ("expertmesh.queue_seconds", Value::Float((self.admitted - self.sub.submitted).as_secs_f64())),
                ("expertmesh.outcome", Value::Str(outcome.to_string())),
            ],
            error,
        });
    }

    /// Fails the request with `err` (its final event), counted and logged.
    pub fn fail(&self, err: &ServiceError, m: &RoleRequestMetrics) {
        let end = SystemTime::now();
        self.send(EngineEvent::Failed(err.clone()));
        m.failed(ErrorKind::of_code(err.code()));
        self.span(ErrorKind::of_code(err.code()).label(), Some(err.to_string()), end);
        tracing::warn!(request_id = %self.id(), trace_id = %self.sub.trace_id(), error = %err, "request failed");
    }
}
