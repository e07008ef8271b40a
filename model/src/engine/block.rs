//! One transformer block: `[mHC-pre → attn_norm → attention → mHC-post]` then
//! `[mHC-pre → ffn_norm → MoE → mHC-post]` (spec §3). MTP blocks wrap the same block.

use crate::checkpoint::Checkpoint;
use crate::checkpoint::layout::block_prefix;
use crate::error::ModelError;
use crate::layers::QuantSim;
use crate::layers::attention::{Attention, AttentionState};
use crate::layers::chunk::Layout;
use crate::layers::ffn::Ffn;
use crate::layers::linear::Linear;
use crate::layers::mhc::{HcSite, hc_post};
use crate::layers::norm::RmsNorm;
use crate::layers::router::Router;

use super::experts::ExpertBackend;
use crate::error::ExpertError;

pub struct Block {
    pub layer: usize,
    hc_attn: HcSite,
    hc_ffn: HcSite,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    pub attn: Attention,
    router: Router,
    shared: Ffn,
    dim: usize,
}

impl Block {
    pub fn load(ckpt: &Checkpoint, layer: usize, sim: QuantSim) -> Result<Self, ModelError> {
        let cfg = ckpt.config();
        let p = block_prefix(cfg, layer);
        Ok(Block {
            layer,
            hc_attn: HcSite::load(ckpt, &format!("{p}.hc_attn"), false)?,
            hc_ffn: HcSite::load(ckpt, &format!("{p}.hc_ffn"), false)?,
            attn_norm: RmsNorm::load(ckpt, &format!("{p}.attn_norm.weight"), cfg.dim, cfg.norm_eps)?,
            ffn_norm: RmsNorm::load(ckpt, &format!("{p}.ffn_norm.weight"), cfg.dim, cfg.norm_eps)?,
            attn: Attention::load(ckpt, layer, sim.gemm_inputs)?,
            router: Router::load(ckpt, layer)?,
            shared: Ffn::load(ckpt, &format!("{p}.ffn.shared_experts"), sim.gemm_inputs)?,
            dim: cfg.dim,
        })
    }

    pub fn bytes(&self) -> usize {
        self.hc_attn.bytes()
            + self.hc_ffn.bytes()
            + self.attn_norm.bytes()
            + self.ffn_norm.bytes()
            + self.attn.bytes()
            + self.router.bytes()
            + self.shared.bytes()
    }

    /// Advances `streams` (`[T, n, d]`) through the block. Every token's keys enter the caches;
    /// afterwards `streams` holds the layout's output tokens only (`[outputs, n, d]`).
    pub fn forward(
        &self,
        streams: &mut Vec<f32>,
        ids: &[u32],
        layout: &Layout,
        states: &mut [&mut AttentionState],
        experts: &dyn ExpertBackend,
        sim: QuantSim,
    ) -> Result<(), ModelError> {
        let (mut x, mix) = self.hc_attn.pre(streams, ids.len());
        self.attn_norm.apply(&mut x);
        let a = self.attn.forward(&x, layout, states, sim);
        // The tokens without outputs are done: their keys are in the caches.
        let (ids, mix) = if layout.is_all() {
            (std::borrow::Cow::Borrowed(ids), mix)
        } else {
            *streams = layout.gather(streams, streams.len() / ids.len()).into_owned();
            (layout.gather(ids, 1), mix.rows(layout))
        };
        let tokens = ids.len();
        hc_post(&a, streams, &mix, self.dim);

        let (mut x, mix) = self.hc_ffn.pre(streams, tokens);
        self.ffn_norm.apply(&mut x);
        let routes = self.router.route(&x, &ids);
        // The shared expert runs while the routed experts do (in process: on the other cores;
        // remote: while the request is on the wire).
        let (routed, shared) =
            rayon::join(|| experts.forward(self.layer, &x, &routes), || self.shared.forward(&x, tokens, None));
        let mut y = routed?;
        // A remote backend's reply is input like any other: check it before it reaches the streams.
        if y.len() != x.len() {
            return Err(ExpertError::InvalidResponse(format!(
                "layer {}: expert backend returned {} values for {tokens} tokens × {}",
                self.layer,
                y.len(),
                self.dim
            ))
            .into());
        }
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(ExpertError::InvalidResponse(format!(
                "layer {}: expert output [{i}] is not finite",
                self.layer
            ))
            .into());
        }
        y.iter_mut().zip(&shared).for_each(|(a, b)| *a += b);
        hc_post(&y, streams, &mix, self.dim);
        Ok(())
    }
}

/// The multi-token-prediction block: combines the main model's final streams at position `t`
/// with the embedding of token `t+1` and runs one more block with its own head collapse.
pub struct MtpBlock {
    pub block: Block,
    e_proj: Linear,
    h_proj: Linear,
    enorm: RmsNorm,
    hnorm: RmsNorm,
    pub norm: RmsNorm,
    pub hc_head: HcSite,
}

impl MtpBlock {
    pub fn load(ckpt: &Checkpoint, layer: usize, sim: QuantSim) -> Result<Self, ModelError> {
        let cfg = ckpt.config();
        let p = block_prefix(cfg, layer);
        let d = cfg.dim;
        Ok(MtpBlock {
            block: Block::load(ckpt, layer, sim)?,
            e_proj: Linear::load(ckpt, &format!("{p}.e_proj.weight"), d, d, sim.gemm_inputs)?,
            h_proj: Linear::load(ckpt, &format!("{p}.h_proj.weight"), d, d, sim.gemm_inputs)?,
            enorm: RmsNorm::load(ckpt, &format!("{p}.enorm.weight"), d, cfg.norm_eps)?,
            hnorm: RmsNorm::load(ckpt, &format!("{p}.hnorm.weight"), d, cfg.norm_eps)?,
            norm: RmsNorm::load(ckpt, &format!("{p}.norm.weight"), d, cfg.norm_eps)?,
            hc_head: HcSite::load(ckpt, &format!("{p}.hc_head"), true)?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.block.bytes()
            + self.e_proj.bytes()
            + self.h_proj.bytes()
            + self.enorm.bytes()
            + self.hnorm.bytes()
            + self.norm.bytes()
            + self.hc_head.bytes()
    }

    /// The block's input streams: `e_proj(enorm(embed(next)))` broadcast to every stream plus
    /// `h_proj(hnorm(X))` per stream.
    pub fn input_streams(&self, main_streams: &[f32], next_embeddings: &[f32], n: usize) -> Vec<f32> {
        let d = self.block.dim;
        let tokens = next_embeddings.len() / d;
        let mut e = next_embeddings.to_vec();
        self.enorm.apply(&mut e);
        let e = self.e_proj.forward(&e, tokens);
        let mut h = main_streams.to_vec();
        self.hnorm.apply(&mut h);
        let mut h = self.h_proj.forward(&h, tokens * n);
        for t in 0..tokens {
            for j in 0..n {
                h[(t * n + j) * d..(t * n + j + 1) * d]
                    .iter_mut()
                    .zip(&e[t * d..(t + 1) * d])
                    .for_each(|(a, b)| *a += b);
            }
        }
        h
    }
}
