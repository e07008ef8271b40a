//! The seam between the attention side and the routed experts. The engine calls
//! [`ExpertBackend`] once per MoE layer with the batch's normalised hidden vectors and their
//! routing; an in-process [`ExpertStore`] answers here, a remote backend (gRPC shards) elsewhere.

use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::checkpoint::layout::block_prefix;
use crate::config::ModelConfig;
use crate::error::{ExpertError, ModelError};
use crate::layers::QuantSim;
use crate::layers::ffn::Ffn;
use crate::layers::router::Routes;

/// A routing slot that carries no expert (lets a sender drop the slots another shard serves).
pub const NO_EXPERT: u32 = u32::MAX;

/// Computes routed-expert contributions: for each token `t`, `Σ_slots g · FFN_e(hidden[t])` over
/// its slots (`routes.experts[t·k + j]`, `routes.weights[t·k + j]`), as `[T, dim]`.
pub trait ExpertBackend: Send + Sync {
    fn forward(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError>;

    /// Called by an engine before each step with the trace ids (W3C, 16 bytes) of the sampled
    /// requests in it, so a remote backend can carry them to the workers' logs. The math ignores
    /// them.
    fn begin_step(&self, _trace_ids: &[[u8; 16]]) {}
}

/// Which routed experts a store holds: every `(layer, expert)` of `layers × experts`, or an
/// explicit set of pairs (placements that hold different experts on different layers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSelection {
    /// Blocks (main layers and MTP, by layer id); `None` = all.
    pub layers: Option<BTreeSet<usize>>,
    /// Expert ids; `None` = all.
    pub experts: Option<BTreeSet<usize>>,
    /// When set, exactly these pairs (the two fields above are ignored).
    pub pairs: Option<BTreeSet<(usize, usize)>>,
}

impl ExpertSelection {
    /// More ids than any model has layers or experts: a typo, not a selection.
    pub const MAX_IDS: usize = 1 << 16;

    pub fn all() -> Self {
        ExpertSelection { layers: None, experts: None, pairs: None }
    }

    pub fn experts(ids: impl IntoIterator<Item = usize>) -> Self {
        ExpertSelection { layers: None, experts: Some(ids.into_iter().collect()), pairs: None }
    }

    pub fn pairs(pairs: impl IntoIterator<Item = (usize, usize)>) -> Self {
        ExpertSelection { layers: None, experts: None, pairs: Some(pairs.into_iter().collect()) }
    }

    /// Parses `"0-7,12,14-15"` (inclusive ranges), at most [`MAX_IDS`](Self::MAX_IDS) ids.
    pub fn parse_ids(text: &str) -> Result<BTreeSet<usize>, String> {
        let mut out = BTreeSet::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("invalid id range {part:?} (expected e.g. 0-7,12)");
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) =
                        (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                    if a > b || b - a >= Self::MAX_IDS || out.len() + (b - a) >= Self::MAX_IDS {
                        return Err(bad());
                    }
                    out.extend(a..=b);
                }
                None => {
                    out.insert(part.parse().map_err(|_| bad())?);
                }
            }
        }
        if out.is_empty() {
            return Err(format!("no ids in {text:?}"));
        }
        Ok(out)
    }

    /// The (layer, expert) pairs selected under `cfg`, or an error naming an id out of range.
    pub fn resolve(&self, cfg: &ModelConfig) -> Result<Vec<(usize, usize)>, ModelError> {
        if let Some(pairs) = &self.pairs {
            if let Some(&(l, e)) = pairs.iter().find(|(l, e)| *l >= cfg.n_blocks() || *e >= cfg.n_routed_experts) {
                return Err(ModelError::InvalidInput(format!(
                    "layer {l} expert {e} does not exist (model has {} blocks × {} routed experts)",
                    cfg.n_blocks(),
                    cfg.n_routed_experts
                )));
            }
            return Ok(pairs.iter().copied().collect());
        }
        if let Some(&l) = self.layers.as_ref().and_then(|l| l.iter().find(|&&l| l >= cfg.n_blocks())) {
            return Err(ModelError::InvalidInput(format!(
                "layer {l} does not exist (model has {} blocks)",
                cfg.n_blocks()
            )));
        }
        if let Some(&e) = self.experts.as_ref().and_then(|e| e.iter().find(|&&e| e >= cfg.n_routed_experts)) {
            return Err(ModelError::InvalidInput(format!(
                "expert {e} does not exist (model has {} routed experts)",
                cfg.n_routed_experts
            )));
        }
        let layers: Vec<usize> = match &self.layers {
            Some(l) => l.iter().copied().collect(),
            None => (0..cfg.n_blocks()).collect(),
        };
        let experts: Vec<usize> = match &self.experts {
            Some(e) => e.iter().copied().collect(),
            None => (0..cfg.n_routed_experts).collect(),
        };
        Ok(layers.iter().flat_map(|&l| experts.iter().map(move |&e| (l, e))).collect())
    }
}

