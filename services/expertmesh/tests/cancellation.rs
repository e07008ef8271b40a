//! Abandoned expert calls are not computed: an expert worker whose compute pool is busy receives
//! calls that the engine then gives up on (a unary call dropped at its timeout, and a streamed
//! call whose stream the engine's link cancels), and skips them when the pool frees, counting
//! them as cancelled. Real gRPC on loopback, an in-process worker with a one-thread pool.

mod common;

use expertmesh_attention::shard_link::ShardLink;
use expertmesh_expert::{DEFAULT_MAX_TOKENS, ExpertWorkerOptions};
use expertmesh_model::engine::{ExpertSelection, ExpertStore};
use expertmesh_model::layers::QuantSim;
use expertmesh_proto::v1::ForwardRequest;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_runtime::registry::{MemoryRegistry, Registry, Topology};
use expertmesh_runtime::shutdown::Shutdown;
use expertmesh_runtime::wire::{self, WireDType};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORKER: &str = "cancellation-test";

/// Eight tokens of layer 0, each routed to experts 0..4: more tokens than the worker computes
/// inline, so the call waits for the pool.
fn request(dim: usize) -> ForwardRequest {
    let (tokens, k) = (8, 4);
    let hidden: Vec<f32> = (0..tokens * dim).map(|i| ((i % 17) as f32 - 8.0) / 16.0).collect();
    ForwardRequest {
        call_id: 0,
        layer: 0,
        hidden: Some(wire::encode(&hidden, tokens, dim, WireDType::F32)),
        expert_ids: (0..tokens * k).map(|i| (i % k) as u32).collect(),
        weights: vec![0.25; tokens * k],
        experts_per_token: k as u32,
        output_dtype: WireDType::F32.to_proto() as i32,
        trace_ids: Vec::new(),
    }
}

/// This worker's value of an exported counter (`kind` filters the error counter).
fn counter(name: &str, kind: Option<&str>) -> f64 {
    let worker = format!("worker=\"{WORKER}\"");
    expertmesh_runtime::metrics::render()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&worker))
        .filter(|l| kind.is_none_or(|k| l.contains(&format!("kind=\"{k}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_abandoned_while_queued_are_skipped() {
    let ckpt = common::checkpoint();
    let dim = ckpt.config().dim;
    let store = Arc::new(ExpertStore::load(&ckpt, &ExpertSelection::all(), QuantSim::default()).unwrap());
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap());
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    let opts = ExpertWorkerOptions {
        listen: "127.0.0.1:0".into(),
        advertise: None,
        id: Some(WORKER.into()),
        topology: Topology::default(),
        selection: ExpertSelection::all(),
        max_tokens: DEFAULT_MAX_TOKENS,
        drain: Duration::from_secs(5),
        pool: Some(pool.clone()),
        per_layer_metrics: false,
    };
    let worker = expertmesh_expert::start(store, opts, registry, Shutdown::new()).await.unwrap();

    // Occupy the worker's only compute thread until released.
    let (release, held) = std::sync::mpsc::channel::<()>();
    pool.spawn(move || {
        let _ = held.recv();
    });

    // A unary call dropped at its deadline (the HTTP/2 stream is reset).
    let mut client = ExpertServiceClient::connect(worker.endpoint.clone()).await.unwrap();
    let unary = tokio::time::timeout(Duration::from_millis(300), client.forward(request(dim))).await;
    assert!(unary.is_err(), "answered although the pool was busy: {unary:?}");
    // A streamed call the engine's link gives up on, as after a timeout.
    let link = ShardLink::new(&worker.endpoint, true).unwrap();
    let streamed = tokio::time::timeout(Duration::from_millis(300), link.call(request(dim))).await;
    assert!(streamed.is_err(), "answered although the pool was busy: {streamed:?}");
    link.reset();
    // The resets reach the worker's connection tasks, which the busy pool does not hold up, in
    // microseconds on loopback; two seconds is a wide margin before the pool frees.
    tokio::time::sleep(Duration::from_secs(2)).await;
    release.send(()).unwrap();

    // Each queued call either runs (its queueing time is recorded) or is skipped (cancelled).
    let ran = || counter("expertmesh_expert_queue_seconds_count", None);
    let skipped = || counter("expertmesh_expert_forward_errors_total", Some("cancelled"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while ran() + skipped() < 2.0 {
        assert!(Instant::now() < deadline, "the two queued calls never left the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((ran(), skipped()), (0.0, 2.0), "(calls run, calls skipped)");
    assert_eq!(counter("expertmesh_expert_routed_tokens_total", None), 0.0, "an abandoned call was computed");

    // The worker keeps serving, on the same link too (it opens a new stream).
    let reply = link.call(request(dim)).await.unwrap();
    assert_eq!(wire::decode(reply.output.as_ref(), dim, "output").unwrap().rows, 8);
    client.forward(request(dim)).await.unwrap();
    assert_eq!(counter("expertmesh_expert_forward_calls_total", None), 2.0);
    assert_eq!(counter("expertmesh_expert_routed_tokens_total", None), 2.0 * 8.0 * 4.0);
    assert_eq!(skipped(), 2.0);
    worker.stop().await.unwrap();
}
