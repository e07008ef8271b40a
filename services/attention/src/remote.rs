//! The remote expert backend: at each MoE layer, groups the batch's routing slots by the shard
//! chosen for each expert, sends each shard one call holding only the tokens it serves (one copy
//! of a token per shard, not per expert), waits for all calls concurrently, and sums the partial
//! results. A shard that fails is excluded and its tokens are retried on another replica before
//! the step fails.
//!
//! `forward` is called on a compute thread (inside the model's layer loop); the calls run on the
//! process's tokio runtime, which this thread only blocks on.

use expertmesh_model::ExpertError;
use expertmesh_model::engine::{ExpertBackend, NO_EXPERT};
use expertmesh_model::layers::router::Routes;
use expertmesh_proto::v1::ForwardRequest;
use expertmesh_runtime::metrics::{FailoverReason, dispatch};
use expertmesh_runtime::registry::{RegistryView, Role, Topology, WorkerRecord};
use expertmesh_runtime::wire::{self, WireDType};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::Code;

use crate::placement::{Placement, PlacementOverride, distance};
use crate::shard_link::ShardLink;

/// A failed shard is ranked last for at least this long (or the call timeout, if longer).
const SUSPECT_FOR: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct RemoteOptions {
    pub wire: WireDType,
    /// Deadline of one shard call.
    pub call_timeout: Duration,
    /// Send calls on one long-lived stream per worker (default) instead of one RPC each.
    pub streaming: bool,
    /// Operator overrides of the placement the registry implies.
    pub overrides: PlacementOverride,
    /// This worker's place (replicas close to it are preferred).
    pub topology: Topology,
    pub n_blocks: usize,
    pub n_experts: usize,
    pub dim: usize,
}

/// Traffic and failover counters (for benchmarks and metrics).
#[derive(Debug, Default)]
pub struct RemoteStats {
    pub calls: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Per (token, shard) pair: one d-vector each way plus k expert ids and weights (spec §10):
    /// the ideal traffic of a dispatch that sends one copy of a token to each shard it needs.
    pub ideal_bytes: AtomicU64,
    /// (token, layer) pairs dispatched.
    pub token_layers: AtomicU64,
    pub retries: AtomicU64,
}

pub struct RemoteExperts {
    rt: tokio::runtime::Handle,
    opts: RemoteOptions,
    view: watch::Receiver<Arc<RegistryView>>,
    placement: Mutex<CachedPlacement>,
    links: Mutex<HashMap<String, Arc<ShardLink>>>,
    suspects: Mutex<HashMap<String, Instant>>,
    rotation: AtomicU64,
    pub stats: Arc<RemoteStats>,
    /// Trace ids of the sampled requests in the current step (sent with every call).
    step_traces: Mutex<Vec<Vec<u8>>>,
}

#[derive(Default)]
struct CachedPlacement {
    view: Option<Arc<RegistryView>>,
    /// The expert workers' records the placement was built from (load figures zeroed).
    experts: Vec<WorkerRecord>,
    placement: Arc<Placement>,
}

/// What one shard gets in one attempt.
struct ShardCall {
    shard: usize,
    /// Batch token indices, ascending (row i of the call is token `tokens[i]`).
    tokens: Vec<usize>,
    /// Routing slots (indices into `routes.experts`) it serves.
    slots: Vec<usize>,
}

impl RemoteExperts {
    pub fn new(rt: tokio::runtime::Handle, view: watch::Receiver<Arc<RegistryView>>, opts: RemoteOptions) -> Self {
        RemoteExperts {
            rt,
            opts,
            view,
            placement: Mutex::new(CachedPlacement::default()),
            links: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            rotation: AtomicU64::new(0),
            stats: Arc::new(RemoteStats::default()),
            step_traces: Mutex::new(Vec::new()),
        }
    }

    /// The placement for the registry's current view. Rebuilt only when the expert workers'
    /// records change (load updates of attention workers arrive several times a second); links
    /// to workers that left are closed then.
    pub fn placement(&self) -> Arc<Placement> {
        let view = self.view.borrow().clone();
        let mut cached = self.placement.lock().unwrap();
        if cached.view.as_ref().is_some_and(|v| Arc::ptr_eq(v, &view)) {
            return cached.placement.clone();
        }
        let experts: Vec<WorkerRecord> = view
            .of_role(Role::Expert)
            .map(|r| WorkerRecord { load: Default::default(), resident_bytes: 0, ..r.clone() })
            .collect();
        if cached.view.is_none() || experts != cached.experts {
            let p = Placement::from_view(&view, self.opts.n_blocks, self.opts.n_experts, &self.opts.overrides);
            let live: std::collections::HashSet<&str> = p.shards.iter().map(|s| s.endpoint.as_str()).collect();
            self.links.lock().unwrap().retain(|endpoint, _| live.contains(endpoint.as_str()));
            export_coverage(&p, self.opts.n_blocks, self.opts.n_experts);
            cached.placement = Arc::new(p);
            cached.experts = experts;
        }
        cached.view = Some(view);
        cached.placement.clone()
    }

