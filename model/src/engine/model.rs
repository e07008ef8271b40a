//! The attention side of the model: embedding, blocks (attention, mHC, norms, routers, shared
//! experts), head and MTP. Routed experts are reached through an [`ExpertBackend`].

use super::block::{Block, MtpBlock};
use super::experts::ExpertBackend;
use super::state::SequenceState;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::kernels::{self, WeightMatrix};
use crate::layers::QuantSim;
use crate::layers::attention::AttentionState;
use crate::layers::chunk::{Chunk, Layout};
use crate::layers::mhc::HcSite;
use crate::layers::norm::RmsNorm;

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub sim: QuantSim,
    /// Load the MTP block(s) (speculative decoding); off saves their memory.
    pub mtp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { sim: QuantSim::default(), mtp: true }
    }
}

/// Which positions of a chunk produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// The chunk's last token (generation).
    Last,
    /// Every token (scoring, tests).
    All,
    None,
}

/// One sequence's part of a step: `tokens` at positions `state.position()..`.
pub struct Step<'a> {
    pub state: &'a mut SequenceState,
    pub tokens: &'a [u32],
    pub logits: LogitRows,
    /// Return the final residual streams `[len, n, d]` (the MTP block's input).
    pub keep_streams: bool,
}

impl<'a> Step<'a> {
    pub fn new(state: &'a mut SequenceState, tokens: &'a [u32]) -> Self {
        Step { state, tokens, logits: LogitRows::Last, keep_streams: false }
    }
}

#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    /// `[rows, vocab]`.
    pub logits: Vec<f32>,
    pub rows: usize,
    pub streams: Option<Vec<f32>>,
}

/// One sequence's part of an MTP step: the main model's final streams for `next_tokens.len()`
/// positions and, for each, the token that follows it.
pub struct MtpStep<'a> {
    pub state: &'a mut SequenceState,
    pub streams: &'a [f32],
    pub next_tokens: &'a [u32],
    pub logits: LogitRows,
}

pub struct Model {
    cfg: ModelConfig,
    sim: QuantSim,
    embed: WeightMatrix,
    head: WeightMatrix,
    norm: RmsNorm,
    hc_head: HcSite,
    blocks: Vec<Block>,
    mtp: Vec<MtpBlock>,
}

