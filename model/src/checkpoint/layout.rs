//! The tensors of a DeepSeek-V4 checkpoint: official names (spec §9.1), logical shapes and the
//! storage each may use. The loader, the checkpoint writer and the parameter count all read this
//! one list, so they cannot disagree.

use crate::config::{AttentionKind, CSA_RATIO, ModelConfig};

/// How a tensor may be stored and how the math consumes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// A dense linear `[out, in]`: bf16/f32, or FP8 e4m3 with 128×128 UE8M0 block scales.
    DenseLinear,
    /// A routed-expert linear `[out, in]`: bf16/f32, or FP4 e2m1 packed `[out, in/2]` with 1×32
    /// UE8M0 scales.
    ExpertLinear,
    /// A matrix the official code always uses in bf16/fp32 (embedding, head, gate, compressor and
    /// indexer-weight projections).
    Matrix,
    /// An RMSNorm weight (bf16 in the releases).
    Norm,
    /// An fp32 parameter (mHC, attention sink, compressor position bias, router bias).
    F32,
    /// The int64 token-id → expert table of hash-routed layers.
    HashTable,
}

/// Who needs a tensor: the attention side, or one routed expert (what an expert shard loads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Attention,
    Expert { layer: usize, expert: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// Logical shape (FP4 packing halves the stored last axis).
    pub shape: Vec<usize>,
    pub role: TensorRole,
    pub owner: Owner,
}

impl TensorSpec {
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Byte copies of `embed.weight` / `head.weight` the releases carry inside the MTP block; the
/// official code ignores them and so does the loader.
pub fn is_ignored_tensor(name: &str) -> bool {
    name.starts_with("mtp.") && (name.ends_with(".emb.tok_emb.weight") || name.ends_with(".head.weight"))
}

/// Name prefix of block `layer` (MTP blocks follow the main layers).
pub fn block_prefix(cfg: &ModelConfig, layer: usize) -> String {
    if layer < cfg.n_layers { format!("layers.{layer}") } else { format!("mtp.{}", layer - cfg.n_layers) }
}

/// `w1`/`w2`/`w3` weight name of routed expert `expert` in block `layer`.
pub fn expert_weight_name(cfg: &ModelConfig, layer: usize, expert: usize, w: &str) -> String {
    format!("{}.ffn.experts.{expert}.{w}.weight", block_prefix(cfg, layer))
}

struct Builder<'a> {
    cfg: &'a ModelConfig,
    out: Vec<TensorSpec>,
}

