//! Per-sequence state size (spec §8): what a sequence really holds after N tokens equals the
//! formula, and the formula's per-token slope reproduces the spec's fp32 table.

mod common;

use common::*;
use expertmesh_model::Preset;
use expertmesh_model::checkpoint::InitDtype;
use expertmesh_model::engine::{Step, state_bytes, state_bytes_per_token};
use expertmesh_model::layers::QuantSim;

#[test]
fn held_bytes_match_the_formula() {
    let cfg = Preset::Tiny.config();
    let m = load(&cfg, InitDtype::Bf16, QuantSim::default());
    let ids = tokens(300, cfg.vocab_size, 1);
    let mut s = m.model.new_sequence();
    assert_eq!(s.bytes(), state_bytes(&cfg, 0, true));
    m.model.forward(&mut [Step::new(&mut s, &ids[..260])], &m.experts).unwrap();
    assert_eq!(s.bytes(), state_bytes(&cfg, 260, true));
    for t in 260..300 {
        m.model.forward(&mut [Step::new(&mut s, &ids[t..t + 1])], &m.experts).unwrap();
    }
    assert_eq!(s.bytes(), state_bytes(&cfg, 300, true));
}

/// Spec §8.2, fp32 column: Pro 19696 B, Flash 13760 B, tiny 780 B per token; §8.1 compressor
/// states: CSA main 64 KiB + indexer 16 KiB, HCA 512 KiB per layer; window 128 × 512 × 4 B.
#[test]
fn per_token_bytes_reproduce_spec_table() {
    assert_eq!(state_bytes_per_token(&Preset::V4Pro.config()), 19696.0);
    assert_eq!(state_bytes_per_token(&Preset::V4Flash.config()), 13760.0);
    assert_eq!(state_bytes_per_token(&Preset::Tiny.config()), 780.0);
    let flash = Preset::V4Flash.config();
    let fixed = state_bytes(&flash, 0, false);
    let (window, csa, hca) = (128 * 512 * 4, (64 + 16) * 1024, 512 * 1024);
    assert_eq!(fixed, 43 * window + 21 * csa + 20 * hca);
}
