//! Observability end to end through real processes (gateway, attention worker, two expert
//! workers, real etcd): every process's `/metrics` passes `promtool check metrics` and its
//! counters move by exactly what the requests imply; a request's trace id shows up in the logs
//! of every process it touched; every metric the Grafana dashboard and the Prometheus rules use
//! is exported by the live cluster.

mod common;

use common::Worker;
use common::http::{Http, VOCAB, events, gateway_flags, get, post, tokenizer_path};
use expertmesh_proto::otlp::trace_service_server::{TraceService, TraceServiceServer};
use expertmesh_proto::otlp::{ExportTraceServiceRequest, ExportTraceServiceResponse, Span, any_value};
use expertmesh_runtime::testkit::EtcdServer;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tiny preset: 8 MoE layers, 4 routed experts per token.
const LAYERS: f64 = 8.0;
const EXPERTS_PER_TOKEN: f64 = 4.0;

const TRACE_ID: &str = "5e1f9a7c2b3d4e6f8091a2b3c4d5e6f7";

struct Cluster {
    gateway: Worker,
    attention: Worker,
    experts: Vec<Worker>,
    logs: tempfile::TempDir,
    _etcd: EtcdServer,
}

impl Cluster {
    /// `extra`: flags for the attention worker and the gateway.
    fn start(extra: &[&str]) -> Cluster {
        Cluster::start_with(&[], extra)
    }

    /// `attention_only`: more flags for the attention worker.
    fn start_with(attention_only: &[&str], extra: &[&str]) -> Cluster {
        let etcd = EtcdServer::start();
        let e = etcd.endpoint();
        let logs = tempfile::tempdir().unwrap();
        let base = ["--vocab-size", VOCAB, "--etcd", e.as_str(), "--lease-ttl", "2", "--metrics-listen", "127.0.0.1:0"];
        let expert = |experts: &str, i: usize, more: &[&str]| {
            let mut args = vec!["--experts", experts];
            args.extend_from_slice(&base);
            args.extend_from_slice(more);
            Worker::spawn_logged("expert", &args, &logs.path().join(format!("expert-{i}.log")))
        };
        // The second shard also counts per layer.
        let experts = vec![expert("0-7", 0, &[]), expert("8-15", 1, &["--metrics-per-layer"])];
        let mut attention_args = base.to_vec();
        attention_args.extend_from_slice(extra);
        attention_args.extend_from_slice(attention_only);
        let attention = Worker::spawn_logged("attention", &attention_args, &logs.path().join("attention.log"));
        let mut gw = gateway_flags(&tokenizer_path(), &e, "/expertmesh");
        gw.extend(["--log-format", "json"].map(String::from));
        gw.extend(extra.iter().map(|a| a.to_string()));
        let gw: Vec<&str> = gw.iter().map(String::as_str).collect();
        let gateway = Worker::spawn_plain_logged("gateway", &gw, &logs.path().join("gateway.log"));
        // Ready without warm-up traffic (the counters must start at zero): the engine sees every
        // expert, and the gateway sees the engine.
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&attention.metrics_url(), "/ready").status != 200 || get(&gateway.endpoint, "/ready").status != 200 {
            assert!(Instant::now() < deadline, "the cluster never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Cluster { gateway, attention, experts, logs, _etcd: etcd }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(name)).unwrap()
    }

    /// Every process's exposition, checked by `promtool check metrics`.
    fn scrape(&self) -> Vec<(String, Vec<Sample>)> {
        let mut out = vec![("gateway".to_string(), scrape(&self.gateway.endpoint))];
        out.push(("attention".to_string(), scrape(&self.attention.metrics_url())));
        for (i, w) in self.experts.iter().enumerate() {
            out.push((format!("expert-{i}"), scrape(&w.metrics_url())));
        }
        out
    }
}

fn completion(url: &str, body: Value, headers: &[(&str, &str)]) -> Value {
    let r: Http = post(url, "/v1/completions", &body, headers);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    // The id in the body, the response header and the logs is one.
    assert_eq!(r.header("x-request-id"), v["id"].as_str(), "{}", r.head);
    v
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// The samples of a text exposition (label values here never contain `,` or `"`).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (n, labels)
                }
                None => (series, Vec::new()),
            };
            Sample { name: name.to_string(), labels, value: value.parse().unwrap() }
        })
        .collect()
}

