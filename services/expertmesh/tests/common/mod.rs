//! Shared by the cluster tests: worker processes of the real binary, the in-process reference
//! model, and a gRPC client for the engine.
#![allow(dead_code)]

pub mod http;

use expertmesh_model::ExpertError;
use expertmesh_model::Preset;
use expertmesh_model::checkpoint::{Checkpoint, InitDtype, in_memory};
use expertmesh_model::engine::{
    ExpertBackend, ExpertSelection, ExpertStore, LoadOptions, LocalExperts, Model, NO_EXPERT, Step,
};
use expertmesh_model::layers::QuantSim;
use expertmesh_model::layers::router::Routes;
use expertmesh_proto::v1::engine_service_client::EngineServiceClient;
use expertmesh_proto::v1::generate_event::Event;
use expertmesh_proto::v1::{GenerateRequest, SamplingParams};
use expertmesh_runtime::wire::{WireDType, round_trip};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use tonic::transport::Channel;

/// Workers and the reference both generate this model (the same seed gives the same bytes).
pub const SEED: &str = "7";

pub fn checkpoint() -> Checkpoint {
    checkpoint_with_vocab(Preset::Tiny.config().vocab_size)
}

/// The workers' model with `vocab` rows (`--vocab-size`).
pub fn checkpoint_with_vocab(vocab: usize) -> Checkpoint {
    let mut cfg = Preset::Tiny.config();
    cfg.vocab_size = vocab;
    in_memory(&cfg, SEED.parse().unwrap(), InitDtype::Bf16).unwrap()
}

/// A worker process of the `expertmesh` binary; killed (SIGKILL) when dropped.
pub struct Worker {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    pub endpoint: String,
    pub id: String,
    /// The whole "listening on" line (some roles print more than one address).
    pub line: String,
}

impl Worker {
    /// Starts `expertmesh <role> --preset tiny --seed 7 --listen 127.0.0.1:0 <args>` and waits for
    /// its "listening on" line.
    pub fn spawn(role: &str, args: &[&str]) -> Worker {
        Self::start(&mut Self::model_role(role, args), role, None)
    }

    /// [`Self::spawn`] logging at info (expert calls at debug) into `log` instead of stderr.
    pub fn spawn_logged(role: &str, args: &[&str], log: &std::path::Path) -> Worker {
        Self::start(&mut Self::model_role(role, args), role, Some(log))
    }

    /// [`Self::spawn_plain`] logging like [`Self::spawn_logged`].
    pub fn spawn_plain_logged(role: &str, args: &[&str], log: &std::path::Path) -> Worker {
        Self::start(Command::new(env!("CARGO_BIN_EXE_expertmesh")).arg(role).args(args), role, Some(log))
    }

    fn model_role(role: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_expertmesh"));
        cmd.args([role, "--preset", "tiny", "--seed", SEED, "--listen", "127.0.0.1:0", "--drain-seconds", "2"])
            .args(args);
        cmd
    }

    fn start(cmd: &mut Command, role: &str, log: Option<&std::path::Path>) -> Worker {
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let (filter, stderr) = match log {
            Some(path) => ("info,expertmesh_expert=debug", Stdio::from(std::fs::File::create(path).unwrap())),
            None => ("warn", Stdio::inherit()),
        };
        let mut child = cmd
            .env("EXPERTMESH_THREADS", "2")
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning expertmesh");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let (head, endpoint) = line
            .trim()
            .split_once(" listening on ")
            .unwrap_or_else(|| panic!("{role} {args:?} did not start: {line:?}"));
        let endpoint = endpoint.split_whitespace().next().unwrap().to_string();
        let id = head.split_whitespace().last().unwrap().to_string();
        Worker { child, _stdout: stdout, endpoint, id, line: line.trim().to_string() }
    }

    /// Starts `expertmesh <role> <args>` (no model flags) and waits for its "listening on" line.
    pub fn spawn_plain(role: &str, args: &[&str]) -> Worker {
        Self::start(Command::new(env!("CARGO_BIN_EXE_expertmesh")).arg(role).args(args), role, None)
    }

    /// The `metrics http://…` address of the start line (expert and attention workers).
    pub fn metrics_url(&self) -> String {
        let rest =
            self.line.split("metrics ").nth(1).unwrap_or_else(|| panic!("no metrics address in {:?}", self.line));
        rest.trim_end_matches(')').split_whitespace().next().unwrap().trim_end_matches(')').to_string()
    }

