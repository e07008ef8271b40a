//! Checkpoints on disk: the writer's determinism and layouts, bf16 vs FP8/FP4 variants, and
//! loading errors that name the problem.

mod common;

use common::*;
use expertmesh_model::Preset;
use expertmesh_model::checkpoint::writer::{OwnedTensor, generate, init_config, write_tensors};
use expertmesh_model::checkpoint::{Checkpoint, InitDtype, write_checkpoint};
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions, Model, teacher_forced_logits};
use expertmesh_model::layers::QuantSim;
use std::path::Path;

fn read_dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

fn open_model(dir: &Path, sim: QuantSim) -> Loaded {
    let ckpt = Checkpoint::open(dir).unwrap();
    Loaded {
        model: Model::load(&ckpt, LoadOptions { sim, mtp: true }).unwrap(),
        experts: ExpertStore::load(&ckpt, &ExpertSelection::all(), sim).unwrap(),
    }
}

#[test]
fn same_seed_writes_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Preset::Micro.config();
    for dtype in [InitDtype::Bf16, InitDtype::Fp8] {
        write_checkpoint(&tmp.path().join("a"), &cfg, 7, dtype, 1).unwrap();
        write_checkpoint(&tmp.path().join("b"), &cfg, 7, dtype, 1).unwrap();
        write_checkpoint(&tmp.path().join("c"), &cfg, 8, dtype, 1).unwrap();
        let a = read_dir_bytes(&tmp.path().join("a"));
        assert_eq!(a, read_dir_bytes(&tmp.path().join("b")));
        assert_ne!(a, read_dir_bytes(&tmp.path().join("c")));
    }
}

/// The released layout: every tensor name and stored dtype/shape as in the FP8 golden checkpoint
/// of DeepSeek's reference (same config), including the scale companions and the MTP copies.
#[test]
fn fp8_writer_reproduces_the_release_layout() {
    let golden =
        Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/golden/fp8fp4")).unwrap();
    let tensors = generate(golden.config(), 7, InitDtype::Fp8).unwrap();
    let mut ours: Vec<(String, String, Vec<usize>)> =
        tensors.iter().map(|t| (t.name.clone(), format!("{:?}", t.dtype), t.shape.clone())).collect();
    ours.sort();
    let mut theirs: Vec<(String, String, Vec<usize>)> = golden
        .names()
        .map(|n| {
            let e = golden.entry(n).unwrap();
            (n.to_string(), format!("{:?}", e.dtype), e.shape.clone())
        })
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert_eq!(&init_config(golden.config(), InitDtype::Fp8), golden.config());
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Preset::Micro.config();
    write_checkpoint(&tmp.path().join("one"), &cfg, 7, InitDtype::Fp8, 1).unwrap();
    write_checkpoint(&tmp.path().join("three"), &cfg, 7, InitDtype::Fp8, 3).unwrap();
    let names: Vec<String> = read_dir_bytes(&tmp.path().join("three")).into_iter().map(|f| f.0).collect();
    assert!(names.contains(&"model.safetensors.index.json".to_string()));
    assert!(names.contains(&"model-00003-of-00003.safetensors".to_string()));
    let ids = tokens(20, cfg.vocab_size, 1);
    let a = open_model(&tmp.path().join("one"), QuantSim::default());
    let b = open_model(&tmp.path().join("three"), QuantSim::default());
    let la = teacher_forced_logits(&a.model, &a.experts, &ids, 12).unwrap();
    let lb = teacher_forced_logits(&b.model, &b.experts, &ids, 12).unwrap();
    assert_eq!(la, lb);
}

