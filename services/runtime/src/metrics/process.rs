//! Process-wide metrics: build info, the standard `process_*` collector, values refreshed at
//! scrape time, and rendering in the text exposition format.

use prometheus::{Encoder, TextEncoder};
use std::sync::{Mutex, OnceLock};

use super::int_gauge_vec;

type Refresh = Box<dyn Fn() + Send>;

/// Callbacks that bring gauges up to date just before a scrape (values that are cheaper to read
/// on demand than to track, such as the age of the last registry sync).
static REFRESH: Mutex<Vec<Refresh>> = Mutex::new(Vec::new());

pub(super) fn on_scrape(f: impl Fn() + Send + 'static) {
    REFRESH.lock().unwrap().push(Box::new(f));
}

/// Registers the families every process exports (build info; the default registry adds
/// `process_*` CPU, memory, fds). Idempotent.
pub fn init() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let build = int_gauge_vec("build_info", "The running build (value 1).", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // (The default registry carries the standard process collector itself on Linux.)
    });
}

/// Everything this process exports, in Prometheus' text format.
pub fn render() -> String {
    init();
    for f in REFRESH.lock().unwrap().iter() {
        f();
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&prometheus::gather(), &mut out).expect("text encoding cannot fail on a Vec");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Spans the OTLP exporter delivered / dropped (queue full, collector unreachable).
fn span_counters() -> &'static (prometheus::IntCounter, prometheus::IntCounter) {
    static M: OnceLock<(prometheus::IntCounter, prometheus::IntCounter)> = OnceLock::new();
    M.get_or_init(|| {
        (
            super::counter("trace_spans_exported_total", "Spans delivered to the OTLP collector."),
            super::counter("trace_spans_dropped_total", "Spans dropped (export queue full or collector unreachable)."),
        )
    })
}

pub fn spans_exported(n: u64) {
    span_counters().0.inc_by(n);
}

pub fn spans_dropped(n: u64) {
    span_counters().1.inc_by(n);
}
