//! One attention layer (spec §5): low-rank queries with a per-head norm, one shared K=V latent
//! with a sliding window, optional compressed entries (HCA: all; CSA: the indexer's top-k),
//! sink softmax, de-rotation and the grouped low-rank output projection.
//!
//! A call processes a chunk of tokens for each of several sequences. Projections run batched over
//! all tokens of the call; the compressor state machines run per sequence; the attention core
//! runs per token in parallel. Prefill (from position 0) and decode (one token) are both chunks.

use rayon::prelude::*;

use super::QuantSim;
use super::chunk::{Chunk, Layout};
use super::compressor::{Compressor, CompressorState, KV_SIM_BLOCK, Projected};
use super::indexer::Indexer;
use super::linear::Linear;
use super::norm::{RmsNorm, rms_normalize};
use super::rope::{Rope, RopeAngles};
use super::rows::{for_each_row, map_rows};
use super::sparse_attn::{BlockKeys, QueryKeys, attend_block};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::layout::block_prefix;
use crate::config::{AttentionKind, ModelConfig};
use crate::error::ModelError;
use crate::kernels;
use crate::numerics::fp8_sim;

#[derive(Clone, Debug)]
pub struct Attention {
    kind: AttentionKind,
    wq_a: Linear,
    q_norm: RmsNorm,
    wq_b: Linear,
    wkv: Linear,
    kv_norm: RmsNorm,
    /// The reference dequantises `wo_a` and multiplies in bf16: never input-quantised. Kept as
    /// one row-block view per output group.
    wo_a: Vec<kernels::WeightMatrix>,
    wo_b: Linear,
    sink: Vec<f32>,
    compressor: Option<Compressor>,
    indexer: Option<Indexer>,
    rope: Rope,
    n_heads: usize,
    head_dim: usize,
    rope_dim: usize,
    window: usize,
    groups: usize,
    o_rank: usize,
    eps: f32,
    scale: f32,
}

/// One sequence's caches for this layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionState {
    /// Ring of the last `window` latents; position `t` lives in slot `t mod window`.
    window: Vec<f32>,
    /// Main compressed entries `[n, head_dim]`, one per complete block.
    compressed: Vec<f32>,
    compressor: Option<CompressorState>,
    /// Indexer keys `[n, index_head_dim]` (CSA only).
    index_keys: Vec<f32>,
    index_compressor: Option<CompressorState>,
}

impl AttentionState {
    /// Bytes held for this sequence (fp32 entries, spec §8.1).
    pub fn bytes(&self) -> usize {
        (self.window.len() + self.compressed.len() + self.index_keys.len()) * 4
            + self.compressor.as_ref().map_or(0, |s| s.bytes())
            + self.index_compressor.as_ref().map_or(0, |s| s.bytes())
    }

    pub fn compressed_entries(&self, head_dim: usize) -> usize {
        self.compressed.len() / head_dim
    }
}

/// Consecutive queries of a sequence attended together (see `sparse_attn`): 16 tokens share all
/// but 15 of their window keys, so the block's union costs little more than one query's set.
const QUERY_BLOCK: usize = 16;
/// Chunks at least this long run their indexer and compressor state machines on two threads.
const PARALLEL_ABSORB_TOKENS: usize = 16;

impl Attention {
    pub fn load(ckpt: &Checkpoint, layer: usize, quantize_inputs: bool) -> Result<Self, ModelError> {
        let cfg: &ModelConfig = ckpt.config();
        let p = format!("{}.attn", block_prefix(cfg, layer));
        let (d, q, hd, h) = (cfg.dim, cfg.q_lora_rank, cfg.head_dim, cfg.n_heads);
        let kind = cfg.attention_kind(layer);
        let compressor = match kind {
            AttentionKind::Window => None,
            k => Some(Compressor::load(ckpt, &format!("{p}.compressor"), k.ratio(), hd, false)?),
        };
        let indexer = match kind {
            AttentionKind::Csa => Some(Indexer::load(ckpt, &format!("{p}.indexer"), quantize_inputs)?),
            _ => None,
        };
        Ok(Attention {
            kind,
            wq_a: Linear::load(ckpt, &format!("{p}.wq_a.weight"), q, d, quantize_inputs)?,
            q_norm: RmsNorm::load(ckpt, &format!("{p}.q_norm.weight"), q, cfg.norm_eps)?,
            wq_b: Linear::load(ckpt, &format!("{p}.wq_b.weight"), h * hd, q, quantize_inputs)?,
            wkv: Linear::load(ckpt, &format!("{p}.wkv.weight"), hd, d, quantize_inputs)?,
            kv_norm: RmsNorm::load(ckpt, &format!("{p}.kv_norm.weight"), hd, cfg.norm_eps)?,
            wo_a: {
                let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
                let w = ckpt.linear(&format!("{p}.wo_a.weight"), g * r, cfg.group_width())?;
                (0..g).map(|i| w.row_block(i * r..(i + 1) * r)).collect()
            },
            wo_b: Linear::load(ckpt, &format!("{p}.wo_b.weight"), d, cfg.o_groups * cfg.o_lora_rank, quantize_inputs)?,
            sink: ckpt.vector(&format!("{p}.attn_sink"), &[h])?,
            compressor,
            indexer,
            rope: Rope::for_layer(cfg, layer),
            n_heads: h,
            head_dim: hd,
            rope_dim: cfg.rope_head_dim,
            window: cfg.window_size,
            groups: cfg.o_groups,
            o_rank: cfg.o_lora_rank,
            eps: cfg.norm_eps,
            scale: cfg.softmax_scale(),
        })
    }