/// The FP8/FP4 variant holds exactly the bf16 model's weights rounded to the release formats:
/// written back as bf16 (exact: e4m3 and e2m1 values times power-of-two scales fit bf16), the
/// decoded values give the FP8 checkpoint's logits to fp32 accuracy once GEMM inputs are not
/// rounded. The decoding here is written out independently of the kernels, from the format tables.
#[test]
fn fp8_checkpoint_is_exactly_its_decoded_weights() {
    use expertmesh_model::numerics::{E2M1_VALUES, e4m3_to_f32, e8m0_to_f32};
    let cfg = Preset::Tiny.config();
    let fp8_tensors = generate(&cfg, 7, InitDtype::Fp8).unwrap();
    let find = |name: &str| fp8_tensors.iter().find(|t| t.name == name);
    let mut decoded = Vec::new();
    for t in &fp8_tensors {
        if t.name.ends_with(".scale") {
            continue;
        }
        let scale = find(&t.name.replace(".weight", ".scale"));
        let values: Option<Vec<f32>> = match (t.dtype, scale) {
            (safetensors::Dtype::F8_E4M3, Some(s)) => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let tiles = cols.div_ceil(128);
                Some(
                    (0..rows * cols)
                        .map(|i| {
                            e4m3_to_f32(t.data[i]) * e8m0_to_f32(s.data[(i / cols / 128) * tiles + (i % cols) / 128])
                        })
                        .collect(),
                )
            }
            (safetensors::Dtype::I8, Some(s)) => Some(
                t.data
                    .iter()
                    .enumerate()
                    .flat_map(|(i, b)| {
                        let sc = e8m0_to_f32(s.data[2 * i / 32]);
                        [E2M1_VALUES[(b & 15) as usize] * sc, E2M1_VALUES[(b >> 4) as usize] * sc]
                    })
                    .collect(),
            ),
            _ => None,
        };
        decoded.push(match values {
            Some(v) => {
                let shape =
                    if t.dtype == safetensors::Dtype::I8 { vec![t.shape[0], t.shape[1] * 2] } else { t.shape.clone() };
                let data: Vec<u8> = v
                    .iter()
                    .flat_map(|x| {
                        let b = half::bf16::from_f32(*x);
                        assert_eq!(b.to_f32(), *x, "{} does not fit bf16 exactly", t.name);
                        b.to_bits().to_le_bytes()
                    })
                    .collect();
                OwnedTensor { name: t.name.clone(), dtype: safetensors::Dtype::BF16, shape, data }
            }
            None => OwnedTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), data: t.data.clone() },
        });
    }
    let tmp = tempfile::tempdir().unwrap();
    write_tensors(&tmp.path().join("decoded"), &init_config(&cfg, InitDtype::Bf16), &decoded, 1).unwrap();
    write_tensors(&tmp.path().join("fp8"), &init_config(&cfg, InitDtype::Fp8), &fp8_tensors, 1).unwrap();
    let sim = QuantSim { gemm_inputs: false, ..QuantSim::default() };
    let ids = tokens(48, cfg.vocab_size, 3);
    let a = open_model(&tmp.path().join("decoded"), sim);
    let b = open_model(&tmp.path().join("fp8"), sim);
    let la = teacher_forced_logits(&a.model, &a.experts, &ids, 40).unwrap();
    let lb = teacher_forced_logits(&b.model, &b.experts, &ids, 40).unwrap();
    let d = rel_diff(&lb, &la);
    assert!(d < 1e-4, "relative difference {d}");
}

/// How close the FP8/FP4 variant stays to the bf16 model it was quantised from. Per weight, e4m3
/// with 128×128 power-of-two scales errs by ≤ 6.25 % (RMS ≈ 2.5 %), while e2m1 with 1×32 scales
/// has one mantissa bit: RMS error ≈ 20 % of a Gaussian weight's spread; every GEMM input is
/// rounded to e4m3 as well. A random, untrained model has none of the robustness that
/// quantisation-aware training gives the released weights, so this noise reaches the logits
/// nearly undamped through 8 layers. Stated bound (observed min 0.882, median 0.948 on these 48
/// positions): median cosine ≥ 0.93 and every position ≥ 0.85, while the variants must not be
/// identical. The exact correspondence is the test above.
#[test]
fn fp8_variant_agrees_with_bf16_as_far_as_quantisation_allows() {
    let cfg = Preset::Tiny.config();
    let ids = tokens(48, cfg.vocab_size, 3);
    let run = |dtype| {
        let m = load(&cfg, dtype, QuantSim::default());
        let mut s = m.model.new_sequence();
        logits_in_chunks(&m, &mut s, &[&ids])
    };
    let (bf16, fp8) = (run(InitDtype::Bf16), run(InitDtype::Fp8));
    let mut cos: Vec<f64> = bf16.iter().zip(&fp8).map(|(a, b)| cosine(a, b)).collect();
    cos.sort_by(f64::total_cmp);
    eprintln!(
        "bf16 vs fp8 logits cosine: min {:.5}, median {:.5}, max {:.5}",
        cos[0],
        cos[cos.len() / 2],
        cos[cos.len() - 1]
    );
    assert!(cos[cos.len() / 2] >= 0.93 && cos[0] >= 0.85, "{cos:?}");
    assert!(cos[cos.len() - 1] < 0.999999, "the variants should differ: is FP8 really used?");
}

