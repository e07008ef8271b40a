//! The scheduler over an in-process model (micro preset, in-process experts): continuous
//! batching under a KV budget, stop and length endings, seeded sampling.

use expertmesh_attention::scheduler::{EngineEvent, EngineOptions, FinishReason, GenerateParams, Scheduler};
use expertmesh_model::Preset;
use expertmesh_model::checkpoint::{InitDtype, in_memory};
use expertmesh_model::engine::{
    ExpertSelection, ExpertStore, LoadOptions, LocalExperts, Model, SamplingParams, Step, state_bytes,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;

struct Setup {
    model: Arc<Model>,
    experts: Arc<ExpertStore>,
}

fn setup(max_context: usize) -> Setup {
    let mut cfg = Preset::Micro.config();
    cfg.max_position_embeddings = max_context;
    let ckpt = in_memory(&cfg, 3, InitDtype::Bf16).unwrap();
    let opts = LoadOptions { mtp: false, ..LoadOptions::default() };
    Setup {
        model: Arc::new(Model::load(&ckpt, opts).unwrap()),
        experts: Arc::new(ExpertStore::load(&ckpt, &ExpertSelection::all(), opts.sim).unwrap()),
    }
}

impl Setup {
    fn scheduler(&self, opts: EngineOptions) -> Scheduler {
        Scheduler::start(self.model.clone(), Arc::new(LocalExperts(self.experts.clone())), opts)
    }

    /// Greedy decoding of one sequence straight through the model.
    fn solo(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut state = self.model.new_sequence();
        let mut out = self.model.forward(&mut [Step::new(&mut state, prompt)], &*self.experts).unwrap();
        let mut tokens = Vec::new();
        while tokens.len() < n {
            let t = expertmesh_model::engine::sampling::argmax(&out[0].logits) as u32;
            tokens.push(t);
            out = self.model.forward(&mut [Step::new(&mut state, &[t])], &*self.experts).unwrap();
        }
        tokens
    }
}

fn params(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateParams {
    GenerateParams {
        id: id.into(),
        prompt,
        sampling: SamplingParams::default(),
        seed: 0,
        max_tokens,
        stop_tokens: vec![],
        logprobs: false,
        trace: None,
    }
}

/// Collects a request's tokens and its finish reason.
fn run(mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> (Vec<u32>, FinishReason) {
    let mut tokens = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            EngineEvent::Token { token, index, .. } => {
                assert_eq!(index, tokens.len());
                tokens.push(token);
            }
            EngineEvent::Finished { reason, completion_tokens, .. } => {
                assert_eq!(completion_tokens, tokens.len());
                return (tokens, reason);
            }
            EngineEvent::Failed(e) => panic!("request failed: {e}"),
            EngineEvent::Admitted { .. } => {}
        }
    }
    panic!("events ended without Finished");
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (seed * 31 + i * 17 + 1) % 250 + 2).collect()
}

#[test]
fn queued_sequences_under_a_kv_budget_each_equal_their_solo_run() {
    let s = setup(4096);
    let cfg = s.model.config().clone();
    // Room for three sequences of the longest request at a time; twelve are submitted.
    let longest = state_bytes(&cfg, 30 + 12, false) as u64;
    let opts = EngineOptions { max_running: 8, prefill_chunk: 16, kv_budget_bytes: 3 * longest, max_waiting: 100 };
    let sched = s.scheduler(opts);
    let requests: Vec<(Vec<u32>, usize)> =
        (0..12).map(|i| (prompt(i, 5 + (i as usize * 7) % 26), 4 + i as usize % 9)).collect();
    let receivers: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(i, (p, n))| sched.submit(params(&format!("r{i}"), p.clone(), *n)).unwrap())
        .collect();
    for ((p, n), rx) in requests.iter().zip(receivers) {
        let (tokens, reason) = run(rx);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(tokens, s.solo(p, *n), "prompt of {} tokens", p.len());
    }
    let st = &sched.stats;
    assert!(st.peak_kv_bytes_used.load(Ordering::Relaxed) <= 3 * longest);
    assert!(st.peak_running.load(Ordering::Relaxed) >= 2, "sequences were batched");
    // Let the engine publish its final state.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!((st.running.load(Ordering::Relaxed), st.kv_bytes_used.load(Ordering::Relaxed)), (0, 0));
}

#[test]
fn stop_tokens_context_length_and_oversized_requests() {
    let s = setup(64);
    let sched = s.scheduler(EngineOptions::default());
    let p = prompt(1, 10);
    let expected = s.solo(&p, 6);
    // Stop on the third token: it is emitted, then the sequence ends with STOP.
    let mut stop = params("stop", p.clone(), 50);
    stop.stop_tokens = vec![expected[2]];
    let (tokens, reason) = run(sched.submit(stop).unwrap());
    let first_stop = expected.iter().position(|t| *t == expected[2]).unwrap();
    assert_eq!((tokens.as_slice(), reason), (&expected[..=first_stop], FinishReason::Stop));

    // 60 prompt tokens in a 64-token context: tokens for positions 60..63 are fed back, the
    // fifth is emitted and the sequence ends with LENGTH even though max_tokens is larger.
    let (tokens, reason) = run(sched.submit(params("long", prompt(2, 60), 50)).unwrap());
    assert_eq!((tokens.len(), reason), (5, FinishReason::Length));

    let e = sched.submit(params("too-long", prompt(3, 64), 4)).unwrap_err();
    assert!(e.to_string().starts_with("prompt_tokens"), "{e}");
    let tiny_budget = s.scheduler(EngineOptions { kv_budget_bytes: 1000, ..EngineOptions::default() });
    // A request that could never fit the KV budget is a bad request (retrying cannot help), not
    // overload.
    let e = tiny_budget.submit(params("big", prompt(4, 20), 4)).unwrap_err();
    assert_eq!(e.kind(), "invalid_argument", "{e}");
    assert!(e.to_string().starts_with("sampling.max_tokens"), "{e}");
}

#[test]
fn seeded_sampling_reproduces_and_different_seeds_differ() {
    let s = setup(4096);
    let sched = s.scheduler(EngineOptions::default());
    let sample = |seed: u64| {
        let mut p = params("s", prompt(5, 8), 24);
        p.sampling = SamplingParams { temperature: 1.5, top_k: 0, top_p: 1.0 };
        p.seed = seed;
        run(sched.submit(p).unwrap()).0
    };
    let (a, b, c) = (sample(11), sample(11), sample(12));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, s.solo(&prompt(5, 8), 24), "temperature 1.5 is not greedy");
}