    fn link(&self, endpoint: &str) -> Result<Arc<ShardLink>, String> {
        let mut links = self.links.lock().unwrap();
        if let Some(l) = links.get(endpoint) {
            return Ok(l.clone());
        }
        // Channels spawn their connection task on the runtime; this runs on a compute thread.
        let _runtime = self.rt.enter();
        let link = Arc::new(ShardLink::new(endpoint, self.opts.streaming)?);
        links.insert(endpoint.to_string(), link.clone());
        Ok(link)
    }

    /// Assigns each pending slot to a replica: never one that failed in this call; live before
    /// suspect; near before far; then by the call's rotation.
    fn plan(
        &self,
        placement: &Placement,
        layer: usize,
        routes: &Routes,
        pending: &[usize],
        failed: &[bool],
        rotation: usize,
    ) -> Result<Vec<ShardCall>, ExpertError> {
        let n = placement.shards.len().max(1);
        let now = Instant::now();
        let suspects = self.suspects.lock().unwrap();
        let rank: Vec<(bool, u8, usize)> = placement
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let suspect = suspects.get(&s.id).is_some_and(|t| now < *t);
                (suspect, distance(&self.opts.topology, &s.topology), (i + n - rotation % n) % n)
            })
            .collect();
        drop(suspects);
        let mut by_shard: BTreeMap<usize, ShardCall> = BTreeMap::new();
        for &slot in pending {
            let e = routes.experts[slot] as usize;
            let replicas = placement.replicas(layer, e);
            let Some(&shard) = replicas.iter().filter(|&&s| !failed[s]).min_by_key(|&&s| rank[s]) else {
                let reason = if replicas.is_empty() {
                    "no registered expert worker holds it".to_string()
                } else {
                    format!("every replica failed ({} tried)", replicas.len())
                };
                return Err(ExpertError::Unavailable { layer, expert: e, reason });
            };
            let call =
                by_shard.entry(shard).or_insert_with(|| ShardCall { shard, tokens: Vec::new(), slots: Vec::new() });
            let t = slot / routes.k;
            if call.tokens.last() != Some(&t) {
                call.tokens.push(t);
            }
            call.slots.push(slot);
        }
        Ok(by_shard.into_values().collect())
    }

    fn request(&self, layer: usize, hidden: &[f32], routes: &Routes, call: &ShardCall) -> ForwardRequest {
        let (d, k) = (self.opts.dim, routes.k);
        let mut rows = Vec::with_capacity(call.tokens.len() * d);
        let mut expert_ids = vec![NO_EXPERT; call.tokens.len() * k];
        let mut weights = vec![0.0f32; call.tokens.len() * k];
        for &t in &call.tokens {
            rows.extend_from_slice(&hidden[t * d..(t + 1) * d]);
        }
        for &slot in &call.slots {
            let (t, j) = (slot / k, slot % k);
            // `tokens` is ascending (the plan walks sorted slots).
            let row = call.tokens.binary_search(&t).expect("every slot's token is in its call");
            expert_ids[row * k + j] = routes.experts[slot];
            weights[row * k + j] = routes.weights[slot];
        }
        ForwardRequest {
            call_id: 0,
            layer: layer as u32,
            hidden: Some(wire::encode(&rows, call.tokens.len(), d, self.opts.wire)),
            expert_ids,
            weights,
            experts_per_token: k as u32,
            output_dtype: self.opts.wire.to_proto() as i32,
            trace_ids: self.step_traces.lock().unwrap().clone(),
        }
    }
}

/// Replicas of each expert (the fewest over the layers), for the "no live replica" alert.
fn export_coverage(p: &Placement, n_blocks: usize, n_experts: usize) {
    let gauge = &dispatch().live_replicas;
    for e in 0..n_experts {
        let fewest = (0..n_blocks).map(|l| p.replicas(l, e).len()).min().unwrap_or(0);
        gauge.with_label_values(&[&e.to_string()]).set(fewest as i64);
    }
}

/// How a shard call ended.
enum Outcome {
    Done(Vec<f32>),
    /// Worth retrying on another replica (transport failure, shard gone or not holding).
    Failover(FailoverReason, String),
    /// The request itself was wrong: retrying cannot help.
    Fatal(ExpertError),
}

impl ExpertBackend for RemoteExperts {
    fn begin_step(&self, trace_ids: &[[u8; 16]]) {
        *self.step_traces.lock().unwrap() = trace_ids.iter().map(|t| t.to_vec()).collect();
    }

