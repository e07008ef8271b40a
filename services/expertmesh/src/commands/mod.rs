pub mod attention;
pub mod client;
pub mod cluster;
pub mod expert;
pub mod gateway;
pub mod generate;
pub mod local;
pub mod model;

use anyhow::{Context, Result, bail};
use expertmesh_model::checkpoint::{Checkpoint, InitDtype, in_memory};
use expertmesh_model::{ModelConfig, Preset};
use std::path::PathBuf;

/// Where a command's model comes from: a checkpoint folder, or a preset generated in memory.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelSource {
    /// Checkpoint folder (config.json + safetensors, single or sharded).
    #[arg(long, env = "EXPERTMESH_MODEL", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Generate this preset in memory instead (tiny or micro).
    #[arg(long)]
    pub preset: Option<Preset>,
    /// Seed of the generated preset.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Vocabulary of the generated preset (e.g. 129280, DeepSeek's, to serve text through the
    /// real tokenizer; the tiny preset has 4096).
    #[arg(long, env = "EXPERTMESH_VOCAB_SIZE", conflicts_with = "model")]
    pub vocab_size: Option<usize>,
}

impl ModelSource {
    /// How the model is named in metrics: the checkpoint folder's name, or the preset's.
    pub fn name(&self) -> String {
        match &self.model {
            Some(dir) => {
                dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
            }
            None => self.preset.unwrap_or(Preset::Tiny).to_string(),
        }
    }

    pub fn open(&self) -> Result<Checkpoint> {
        match (&self.model, self.preset) {
            (Some(dir), _) => Checkpoint::open(dir).with_context(|| format!("opening checkpoint {}", dir.display())),
            (None, preset) => {
                let preset = preset.unwrap_or(Preset::Tiny);
                if !matches!(preset, Preset::Tiny | Preset::Micro) {
                    bail!("only tiny and micro can be generated in memory; pass --model DIR for {preset}");
                }
                let mut cfg = preset.config();
                if let Some(v) = self.vocab_size {
                    cfg.vocab_size = v;
                    cfg.validate()?;
                }
                Ok(in_memory(&cfg, self.seed, InitDtype::Bf16)?)
            }
        }
    }
}

/// Parses `0,17,5` into token ids.
pub fn parse_tokens(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("--tokens: {t:?} is not a token id")))
        .collect()
}

pub fn config_of(preset: Option<Preset>, config: &Option<PathBuf>, model: &Option<PathBuf>) -> Result<ModelConfig> {
    Ok(match (preset, config, model) {
        (Some(p), _, _) => p.config(),
        (None, Some(path), _) => ModelConfig::from_file(path)?,
        (None, None, Some(dir)) => ModelConfig::from_file(&dir.join("config.json"))?,
        _ => bail!("give --preset, --config FILE or --model DIR"),
    })
}
