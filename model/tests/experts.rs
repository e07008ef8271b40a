//! The attention/expert split: expert stores built from a subset of experts load only those
//! tensors, and shards combined give what one store gives.

mod common;

use common::*;
use expertmesh_model::checkpoint::writer::{generate, init_config, write_tensors};
use expertmesh_model::checkpoint::{Checkpoint, InitDtype, in_memory};
use expertmesh_model::engine::{
    ExpertBackend, ExpertSelection, ExpertStore, LoadOptions, Model, NO_EXPERT, teacher_forced_logits,
};
use expertmesh_model::layers::QuantSim;
use expertmesh_model::layers::router::Routes;
use expertmesh_model::{ExpertError, Preset};

/// Sends each routing slot to one shard holding its expert (the first, as a placement would pick
/// one replica) and sums the shards' answers — what a remote backend does over the network.
struct Sharded(Vec<ExpertStore>);

impl ExpertBackend for Sharded {
    fn forward(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        let owner = |e: u32| self.0.iter().position(|s| e != NO_EXPERT && s.holds(layer, e as usize));
        let mut total = vec![0.0f32; hidden.len()];
        for (i, shard) in self.0.iter().enumerate() {
            let experts = routes.experts.iter().map(|&e| if owner(e) == Some(i) { e } else { NO_EXPERT }).collect();
            let part = Routes { k: routes.k, experts, weights: routes.weights.clone() };
            for (t, v) in total.iter_mut().zip(shard.forward(layer, hidden, &part)?) {
                *t += v;
            }
        }
        Ok(total)
    }
}

#[test]
fn uneven_shards_with_replicas_equal_one_store() {
    let ckpt = in_memory(&Preset::Micro.config(), 7, InitDtype::Fp8).unwrap();
    // Without the quantisation simulations: their roundings turn a last-bit difference of
    // summation order into a whole FP8 step when a value sits near a rounding boundary, and that
    // grows over the following positions (measured: 0.1 relative with them on, 3e-7 off).
    let sim = QuantSim::off();
    let model = Model::load(&ckpt, LoadOptions { sim, ..LoadOptions::default() }).unwrap();
    let whole = ExpertStore::load(&ckpt, &ExpertSelection::all(), sim).unwrap();
    // Uneven: 0-2 (+5), 3-9, 10-15. Expert 5 has a replica on the first shard; the slot goes to
    // one holder only, so it is counted once.
    let shards = Sharded(vec![
        ExpertStore::load(&ckpt, &ExpertSelection::experts([0, 1, 2, 5]), sim).unwrap(),
        ExpertStore::load(&ckpt, &ExpertSelection::experts(3..10), sim).unwrap(),
        ExpertStore::load(&ckpt, &ExpertSelection::experts(10..16), sim).unwrap(),
    ]);
    let ids = tokens(40, ckpt.config().vocab_size, 5);
    let a = teacher_forced_logits(&model, &whole, &ids, 30).unwrap();
    let b = teacher_forced_logits(&model, &shards, &ids, 30).unwrap();
    // Only the association of the fp32 sum over a token's experts differs.
    let d = rel_diff(&b, &a);
    assert!(d < 1e-4, "relative difference {d}");
    let held: usize = shards.0.iter().map(|s| s.resident_bytes()).sum();
    let replica = shards.0[0].resident_bytes() / 4; // one of the first shard's four experts
    assert_eq!(held, whole.resident_bytes() + replica);
}

#[test]
fn a_shard_loads_only_its_own_expert_tensors() {
    // A checkpoint that holds only experts 0-7: a shard of them loads, the full store cannot.
    let cfg = init_config(&Preset::Micro.config(), InitDtype::Fp8);
    let mut tensors = generate(&cfg, 7, InitDtype::Fp8).unwrap();
    tensors.retain(|t| !(8..16).any(|e| t.name.contains(&format!(".ffn.experts.{e}."))));
    let tmp = tempfile::tempdir().unwrap();
    write_tensors(tmp.path(), &cfg, &tensors, 1).unwrap();
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let shard = ExpertStore::load(&ckpt, &ExpertSelection::experts(0..8), QuantSim::default()).unwrap();
    assert!(shard.holds(3, 7) && !shard.holds(3, 8));
    let err = ExpertStore::load(&ckpt, &ExpertSelection::all(), QuantSim::default()).err().unwrap().to_string();
    assert!(err.contains("missing tensor layers.0.ffn.experts.8.w1.weight"), "{err}");
    // The attention side never needs routed experts.
    Model::load(&ckpt, LoadOptions::default()).unwrap();

    // Resident bytes are exactly those of the shard's tensors: FP4 codes and UE8M0 scales, one
    // byte per stored element, kept as stored.
    let expected: usize = ckpt
        .names()
        .filter(|n| (0..8).any(|e| n.contains(&format!(".ffn.experts.{e}."))))
        .map(|n| ckpt.entry(n).unwrap().shape.iter().product::<usize>())
        .sum();
    assert_eq!(shard.resident_bytes(), expected);
}