    pub fn kind(&self) -> AttentionKind {
        self.kind
    }

    pub fn bytes(&self) -> usize {
        [&self.wq_a, &self.wq_b, &self.wkv, &self.wo_b].iter().map(|l| l.bytes()).sum::<usize>()
            + self.wo_a.iter().map(|w| w.stored_bytes()).sum::<usize>()
            + self.q_norm.bytes()
            + self.kv_norm.bytes()
            + self.sink.len() * 4
            + self.compressor.as_ref().map_or(0, |c| c.bytes())
            + self.indexer.as_ref().map_or(0, |i| i.bytes())
    }

    pub fn new_state(&self) -> AttentionState {
        AttentionState {
            window: vec![0.0; self.window * self.head_dim],
            compressed: Vec::new(),
            compressor: self.compressor.as_ref().map(|c| c.new_state()),
            index_keys: Vec::new(),
            index_compressor: self.indexer.as_ref().map(|i| i.compressor.new_state()),
        }
    }

    /// Runs the layer for every chunk; `x` is `[T, dim]` (after `attn_norm`), rows ordered as
    /// the chunks say. Every token's keys enter the caches; outputs are computed for the
    /// layout's output tokens only. Returns `[layout.output_tokens(), dim]`.
    pub fn forward(&self, x: &[f32], layout: &Layout, states: &mut [&mut AttentionState], sim: QuantSim) -> Vec<f32> {
        let (chunks, outputs) = (&layout.chunks, &layout.outputs);
        let tokens = layout.tokens();
        let (h, hd) = (self.n_heads, self.head_dim);
        let positions: Vec<usize> = chunks.iter().flat_map(|c| c.t0..c.t0 + c.len).collect();
        let angles: Vec<RopeAngles> = map_rows(tokens, 4 * self.rope_dim, |i| self.rope.angles(positions[i]));
        let q_tokens = layout.output_tokens();
        let (xq, q_angles) = (layout.gather(x, x.len() / tokens), layout.gather(&angles, 1));

        // Every projection at once (the queries' of the output rows, the keys' of all rows),
        // then every projection of the query latent qr.
        let mut projections: Vec<(&Linear, &[f32])> = vec![(&self.wq_a, &xq)];
        if let Some(ix) = &self.indexer {
            projections.push((&ix.weights_proj, &xq));
        }
        let of_queries = projections.len();
        projections.push((&self.wkv, x));
        if let Some(c) = &self.compressor {
            projections.extend([(&c.wkv, x), (&c.wgate, x)]);
        }
        if let Some(ix) = &self.indexer {
            projections.extend([(&ix.compressor.wkv, x), (&ix.compressor.wgate, x)]);
        }
        let mut outs = if layout.is_all() {
            Linear::forward_many(&projections, tokens)
        } else {
            let mut q = Linear::forward_many(&projections[..of_queries], q_tokens);
            q.extend(Linear::forward_many(&projections[of_queries..], tokens));
            q
        }
        .into_iter();
        let mut next = || outs.next().expect("one output per projection");
        let mut qr = next();
        let index_weights = self.indexer.as_ref().map(|_| next());
        let mut kv = next();
        let projected = self.compressor.as_ref().map(|_| Projected { kv: next(), score: next() });
        let index_proj = self.indexer.as_ref().map(|_| Projected { kv: next(), score: next() });
        self.q_norm.apply(&mut qr);
        let mut of_qr: Vec<(&Linear, &[f32])> = vec![(&self.wq_b, &qr)];
        if let Some(ix) = &self.indexer {
            of_qr.push((&ix.wq_b, &qr));
        }
        let mut outs = Linear::forward_many(&of_qr, q_tokens).into_iter();
        let mut q = outs.next().expect("wq_b output");
        let index_q = outs.next();

        // Queries: weightless per-head norm, RoPE.
        for_each_row(&mut q, h * hd, |t, row| {
            rms_normalize(row, hd, self.eps);
            row.chunks_exact_mut(hd).for_each(|head| q_angles[t].rotate(head));
        });

        // The window latent (key = value), FP8-simulated on its non-rotary channels.
        self.kv_norm.apply(&mut kv);
        for_each_row(&mut kv, hd, |t, row| {
            angles[t].rotate(row);
            if sim.kv_fp8 {
                fp8_sim(&mut row[..hd - self.rope_dim], KV_SIM_BLOCK);
            }
        });

        // Compressed entries and indexer keys: state machines per sequence.
        let index_inputs = match (&self.indexer, index_q, index_weights, index_proj) {
            (Some(ix), Some(iq), Some(w), Some(p)) => {
                Some((ix.queries(iq, &q_angles, sim.indexer_fp4), ix.head_weights(w), p))
            }
            _ => None,
        };
        states.par_iter_mut().zip(chunks).for_each(|(state, c)| {
            let rows = c.row0..c.row0 + c.len;
            let st = &mut **state;
            // The indexer's and the main compressor's state machines are independent.
            let mut index = || {
                if let (Some(ix), Some((_, _, p))) = (&self.indexer, &index_inputs) {
                    let cs = st.index_compressor.as_mut().expect("CSA state has an indexer compressor");
                    let keys = ix.compressor.absorb(cs, p, rows.clone(), c.t0, &self.rope, sim.indexer_fp4);
                    st.index_keys.extend(keys);
                }
            };
            let mut main = || {
                if let (Some(comp), Some(p)) = (&self.compressor, &projected) {
                    let cs = st.compressor.as_mut().expect("compressed layer has compressor state");
                    let entries = comp.absorb(cs, p, rows.clone(), c.t0, &self.rope, sim.kv_fp8);
                    st.compressed.extend(entries);
                }
            };
            // A decode step's few tokens take microseconds here, less than waking another thread.
            if c.len >= PARALLEL_ABSORB_TOKENS {
                rayon::join(index, main);
            } else {
                index();
                main();
            }
        });

        // Attention in blocks of consecutive queries, blocks in parallel (states are read-only).
        let mut o = vec![0.0f32; q_tokens * h * hd];
        {
            let shared: Vec<&AttentionState> = states.iter().map(|s| &**s).collect();
            let mut blocks: Vec<(usize, std::ops::Range<usize>, &mut [f32])> = Vec::new();
            let mut rest: &mut [f32] = &mut o;
            for (seq, oc) in outputs.iter().enumerate() {
                for s0 in (0..oc.len).step_by(QUERY_BLOCK) {
                    let s1 = (s0 + QUERY_BLOCK).min(oc.len);
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut((s1 - s0) * h * hd);
                    blocks.push((seq, oc.row0 + s0..oc.row0 + s1, head));
                    rest = tail;
                }
            }
            let index = index_inputs.as_ref().map(|(qi, wi, _)| (qi, wi));
            blocks.into_par_iter().for_each(|(seq, q_rows, out)| {
                let (c, oc) = (chunks[seq], outputs[seq]);
                // The block's tokens as positions within the sequence's chunk.
                let skipped = oc.t0 - c.t0;
                let range = skipped + q_rows.start - oc.row0..skipped + q_rows.end - oc.row0;
                let k = self.gather_block(shared[seq], &kv, c, range, q_rows.clone(), index);
                attend_block(&q[q_rows.start * h * hd..q_rows.end * h * hd], &k, &self.sink, self.scale, hd, out);
                for (row, o_row) in q_rows.zip(out.chunks_exact_mut(h * hd)) {
                    o_row.chunks_exact_mut(hd).for_each(|head| q_angles[row].unrotate(head));
                }
            });
        }

        // Only now does the chunk enter the window ring: earlier tokens of the chunk needed the
        // ring as it was before the chunk.
        for (state, c) in states.iter_mut().zip(chunks) {
            let keep = c.len.min(self.window);
            for t in c.t0 + c.len - keep..c.t0 + c.len {
                let slot = t % self.window;
                let src = &kv[(c.row0 + t - c.t0) * hd..(c.row0 + t - c.t0 + 1) * hd];
                state.window[slot * hd..(slot + 1) * hd].copy_from_slice(src);
            }
        }
        self.project_out(&o, q_tokens)
    }

