//! Logits against DeepSeek's official inference code on the tiny golden checkpoints
//! (`../shared/data/golden/`), with the pass criteria of the README there.

use expertmesh_model::checkpoint::Checkpoint;
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions, Model, teacher_forced_logits};
use expertmesh_model::layers::QuantSim;
use std::path::PathBuf;

fn golden(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/golden").join(dir)
}

fn read_tokens(path: PathBuf) -> (Vec<u32>, usize) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tokens = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    (tokens, v["prefill"].as_u64().unwrap() as usize)
}

fn read_logits(path: PathBuf, name: &str) -> (Vec<f32>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let values = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (values, t.shape()[1])
}

struct Agreement {
    cosines: Vec<f64>,
    argmax_agree: f64,
}

impl Agreement {
    fn of(ours: &[f32], theirs: &[f32], vocab: usize) -> Self {
        assert_eq!(ours.len(), theirs.len());
        let mut cosines = Vec::new();
        let mut agree = 0;
        for (a, b) in ours.chunks_exact(vocab).zip(theirs.chunks_exact(vocab)) {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            cosines.push(dot / (na * nb));
            agree += (argmax(a) == argmax(b)) as usize;
        }
        let n = cosines.len();
        Agreement { cosines, argmax_agree: agree as f64 / n as f64 }
    }

    fn median(&self) -> f64 {
        let mut c = self.cosines.clone();
        c.sort_by(f64::total_cmp);
        c[c.len() / 2]
    }

    fn frac_at_least(&self, v: f64) -> f64 {
        self.cosines.iter().filter(|&&c| c >= v).count() as f64 / self.cosines.len() as f64
    }

    fn min(&self) -> f64 {
        self.cosines.iter().cloned().fold(f64::INFINITY, f64::min)
    }

    fn report(&self, what: &str) -> String {
        format!(
            "{what}: median cosine {:.7}, min {:.7}, >=0.999 on {:.0}% of steps, argmax agrees {:.0}%",
            self.median(),
            self.min(),
            100.0 * self.frac_at_least(0.999),
            100.0 * self.argmax_agree
        )
    }

    /// README "strict": cosine ≥ 0.999 on ≥ 95 % of steps, median ≥ 0.99995, argmax ≥ 95 %.
    fn assert_strict(&self, what: &str) {
        let r = self.report(what);
        eprintln!("{r}");
        assert!(self.frac_at_least(0.999) >= 0.95 && self.median() >= 0.99995 && self.argmax_agree >= 0.95, "{r}");
    }

    /// README "fp8": median ≥ 0.98, every step ≥ 0.90, argmax ≥ 50 %.
    fn assert_fp8(&self, what: &str) {
        let r = self.report(what);
        eprintln!("{r}");
        assert!(self.median() >= 0.98 && self.min() >= 0.90 && self.argmax_agree >= 0.5, "{r}");
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

fn run(dir: &str, case_tokens: &str, prefill: Option<usize>, sim: QuantSim) -> (Vec<f32>, usize) {
    let ckpt = Checkpoint::open(&golden(dir)).unwrap();
    let model = Model::load(&ckpt, LoadOptions { sim, mtp: false }).unwrap();
    let experts = ExpertStore::load(&ckpt, &ExpertSelection::all(), sim).unwrap();
    let (tokens, p) = read_tokens(golden(dir).join(case_tokens));
    let logits = teacher_forced_logits(&model, &experts, &tokens, prefill.unwrap_or(p)).unwrap();
    (logits, ckpt.config().vocab_size)
}

#[test]
fn bf16_checkpoint_matches_official_fp32_logits() {
    for (tokens, logits) in [("tokens_short.json", "logits_short.safetensors"), ("tokens.json", "logits.safetensors")] {
        let (ours, vocab) = run("bf16", tokens, None, QuantSim::default());
        let (theirs, _) = read_logits(golden("bf16").join(logits), "logits_fp32");
        Agreement::of(&ours, &theirs, vocab).assert_strict(&format!("bf16 {tokens} vs logits_fp32"));
    }
}

/// The same 300 tokens with a 9-token prefill and 291 decode steps must reproduce the last 21
/// rows: every compressor state and the window ring driven through decode.
#[test]
fn bf16_long_decode_matches_official_fp32_logits() {
    let (ours, vocab) = run("bf16", "tokens.json", Some(9), QuantSim::default());
    let (theirs, _) = read_logits(golden("bf16").join("logits.safetensors"), "logits_fp32");
    let tail = &ours[ours.len() - theirs.len()..];
    Agreement::of(tail, &theirs, vocab).assert_strict("bf16 prefill 9 + 291 decode vs logits_fp32");
}

#[test]
fn fp8fp4_checkpoint_matches_official_logits() {
    for (tokens, logits) in [("tokens_short.json", "logits_short.safetensors"), ("tokens.json", "logits.safetensors")] {
        let (ours, vocab) = run("fp8fp4", tokens, None, QuantSim::default());
        for target in ["logits_fp32", "logits"] {
            let (theirs, _) = read_logits(golden("fp8fp4").join(logits), target);
            Agreement::of(&ours, &theirs, vocab).assert_fp8(&format!("fp8fp4 {tokens} vs {target}"));
        }
    }
    let (ours, vocab) = run("fp8fp4", "tokens.json", Some(9), QuantSim::default());
    let (theirs, _) = read_logits(golden("fp8fp4").join("logits.safetensors"), "logits_fp32");
    Agreement::of(&ours[ours.len() - theirs.len()..], &theirs, vocab).assert_fp8("fp8fp4 prefill 9 vs logits_fp32");
}

/// With GEMM inputs left unrounded, FP8/FP4 weights decoded exactly must match the reference's
/// `logits_dequant_fp32` strictly: this isolates the weight formats (nibble order, scale grids,
/// e8m0 bias) from activation rounding.
#[test]
fn fp8fp4_dequantised_matches_strictly() {
    let sim = QuantSim { gemm_inputs: false, ..QuantSim::default() };
    for (tokens, logits) in [("tokens_short.json", "logits_short.safetensors"), ("tokens.json", "logits.safetensors")] {
        let (ours, vocab) = run("fp8fp4", tokens, None, sim);
        let (theirs, _) = read_logits(golden("fp8fp4").join(logits), "logits_dequant_fp32");
        Agreement::of(&ours, &theirs, vocab).assert_strict(&format!("fp8fp4 {tokens} vs logits_dequant_fp32"));
    }
}
