//! `expertmesh generate`: greedy decoding with the in-process engine, printing token ids as they
//! are produced.

use anyhow::Result;
use clap::Args;
use expertmesh_model::engine::sampling::argmax;
use expertmesh_model::engine::{ExpertSelection, ExpertStore, LoadOptions, Model, Step};
use std::io::Write;
use std::time::Instant;

use super::{ModelSource, parse_tokens};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Prompt token ids, comma separated.
    #[arg(long, default_value = "0,17,5,300,42")]
    prompt_tokens: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let prompt = parse_tokens(&a.prompt_tokens)?;
    let ckpt = a.source.open()?;
    let opts = LoadOptions { mtp: false, ..LoadOptions::default() };
    let model = Model::load(&ckpt, opts)?;
    let experts = ExpertStore::load(&ckpt, &ExpertSelection::all(), opts.sim)?;
    let eos = model.config().eos_token_id;
    let mut state = model.new_sequence();
    let start = Instant::now();
    let mut out = model.forward(&mut [Step::new(&mut state, &prompt)], &experts)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let mut stdout = std::io::stdout();
    let mut generated = 0;
    let decode_start = Instant::now();
    while generated < a.max_tokens {
        let next = argmax(&out[0].logits) as u32;
        generated += 1;
        write!(stdout, "{next} ")?;
        stdout.flush()?;
        if next == eos || generated == a.max_tokens {
            break;
        }
        out = model.forward(&mut [Step::new(&mut state, &[next])], &experts)?;
    }
    let decode_s = decode_start.elapsed().as_secs_f64();
    writeln!(stdout)?;
    eprintln!(
        "prompt {} tokens in {:.3}s; generated {generated} tokens, {:.1} tokens/s",
        prompt.len(),
        prefill_s,
        (generated.saturating_sub(1)) as f64 / decode_s.max(1e-9)
    );
    Ok(())
}
