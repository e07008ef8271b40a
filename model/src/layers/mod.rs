//! The parts of the forward pass, bottom-up: norms and RoPE, linears, mHC, compressor and
//! indexer, the attention layer, routing and the expert FFN.

pub mod attention;
pub mod chunk;
pub mod compressor;
pub mod ffn;
pub mod indexer;
pub mod linear;
pub mod mhc;
pub mod norm;
pub mod rope;
pub mod router;
pub mod rows;
pub mod sparse_attn;
pub mod topk;

/// The quantisation simulations of the official code (spec §2). All on by default: the model was
/// trained with them. Switchable for experiments and to compare against references that skip
/// some of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSim {
    /// FP8 on the non-rotary channels of window latents and compressed entries.
    pub kv_fp8: bool,
    /// Hadamard-then-FP4 on indexer queries and keys.
    pub indexer_fp4: bool,
    /// FP8 (1×128) on the inputs of FP8/FP4 GEMMs.
    pub gemm_inputs: bool,
}

impl Default for QuantSim {
    fn default() -> Self {
        QuantSim { kv_fp8: true, indexer_fp4: true, gemm_inputs: true }
    }
}

impl QuantSim {
    pub fn off() -> Self {
        QuantSim { kv_fp8: false, indexer_fp4: false, gemm_inputs: false }
    }
}