/// Routed experts held in this process: a whole model's, or a shard's. Loads only the tensors of
/// the experts it holds.
pub struct ExpertStore {
    sim: QuantSim,
    dim: usize,
    n_blocks: usize,
    n_experts: usize,
    experts: BTreeMap<(usize, usize), Ffn>,
}

impl ExpertStore {
    pub fn load(ckpt: &Checkpoint, selection: &ExpertSelection, sim: QuantSim) -> Result<Self, ModelError> {
        let cfg = ckpt.config();
        let mut experts = BTreeMap::new();
        for (layer, e) in selection.resolve(cfg)? {
            let prefix = format!("{}.ffn.experts.{e}", block_prefix(cfg, layer));
            experts.insert((layer, e), Ffn::load(ckpt, &prefix, sim.gemm_inputs)?);
        }
        Ok(ExpertStore { sim, dim: cfg.dim, n_blocks: cfg.n_blocks(), n_experts: cfg.n_routed_experts, experts })
    }

    /// The simulations this store computes with (the attention side must use the same).
    pub fn quant_sim(&self) -> QuantSim {
        self.sim
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Blocks of the model (main layers + MTP); valid layer ids are `0..n_blocks`.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Routed experts per layer in the model (not only those held).
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.experts.contains_key(&(layer, expert))
    }

