//! Named configurations. The JSON files under `model/presets/` are copies of the real configs
//! (see the README there); `micro` derives from `tiny`.

use std::str::FromStr;

use super::ModelConfig;
use crate::error::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// DeepSeek-V4-Pro: 1.6T parameters, 49B active.
    V4Pro,
    /// DeepSeek-V4-Flash: 284B parameters, 13B active.
    V4Flash,
    /// The spec's tiny model, every feature at ~20M parameters.
    Tiny,
    /// `tiny` with a window of 8, HCA ratio 16 and indexer top-4: unit tests hit every boundary
    /// within a few dozen tokens.
    Micro,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::V4Pro, Preset::V4Flash, Preset::Tiny, Preset::Micro];

    pub fn name(self) -> &'static str {
        match self {
            Preset::V4Pro => "v4-pro",
            Preset::V4Flash => "v4-flash",
            Preset::Tiny => "tiny",
            Preset::Micro => "micro",
        }
    }

    pub fn config(self) -> ModelConfig {
        let parse = |text: &str| ModelConfig::from_json_str(text).expect("bundled preset is valid");
        match self {
            Preset::V4Pro => parse(include_str!("../../presets/v4-pro.json")),
            Preset::V4Flash => parse(include_str!("../../presets/v4-flash.json")),
            Preset::Tiny => parse(include_str!("../../presets/tiny.json")),
            Preset::Micro => {
                let mut cfg = Preset::Tiny.config();
                cfg.window_size = 8;
                for r in cfg.compress_ratios.iter_mut().filter(|r| **r > 4) {
                    *r = 16;
                }
                cfg.index_topk = 4;
                cfg.validate().expect("micro preset is valid");
                cfg
            }
        }
    }
}

impl FromStr for Preset {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<_> = Preset::ALL.iter().map(|p| p.name()).collect();
            ModelError::Config(format!("unknown preset {s:?} (known: {})", names.join(", ")))
        })
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
