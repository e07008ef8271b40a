//! Helpers shared by the model's integration tests: generated checkpoints (the writer's real
//! safetensors bytes) and simple comparisons.
#![allow(dead_code)]

use expertmesh_model::checkpoint::{Checkpoint, InitDtype, in_memory};
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions, LogitRows, Model, SequenceState, Step};
use expertmesh_model::layers::QuantSim;
use expertmesh_model::{ModelConfig, Preset};

pub struct Loaded {
    pub model: Model,
    pub experts: ExpertStore,
}

pub fn load(cfg: &ModelConfig, dtype: InitDtype, sim: QuantSim) -> Loaded {
    let ckpt: Checkpoint = in_memory(cfg, 7, dtype).expect("generate checkpoint");
    let opts = LoadOptions { sim, mtp: true };
    Loaded {
        model: Model::load(&ckpt, opts).expect("load model"),
        experts: ExpertStore::load(&ckpt, &ExpertSelection::all(), sim).expect("load experts"),
    }
}

pub fn micro(sim: QuantSim) -> Loaded {
    load(&Preset::Micro.config(), InitDtype::Bf16, sim)
}

/// Deterministic token ids for tests.
pub fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 2654435761 + salt * 97 + 11) % vocab) as u32).collect()
}

/// Runs `chunks` (consecutive pieces of one sequence) and returns the logits of every token.
pub fn logits_in_chunks(m: &Loaded, state: &mut SequenceState, chunks: &[&[u32]]) -> Vec<Vec<f32>> {
    let vocab = m.model.config().vocab_size;
    let mut rows = Vec::new();
    for c in chunks {
        let mut step = Step::new(state, c);
        step.logits = LogitRows::All;
        let out = m.model.forward(&mut [step], &m.experts).expect("forward");
        rows.extend(out[0].logits.chunks_exact(vocab).map(|r| r.to_vec()));
    }
    rows
}

/// Largest |a − b| relative to the largest |b|.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
