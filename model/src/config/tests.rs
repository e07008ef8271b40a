use super::*;
use std::path::PathBuf;

fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data").join(path)
}

#[test]
fn presets_equal_the_official_config_files() {
    for (preset, file) in [
        (Preset::V4Pro, "configs/deepseek-v4-pro.config.json"),
        (Preset::V4Flash, "configs/deepseek-v4-flash.config.json"),
        (Preset::Tiny, "golden/bf16/config.json"),
    ] {
        let real = ModelConfig::from_file(&shared(file)).unwrap();
        assert_eq!(preset.config(), real, "{preset} differs from {file}");
    }
}

#[test]
fn layer_census_matches_spec() {
    let census = |cfg: &ModelConfig| {
        let mut c = (0, 0, 0);
        for l in 0..cfg.n_layers {
            match cfg.attention_kind(l) {
                AttentionKind::Window => c.0 += 1,
                AttentionKind::Csa => c.1 += 1,
                AttentionKind::Hca { .. } => c.2 += 1,
            }
        }
        c
    };
    assert_eq!(census(&Preset::V4Pro.config()), (0, 30, 31));
    assert_eq!(census(&Preset::V4Flash.config()), (2, 21, 20));
    assert_eq!(census(&Preset::Tiny.config()), (2, 3, 3));
    // The MTP block is window-only in both releases.
    let pro = Preset::V4Pro.config();
    assert_eq!(pro.attention_kind(pro.n_layers), AttentionKind::Window);
}

/// Spec §1.3: Flash 284.33 B total / 13.8 B active, Pro 1573.0 B (+25.8 B MTP) / 49.8 B,
/// tiny 19.8 M (+2.2 M MTP) / 10.3 M.
#[test]
fn parameter_counts_reproduce_published_sizes() {
    let b = |x: u64| x as f64 / 1e9;
    let flash = Preset::V4Flash.config().parameter_count();
    assert!((b(flash.main_total) - 284.33).abs() < 0.01, "{}", b(flash.main_total));
    assert!((b(flash.main_active) - 13.80).abs() < 0.01, "{}", b(flash.main_active));
    assert!((b(flash.mtp_total) - 6.61).abs() < 0.01);
    let pro = Preset::V4Pro.config().parameter_count();
    assert!((b(pro.main_total) - 1573.0).abs() < 0.05, "{}", b(pro.main_total));
    assert!((b(pro.main_total + pro.mtp_total) - 1598.8).abs() < 0.1);
    assert!((b(pro.main_active) - 49.78).abs() < 0.01, "{}", b(pro.main_active));
    let tiny = Preset::Tiny.config().parameter_count();
    assert_eq!(tiny.main_total, 19_813_317);
    assert_eq!(tiny.mtp_total, 2_188_883);
}

#[test]
fn micro_preset_overrides_window_ratio_and_topk() {
    let micro = Preset::Micro.config();
    assert_eq!(micro.window_size, 8);
    assert_eq!(micro.index_topk, 4);
    assert_eq!(micro.compress_ratios, vec![0, 0, 4, 16, 4, 16, 4, 16, 0]);
    assert_eq!("micro".parse::<Preset>().unwrap(), Preset::Micro);
    let err = "huge".parse::<Preset>().unwrap_err().to_string();
    assert!(err.contains("huge") && err.contains("v4-pro"), "{err}");
}

fn tiny_json() -> serde_json::Value {
    serde_json::from_str(include_str!("../../presets/tiny.json")).unwrap()
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = tiny_json();
    edit(&mut v);
    ModelConfig::from_json_str(&v.to_string()).unwrap_err().to_string()
}

#[test]
fn inconsistent_configs_fail_naming_the_field() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("compress_ratios", Box::new(|v| v["compress_ratios"] = serde_json::json!([0, 0, 4]))),
        ("o_groups", Box::new(|v| v["o_groups"] = 3.into())),
        ("num_experts_per_tok", Box::new(|v| v["num_experts_per_tok"] = 17.into())),
        ("head_dim", Box::new(|v| v["head_dim"] = 96.into())),
        ("index_head_dim", Box::new(|v| v["index_head_dim"] = 96.into())),
        ("num_hash_layers", Box::new(|v| v["num_hash_layers"] = 9.into())),
        ("n_shared_experts", Box::new(|v| v["n_shared_experts"] = 2.into())),
        ("hidden_size", Box::new(|v| v["hidden_size"] = 0.into())),
        ("num_key_value_heads", Box::new(|v| v["num_key_value_heads"] = 8.into())),
        ("rope_scaling.type", Box::new(|v| v["rope_scaling"]["type"] = "linear".into())),
        ("scoring_func", Box::new(|v| v["scoring_func"] = "relu".into())),
        (
            "vocab_size",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("vocab_size");
            }),
        ),
    ];
    for (field, edit) in cases {
        let err = config_error(edit);
        assert!(err.contains(field), "error for {field} does not name it: {err}");
    }
}

#[test]
fn fp8_configs_require_128_wide_gemm_inputs() {
    let err = config_error(|v| {
        v["quantization_config"] = serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
        v["q_lora_rank"] = 96.into();
    });
    assert!(err.contains("q_lora_rank") && err.contains("128"), "{err}");
}

#[test]
fn config_round_trips_through_json() {
    let cfg = Preset::V4Pro.config();
    let again = ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap();
    assert_eq!(cfg, again);
}