impl Model {
    /// Loads everything but the routed experts. Fails on a tensor the config does not know, and
    /// on any missing or mis-shaped tensor, naming it.
    pub fn load(ckpt: &Checkpoint, opts: LoadOptions) -> Result<Self, ModelError> {
        ckpt.check_no_unexpected_tensors()?;
        let cfg = ckpt.config().clone();
        let (v, d) = (cfg.vocab_size, cfg.dim);
        let blocks = (0..cfg.n_layers).map(|l| Block::load(ckpt, l, opts.sim)).collect::<Result<_, _>>()?;
        let mtp = if opts.mtp {
            (cfg.n_layers..cfg.n_blocks()).map(|l| MtpBlock::load(ckpt, l, opts.sim)).collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Model {
            embed: ckpt.matrix("embed.weight", v, d)?,
            head: ckpt.matrix("head.weight", v, d)?,
            norm: RmsNorm::load(ckpt, "norm.weight", d, cfg.norm_eps)?,
            hc_head: HcSite::load(ckpt, "hc_head", true)?,
            blocks,
            mtp,
            sim: opts.sim,
            cfg,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn quant_sim(&self) -> QuantSim {
        self.sim
    }

    pub fn has_mtp(&self) -> bool {
        !self.mtp.is_empty()
    }

    /// Weight bytes held by the attention side.
    pub fn resident_bytes(&self) -> usize {
        self.embed.stored_bytes()
            + self.head.stored_bytes()
            + self.norm.bytes()
            + self.hc_head.bytes()
            + self.blocks.iter().map(|b| b.bytes()).sum::<usize>()
            + self.mtp.iter().map(|m| m.bytes()).sum::<usize>()
    }

    pub fn new_sequence(&self) -> SequenceState {
        SequenceState {
            pos: 0,
            layers: self.blocks.iter().map(|b| b.attn.new_state()).collect(),
            mtp: self.mtp.iter().map(|m| m.block.attn.new_state()).collect(),
            mtp_pos: 0,
            poisoned: false,
        }
    }

    fn validate(&self, state: &SequenceState, tokens: &[u32], pos: usize, what: &str) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidInput(m));
        if state.poisoned {
            return bad(format!(
                "{what}: sequence state was left inconsistent by a failed step; start the sequence again"
            ));
        }
        if state.layers.len() != self.blocks.len() {
            return bad(format!("{what}: sequence state belongs to a model with {} layers", state.layers.len()));
        }
        if tokens.is_empty() {
            return bad(format!("{what}: no tokens"));
        }
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= self.cfg.vocab_size) {
            return bad(format!(
                "{what}: token id {t} at index {i} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            ));
        }
        if pos + tokens.len() > self.cfg.max_position_embeddings {
            return bad(format!(
                "{what}: {} tokens after position {pos} exceed max_position_embeddings {}",
                tokens.len(),
                self.cfg.max_position_embeddings
            ));
        }
        Ok(())
    }

    fn embed_rows(&self, ids: &[u32]) -> Vec<f32> {
        let d = self.cfg.dim;
        let mut e = vec![0.0f32; ids.len() * d];
        for (row, &id) in e.chunks_exact_mut(d).zip(ids) {
            kernels::decode_row(&self.embed, id as usize, row);
        }
        e
    }

    /// Logits of the given token rows, the head applied to all of them in one product (the head
    /// is the largest matrix a decode step reads).
    fn logits(&self, streams: &[f32], rows: &[usize], hc_head: &HcSite, norm: &RmsNorm) -> Vec<f32> {
        if rows.is_empty() {
            return Vec::new();
        }
        let width = self.cfg.hc_dim();
        let picked: Vec<f32> = rows.iter().flat_map(|&r| streams[r * width..(r + 1) * width].iter().copied()).collect();
        let mut h = hc_head.head(&picked, rows.len());
        norm.apply(&mut h);
        kernels::matmul(&h, rows.len(), &self.head)
    }

    /// Runs one step for several sequences: a prefill chunk or a single decode token each, at
    /// their own positions. On success every state advances by its chunk; on a backend failure the
    /// states are marked poisoned.
    pub fn forward(&self, steps: &mut [Step<'_>], experts: &dyn ExpertBackend) -> Result<Vec<StepOutput>, ModelError> {
        kernels::with_awake_pool(|| self.forward_steps(steps, experts))
    }

    fn forward_steps(
        &self,
        steps: &mut [Step<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<StepOutput>, ModelError> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        for (i, s) in steps.iter().enumerate() {
            self.validate(s.state, s.tokens, s.state.pos, &format!("sequence {i}"))?;
        }
        let (ids, chunks) = batch_layout(steps.iter().map(|s| (s.state.pos, s.tokens)));
        // The last block produces only the rows someone reads (see `layers::chunk`).
        let read_from: Vec<usize> = steps.iter().zip(&chunks).map(|(s, c)| first_read(s, c)).collect();
        let (every, last) = (Layout::all(chunks.clone()), Layout::with_outputs_from(chunks, &read_from));
        let mut streams = self.expand(&self.embed_rows(&ids));
        for (l, block) in self.blocks.iter().enumerate() {
            let layout = if l + 1 == self.blocks.len() { &last } else { &every };
            let mut states: Vec<&mut AttentionState> = steps.iter_mut().map(|s| &mut s.state.layers[l]).collect();
            match block.forward(&mut streams, &ids, layout, &mut states, experts, self.sim) {
                Ok(()) => {}
                Err(e) => {
                    steps.iter_mut().for_each(|s| s.state.poisoned = true);
                    return Err(e);
                }
            }
        }
        let width = self.cfg.hc_dim();
        let rows: Vec<Vec<usize>> = steps.iter().zip(&last.outputs).map(|(s, c)| logit_rows(s.logits, c)).collect();
        let mut logits = self.logits(&streams, &rows.concat(), &self.hc_head, &self.norm).into_iter();
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(steps.len());
        for (((s, c), kept), r) in steps.iter_mut().zip(&last.chunks).zip(&last.outputs).zip(&rows) {
            s.state.pos += c.len;
            out.push(StepOutput {
                logits: logits.by_ref().take(r.len() * vocab).collect(),
                rows: r.len(),
                streams: s.keep_streams.then(|| streams[kept.row0 * width..(kept.row0 + kept.len) * width].to_vec()),
            });
        }
        Ok(out)
    }

    /// Runs the (first) MTP block: for each position, the main model's final streams and the
    /// next token predict the token after it.
    pub fn forward_mtp(
        &self,
        steps: &mut [MtpStep<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<StepOutput>, ModelError> {
        let mtp = self
            .mtp
            .first()
            .ok_or_else(|| ModelError::InvalidInput("the model was loaded without its MTP block".into()))?;
        let width = self.cfg.hc_dim();
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        for (i, s) in steps.iter().enumerate() {
            let what = format!("mtp sequence {i}");
            self.validate(s.state, s.next_tokens, s.state.mtp_pos, &what)?;
            if s.state.mtp.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "{what}: state was created by a model without its MTP block"
                )));
            }
            if s.streams.len() != s.next_tokens.len() * width {
                return Err(ModelError::InvalidInput(format!(
                    "{what}: {} stream values for {} tokens (expected tokens × {width})",
                    s.streams.len(),
                    s.next_tokens.len()
                )));
            }
        }
        let (ids, chunks) = batch_layout(steps.iter().map(|s| (s.state.mtp_pos, s.next_tokens)));
        let read_from: Vec<usize> = steps.iter().zip(&chunks).map(|(s, c)| first_logit(s.logits, c)).collect();
        let layout = Layout::with_outputs_from(chunks, &read_from);
        let main: Vec<f32> = steps.iter().flat_map(|s| s.streams.iter().copied()).collect();
        let mut streams = mtp.input_streams(&main, &self.embed_rows(&ids), self.cfg.hc_mult);
        let mut states: Vec<&mut AttentionState> = steps.iter_mut().map(|s| &mut s.state.mtp[0]).collect();
        match mtp.block.forward(&mut streams, &ids, &layout, &mut states, experts, self.sim) {
            Ok(()) => {}
            Err(e) => {
                steps.iter_mut().for_each(|s| s.state.poisoned = true);
                return Err(e);
            }
        };
        let rows: Vec<Vec<usize>> = steps.iter().zip(&layout.outputs).map(|(s, c)| logit_rows(s.logits, c)).collect();
        let mut logits = self.logits(&streams, &rows.concat(), &mtp.hc_head, &mtp.norm).into_iter();
        let vocab = self.cfg.vocab_size;
        Ok(steps
            .iter_mut()
            .zip(&layout.chunks)
            .zip(&rows)
            .map(|((s, c), r)| {
                s.state.mtp_pos += c.len;
                StepOutput { logits: logits.by_ref().take(r.len() * vocab).collect(), rows: r.len(), streams: None }
            })
            .collect())
    }

    /// Copies each embedding into the `n` residual streams.
    fn expand(&self, e: &[f32]) -> Vec<f32> {
        let (n, d) = (self.cfg.hc_mult, self.cfg.dim);
        let mut s = Vec::with_capacity(e.len() * n);
        for row in e.chunks_exact(d) {
            for _ in 0..n {
                s.extend_from_slice(row);
            }
        }
        s
    }
}

/// Concatenated token ids and where each sequence's chunk sits.
fn batch_layout<'a>(parts: impl Iterator<Item = (usize, &'a [u32])>) -> (Vec<u32>, Vec<Chunk>) {
    let mut ids = Vec::new();
    let mut chunks = Vec::new();
    for (t0, tokens) in parts {
        chunks.push(Chunk { t0, len: tokens.len(), row0: ids.len() });
        ids.extend_from_slice(tokens);
    }
    (ids, chunks)
}

/// The first token of chunk `c` whose logits `mode` asks for (`c.len`: none).
fn first_logit(mode: LogitRows, c: &Chunk) -> usize {
    match mode {
        LogitRows::Last => c.len - 1,
        LogitRows::All => 0,
        LogitRows::None => c.len,
    }
}

/// The first token of a step's chunk whose final streams someone reads: for its logits, or
/// all of them when the streams are returned.
fn first_read(step: &Step<'_>, c: &Chunk) -> usize {
    if step.keep_streams { 0 } else { first_logit(step.logits, c) }
}

/// The rows of an output chunk (the tokens `first_logit` kept) that produce logits.
fn logit_rows(mode: LogitRows, c: &Chunk) -> Vec<usize> {
    match mode {
        LogitRows::Last => vec![c.row0 + c.len - 1],
        LogitRows::All => (c.row0..c.row0 + c.len).collect(),
        LogitRows::None => Vec::new(),
    }
}