/// Writes `cfg`'s micro checkpoint after `edit` and returns the error of opening + loading it.
fn load_error(edit: impl FnOnce(&mut Vec<OwnedTensor>, &Path)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = init_config(&Preset::Micro.config(), InitDtype::Fp8);
    let mut tensors = generate(&cfg, 7, InitDtype::Fp8).unwrap();
    edit(&mut tensors, tmp.path());
    write_tensors(tmp.path(), &cfg, &tensors, 1).unwrap();
    let result = Checkpoint::open(tmp.path()).and_then(|ckpt| {
        Model::load(&ckpt, LoadOptions::default())?;
        ExpertStore::load(&ckpt, &ExpertSelection::all(), QuantSim::default())?;
        Ok(())
    });
    result.expect_err("a broken checkpoint must not load").to_string()
}

#[test]
fn missing_tensor_is_named() {
    let err = load_error(|t, _| t.retain(|t| t.name != "layers.4.attn.indexer.wq_b.weight"));
    assert!(err.contains("missing tensor layers.4.attn.indexer.wq_b.weight"), "{err}");
    let err = load_error(|t, _| t.retain(|t| t.name != "layers.5.ffn.experts.11.w2.scale"));
    assert!(err.contains("layers.5.ffn.experts.11.w2.scale"), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let err = load_error(|t, _| {
        let x = t.iter_mut().find(|t| t.name == "layers.2.attn.kv_norm.weight").unwrap();
        x.shape = vec![64];
        x.data.truncate(128);
    });
    assert!(err.contains("layers.2.attn.kv_norm.weight") && err.contains("[64]") && err.contains("[128]"), "{err}");
}

#[test]
fn unexpected_tensor_is_named() {
    let err = load_error(|t, _| {
        t.push(OwnedTensor {
            name: "layers.99.attn.wq_a.weight".into(),
            dtype: safetensors::Dtype::F32,
            shape: vec![1],
            data: vec![0; 4],
        });
    });
    assert!(err.contains("unexpected tensor layers.99.attn.wq_a.weight"), "{err}");
}

#[test]
fn out_of_range_hash_table_is_rejected() {
    let err = load_error(|t, _| {
        let x = t.iter_mut().find(|t| t.name == "layers.1.ffn.gate.tid2eid").unwrap();
        x.data[0..8].copy_from_slice(&99i64.to_le_bytes());
    });
    assert!(err.contains("layers.1.ffn.gate.tid2eid") && err.contains("99"), "{err}");
}

#[test]
fn truncated_file_and_bad_config_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(tmp.path(), &Preset::Micro.config(), 7, InitDtype::Bf16, 1).unwrap();
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::open(tmp.path()).err().expect("truncated file must fail").to_string();
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors file"), "{err}");

    std::fs::write(&file, &bytes).unwrap();
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"o_groups\": 4", "\"o_groups\": 3");
    std::fs::write(&config, text).unwrap();
    let err = Checkpoint::open(tmp.path()).err().expect("inconsistent config must fail").to_string();
    assert!(err.contains("config.json") && err.contains("o_groups"), "{err}");

    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(&config).unwrap();
    let err = Checkpoint::open(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn empty_folder_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), Preset::Micro.config().to_json_pretty()).unwrap();
    let err = Checkpoint::open(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("model.safetensors") && err.contains("index"), "{err}");
}
