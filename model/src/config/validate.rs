//! Relations between config fields that the math relies on. Each error names the field.

use super::{AttentionKind, ModelConfig};
use crate::error::ModelError;

fn fail(field: &str, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{field}: {msg}"))
}

fn require(ok: bool, field: &str, msg: impl std::fmt::Display) -> Result<(), ModelError> {
    if ok { Ok(()) } else { Err(fail(field, msg)) }
}

/// FP8 activation blocks are 128 wide: every FP8/FP4 GEMM input width must divide into them.
const ACT_QUANT_BLOCK: usize = 128;
/// FP8 KV simulation blocks on the non-rotary channels.
const KV_SIM_BLOCK: usize = 64;
/// FP4 blocks (weights and indexer simulation).
const FP4_BLOCK: usize = 32;

impl ModelConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.dim),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("qk_rope_head_dim", self.rope_head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("sliding_window", self.window_size),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.n_activated_experts),
            ("moe_intermediate_size", self.moe_inter_dim),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            require(value > 0, field, "must be positive")?;
        }
        require(
            self.num_key_value_heads == 1,
            "num_key_value_heads",
            format!("DeepSeek-V4 has one shared KV latent, got {}", self.num_key_value_heads),
        )?;
        require(
            self.compress_ratios.len() == self.n_layers + self.n_mtp_layers,
            "compress_ratios",
            format!(
                "has {} entries, expected num_hidden_layers + num_nextn_predict_layers = {} + {}",
                self.compress_ratios.len(),
                self.n_layers,
                self.n_mtp_layers
            ),
        )?;
        require(
            self.rope_head_dim.is_multiple_of(2) && self.rope_head_dim < self.head_dim,
            "qk_rope_head_dim",
            format!("must be even and below head_dim {}", self.head_dim),
        )?;
        require(
            self.nope_head_dim().is_multiple_of(KV_SIM_BLOCK),
            "head_dim",
            format!(
                "head_dim - qk_rope_head_dim = {} must be a multiple of {KV_SIM_BLOCK} (FP8 KV blocks)",
                self.nope_head_dim()
            ),
        )?;
        require(
            self.n_heads.is_multiple_of(self.o_groups),
            "o_groups",
            format!("num_attention_heads {} is not divisible by o_groups {}", self.n_heads, self.o_groups),
        )?;
        require(
            self.n_activated_experts <= self.n_routed_experts,
            "num_experts_per_tok",
            format!("{} exceeds n_routed_experts {}", self.n_activated_experts, self.n_routed_experts),
        )?;
        require(
            self.n_shared_experts == 1,
            "n_shared_experts",
            format!("the V4 block has exactly one shared expert, got {}", self.n_shared_experts),
        )?;
        require(
            self.n_hash_layers <= self.n_layers,
            "num_hash_layers",
            format!("{} exceeds num_hidden_layers {}", self.n_hash_layers, self.n_layers),
        )?;
        require(!self.tie_word_embeddings, "tie_word_embeddings", "V4 has separate embed and head")?;
        require(self.norm_eps > 0.0, "rms_norm_eps", "must be positive")?;
        require(self.hc_eps >= 0.0, "hc_eps", "must not be negative")?;
        require(
            self.route_scale.is_finite() && self.route_scale > 0.0,
            "routed_scaling_factor",
            "must be a positive number",
        )?;
        require(self.swiglu_limit >= 0.0, "swiglu_limit", "must not be negative")?;
        require(self.rope_theta > 0.0, "rope_theta", "must be positive")?;
        require(self.compress_rope_theta > 0.0, "compress_rope_theta", "must be positive")?;
        require(
            self.bos_token_id < self.vocab_size as u32 && self.eos_token_id < self.vocab_size as u32,
            "bos_token_id",
            "bos/eos ids must be inside the vocabulary",
        )?;
        if let Some(rs) = &self.rope_scaling {
            require(rs.kind == "yarn", "rope_scaling.type", format!("only yarn is supported, got {:?}", rs.kind))?;
            require(rs.factor >= 1.0, "rope_scaling.factor", "must be at least 1")?;
            require(rs.original_seq_len > 0, "rope_scaling.original_max_position_embeddings", "must be positive")?;
        }
        self.validate_indexer()?;
        self.validate_quantised_widths()
    }

    fn validate_indexer(&self) -> Result<(), ModelError> {
        let has_csa = (0..self.n_blocks()).any(|l| self.attention_kind(l) == AttentionKind::Csa);
        if !has_csa {
            return Ok(());
        }
        require(
            self.index_head_dim.is_power_of_two() && self.index_head_dim.is_multiple_of(FP4_BLOCK),
            "index_head_dim",
            format!(
                "{} must be a power of two and a multiple of {FP4_BLOCK} (Hadamard, FP4 blocks)",
                self.index_head_dim
            ),
        )?;
        require(
            self.index_head_dim >= self.rope_head_dim,
            "index_head_dim",
            format!("{} must be at least qk_rope_head_dim {}", self.index_head_dim, self.rope_head_dim),
        )?;
        require(self.index_n_heads > 0, "index_n_heads", "must be positive")?;
        require(self.index_topk > 0, "index_topk", "must be positive")
    }

    /// FP8/FP4 GEMMs quantise their input in 1×128 blocks; FP4 weights pack 1×32 blocks.
    fn validate_quantised_widths(&self) -> Result<(), ModelError> {
        if self.dense_fp8() {
            if let Some(q) = &self.quantization_config
                && let Some(b) = &q.weight_block_size
            {
                require(
                    b.as_slice() == [128, 128],
                    "quantization_config.weight_block_size",
                    format!("only [128, 128] is supported, got {b:?}"),
                )?;
            }
            for (field, width) in [
                ("hidden_size", self.dim),
                ("q_lora_rank", self.q_lora_rank),
                ("o_groups * o_lora_rank", self.o_groups * self.o_lora_rank),
                ("moe_intermediate_size", self.moe_inter_dim),
            ] {
                require(
                    width % ACT_QUANT_BLOCK == 0,
                    field,
                    format!("{width} must be a multiple of {ACT_QUANT_BLOCK} for FP8 activation blocks"),
                )?;
            }
        }
        if self.experts_fp4() {
            for (field, width) in [("hidden_size", self.dim), ("moe_intermediate_size", self.moe_inter_dim)] {
                require(
                    width % ACT_QUANT_BLOCK == 0,
                    field,
                    format!("{width} must be a multiple of {ACT_QUANT_BLOCK} for FP4 experts"),
                )?;
            }
        } else if let Some(other) = &self.expert_dtype {
            return Err(fail("expert_dtype", format!("unsupported {other:?} (expected \"fp4\" or absent)")));
        }
        Ok(())
    }
}
