//! `expertmesh model info|init|logits`.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use expertmesh_model::checkpoint::{InitDtype, write_checkpoint};
use expertmesh_model::engine::{
    ExpertSelection, ExpertStore, LoadOptions, Model, state_bytes_per_token, teacher_forced_logits,
};
use expertmesh_model::layers::QuantSim;
use expertmesh_model::{AttentionKind, ModelConfig, Preset};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use super::{ModelSource, config_of, parse_tokens};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Parameter counts, layer census and per-token state/wire sizes of a config.
    Info(InfoArgs),
    /// Write a deterministic random checkpoint in the released layout.
    Init(InitArgs),
    /// Teacher-forced logits: prefill the first P tokens, then decode the rest one by one.
    Logits(LogitsArgs),
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long)]
    preset: Option<Preset>,
    /// A Hugging Face config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A checkpoint folder (also reports its bytes per dtype).
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    Fp8,
}

#[derive(Args)]
pub struct InitArgs {
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// bf16: bf16 matrices; fp8: FP8 dense linears and FP4 routed experts, as released.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Split the tensors over this many files with a model.safetensors.index.json.
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Token ids, comma separated.
    #[arg(long)]
    tokens: String,
    /// Tokens to prefill at once; the rest are decoded one at a time.
    #[arg(long)]
    prefill: usize,
    /// Output safetensors file with tensor `logits` (f32, [1 + len - prefill, vocab]).
    #[arg(long)]
    out: PathBuf,
    /// Disable every quantisation simulation (KV FP8, indexer FP4, GEMM-input FP8).
    #[arg(long)]
    no_quant_sim: bool,
    /// Keep the KV/indexer simulations but do not round FP8/FP4 GEMM inputs.
    #[arg(long)]
    no_gemm_input_quant: bool,
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Info(a) => info(a),
        ModelCommand::Init(a) => init(a),
        ModelCommand::Logits(a) => logits(a),
    }
}

fn info(a: InfoArgs) -> Result<()> {
    let cfg = config_of(a.preset, &a.config, &a.model)?;
    print!("{}", describe(&cfg));
    if let Some(dir) = &a.model {
        let ckpt = expertmesh_model::checkpoint::Checkpoint::open(dir)?;
        let mut by: Vec<(String, usize)> = ckpt.bytes_by_dtype().into_iter().collect();
        by.sort();
        println!("checkpoint bytes     {} ({})", ckpt.total_tensor_bytes(), fmt_by_dtype(&by));
    }
    Ok(())
}

fn fmt_by_dtype(by: &[(String, usize)]) -> String {
    by.iter().map(|(d, b)| format!("{d} {b}")).collect::<Vec<_>>().join(", ")
}

/// The human summary `model info` prints.
pub fn describe(cfg: &ModelConfig) -> String {
    let p = cfg.parameter_count();
    let mut census: HashMap<&str, usize> = HashMap::new();
    for l in 0..cfg.n_layers {
        *census
            .entry(match cfg.attention_kind(l) {
                AttentionKind::Window => "window",
                AttentionKind::Csa => "csa",
                AttentionKind::Hca { .. } => "hca",
            })
            .or_default() += 1;
    }
    let b = |x: u64| {
        if x >= 1_000_000_000 { format!("{:.2} B", x as f64 / 1e9) } else { format!("{:.2} M", x as f64 / 1e6) }
    };
    let d = cfg.dim;
    let k = cfg.n_activated_experts;
    format!(
        "layers               {} (+{} MTP): window {}, CSA {}, HCA {}\n\
         hidden / heads       {d} / {} × {} (rope {}), q_lora {}, o_groups {} × {}\n\
         experts              {} routed (top-{k}) + {} shared, inter {}; {} hash layers\n\
         parameters           {} total, {} active per token, {} in MTP, {} per routed expert\n\
         kv state per token   {:.0} B (fp32 entries, spec §8.2)\n\
         dispatch per token   {} B bf16 + {} B ids/weights per MoE layer, combine {} B\n",
        cfg.n_layers,
        cfg.n_mtp_layers,
        census.get("window").unwrap_or(&0),
        census.get("csa").unwrap_or(&0),
        census.get("hca").unwrap_or(&0),
        cfg.n_heads,
        cfg.head_dim,
        cfg.rope_head_dim,
        cfg.q_lora_rank,
        cfg.o_groups,
        cfg.o_lora_rank,
        cfg.n_routed_experts,
        cfg.n_shared_experts,
        cfg.moe_inter_dim,
        cfg.n_hash_layers,
        b(p.main_total),
        b(p.main_active),
        b(p.mtp_total),
        b(p.per_expert),
        state_bytes_per_token(cfg),
        2 * d,
        8 * k,
        2 * d,
    )
}

fn init(a: InitArgs) -> Result<()> {
    let dtype = match a.dtype {
        DtypeArg::Bf16 => InitDtype::Bf16,
        DtypeArg::Fp8 => InitDtype::Fp8,
    };
    write_checkpoint(&a.out, &a.preset.config(), a.seed, dtype, a.shards)?;
    println!(
        "wrote {} ({}, seed {}) to {}",
        a.preset,
        a.dtype.to_possible_value().unwrap().get_name(),
        a.seed,
        a.out.display()
    );
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    if a.prefill == 0 || a.prefill > tokens.len() {
        bail!("--prefill must be between 1 and the number of tokens ({}), got {}", tokens.len(), a.prefill);
    }
    let sim = if a.no_quant_sim {
        QuantSim::off()
    } else {
        QuantSim { gemm_inputs: !a.no_gemm_input_quant, ..QuantSim::default() }
    };
    let ckpt = a.source.open()?;
    let model = Model::load(&ckpt, LoadOptions { sim, mtp: false })?;
    let experts = ExpertStore::load(&ckpt, &ExpertSelection::all(), sim)?;
    let start = Instant::now();
    let logits = teacher_forced_logits(&model, &experts, &tokens, a.prefill)?;
    let vocab = ckpt.config().vocab_size;
    let rows = logits.len() / vocab;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, vocab], &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote logits [{rows}, {vocab}] to {} ({} tokens in {:.2}s)",
        a.out.display(),
        tokens.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