    pub fn expert(experts: &str, args: &[&str]) -> Worker {
        let mut all = vec!["--experts", experts];
        all.extend_from_slice(args);
        Worker::spawn("expert", &all)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit; returns its success.
    pub fn wait_success(&mut self) -> bool {
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// SIGTERM, then waits for the process to exit; returns its success.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the wire does to one layer's call, computed in process: hidden vectors rounded to the
/// wire type, each shard's partial sum over its own experts rounded to the wire type, partials
/// added in shard order. With f32 and two shards this is exactly the distributed arithmetic
/// (two partials add the same in either order); the plain in-process sum adds the experts in
/// one sequence instead, which differs in the last bits and can flip a near-tie in greedy
/// decoding of these random weights.
pub struct WireSimulation {
    pub store: Arc<ExpertStore>,
    pub shards: Vec<Vec<u32>>,
    pub wire: WireDType,
}

impl ExpertBackend for WireSimulation {
    fn forward(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        let mut h = hidden.to_vec();
        round_trip(&mut h, self.wire);
        let mut out = vec![0.0f32; hidden.len()];
        for shard in &self.shards {
            let experts = routes.experts.iter().map(|e| if shard.contains(e) { *e } else { NO_EXPERT }).collect();
            let masked = Routes { k: routes.k, experts, weights: routes.weights.clone() };
            let mut partial = self.store.compute(layer, &h, &masked)?;
            round_trip(&mut partial, self.wire);
            out.iter_mut().zip(&partial).for_each(|(o, p)| *o += p);
        }
        Ok(out)
    }
}

/// The in-process engine: the reference every distributed result is compared with.
pub struct Reference {
    pub model: Model,
    pub experts: Arc<ExpertStore>,
    backend: Box<dyn ExpertBackend>,
}

impl Reference {
    /// Experts summed in one sequence per token (the monolithic engine).
    pub fn new() -> Self {
        Self::load(checkpoint())
    }

    /// [`Self::new`] without the official code's quantisation simulations (FP8 KV, FP4 indexer,
    /// FP8 activations). With them, a last-bit difference (e.g. the order of a sum) can move a
    /// value across a rounding boundary and grow from there, so comparisons that expect the
    /// order of summation to be the only difference use this. (The workers' checkpoint is bf16,
    /// so their experts run no simulation either way.)
    pub fn without_quant_sims() -> Self {
        Self::load_with(checkpoint(), QuantSim::off())
    }

    fn load(ckpt: Checkpoint) -> Self {
        Self::load_with(ckpt, LoadOptions::default().sim)
    }

    fn load_with(ckpt: Checkpoint, sim: QuantSim) -> Self {
        let opts = LoadOptions { mtp: false, sim };
        let experts = Arc::new(ExpertStore::load(&ckpt, &ExpertSelection::all(), opts.sim).unwrap());
        Reference {
            model: Model::load(&ckpt, opts).unwrap(),
            backend: Box::new(LocalExperts(experts.clone())),
            experts,
        }
    }

    /// Experts summed per shard group, then the groups added: a cluster whose shards partition
    /// the experts into `groups`, with f32 on the wire.
    pub fn grouped(groups: &[std::ops::Range<u32>]) -> Self {
        Self::grouped_with_vocab(groups, Preset::Tiny.config().vocab_size)
    }

    /// [`Self::grouped`] for workers started with `--vocab-size vocab`.
    pub fn grouped_with_vocab(groups: &[std::ops::Range<u32>], vocab: usize) -> Self {
        let mut r = Self::load(checkpoint_with_vocab(vocab));
        let shards = groups.iter().map(|g| g.clone().collect()).collect();
        r.backend = Box::new(WireSimulation { store: r.experts.clone(), shards, wire: WireDType::F32 });
        r
    }

    /// Greedy tokens: the prompt prefilled at once, then one token per step.
    pub fn greedy(&self, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
        let mut state = self.model.new_sequence();
        let mut out = self.model.forward(&mut [Step::new(&mut state, prompt)], &*self.backend).unwrap();
        let mut tokens = Vec::new();
        loop {
            let next = expertmesh_model::engine::sampling::argmax(&out[0].logits) as u32;
            tokens.push(next);
            if tokens.len() == max_tokens {
                return tokens;
            }
            out = self.model.forward(&mut [Step::new(&mut state, &[next])], &*self.backend).unwrap();
        }
    }
}

/// A prompt of `len` tokens that differs per `seed`.
pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (seed * 7919 + i * 104_729 + 13) % 4000 + 2).collect()
}

pub async fn engine_client(endpoint: &str) -> EngineServiceClient<Channel> {
    EngineServiceClient::connect(endpoint.to_string()).await.expect("connecting to the engine")
}

pub fn greedy_request(prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: String::new(),
        prompt_tokens: prompt,
        sampling: Some(SamplingParams { max_tokens, ..Default::default() }),
    }
}

/// Runs a request to the end: the generated tokens, or the gRPC status that ended it.
pub async fn generate(
    client: &mut EngineServiceClient<Channel>,
    req: GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(e) = stream.message().await? {
        match e.event {
            Some(Event::Token(t)) => tokens.push(t.token_id),
            Some(Event::Finished(_)) => return Ok(tokens),
            _ => {}
        }
    }
    Err(tonic::Status::internal("stream ended without a Finished event"))
}

/// Waits until the worker's `grpc.health.v1` check says SERVING (or panics after `secs`).
pub async fn wait_ready(endpoint: &str, secs: u64) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Ok(channel) = Channel::from_shared(endpoint.to_string()).unwrap().connect().await {
            let mut c = HealthClient::new(channel);
            let r = c.check(HealthCheckRequest { service: String::new() }).await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{endpoint} did not become ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
