//! The `expertmesh` binary end to end: `model init` writes a checkpoint, `model logits` reads it
//! back through the real files, `model info` reports the published sizes, bad input fails cleanly.

use expertmesh_model::checkpoint::Checkpoint;
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions, Model, teacher_forced_logits};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn expertmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_expertmesh"))
        .args(args)
        .env("EXPERTMESH_THREADS", "2")
        .output()
        .expect("run expertmesh")
}

fn ok(args: &[&str]) -> String {
    let out = expertmesh(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

fn golden(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/golden").join(dir)
}

#[test]
fn init_then_logits_matches_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("micro-fp8");
    let out = tmp.path().join("logits.safetensors");
    ok(&[
        "model",
        "init",
        "--preset",
        "micro",
        "--seed",
        "7",
        "--dtype",
        "fp8",
        "--shards",
        "2",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 4096).collect();
    let list = tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    ok(&[
        "model",
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &list,
        "--prefill",
        "17",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (shape, values) = read_logits(&out);
    assert_eq!(shape, vec![1 + 24 - 17, 4096]);

    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&ckpt, LoadOptions::default()).unwrap();
    let experts = ExpertStore::load(&ckpt, &ExpertSelection::all(), model.quant_sim()).unwrap();
    let want = teacher_forced_logits(&model, &experts, &tokens, 17).unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = values.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5 * scale, "CLI and library differ by {diff}");
}

/// `model logits` on DeepSeek's golden bf16 checkpoint reproduces the official fp32 logits.
#[test]
fn logits_command_reproduces_the_golden_short_case() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("short.safetensors");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("bf16").join("tokens_short.json")).unwrap()).unwrap();
    let list = case["tokens"].as_array().unwrap().iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let prefill = case["prefill"].to_string();
    ok(&[
        "model",
        "logits",
        "--model",
        golden("bf16").to_str().unwrap(),
        "--tokens",
        &list,
        "--prefill",
        &prefill,
        "--out",
        out.to_str().unwrap(),
    ]);
    let (_, ours) = read_logits(&out);
    let bytes = std::fs::read(golden("bf16").join("logits_short.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let theirs: Vec<f32> = st
        .tensor("logits_fp32")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (i, (a, b)) in ours.chunks(4096).zip(theirs.chunks(4096)).enumerate() {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (n(a) * n(b));
        assert!(cos > 0.99999, "row {i}: cosine {cos}");
    }
}

#[test]
fn info_reports_published_sizes() {
    let pro = ok(&["model", "info", "--preset", "v4-pro"]);
    assert!(
        pro.contains("1573.00 B total") && pro.contains("49.78 B active") && pro.contains("CSA 30, HCA 31"),
        "{pro}"
    );
    let flash = ok(&["model", "info", "--preset", "v4-flash"]);
    assert!(
        flash.contains("284.33 B total") && flash.contains("13.80 B active") && flash.contains("window 2"),
        "{flash}"
    );
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let o = out.to_str().unwrap();
    for (args, want) in [
        (
            vec!["model", "logits", "--preset", "micro", "--tokens", "1,2,99999", "--prefill", "2", "--out", o],
            "token id 99999",
        ),
        (
            vec!["model", "logits", "--preset", "micro", "--tokens", "1,2,x", "--prefill", "2", "--out", o],
            "\"x\" is not a token id",
        ),
        (vec!["model", "logits", "--preset", "micro", "--tokens", "1,2,3", "--prefill", "0", "--out", o], "--prefill"),
        (
            vec!["model", "logits", "--model", "/nonexistent", "--tokens", "1", "--prefill", "1", "--out", o],
            "/nonexistent",
        ),
        (vec!["model", "info", "--preset", "v5"], "unknown preset"),
        (
            vec!["gateway", "--tokenizer", "/nonexistent", "--default-max-tokens", "0", "--etcd", "http://127.0.0.1:1"],
            "--default-max-tokens 0",
        ),
    ] {
        let r = expertmesh(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} should fail");
        assert!(stderr.contains(want), "{args:?}: expected {want:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}