impl Builder<'_> {
    fn push(&mut self, name: String, shape: &[usize], role: TensorRole, owner: Owner) {
        self.out.push(TensorSpec { name, shape: shape.to_vec(), role, owner });
    }

    fn attn(&mut self, name: String, shape: &[usize], role: TensorRole) {
        self.push(name, shape, role, Owner::Attention);
    }

    fn hc_head(&mut self, prefix: &str) {
        let (n, hc) = (self.cfg.hc_mult, self.cfg.hc_dim());
        self.attn(format!("{prefix}hc_head_fn"), &[n, hc], TensorRole::F32);
        self.attn(format!("{prefix}hc_head_base"), &[n], TensorRole::F32);
        self.attn(format!("{prefix}hc_head_scale"), &[1], TensorRole::F32);
    }

    fn compressor(&mut self, p: &str, ratio: usize, width: usize) {
        let coff = if ratio == CSA_RATIO { 2 } else { 1 };
        let d = self.cfg.dim;
        self.attn(format!("{p}.wkv.weight"), &[coff * width, d], TensorRole::Matrix);
        self.attn(format!("{p}.wgate.weight"), &[coff * width, d], TensorRole::Matrix);
        self.attn(format!("{p}.ape"), &[ratio, coff * width], TensorRole::F32);
        self.attn(format!("{p}.norm.weight"), &[width], TensorRole::Norm);
    }

    fn block(&mut self, layer: usize) {
        let c = self.cfg;
        let p = block_prefix(c, layer);
        let (d, q, hd) = (c.dim, c.q_lora_rank, c.head_dim);
        for site in ["attn", "ffn"] {
            self.attn(format!("{p}.hc_{site}_fn"), &[c.hc_mix(), c.hc_dim()], TensorRole::F32);
            self.attn(format!("{p}.hc_{site}_base"), &[c.hc_mix()], TensorRole::F32);
            self.attn(format!("{p}.hc_{site}_scale"), &[3], TensorRole::F32);
        }
        self.attn(format!("{p}.attn_norm.weight"), &[d], TensorRole::Norm);
        self.attn(format!("{p}.ffn_norm.weight"), &[d], TensorRole::Norm);

        let a = format!("{p}.attn");
        self.attn(format!("{a}.wq_a.weight"), &[q, d], TensorRole::DenseLinear);
        self.attn(format!("{a}.q_norm.weight"), &[q], TensorRole::Norm);
        self.attn(format!("{a}.wq_b.weight"), &[c.n_heads * hd, q], TensorRole::DenseLinear);
        self.attn(format!("{a}.wkv.weight"), &[hd, d], TensorRole::DenseLinear);
        self.attn(format!("{a}.kv_norm.weight"), &[hd], TensorRole::Norm);
        self.attn(format!("{a}.wo_a.weight"), &[c.o_groups * c.o_lora_rank, c.group_width()], TensorRole::DenseLinear);
        self.attn(format!("{a}.wo_b.weight"), &[d, c.o_groups * c.o_lora_rank], TensorRole::DenseLinear);
        self.attn(format!("{a}.attn_sink"), &[c.n_heads], TensorRole::F32);
        match c.attention_kind(layer) {
            AttentionKind::Window => {}
            AttentionKind::Hca { ratio } => self.compressor(&format!("{a}.compressor"), ratio, hd),
            AttentionKind::Csa => {
                self.compressor(&format!("{a}.compressor"), CSA_RATIO, hd);
                let i = format!("{a}.indexer");
                let (hi, di) = (c.index_n_heads, c.index_head_dim);
                self.attn(format!("{i}.wq_b.weight"), &[hi * di, q], TensorRole::DenseLinear);
                self.attn(format!("{i}.weights_proj.weight"), &[hi, d], TensorRole::Matrix);
                self.compressor(&format!("{i}.compressor"), CSA_RATIO, di);
            }
        }

        let f = format!("{p}.ffn");
        let (e, k, inter) = (c.n_routed_experts, c.n_activated_experts, c.moe_inter_dim);
        self.attn(format!("{f}.gate.weight"), &[e, d], TensorRole::Matrix);
        if c.is_hash_layer(layer) {
            self.attn(format!("{f}.gate.tid2eid"), &[c.vocab_size, k], TensorRole::HashTable);
        } else {
            self.attn(format!("{f}.gate.bias"), &[e], TensorRole::F32);
        }
        for expert in 0..e {
            let owner = Owner::Expert { layer, expert };
            for (w, shape) in [("w1", [inter, d]), ("w2", [d, inter]), ("w3", [inter, d])] {
                self.push(expert_weight_name(c, layer, expert, w), &shape, TensorRole::ExpertLinear, owner);
            }
        }
        for (w, shape) in [("w1", [inter, d]), ("w2", [d, inter]), ("w3", [inter, d])] {
            self.attn(format!("{f}.shared_experts.{w}.weight"), &shape, TensorRole::DenseLinear);
        }

        if layer >= c.n_layers {
            self.attn(format!("{p}.e_proj.weight"), &[d, d], TensorRole::DenseLinear);
            self.attn(format!("{p}.h_proj.weight"), &[d, d], TensorRole::DenseLinear);
            for norm in ["enorm", "hnorm", "norm"] {
                self.attn(format!("{p}.{norm}.weight"), &[d], TensorRole::Norm);
            }
            self.hc_head(&format!("{p}."));
        }
    }
}

/// Every tensor of the checkpoint, in a stable order.
pub fn model_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut b = Builder { cfg, out: Vec::new() };
    let (v, d) = (cfg.vocab_size, cfg.dim);
    b.attn("embed.weight".into(), &[v, d], TensorRole::Matrix);
    b.attn("head.weight".into(), &[v, d], TensorRole::Matrix);
    b.attn("norm.weight".into(), &[d], TensorRole::Norm);
    b.hc_head("");
    for layer in 0..cfg.n_blocks() {
        b.block(layer);
    }
    b.out
}