    /// The keys a block of queries (chunk `c`, tokens `range`; query rows `q_rows` of the
    /// indexer's inputs) attends to: the shared keys (the window positions up to the block's last
    /// token, then for HCA the complete blocks), each query's view of them, and each query's own
    /// keys (for CSA: its top-k picks).
    fn gather_block(
        &self,
        state: &AttentionState,
        kv: &[f32],
        c: Chunk,
        range: std::ops::Range<usize>,
        q_rows: std::ops::Range<usize>,
        index: Option<(&Vec<f32>, &Vec<f32>)>,
    ) -> BlockKeys {
        let hd = self.head_dim;
        let (t_first, t_last) = (c.t0 + range.start, c.t0 + range.end - 1);
        let first = (t_first + 1).saturating_sub(self.window);
        let n_window = t_last + 1 - first;
        let mut shared = Vec::with_capacity(n_window * hd);
        for p in first..=t_last {
            let src = if p >= c.t0 {
                let r = c.row0 + p - c.t0;
                &kv[r * hd..(r + 1) * hd]
            } else {
                let slot = p % self.window;
                &state.window[slot * hd..(slot + 1) * hd]
            };
            shared.extend_from_slice(src);
        }
        let window_of = |t: usize| ((t + 1).saturating_sub(self.window) - first)..(t + 1 - first);
        let mut views: Vec<QueryKeys> =
            range.clone().map(|s| QueryKeys { window: window_of(c.t0 + s), prefix: 0 }).collect();
        let mut own = vec![Vec::new(); range.len()];
        match self.kind {
            AttentionKind::Window => {}
            AttentionKind::Hca { ratio } => {
                let n = (t_last + 1) / ratio;
                shared.extend_from_slice(&state.compressed[..n * hd]);
                for (v, s) in views.iter_mut().zip(range) {
                    v.prefix = (c.t0 + s + 1) / ratio;
                }
            }
            AttentionKind::Csa => {
                let ix = self.indexer.as_ref().expect("CSA layer has an indexer");
                let (qi, wi) = index.expect("CSA layer computed indexer inputs");
                let (hi, di) = (ix.heads(), ix.head_dim());
                let visible: Vec<usize> = range.clone().map(|s| (c.t0 + s + 1) / crate::config::CSA_RATIO).collect();
                let picks = ix.select_block(
                    &qi[q_rows.start * hi * di..q_rows.end * hi * di],
                    &wi[q_rows.start * hi..q_rows.end * hi],
                    &state.index_keys,
                    &visible,
                );
                for (o, p) in own.iter_mut().zip(picks) {
                    o.reserve(p.len() * hd);
                    for j in p {
                        o.extend_from_slice(&state.compressed[j * hd..(j + 1) * hd]);
                    }
                }
            }
        }
        BlockKeys { shared, n_window, views, own }
    }

