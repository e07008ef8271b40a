//! Writes deterministic random checkpoints in exactly the released layout (`model init`): the
//! official tensor names, bf16 / fp32 / int64 tensors, and with `Fp8` the release formats: FP8
//! e4m3 dense linears with 128×128 UE8M0 scales and FP4 e2m1 routed experts (two per byte, even
//! input index in the low nibble) with 1×32 UE8M0 scales. Both formats derive from the same
//! master values, so a bf16 checkpoint and its FP8 variant are the same model up to quantisation.

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::layout::{TensorRole, TensorSpec, model_tensors};
use super::load::scale_name;
use super::random::{hash_table, tensor_values};
use super::reader::{CONFIG_FILE, Checkpoint, INDEX_FILE, SINGLE_FILE};
use crate::config::{ModelConfig, QuantizationConfig};
use crate::error::ModelError;
use crate::kernels::{FP4_BLOCK, FP8_TILE};
use crate::numerics::minifloat::{E2M1_MAX, E4M3_MAX, pow2_scale};
use crate::numerics::{f32_to_e2m1, f32_to_e4m3, f32_to_e8m0};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitDtype {
    /// bf16 matrices, fp32 mHC/sink/ape/bias (like the bf16 golden checkpoint).
    Bf16,
    /// As released: FP8 dense linears, FP4 routed experts.
    Fp8,
}

/// Larger models are not something to fill with random numbers on a test machine.
const MAX_INIT_PARAMETERS: u64 = 2_000_000_000;

/// One tensor ready to serialise.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The config a generated checkpoint declares for `dtype`.
pub fn init_config(cfg: &ModelConfig, dtype: InitDtype) -> ModelConfig {
    let mut c = cfg.clone();
    match dtype {
        InitDtype::Bf16 => {
            c.quantization_config = None;
            c.expert_dtype = None;
        }
        InitDtype::Fp8 => {
            c.quantization_config = Some(QuantizationConfig {
                quant_method: "fp8".into(),
                fmt: Some("e4m3".into()),
                scale_fmt: Some("ue8m0".into()),
                weight_block_size: Some(vec![FP8_TILE, FP8_TILE]),
                activation_scheme: Some("dynamic".into()),
            });
            c.expert_dtype = Some("fp4".into());
        }
    }
    c
}

/// Generates every tensor of `cfg` for `seed`, in the stored formats of `dtype`.
pub fn generate(cfg: &ModelConfig, seed: u64, dtype: InitDtype) -> Result<Vec<OwnedTensor>, ModelError> {
    let count = cfg.parameter_count();
    if count.main_total + count.mtp_total > MAX_INIT_PARAMETERS {
        return Err(ModelError::InvalidInput(format!(
            "model init writes test-size models; this config has {:.1}B parameters",
            (count.main_total + count.mtp_total) as f64 / 1e9
        )));
    }
    let cfg = init_config(cfg, dtype);
    cfg.validate()?;
    let mut out = Vec::new();
    for spec in model_tensors(&cfg) {
        encode(&cfg, &spec, seed, dtype, &mut out);
    }
    // The releases also carry byte copies of embed/head inside each MTP block.
    for j in 0..cfg.n_mtp_layers {
        for (src, dst) in
            [("embed.weight", format!("mtp.{j}.emb.tok_emb.weight")), ("head.weight", format!("mtp.{j}.head.weight"))]
        {
            let t = out.iter().find(|t| t.name == src).expect("embed/head generated");
            let copy = OwnedTensor { name: dst, dtype: t.dtype, shape: t.shape.clone(), data: t.data.clone() };
            out.push(copy);
        }
    }
    Ok(out)
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect()
}

fn encode(cfg: &ModelConfig, spec: &TensorSpec, seed: u64, dtype: InitDtype, out: &mut Vec<OwnedTensor>) {
    let push = |out: &mut Vec<OwnedTensor>, name: String, dtype, shape: Vec<usize>, data| {
        out.push(OwnedTensor { name, dtype, shape, data });
    };
    if spec.role == TensorRole::HashTable {
        let data = hash_table(cfg, spec, seed).iter().flat_map(|v| v.to_le_bytes()).collect();
        return push(out, spec.name.clone(), Dtype::I64, spec.shape.clone(), data);
    }
    let master = tensor_values(cfg, spec, seed);
    if spec.role == TensorRole::F32 {
        let data = master.iter().flat_map(|v| v.to_le_bytes()).collect();
        return push(out, spec.name.clone(), Dtype::F32, spec.shape.clone(), data);
    }
    // Every stored weight starts from its bf16 rounding, as a bf16-trained release does.
    let values: Vec<f32> = master.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
    match (spec.role, dtype) {
        (TensorRole::DenseLinear, InitDtype::Fp8) => {
            let (codes, scales) = quantize_fp8(&values, spec.shape[0], spec.shape[1]);
            push(out, spec.name.clone(), Dtype::F8_E4M3, spec.shape.clone(), codes);
            let sshape = vec![spec.shape[0].div_ceil(FP8_TILE), spec.shape[1].div_ceil(FP8_TILE)];
            push(out, scale_name(&spec.name), Dtype::F8_E8M0, sshape, scales);
        }
        (TensorRole::ExpertLinear, InitDtype::Fp8) => {
            let (codes, scales) = quantize_fp4(&values, spec.shape[0], spec.shape[1]);
            push(out, spec.name.clone(), Dtype::I8, vec![spec.shape[0], spec.shape[1] / 2], codes);
            push(out, scale_name(&spec.name), Dtype::F8_E8M0, vec![spec.shape[0], spec.shape[1] / FP4_BLOCK], scales);
        }
        _ => push(out, spec.name.clone(), Dtype::BF16, spec.shape.clone(), bf16_bytes(&values)),
    }
}