    fn forward(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        let d = self.opts.dim;
        let placement = self.placement();
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed) as usize;
        let mut out = vec![0.0f32; routes.tokens() * d];
        let mut failed = vec![false; placement.shards.len()];
        let mut pending: Vec<usize> = (0..routes.experts.len()).filter(|&s| routes.experts[s] != NO_EXPERT).collect();
        let stats = &self.stats;
        let metrics = dispatch();
        stats.token_layers.fetch_add(routes.tokens() as u64, Ordering::Relaxed);
        metrics.tokens.inc_by(routes.tokens() as u64);
        let started = Instant::now();
        let mut combining = Duration::ZERO;
        while !pending.is_empty() {
            pending.sort_unstable();
            let calls = self.plan(&placement, layer, routes, &pending, &failed, rotation)?;
            let mut requests = Vec::with_capacity(calls.len());
            for c in &calls {
                let req = self.request(layer, hidden, routes, c);
                let bytes = req.encoded_len() as u64;
                stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                metrics.sent_bytes.inc_by(bytes);
                let ideal = c.tokens.len() * (2 * d * self.opts.wire.bytes() + 8 * routes.k);
                stats.ideal_bytes.fetch_add(ideal as u64, Ordering::Relaxed);
                let shard = &placement.shards[c.shard];
                requests.push((self.link(&shard.endpoint), req, c.tokens.len()));
            }
            stats.calls.fetch_add(calls.len() as u64, Ordering::Relaxed);
            metrics.calls.inc_by(calls.len() as u64);
            let timeout = self.opts.call_timeout;
            let received = stats.clone();
            // The calls run concurrently, polled from this thread: no task hop per call.
            let outcomes: Vec<Outcome> = self.rt.block_on(futures_util::future::join_all(
                requests.into_iter().map(|(client, req, rows)| call_shard(client, req, rows, d, timeout, &received)),
            ));
            pending.clear();
            let combine_start = Instant::now();
            // Sum in shard order (not completion order), so results do not depend on timing.
            for (c, outcome) in calls.iter().zip(outcomes) {
                match outcome {
                    Outcome::Done(y) => {
                        for (i, &t) in c.tokens.iter().enumerate() {
                            out[t * d..(t + 1) * d].iter_mut().zip(&y[i * d..(i + 1) * d]).for_each(|(o, v)| *o += v);
                        }
                    }
                    Outcome::Failover(reason, why) => {
                        let shard = &placement.shards[c.shard];
                        tracing::warn!(shard = %shard.id, layer, reason = %why, "expert call failed; retrying on another replica");
                        metrics.failover(reason);
                        failed[c.shard] = true;
                        let suspect_for = SUSPECT_FOR.max(self.opts.call_timeout);
                        self.suspects.lock().unwrap().insert(shard.id.clone(), Instant::now() + suspect_for);
                        if let Some(link) = self.links.lock().unwrap().get(&shard.endpoint) {
                            link.reset();
                        }
                        stats.retries.fetch_add(1, Ordering::Relaxed);
                        pending.extend_from_slice(&c.slots);
                    }
                    Outcome::Fatal(e) => return Err(e),
                }
            }
            combining += combine_start.elapsed();
        }
        metrics.dispatch_seconds.observe((started.elapsed() - combining).as_secs_f64());
        metrics.combine_seconds.observe(combining.as_secs_f64());
        Ok(out)
    }
}

async fn call_shard(
    link: Result<Arc<ShardLink>, String>,
    req: ForwardRequest,
    rows: usize,
    dim: usize,
    timeout: Duration,
    stats: &RemoteStats,
) -> Outcome {
    let link = match link {
        Ok(l) => l,
        Err(e) => return Outcome::Failover(FailoverReason::Unavailable, e),
    };
    let reply = match tokio::time::timeout(timeout, link.call(req)).await {
        Err(_) => return Outcome::Failover(FailoverReason::Timeout, format!("no reply within {timeout:?}")),
        Ok(Err(status)) => {
            return match status.code() {
                Code::InvalidArgument | Code::OutOfRange => {
                    Outcome::Fatal(ExpertError::InvalidRequest(status.message().to_string()))
                }
                _ => {
                    Outcome::Failover(FailoverReason::Unavailable, format!("{:?}: {}", status.code(), status.message()))
                }
            };
        }
        Ok(Ok(r)) => r,
    };
    let bytes = reply.encoded_len() as u64;
    stats.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    dispatch().received_bytes.inc_by(bytes);
    match wire::decode(reply.output.as_ref(), dim, "output") {
        Ok(m) if m.rows == rows => Outcome::Done(m.values),
        // A worker answering nonsense (another checkpoint, a bug) is treated like a failed one:
        // excluded, and its tokens go to another replica.
        Ok(m) => {
            Outcome::Failover(FailoverReason::InvalidReply, format!("invalid reply: {} rows for {rows} tokens", m.rows))
        }
        Err(e) => Outcome::Failover(FailoverReason::InvalidReply, format!("invalid reply: {e}")),
    }
}