    /// Grouped low-rank output: `u_g = Wo_a[g] · o_g`, then `Wo_b · concat(u)`.
    fn project_out(&self, o: &[f32], tokens: usize) -> Vec<f32> {
        if tokens == 0 {
            return Vec::new();
        }
        let (g_n, r) = (self.groups, self.o_rank);
        let gw = o.len() / tokens / g_n;
        // Each group's input is its heads' outputs, and its weight a row block of wo_a.
        // Gathered one group per task: a prefill moves megabytes here.
        let inputs: Vec<Vec<f32>> = map_rows(g_n, tokens * gw, |g| {
            let mut x = Vec::with_capacity(tokens * gw);
            for t in 0..tokens {
                x.extend_from_slice(&o[t * g_n * gw + g * gw..][..gw]);
            }
            x
        });
        let jobs: Vec<kernels::MatmulJob<'_>> =
            inputs.iter().zip(&self.wo_a).map(|(x, w)| kernels::MatmulJob { x, m: tokens, w }).collect();
        let ug = kernels::matmul_many(&jobs);
        let mut u = vec![0.0f32; tokens * g_n * r];
        for_each_row(&mut u, g_n * r, |t, row| {
            for (dst, part) in row.chunks_exact_mut(r).zip(&ug) {
                dst.copy_from_slice(&part[t * r..(t + 1) * r]);
            }
        });
        self.wo_b.forward(&u, tokens)
    }
}