    /// The (layer, expert) pairs held, ascending.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.experts.keys().copied()
    }

    /// Bytes of expert weights this store keeps (their checkpoint bytes, codes + scales).
    pub fn resident_bytes(&self) -> usize {
        self.experts.values().map(|f| f.bytes()).sum()
    }

    /// Checks a request against the store: shapes, ids, finiteness.
    pub fn validate(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<(), ExpertError> {
        let invalid = |m: String| Err(ExpertError::InvalidRequest(m));
        if layer >= self.n_blocks {
            return invalid(format!("layer {layer} does not exist (model has {} blocks)", self.n_blocks));
        }
        let t = routes.tokens();
        if routes.k == 0 || routes.experts.len() != t * routes.k || routes.weights.len() != routes.experts.len() {
            return invalid(format!(
                "expert_ids ({}) and weights ({}) must both hold tokens × k entries",
                routes.experts.len(),
                routes.weights.len()
            ));
        }
        if hidden.len() != t * self.dim {
            return invalid(format!("hidden has {} values, expected {t} tokens × dim {}", hidden.len(), self.dim));
        }
        if let Some(i) = hidden.iter().position(|v| !v.is_finite()) {
            return invalid(format!("hidden[{i}] is not finite"));
        }
        for (&e, &w) in routes.experts.iter().zip(&routes.weights) {
            if e == NO_EXPERT {
                continue;
            }
            if e as usize >= self.n_experts {
                return invalid(format!("expert id {e} outside 0..{}", self.n_experts));
            }
            if !w.is_finite() {
                return invalid(format!("weight {w} of expert {e} is not finite"));
            }
            if !self.holds(layer, e as usize) {
                return Err(ExpertError::NotHeld { layer, expert: e as usize });
            }
        }
        Ok(())
    }

    /// Validated compute (see [`ExpertBackend`]). Contributions are summed per token in
    /// ascending expert order, the order of the official loop.
    pub fn compute(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        self.compute_with(layer, hidden, routes, true)
    }

    /// [`Self::compute`] entirely on the calling thread, with no pool: for calls so small that
    /// handing them to a pool and back costs more than the math (one token of a small model).
    pub fn compute_here(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        crate::kernels::sequential(|| self.compute_with(layer, hidden, routes, false))
    }

    /// Weight bytes a call with `routes` reads at `layer`: each distinct routed expert held here
    /// once (what a caller needs to judge whether the call is small).
    pub fn call_weight_bytes(&self, layer: usize, routes: &Routes) -> usize {
        let distinct: BTreeSet<u32> = routes.experts.iter().copied().filter(|&e| e != NO_EXPERT).collect();
        distinct.iter().filter_map(|&e| self.experts.get(&(layer, e as usize))).map(|f| f.bytes()).sum()
    }

    fn compute_with(
        &self,
        layer: usize,
        hidden: &[f32],
        routes: &Routes,
        parallel: bool,
    ) -> Result<Vec<f32>, ExpertError> {
        self.validate(layer, hidden, routes)?;
        let d = self.dim;
        // Per expert: the tokens routed to it and their routing weights.
        let mut by_expert: BTreeMap<u32, Assigned> = BTreeMap::new();
        for (slot, (&e, &w)) in routes.experts.iter().zip(&routes.weights).enumerate() {
            if e != NO_EXPERT {
                let entry = by_expert.entry(e).or_default();
                entry.0.push(slot / routes.k);
                entry.1.push(w);
            }
        }
        let work: Vec<(u32, &Assigned)> = by_expert.iter().map(|(e, v)| (*e, v)).collect();
        // With at least one expert per thread, the experts are the parallelism; each expert's
        // products stay on its thread.
        let per_expert_parallel = parallel && work.len() < rayon::current_num_threads();
        let one_expert = |(e, (tokens, weights)): &(u32, &Assigned)| {
            let mut x = Vec::with_capacity(tokens.len() * d);
            for &t in tokens {
                x.extend_from_slice(&hidden[t * d..(t + 1) * d]);
            }
            let ffn = &self.experts[&(layer, *e as usize)];
            let run = || ffn.forward(&x, tokens.len(), Some(weights));
            if per_expert_parallel { run() } else { crate::kernels::sequential(run) }
        };
        let results: Vec<Vec<f32>> =
            if parallel { work.par_iter().map(one_expert).collect() } else { work.iter().map(one_expert).collect() };
        let mut out = vec![0.0f32; hidden.len()];
        for ((_, (tokens, _)), y) in work.iter().zip(results) {
            for (i, &t) in tokens.iter().enumerate() {
                out[t * d..(t + 1) * d].iter_mut().zip(&y[i * d..(i + 1) * d]).for_each(|(o, v)| *o += v);
            }
        }
        Ok(out)
    }
}

/// Token indices and routing weights assigned to one expert.
type Assigned = (Vec<usize>, Vec<f32>);

/// The in-process backend.
#[derive(Clone)]
pub struct LocalExperts(pub Arc<ExpertStore>);

impl ExpertBackend for LocalExperts {
    fn forward(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        self.0.compute(layer, hidden, routes)
    }
}

impl ExpertBackend for ExpertStore {
    fn forward(&self, layer: usize, hidden: &[f32], routes: &Routes) -> Result<Vec<f32>, ExpertError> {
        self.compute(layer, hidden, routes)
    }
}