#[test]
fn requests_are_validated_and_name_the_problem() {
    let ckpt = in_memory(&Preset::Micro.config(), 7, InitDtype::Bf16).unwrap();
    let store = ExpertStore::load(&ckpt, &ExpertSelection::experts(0..4), QuantSim::default()).unwrap();
    let d = ckpt.config().dim;
    let hidden = vec![0.5f32; 2 * d];
    let ok = Routes { k: 2, experts: vec![0, 1, 2, 3], weights: vec![0.5; 4] };
    assert_eq!(store.forward(3, &hidden, &ok).unwrap().len(), 2 * d);
    let cases: Vec<(Routes, Vec<f32>, usize, &str)> = vec![
        (Routes { k: 2, experts: vec![0, 9, 2, 3], weights: vec![0.5; 4] }, hidden.clone(), 3, "expert 9 is not held"),
        (Routes { k: 2, experts: vec![0, 99, 2, 3], weights: vec![0.5; 4] }, hidden.clone(), 3, "expert id 99"),
        (Routes { k: 2, experts: vec![0, 1, 2], weights: vec![0.5; 3] }, hidden.clone(), 3, "tokens × k"),
        (ok.clone(), vec![0.5f32; d], 3, "hidden has"),
        (
            Routes { k: 2, experts: vec![0, 1, 2, 3], weights: vec![0.5, f32::NAN, 0.5, 0.5] },
            hidden.clone(),
            3,
            "not finite",
        ),
        (
            ok.clone(),
            {
                let mut h = hidden.clone();
                h[7] = f32::INFINITY;
                h
            },
            3,
            "hidden[7]",
        ),
        (ok.clone(), hidden.clone(), 42, "layer 42"),
    ];
    for (routes, h, layer, want) in cases {
        let err = store.forward(layer, &h, &routes).unwrap_err().to_string();
        assert!(err.contains(want), "expected {want:?} in {err}");
    }
}

/// The on-this-thread path (expert workers run small calls where they arrive) gives what the
/// pool path gives, rejects what it rejects, and `call_weight_bytes` counts each distinct held
/// expert once.
#[test]
fn computing_on_the_calling_thread_equals_the_pool_path() {
    let ckpt = in_memory(&Preset::Micro.config(), 7, InitDtype::Fp8).unwrap();
    let store = ExpertStore::load(&ckpt, &ExpertSelection::experts(0..4), QuantSim::default()).unwrap();
    let d = ckpt.config().dim;
    let hidden: Vec<f32> = (0..3 * d).map(|i| (i as f32 * 0.37).sin()).collect();
    // Three tokens, two slots each: expert 1 twice, one empty slot.
    let routes = Routes { k: 2, experts: vec![1, 0, 3, NO_EXPERT, 1, 2], weights: vec![0.4, 0.6, 0.7, 0.0, 0.2, 0.8] };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for layer in [0, 3] {
        let pooled = pool.install(|| store.compute(layer, &hidden, &routes)).unwrap();
        let here = store.compute_here(layer, &hidden, &routes).unwrap();
        // The same products summed in the same order per row, whichever thread runs them: equal.
        assert_eq!(here, pooled, "layer {layer}");
    }
    let bad = Routes { k: 2, experts: vec![1, 9, 3, 0, 1, 2], weights: vec![0.5; 6] };
    let err = store.compute_here(0, &hidden, &bad).unwrap_err().to_string();
    assert!(err.contains("expert 9 is not held"), "{err}");

    let one = store.call_weight_bytes(0, &Routes { k: 2, experts: vec![1, NO_EXPERT], weights: vec![1.0, 0.0] });
    assert!(one > 0);
    assert_eq!(store.call_weight_bytes(0, &routes), 4 * one, "experts 0-3 once each (same shapes)");
}

#[test]
fn explicit_pairs_select_per_layer_experts() {
    let ckpt = in_memory(&Preset::Micro.config(), 7, InitDtype::Bf16).unwrap();
    let store = ExpertStore::load(&ckpt, &ExpertSelection::pairs([(0, 3), (5, 11)]), QuantSim::default()).unwrap();
    assert_eq!(store.held().collect::<Vec<_>>(), vec![(0, 3), (5, 11)]);
    let err =
        ExpertStore::load(&ckpt, &ExpertSelection::pairs([(0, 16)]), QuantSim::default()).err().unwrap().to_string();
    assert!(err.contains("layer 0 expert 16"), "{err}");
    let err = ExpertSelection::parse_ids("0-99999999999").unwrap_err();
    assert!(err.contains("0-99999999999"), "{err}");
}

/// A backend that answers with the wrong size is an error, not a panic, and the states are
/// marked as needing a restart.
#[test]
fn malformed_backend_reply_is_an_error() {
    struct Short;
    impl ExpertBackend for Short {
        fn forward(&self, _: usize, hidden: &[f32], _: &Routes) -> Result<Vec<f32>, ExpertError> {
            Ok(vec![0.0; hidden.len() / 2])
        }
    }
    let ckpt = in_memory(&Preset::Micro.config(), 7, InitDtype::Bf16).unwrap();
    let model = Model::load(&ckpt, LoadOptions::default()).unwrap();
    let mut s = model.new_sequence();
    let err =
        model.forward(&mut [expertmesh_model::engine::Step::new(&mut s, &[1, 2, 3])], &Short).unwrap_err().to_string();
    assert!(err.contains("expert backend returned"), "{err}");
    assert!(s.is_poisoned());
    assert!(model.forward(&mut [], &Short).unwrap().is_empty());
}
