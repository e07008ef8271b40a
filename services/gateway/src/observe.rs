//! What the gateway measures about each generation, as its caller receives it (so latencies are
//! what clients see, network and worker failover included): time to first token, inter-token
//! latency, end-to-end time, tokens, and how it ended. A generation counts as waiting until an
//! attention worker admits it (its queue time then includes the network) and as running after.
//! One log line and (with an OTLP exporter, for sampled traces) one span per generation.

use expertmesh_proto::v1::FinishReason;
use expertmesh_runtime::metrics::{
    ErrorKind, FinishedReason, RequestRole, RoleRequestMetrics, TokenClock, role_metrics,
};
use expertmesh_runtime::trace::TraceContext;
use expertmesh_runtime::trace::export::{self, SpanRecord, Value};
use std::time::{Instant, SystemTime};

use crate::generation::{GenEvent, GenItem, GenRequest};

/// The gateway's request families.
pub fn gateway_metrics() -> &'static RoleRequestMetrics {
    role_metrics(RequestRole::Gateway)
}

pub struct Observer {
    id: String,
    trace_id: String,
    span: TraceContext,
    parent: Option<[u8; 8]>,
    prompt_tokens: usize,
    started: SystemTime,
    arrived: Instant,
    clock: TokenClock,
    /// When an attention worker first admitted it (`None`: still waiting).
    admitted: Option<Instant>,
    tokens: usize,
    ended: bool,
}

impl Observer {
    pub fn start(req: &GenRequest) -> Self {
        let m = gateway_metrics();
        m.waiting.inc();
        m.prompt_tokens.inc_by(req.prompt.len() as u64);
        Observer {
            id: req.id.clone(),
            trace_id: req.trace.trace_id_hex(),
            span: req.trace,
            parent: req.parent,
            prompt_tokens: req.prompt.len(),
            started: SystemTime::now(),
            arrived: Instant::now(),
            clock: TokenClock::default(),
            admitted: None,
            tokens: 0,
            ended: false,
        }
    }

    /// An attention worker took the generation from its queue. Only the first admission counts:
    /// after a worker failure the resubmitted generation stays running.
    pub fn admitted(&mut self) {
        if self.admitted.is_some() || self.ended {
            return;
        }
        let m = gateway_metrics();
        let now = Instant::now();
        self.admitted = Some(now);
        m.waiting.dec();
        m.running.inc();
        m.queue.observe((now - self.arrived).as_secs_f64());
    }

    pub fn see(&mut self, item: &GenItem) {
        let m = gateway_metrics();
        match item {
            Ok(GenEvent::Token { .. }) => {
                self.admitted(); // a worker that announced no admission
                if self.clock.token(m, self.arrived) {
                    let admitted = self.admitted.unwrap_or(self.arrived);
                    m.prefill.observe(admitted.elapsed().as_secs_f64());
                }
                self.tokens += 1;
            }
            Ok(GenEvent::Finished { reason, .. }) => {
                let reason = if *reason == FinishReason::Stop { FinishedReason::Stop } else { FinishedReason::Length };
                self.end(Ok(reason));
            }
            Err(e) => self.end(Err(ErrorKind::of_code(e.code()))),
        }
    }

    pub fn stopped(&mut self) {
        self.end(Ok(FinishedReason::Stop));
    }

    fn end(&mut self, how: Result<FinishedReason, ErrorKind>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let m = gateway_metrics();
        if self.admitted.is_some() {
            m.running.dec()
        } else {
            m.waiting.dec()
        }
        self.clock.end(m, self.arrived);
        let seconds = self.arrived.elapsed().as_secs_f64();
        let outcome = match how {
            Ok(reason) => reason.label(),
            Err(kind) => kind.label(),
        };
        export::record(SpanRecord {
            context: self.span,
            parent: self.parent,
            name: "gateway.generate",
            start: self.started,
            end: SystemTime::now(),
            attributes: vec![
                ("expertmesh.request_id", Value::Str(self.id.clone())),
                ("expertmesh.prompt_tokens", Value::Int(self.prompt_tokens as i64)),
                ("expertmesh.completion_tokens", Value::Int(self.tokens as i64)),
                ("expertmesh.outcome", Value::Str(outcome.into())),
            ],
            error: how.is_err().then(|| outcome.to_string()),
        });
        match how {
            Ok(reason) => {
                m.finished(reason);
                tracing::info!(request_id = %self.id, trace_id = %self.trace_id, reason = reason.label(), completion_tokens = self.tokens, seconds, "generation finished");
            }
            Err(kind) => {
                m.failed(kind);
                tracing::warn!(request_id = %self.id, trace_id = %self.trace_id, kind = kind.label(), completion_tokens = self.tokens, seconds, "generation failed");
            }
        }
    }
}

impl Drop for Observer {
    /// Dropped before its end: the client went away (or stopped reading).
    fn drop(&mut self) {
        self.end(Ok(FinishedReason::Abort));
    }
}
