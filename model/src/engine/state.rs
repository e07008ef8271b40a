//! Per-sequence state and its size (spec §8): window rings, compressed caches, compressor
//! partial blocks and indexer keys, for every layer (and the MTP blocks).

use crate::config::{AttentionKind, ModelConfig};
use crate::layers::attention::AttentionState;

/// Everything a sequence carries between steps (equal states: bitwise the same caches).
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceState {
    /// Tokens processed so far (the next token's position).
    pub(crate) pos: usize,
    pub(crate) layers: Vec<AttentionState>,
    /// MTP blocks' own caches, advanced by `Model::forward_mtp`.
    pub(crate) mtp: Vec<AttentionState>,
    pub(crate) mtp_pos: usize,
    /// Set when a step failed half-way (e.g. an expert backend error): the caches may be
    /// partially advanced, so the sequence must be restarted.
    pub(crate) poisoned: bool,
}

impl SequenceState {
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.layers.iter().chain(&self.mtp).map(|l| l.bytes()).sum()
    }
}

/// Bytes of one sequence's state after `tokens` tokens, in the fp32 layout this crate keeps
/// (spec §8.1): per layer a `window × head_dim` ring; for compressed layers one `head_dim` entry
/// per complete block plus the compressor's partial-block state; for CSA layers also one
/// `index_head_dim` key per block plus the indexer compressor's state.
pub fn state_bytes(cfg: &ModelConfig, tokens: usize, include_mtp: bool) -> usize {
    let blocks = if include_mtp { cfg.n_blocks() } else { cfg.n_layers };
    let (d, di) = (cfg.head_dim, cfg.index_head_dim);
    (0..blocks)
        .map(|layer| {
            let window = cfg.window_size * d * 4;
            window
                + match cfg.attention_kind(layer) {
                    AttentionKind::Window => 0,
                    AttentionKind::Hca { ratio } => (tokens / ratio) * d * 4 + 2 * ratio * d * 4,
                    AttentionKind::Csa => {
                        let m = crate::config::CSA_RATIO;
                        (tokens / m) * (d + di) * 4 + 2 * (2 * m) * (2 * d) * 4 + 2 * (2 * m) * (2 * di) * 4
                    }
                }
        })
        .sum()
}

/// Asymptotic bytes per token summed over the main layers (spec §8.2, fp32 column).
pub fn state_bytes_per_token(cfg: &ModelConfig) -> f64 {
    (0..cfg.n_layers)
        .map(|layer| match cfg.attention_kind(layer) {
            AttentionKind::Window => 0.0,
            AttentionKind::Hca { ratio } => (cfg.head_dim * 4) as f64 / ratio as f64,
            AttentionKind::Csa => ((cfg.head_dim + cfg.index_head_dim) * 4) as f64 / crate::config::CSA_RATIO as f64,
        })
        .sum()
}