/// FP8 e4m3 codes with one power-of-two scale per 128×128 tile (`2^ceil(log2(amax/448))`).
pub fn quantize_fp8(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let (tr, tc) = (rows.div_ceil(FP8_TILE), cols.div_ceil(FP8_TILE));
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0u8; tr * tc];
    for bi in 0..tr {
        for bj in 0..tc {
            let (r0, r1) = (bi * FP8_TILE, ((bi + 1) * FP8_TILE).min(rows));
            let (c0, c1) = (bj * FP8_TILE, ((bj + 1) * FP8_TILE).min(cols));
            let amax = (r0..r1).flat_map(|r| w[r * cols + c0..r * cols + c1].iter()).fold(0f32, |m, v| m.max(v.abs()));
            // The floor keeps the scale a normal float (UE8M0 cannot go below 2^-127).
            let scale = pow2_scale(amax.max(E4M3_MAX * f32::MIN_POSITIVE), 1.0 / E4M3_MAX);
            scales[bi * tc + bj] = f32_to_e8m0(scale);
            for r in r0..r1 {
                for c in c0..c1 {
                    codes[r * cols + c] = f32_to_e4m3(w[r * cols + c] / scale);
                }
            }
        }
    }
    (codes, scales)
}

/// FP4 e2m1 codes packed two per byte (even input index in the low nibble) with one
/// power-of-two scale per 1×32 block.
pub fn quantize_fp4(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let mut codes = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / FP4_BLOCK];
    for (b, block) in w.chunks_exact(FP4_BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = pow2_scale(amax.max(6.0 * f32::MIN_POSITIVE), 1.0 / E2M1_MAX);
        scales[b] = f32_to_e8m0(scale);
        for (i, pair) in block.chunks_exact(2).enumerate() {
            let lo = f32_to_e2m1((pair[0] / scale).clamp(-E2M1_MAX, E2M1_MAX));
            let hi = f32_to_e2m1((pair[1] / scale).clamp(-E2M1_MAX, E2M1_MAX));
            codes[b * FP4_BLOCK / 2 + i] = lo | (hi << 4);
        }
    }
    (codes, scales)
}

fn serialize(tensors: &[&OwnedTensor]) -> Result<Vec<u8>, ModelError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| ModelError::Checkpoint(format!("tensor {}: {e}", t.name)))
        })
        .collect::<Result<_, _>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize(views, metadata).map_err(|e| ModelError::Checkpoint(format!("serialise: {e}")))
}

/// Writes `config.json` and the tensors to `dir` (created if missing), in one file or in
/// `shards` files with an index, as the releases do.
pub fn write_checkpoint(
    dir: &Path,
    cfg: &ModelConfig,
    seed: u64,
    dtype: InitDtype,
    shards: usize,
) -> Result<(), ModelError> {
    let tensors = generate(cfg, seed, dtype)?;
    write_tensors(dir, &init_config(cfg, dtype), &tensors, shards)
}

/// Writes given tensors as a checkpoint (also used by tests to write deliberately broken ones).
pub fn write_tensors(dir: &Path, cfg: &ModelConfig, tensors: &[OwnedTensor], shards: usize) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join(CONFIG_FILE), cfg.to_json_pretty() + "\n").map_err(io)?;
    let shards = shards.max(1);
    if shards == 1 {
        let all: Vec<&OwnedTensor> = tensors.iter().collect();
        return std::fs::write(dir.join(SINGLE_FILE), serialize(&all)?).map_err(io);
    }
    // Contiguous runs of the name-sorted tensors, balanced by bytes.
    let mut sorted: Vec<&OwnedTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let total: usize = sorted.iter().map(|t| t.data.len()).sum();
    let mut groups: Vec<Vec<&OwnedTensor>> = vec![Vec::new(); shards];
    let mut acc = 0;
    for t in sorted {
        let g = (acc * shards / total.max(1)).min(shards - 1);
        groups[g].push(t);
        acc += t.data.len();
    }
    let mut weight_map = BTreeMap::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        std::fs::write(dir.join(&file), serialize(group)?).map_err(io)?;
        for t in group {
            weight_map.insert(t.name.clone(), file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_string_pretty(&index).expect("json") + "\n").map_err(io)
}

/// A generated checkpoint held in memory (the built-in tiny model of `expertmesh local`).
pub fn in_memory(cfg: &ModelConfig, seed: u64, dtype: InitDtype) -> Result<Checkpoint, ModelError> {
    let tensors = generate(cfg, seed, dtype)?;
    let all: Vec<&OwnedTensor> = tensors.iter().collect();
    Checkpoint::from_buffers(init_config(cfg, dtype), vec![serialize(&all)?])
}