/// Fetches `/metrics` and runs `promtool check metrics` on it (lint: names, units, help, types).
fn scrape(url: &str) -> Vec<Sample> {
    let r = get(url, "/metrics");
    assert_eq!(r.status, 200, "{url}/metrics: {}", r.body);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/deps --test installs it)");
    promtool.stdin.take().unwrap().write_all(r.body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics on {url}:\n{report}");
    parse(&r.body)
}

/// Sum of `name` over the samples whose labels include `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
        .map(|s| s.value)
        .sum()
}

fn total(scrapes: &[(String, Vec<Sample>)], name: &str, with: &[(&str, &str)]) -> f64 {
    scrapes.iter().map(|(_, s)| sum(s, name, with)).sum()
}

#[test]
fn counters_move_by_what_the_requests_imply_and_traces_reach_every_process() {
    let c = Cluster::start(&[]);
    let url = &c.gateway.endpoint;
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let prompt_a: Vec<u32> = (0..12).map(|i| 100 + 37 * i).collect();
    let prompt_c: Vec<u32> = (0..7).map(|i| 900 + 11 * i).collect();
    // (generations, prompt tokens over generations, completion tokens)
    let mut expected = (0.0, 0.0, 0.0);

    let a = completion(
        url,
        json!({"prompt": prompt_a, "max_tokens": 6, "temperature": 0}),
        &[("traceparent", traceparent.as_str())],
    );
    expected.0 += 1.0;
    expected.1 += prompt_a.len() as f64;
    expected.2 += a["usage"]["completion_tokens"].as_f64().unwrap();

    let chat = post(
        url,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Which expert is hot?"}], "max_tokens": 5,
            "stream": true, "stream_options": {"include_usage": true}}),
        &[],
    );
    assert_eq!(chat.status, 200, "{}", chat.body);
    let usage = events(&chat.body).last().unwrap()["usage"].clone();
    expected.0 += 1.0;
    expected.1 += usage["prompt_tokens"].as_f64().unwrap();
    expected.2 += usage["completion_tokens"].as_f64().unwrap();

    let two = completion(url, json!({"prompt": prompt_c, "max_tokens": 4, "n": 2, "temperature": 0.8, "seed": 3}), &[]);
    expected.0 += 2.0;
    expected.1 += 2.0 * prompt_c.len() as f64;
    expected.2 += two["usage"]["completion_tokens"].as_f64().unwrap();

    let bad = post(url, "/v1/completions", &json!({"prompt": [5], "max_tokens": 0}), &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.header("x-request-id").is_some_and(|id| id.starts_with("cmpl-")), "{}", bad.head);
    assert!(chat.header("x-request-id").is_some_and(|id| id.starts_with("chatcmpl-")), "{}", chat.head);

    let (generations, prompt, completion_tokens) = expected;
    // Every token but each generation's last goes through every MoE layer but the last once; the
    // last layer computes only the rows that yield logits (each prefill's last token, then each
    // decode token): one per generated token.
    let forwarded = (prompt + completion_tokens - generations) * (LAYERS - 1.0) + completion_tokens;
    let scrapes = c.scrape();
    let of = |who: &str| &scrapes.iter().find(|(n, _)| n == who).unwrap().1;
    let (gw, att) = (of("gateway"), of("attention"));
    for (samples, role) in [(gw, "gateway"), (att, "attention")] {
        let r = &[("role", role)];
        assert_eq!(sum(samples, "expertmesh_request_success_total", r), generations, "{role}");
        assert_eq!(sum(samples, "expertmesh_prompt_tokens_total", r), prompt, "{role}");
        assert_eq!(sum(samples, "expertmesh_generation_tokens_total", r), completion_tokens, "{role}");
        assert_eq!(sum(samples, "expertmesh_time_to_first_token_seconds_count", r), generations, "{role}");
        assert_eq!(
            sum(samples, "expertmesh_inter_token_latency_seconds_count", r),
            completion_tokens - generations,
            "{role}"
        );
        assert_eq!(sum(samples, "expertmesh_e2e_request_latency_seconds_count", r), generations, "{role}");
        // Each generation was admitted once and reached its first token; none is left in flight.
        assert_eq!(sum(samples, "expertmesh_request_queue_time_seconds_count", r), generations, "{role}");
        assert_eq!(sum(samples, "expertmesh_request_prefill_time_seconds_count", r), generations, "{role}");
        assert_eq!(sum(samples, "expertmesh_num_requests_running", r), 0.0, "{role}");
        assert_eq!(sum(samples, "expertmesh_num_requests_waiting", r), 0.0, "{role}");
    }
    assert_eq!(sum(gw, "expertmesh_request_errors_total", &[("role", "gateway"), ("kind", "invalid_argument")]), 1.0);
    assert_eq!(sum(gw, "expertmesh_request_errors_total", &[]), 1.0);
    assert_eq!(sum(att, "expertmesh_request_errors_total", &[]), 0.0);
    assert_eq!(sum(att, "expertmesh_dispatch_tokens_total", &[]), forwarded);
    assert_eq!(sum(att, "expertmesh_dispatch_failovers_total", &[]), 0.0);
    assert!(sum(att, "expertmesh_step_batch_size_count", &[]) > 0.0);
    assert_eq!(sum(att, "expertmesh_model_info", &[("routed_experts", "16"), ("experts_per_token", "4")]), 1.0);
    for e in 0..16 {
        assert_eq!(sum(att, "expertmesh_expert_live_replicas", &[("expert", &e.to_string())]), 1.0, "expert {e}");
    }
    assert_eq!(sum(att, "expertmesh_registry_connected", &[]), 1.0);
    assert_eq!(sum(att, "expertmesh_registry_workers", &[("role", "expert")]), 2.0);
    assert_eq!(sum(att, "expertmesh_registry_worker_changes_total", &[("role", "expert"), ("change", "joined")]), 2.0);
    assert_eq!(sum(att, "expertmesh_registry_worker_changes_total", &[("change", "left")]), 0.0);
    // Every (token, layer) pair picks 4 experts; the shards count each pick once.
    let experts = &scrapes[2..];
    assert_eq!(
        total(experts, "expertmesh_expert_routed_tokens_total", &[]),
        forwarded * EXPERTS_PER_TOKEN,
        "per-expert counts sum to (token, layer) pairs × experts per token"
    );
    assert_eq!(
        total(experts, "expertmesh_expert_forward_calls_total", &[]),
        sum(att, "expertmesh_dispatch_calls_total", &[])
    );
    let per_layer = |s: &[Sample]| sum(s, "expertmesh_expert_layer_routed_tokens_total", &[]);
    assert_eq!(per_layer(&experts[0].1), 0.0, "per-layer detail is off by default");
    assert_eq!(per_layer(&experts[1].1), sum(&experts[1].1, "expertmesh_expert_routed_tokens_total", &[]));
    assert!(per_layer(&experts[1].1) > 0.0);
    for (who, s) in experts {
        let held: BTreeSet<&str> = s
            .iter()
            .filter(|x| x.name == "expertmesh_expert_routed_tokens_total")
            .flat_map(|x| x.labels.iter().filter(|(k, _)| k == "expert").map(|(_, v)| v.as_str()))
            .collect();
        assert_eq!(held.len(), 8, "{who} exports exactly its 8 experts: {held:?}");
        assert!(sum(s, "expertmesh_expert_resident_weight_bytes", &[]) > 0.0, "{who}");
        assert!(sum(s, "process_resident_memory_bytes", &[]) > 0.0, "{who}");
        assert_eq!(sum(s, "expertmesh_build_info", &[]), 1.0, "{who}");
    }

    // Registry upkeep: keep-alives go out every TTL/3 (2 s / 3 here), each confirming the view.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrapes = c.scrape();
        let renewed = scrapes.iter().all(|(_, s)| sum(s, "expertmesh_registry_lease_renewals_total", &[]) > 0.0);
        if renewed {
            for (who, s) in &scrapes {
                assert_eq!(sum(s, "expertmesh_registry_lease_failures_total", &[]), 0.0, "{who}");
                let age = sum(s, "expertmesh_registry_last_sync_age_seconds", &[]);
                assert!((0.0..5.0).contains(&age), "{who}: last registry sync {age} s ago");
            }
            break;
        }
        assert!(Instant::now() < deadline, "no lease renewal within 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The traced request: its trace id in the gateway's JSON log lines (with the request id),
    // in the attention worker's log, and in each expert worker's debug log of the calls.
    let request_id = a["id"].as_str().unwrap();
    let gateway_log = c.log("gateway.log");
    let traced: Vec<Value> = gateway_log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .filter(|v| v["span"]["trace_id"] == TRACE_ID)
        .collect();
    assert!(traced.len() >= 2, "gateway logs about the traced request: {gateway_log}");
    assert!(traced.iter().all(|v| v["span"]["request_id"] == request_id), "{traced:?}");
    let attention_log = c.log("attention.log");
    assert!(attention_log.contains(TRACE_ID) && attention_log.contains(request_id), "{attention_log}");
    for i in 0..2 {
        let log = c.log(&format!("expert-{i}.log"));
        assert!(log.contains(TRACE_ID), "expert-{i} log lacks the trace id:\n{log}");
    }
}

