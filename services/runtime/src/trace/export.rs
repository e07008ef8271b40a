//! Optional OTLP/gRPC export of spans (`--otlp-endpoint`): the gateway records one span per
//! generation, the attention worker one per engine request, each a child of the span that called
//! it, so a collector (Jaeger, Tempo, the OpenTelemetry collector) shows a request's path. Only
//! sampled traces are exported. Expert calls serve many requests at once and are not spans; the
//! trace ids of their sampled requests are in the expert workers' debug logs.
//!
//! Spans go through a bounded queue to an exporter thread with its own runtime (serving never
//! waits for the collector); they are sent in batches, and dropped (counted) when the queue is full
//! or the collector is unreachable.

use expertmesh_proto::otlp::trace_service_client::TraceServiceClient;
use expertmesh_proto::otlp::{
    AnyValue, ExportTraceServiceRequest, InstrumentationScope, KeyValue, Resource, ResourceSpans, ScopeSpans, Span,
    Status, any_value, span, status,
};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::TraceContext;
use crate::error::ServiceError;
use crate::metrics;

/// Spans queued at most; more are dropped.
const QUEUE: usize = 8192;
/// Spans per export call at most.
const BATCH: usize = 512;
/// A partial batch waits at most this long.
const LINGER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
}

/// A finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// Its trace and its own span id.
    pub context: TraceContext,
    /// The caller's span id, if the caller sent one.
    pub parent: Option<[u8; 8]>,
    pub name: &'static str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Set when the operation failed.
    pub error: Option<String>,
}

enum Msg {
    Span(Box<SpanRecord>),
    Flush(std::sync::mpsc::Sender<()>),
}

static EXPORTER: OnceLock<SyncSender<Msg>> = OnceLock::new();

/// Starts exporting to `endpoint` (e.g. `http://otel-collector:4317`) as `service_name`. Once per
/// process.
pub fn start(endpoint: &str, service_name: &str) -> Result<(), ServiceError> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let (tx, rx) = sync_channel(QUEUE);
    if EXPORTER.set(tx).is_err() {
        return Err(ServiceError::Internal("the OTLP exporter is already running".into()));
    }
    let resource = Resource {
        attributes: vec![
            attribute("service.name", Value::Str(service_name.to_string())),
            attribute("service.version", Value::Str(env!("CARGO_PKG_VERSION").to_string())),
            attribute("process.pid", Value::Int(std::process::id() as i64)),
        ],
    };
    std::thread::Builder::new()
        .name("otlp".into())
        .spawn(move || run(url, resource, rx))
        .map_err(|e| ServiceError::Internal(format!("starting the OTLP exporter: {e}")))?;
    Ok(())
}

/// Queues a span for export (sampled traces only; a no-op without an exporter).
pub fn record(span: SpanRecord) {
    let Some(tx) = EXPORTER.get() else { return };
    if !span.context.sampled {
        return;
    }
    if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Span(Box::new(span))) {
        metrics::spans_dropped(1);
    }
}

/// Sends what is queued, waiting at most `timeout` (before the process exits).
pub fn flush(timeout: Duration) {
    let Some(tx) = EXPORTER.get() else { return };
    let (done, wait) = std::sync::mpsc::channel();
    if tx.send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(timeout);
    }
}

fn attribute(key: &str, v: Value) -> KeyValue {
    let value = match v {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
        Value::Float(f) => any_value::Value::DoubleValue(f),
    };
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }) }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn to_otlp(s: SpanRecord) -> Span {
    Span {
        trace_id: s.context.trace_id.to_vec(),
        span_id: s.context.span_id.to_vec(),
        trace_state: String::new(),
        parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: s.name.to_string(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes: s.attributes.into_iter().map(|(k, v)| attribute(k, v)).collect(),
        status: Some(match s.error {
            Some(message) => Status { message, code: status::StatusCode::Error as i32 },
            None => Status { message: String::new(), code: status::StatusCode::Ok as i32 },
        }),
        flags: s.context.sampled as u32,
    }
}

fn run(url: String, resource: Resource, rx: Receiver<Msg>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let channel = {
        let _in_runtime = rt.enter();
        match crate::serve::lazy_channel(&url) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(endpoint = %url, error = %e, "OTLP export disabled");
                return;
            }
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let mut batch: Vec<Span> = Vec::new();
    let mut last_warning: Option<Instant> = None;
    let mut deadline = Instant::now() + LINGER;
    loop {
        let mut flushed = None;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Msg::Span(s)) => batch.push(to_otlp(*s)),
            Ok(Msg::Flush(done)) => flushed = Some(done),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if batch.len() < BATCH && flushed.is_none() && Instant::now() < deadline {
            continue;
        }
        deadline = Instant::now() + LINGER;
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let request = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "expertmesh".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                        }),
                        spans: std::mem::take(&mut batch),
                    }],
                }],
            };
            let sent =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), client.export(request)).await });
            match sent {
                Ok(Ok(_)) => metrics::spans_exported(n),
                failed => {
                    metrics::spans_dropped(n);
                    // One warning per minute at most: a collector that is down must not flood the logs.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        let why = match failed {
                            Ok(Err(status)) => status.to_string(),
                            _ => "no reply within 10 s".to_string(),
                        };
                        tracing::warn!(endpoint = %url, error = %why, spans = n, "OTLP export failed; spans dropped");
                        last_warning = Some(Instant::now());
                    }
                }
            }
        }
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}
