//! Distributed decode next to in-process decode, in the same run: the engine's model half runs
//! here; its routed experts either in this process or in separate `expertmesh expert` processes
//! reached over loopback gRPC (bf16 on the wire). Also prints the bytes that crossed per token per
//! MoE layer next to the ideal of spec §10 (one copy of a token per shard it needs, each way,
//! plus k expert ids and weights).

use anyhow::{Context, Result, bail};
use expertmesh_attention::{RemoteExperts, RemoteOptions};
use expertmesh_model::Preset;
use expertmesh_model::checkpoint::{InitDtype, in_memory};
use expertmesh_model::engine::{ExpertBackend, ExpertSelection, ExpertStore, LoadOptions, Model};
use expertmesh_runtime::registry::{HeldExperts, MemoryRegistry, Registry, Role, WorkerRecord};
use expertmesh_runtime::wire::WireDType;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::BenchArgs;
use super::model::measure;
use crate::commands::local::even_ranges;

/// Expert worker processes, killed on drop.
struct Shards(Vec<Child>);

impl Drop for Shards {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_shard(range: &std::ops::Range<usize>, threads: usize) -> Result<(Child, String, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["expert", "--preset", "tiny", "--seed", "7", "--listen", "127.0.0.1:0"])
        .args(["--experts", &format!("{}-{}", range.start, range.end - 1)])
        .env("EXPERTMESH_THREADS", threads.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting an expert worker")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let Some((head, rest)) = line.trim().split_once(" listening on ") else {
        bail!("expert worker did not start: {line:?}");
    };
    let id = head.split_whitespace().last().unwrap_or_default().to_string();
    Ok((child, id, rest.split_whitespace().next().unwrap_or_default().to_string()))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let shards_n = args.cluster_shards.clamp(1, 16);
    let cfg = Preset::Tiny.config();
    let ckpt = in_memory(&cfg, 7, InitDtype::Bf16)?;
    let opts = LoadOptions { mtp: false, ..LoadOptions::default() };
    let model = Model::load(&ckpt, opts)?;
    let local = ExpertStore::load(&ckpt, &ExpertSelection::all(), opts.sim)?;
    drop(ckpt);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let registry = MemoryRegistry::new();
    let mut shards = Shards(Vec::new());
    for range in even_ranges(cfg.n_routed_experts, shards_n) {
        let (child, id, endpoint) = spawn_shard(&range, rayon::current_num_threads())?;
        shards.0.push(child);
        let held = HeldExperts { layers: None, experts: Some(range.map(|e| e as u32).collect()), pairs: None };
        let record = WorkerRecord {
            id,
            role: Role::Expert,
            endpoint,
            topology: Default::default(),
            experts: Some(held),
            resident_bytes: 0,
            load: Default::default(),
        };
        rt.block_on(registry.announce(record))?;
    }
    let remote = |streaming| {
        RemoteExperts::new(
            rt.handle().clone(),
            registry.subscribe(),
            RemoteOptions {
                wire: WireDType::Bf16,
                streaming,
                call_timeout: Duration::from_secs(30),
                topology: Default::default(),
                overrides: Default::default(),
                n_blocks: cfg.n_blocks(),
                n_experts: cfg.n_routed_experts,
                dim: cfg.dim,
            },
        )
    };
    let (streamed, unary) = (remote(true), remote(false));

    println!(
        "\n## Distributed decode: tiny preset, {shards_n} expert worker processes on loopback gRPC (bf16 wire), prompt 32, {} decode steps",
        args.decode
    );
    println!(
        "{:>5} {:>7} {:>16} {:>16} {:>7} {:>20} {:>10}",
        "batch", "calls", "in-process t/s", "distributed t/s", "ratio", "wire B/token/layer", "vs ideal"
    );
    let best = |experts: &dyn ExpertBackend, batch: usize| -> Result<f64> {
        measure(&model, experts, batch, 32, 2.min(args.decode))?; // warm-up (connections, caches)
        let mut best = 0.0f64;
        for _ in 0..args.repeats.max(1) {
            best = best.max(measure(&model, experts, batch, 32, args.decode)?.1);
        }
        Ok(best)
    };
    for batch in [1, 32] {
        let in_process = best(&local, batch)?;
        for (mode, remote) in [("stream", &streamed), ("unary", &unary)] {
            let s = &remote.stats;
            let counters = || {
                [&s.bytes_sent, &s.bytes_received, &s.ideal_bytes, &s.token_layers].map(|c| c.load(Ordering::Relaxed))
            };
            let before = counters();
            let distributed = best(remote, batch)?;
            let d: Vec<f64> = before.iter().zip(counters()).map(|(b, a)| (a - b) as f64).collect();
            let (wire, ideal) = ((d[0] + d[1]) / d[3], d[2] / d[3]);
            println!(
                "{batch:>5} {mode:>7} {in_process:>16.1} {distributed:>16.1} {:>6.0}% {wire:>20.0} {:>9.3}x",
                100.0 * distributed / in_process,
                wire / ideal
            );
        }
    }
    println!(
        "(ideal per token per MoE layer with one copy per shard: {} B each way for d={} bf16 plus {} B of ids and weights, times the shards a token touches)",
        2 * cfg.dim,
        cfg.dim,
        8 * cfg.n_activated_experts
    );
    drop(shards);
    Ok(())
}
