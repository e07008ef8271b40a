//! Model configuration: a mirror of DeepSeek-V4's Hugging Face `config.json`, validated once on
//! load, plus the quantities derived from it (spec §1).

mod params;
mod presets;
mod validate;

pub use params::ParameterCount;
pub use presets::Preset;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

use crate::error::ModelError;

/// Router scoring function (`scoring_func`). V4 uses `sqrtsoftplus`; the official code also
/// accepts the V3 choices, so they are kept here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunc {
    Sqrtsoftplus,
    Sigmoid,
    Softmax,
}

/// `rope_scaling` of the config: YaRN, applied only with `compress_rope_theta` (spec §2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type", default = "yarn")]
    pub kind: String,
    pub factor: f64,
    #[serde(rename = "original_max_position_embeddings")]
    pub original_seq_len: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
}

fn yarn() -> String {
    "yarn".into()
}

/// `quantization_config` of FP8 checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub fmt: Option<String>,
    #[serde(default)]
    pub scale_fmt: Option<String>,
    #[serde(default)]
    pub weight_block_size: Option<Vec<usize>>,
    #[serde(default)]
    pub activation_scheme: Option<String>,
}

/// DeepSeek-V4 hyper-parameters. Field names follow the official inference `ModelArgs`; the serde
/// names are the Hugging Face `config.json` keys, so a released config parses as is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    #[serde(rename = "hidden_size")]
    pub dim: usize,
    #[serde(rename = "num_hidden_layers")]
    pub n_layers: usize,
    #[serde(rename = "num_attention_heads")]
    pub n_heads: usize,
    #[serde(default = "one")]
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    #[serde(rename = "qk_rope_head_dim")]
    pub rope_head_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    #[serde(rename = "sliding_window")]
    pub window_size: usize,
    pub compress_ratios: Vec<usize>,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    #[serde(rename = "num_experts_per_tok")]
    pub n_activated_experts: usize,
    #[serde(rename = "moe_intermediate_size")]
    pub moe_inter_dim: usize,
    #[serde(rename = "num_hash_layers", default)]
    pub n_hash_layers: usize,
    #[serde(rename = "scoring_func")]
    pub score_func: ScoreFunc,
    #[serde(rename = "routed_scaling_factor")]
    pub route_scale: f32,
    #[serde(default)]
    pub swiglu_limit: f32,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    #[serde(rename = "rms_norm_eps")]
    pub norm_eps: f32,
    pub rope_theta: f64,
    pub compress_rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    #[serde(rename = "num_nextn_predict_layers", default)]
    pub n_mtp_layers: usize,
    #[serde(default)]
    pub bos_token_id: u32,
    #[serde(default = "one_u32")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `"fp4"` when routed experts are stored as FP4 e2m1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
    /// Keys this crate does not interpret (`architectures`, `model_type`, ...), kept so that a
    /// config written back out is the one that was read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}

/// What a layer's attention looks like, a pure function of `compress_ratios[layer]` (spec §1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// Sliding window only (ratio 0).
    Window,
    /// Compressed Sparse Attention: overlapping 4:1 compressor + Lightning Indexer top-k.
    Csa,
    /// Heavily Compressed Attention: non-overlapping `ratio`:1 compressor, attended densely.
    Hca { ratio: usize },
}

/// The ratio the official code hard-wires to "overlapping compressor with an indexer".
pub const CSA_RATIO: usize = 4;

impl AttentionKind {
    pub fn from_ratio(ratio: usize) -> Self {
        match ratio {
            0 => AttentionKind::Window,
            CSA_RATIO => AttentionKind::Csa,
            r => AttentionKind::Hca { ratio: r },
        }
    }

    /// Tokens per compressed entry (0 for window-only layers).
    pub fn ratio(self) -> usize {
        match self {
            AttentionKind::Window => 0,
            AttentionKind::Csa => CSA_RATIO,
            AttentionKind::Hca { ratio } => ratio,
        }
    }
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json` and validates it.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        // serde_path_to_error names the field a type error is about ("o_groups: invalid type").
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: ModelConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| ModelError::Config(format!("{}: {}", e.path(), e.inner())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        Self::from_json_str(&text).map_err(|e| e.context(&path.display().to_string()))
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Number of blocks including MTP blocks; MTP block `j` has layer id `n_layers + j`.
    pub fn n_blocks(&self) -> usize {
        self.n_layers + self.n_mtp_layers
    }

    pub fn attention_kind(&self, layer: usize) -> AttentionKind {
        AttentionKind::from_ratio(self.compress_ratios[layer])
    }

    /// Layers `0..n_hash_layers` route by the token-id table instead of scores.
    pub fn is_hash_layer(&self, layer: usize) -> bool {
        layer < self.n_hash_layers
    }

    /// Channels of a head that carry no rotary embedding.
    pub fn nope_head_dim(&self) -> usize {
        self.head_dim - self.rope_head_dim
    }

    /// mHC mixing width `(2 + n)·n`.
    pub fn hc_mix(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }

    /// Flattened width of the mHC streams, `n·d`.
    pub fn hc_dim(&self) -> usize {
        self.hc_mult * self.dim
    }

    pub fn heads_per_group(&self) -> usize {
        self.n_heads / self.o_groups
    }

    /// Input width of one output group: `(H/G)·D`.
    pub fn group_width(&self) -> usize {
        self.heads_per_group() * self.head_dim
    }

    pub fn softmax_scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }

    /// Whether routed experts are FP4 in the released format.
    pub fn experts_fp4(&self) -> bool {
        self.expert_dtype.as_deref() == Some("fp4")
    }

    /// Whether dense linears are FP8 in the released format.
    pub fn dense_fp8(&self) -> bool {
        self.quantization_config.as_ref().is_some_and(|q| q.quant_method == "fp8")
    }
}

#[cfg(test)]
mod tests;