/// `expertmesh_*` (and `process_*`) names a PromQL text uses: recording-rule names (with a colon)
/// are defined by the rules, not exported.
/// The running/waiting gauges mid-flight, where vLLM-style dashboards and autoscalers read them:
/// with room for one running sequence, a second streamed request waits (at the gateway, which
/// counts a generation as waiting until an attention worker admits it, and in the engine's queue),
/// is admitted when the first client disconnects, and both gauges return to zero.
#[test]
fn gauges_count_running_and_waiting_requests_mid_flight() {
    let c = Cluster::start_with(&["--max-running", "1"], &[]);
    let url = &c.gateway.endpoint;
    let gauges = |c: &Cluster| -> Vec<(String, f64, f64)> {
        c.scrape()[..2]
            .iter()
            .map(|(who, s)| {
                let get = |name: &str| sum(s, name, &[]);
                (who.clone(), get("expertmesh_num_requests_running"), get("expertmesh_num_requests_waiting"))
            })
            .collect()
    };
    let wait_for = |want: [(f64, f64); 2], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = gauges(&c);
            if now.iter().zip(want).all(|((_, r, w), (wr, ww))| *r == wr && *w == ww) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: (process, running, waiting) {now:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Long generations (greedy, so the same tokens every run), streamed; each request's socket is
    // kept open, unread, and dropping it disconnects that client.
    let body =
        json!({"prompt": [100, 137, 174, 211], "max_tokens": 4000, "temperature": 0, "stream": true}).to_string();
    let first = common::http::send(url, "POST", "/v1/completions", &body, &[]);
    wait_for([(1.0, 0.0), (1.0, 0.0)], "one request running");
    let second = common::http::send(url, "POST", "/v1/completions", &body, &[]);
    wait_for([(1.0, 1.0), (1.0, 1.0)], "one running, one waiting (gateway, attention)");
    drop(first);
    wait_for([(1.0, 0.0), (1.0, 0.0)], "the waiting request admitted after the first client left");
    drop(second);
    wait_for([(0.0, 0.0), (0.0, 0.0)], "both gone");
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    text.split(|c: char| !is_name(c))
        .filter(|w| (w.starts_with("expertmesh_") || w.starts_with("process_")) && !w.contains(':'))
        .map(String::from)
        .collect()
}

fn observability_file(relative: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/observability").join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

#[test]
fn the_dashboard_and_the_rules_use_only_exported_metrics() {
    let (_, dashboard) = observability_file("grafana/expertmesh.json");
    let dashboard: Value = serde_json::from_str(&dashboard).unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{} queries", queries.len());
    let mut used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let (rules_path, rules) = observability_file("prometheus/rules.yaml");
    let from_rules = metric_names(&rules);
    assert!(!from_rules.is_empty(), "{}", rules_path.display());
    used.extend(from_rules);

    let c = Cluster::start(&[]);
    completion(&c.gateway.endpoint, json!({"prompt": [5, 6, 7], "max_tokens": 3}), &[]);
    let exported: BTreeSet<String> = c.scrape().into_iter().flat_map(|(_, s)| s.into_iter().map(|x| x.name)).collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used by the dashboard or the rules but not exported: {missing:?}");
}

/// An OTLP trace collector: keeps every exported span with its `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                self.spans.lock().unwrap().extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    })
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn sampled_traces_are_exported_as_linked_spans_over_otlp() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let c = Cluster::start(&["--otlp-endpoint", &endpoint]);
    let url = &c.gateway.endpoint;
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    completion(
        url,
        json!({"prompt": [5, 6, 7], "max_tokens": 2}),
        &[("traceparent", &format!("00-{unsampled}-b7ad6b7169203331-00"))],
    );
    let client_span = "00f067aa0ba902b7";
    let traced = completion(
        url,
        json!({"prompt": [8, 9, 10, 11], "max_tokens": 3}),
        &[("traceparent", &format!("00-{TRACE_ID}-{client_span}-01"))],
    );
    let spans_of = |trace: &str| -> Vec<(String, Span)> {
        let id = hex_bytes(trace);
        collector.spans.lock().unwrap().iter().filter(|(_, s)| s.trace_id == id).cloned().collect()
    };
    // Exported in batches at least once a second.
    let deadline = Instant::now() + Duration::from_secs(20);
    while spans_of(TRACE_ID).len() < 2 {
        assert!(Instant::now() < deadline, "spans received: {:?}", collector.spans.lock().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    let spans = spans_of(TRACE_ID);
    assert_eq!(spans.len(), 2, "{spans:?}");
    let (gw_service, gateway) = spans.iter().find(|(_, s)| s.name == "gateway.generate").unwrap();
    let (engine_service, engine) = spans.iter().find(|(_, s)| s.name == "engine.generate").unwrap();
    assert_eq!(gw_service, "expertmesh-gateway");
    assert_eq!(engine_service, "expertmesh-attention");
    // client → gateway → engine
    assert_eq!(gateway.parent_span_id, hex_bytes(client_span));
    assert_eq!(engine.parent_span_id, gateway.span_id);
    assert_ne!(engine.span_id, gateway.span_id);
    let request_id = format!("{}-0", traced["id"].as_str().unwrap());
    assert_eq!(attribute(gateway, "expertmesh.request_id").as_deref(), Some(request_id.as_str()));
    assert_eq!(attribute(engine, "expertmesh.request_id").as_deref(), Some(request_id.as_str()));
    let completion_tokens = traced["usage"]["completion_tokens"].as_i64().unwrap().to_string();
    assert_eq!(attribute(engine, "expertmesh.completion_tokens"), Some(completion_tokens));
    assert_eq!(attribute(engine, "expertmesh.prompt_tokens").as_deref(), Some("4"));
    // The engine's work lies within the gateway's span.
    assert!(gateway.start_time_unix_nano <= engine.start_time_unix_nano);
    assert!(engine.end_time_unix_nano <= gateway.end_time_unix_nano);
    assert!(spans_of(unsampled).is_empty(), "a trace the client did not sample is not exported");
}
