//! One request's life inside the engine: queued submission, then a running sequence with its
//! model state, sampler and progress.

use expertmesh_model::engine::{Sampler, SequenceState};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::metrics::{ErrorKind, FinishedReason, RoleRequestMetrics, TokenClock};
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
    clock: TokenClock,
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
        Sequence { sub, state, sampler, prefilled: 0, generated: Vec::new(), admitted, clock: TokenClock::default() }
    }

    /// Records a sampled token's timing: time to first token and prefill time for the first,
    /// inter-token latency after.
    pub fn observe_token(&mut self, m: &RoleRequestMetrics) {
        if self.clock.token(m, self.sub.submitted) {
            m.prefill.observe(self.admitted.elapsed().as_secs_f64());
        }
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
        self.clock.end(m, self.sub.submitted);
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
            seconds = self.sub.submitted.elapsed().as_secs_f64(),
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
