//! The logical-expert → physical-replica map, derived from the registry's expert workers.
//! Replicas are ranked for each call: live before recently failed, closer in the topology
//! (same node, then same SuperPod) before farther, and by a per-call rotation among equals so
//! that load spreads while the experts of one token tend to land on the same shard.

use expertmesh_runtime::registry::{RegistryView, Role, Topology, WorkerRecord};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// Operator overrides on top of the registry (`--placement FILE`, JSON):
/// `{"pin": {"7": ["expert-a", "expert-b"]}, "exclude": ["expert-c"]}` — expert 7 (every layer)
/// is served only by workers `expert-a`/`expert-b` (e.g. the replicas placed for a hot expert);
/// `expert-c` gets no calls at all (drained for maintenance while it stays up).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementOverride {
    #[serde(default)]
    pub pin: BTreeMap<u32, BTreeSet<String>>,
    #[serde(default)]
    pub exclude: BTreeSet<String>,
}

impl PlacementOverride {
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("placement override: {e}"))
    }
}

/// One expert worker as the engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    pub id: String,
    pub endpoint: String,
    pub topology: Topology,
}

#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub shards: Vec<Shard>,
    n_experts: usize,
    /// `replicas[layer * n_experts + expert]`: indices into `shards`.
    replicas: Vec<Vec<usize>>,
}

impl Placement {
    /// Every expert worker of `view` whose record says it holds `(layer, expert)`, for the
    /// model's `n_blocks × n_experts` experts, narrowed by `overrides`. Shards are ordered by id
    /// (stable across views).
    pub fn from_view(view: &RegistryView, n_blocks: usize, n_experts: usize, overrides: &PlacementOverride) -> Self {
        let records: Vec<&WorkerRecord> =
            view.of_role(Role::Expert).filter(|r| !overrides.exclude.contains(&r.id)).collect();
        let shards: Vec<Shard> = records
            .iter()
            .map(|r| Shard { id: r.id.clone(), endpoint: r.endpoint.clone(), topology: r.topology.clone() })
            .collect();
        let mut replicas = vec![Vec::new(); n_blocks * n_experts];
        for (s, r) in records.iter().enumerate() {
            let Some(held) = &r.experts else { continue };
            for layer in 0..n_blocks {
                for e in 0..n_experts {
                    let pinned_elsewhere = overrides.pin.get(&(e as u32)).is_some_and(|ids| !ids.contains(&r.id));
                    if held.holds(layer as u32, e as u32) && !pinned_elsewhere {
                        replicas[layer * n_experts + e].push(s);
                    }
                }
            }
        }
        Placement { shards, n_experts, replicas }
    }

    /// Shards holding `(layer, expert)`; empty when none (or out of range).
    pub fn replicas(&self, layer: usize, expert: usize) -> &[usize] {
        self.replicas.get(layer * self.n_experts + expert).map_or(&[], |v| v.as_slice())
    }

    /// True when every expert of every layer has at least one shard.
    pub fn covers_all(&self) -> bool {
        !self.replicas.is_empty() && self.replicas.iter().all(|r| !r.is_empty())
    }

    /// Experts of `layer` no live shard holds.
    pub fn uncovered(&self, layer: usize) -> Vec<usize> {
        (0..self.n_experts).filter(|&e| self.replicas(layer, e).is_empty()).collect()
    }
}

/// 0 = same node, 1 = same SuperPod, 2 = elsewhere (unlabelled workers count as elsewhere).
pub fn distance(a: &Topology, b: &Topology) -> u8 {
    let same = |x: &str, y: &str| !x.is_empty() && x == y;
    if same(&a.superpod, &b.superpod) && same(&a.node, &b.node) {
        0
    } else if same(&a.superpod, &b.superpod) {
        1
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_runtime::registry::HeldExperts;

    fn expert(id: &str, experts: &[u32]) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            role: Role::Expert,
            endpoint: format!("http://{id}"),
            topology: Topology::default(),
            experts: Some(HeldExperts { layers: None, experts: Some(experts.to_vec()), pairs: None }),
            resident_bytes: 0,
            load: Default::default(),
        }
    }

    #[test]
    fn maps_every_expert_to_the_shards_that_hold_it() {
        let mut view = RegistryView::default();
        for r in [expert("a", &[0, 1]), expert("b", &[1, 2]), expert("c", &[])] {
            view.workers.insert(r.id.clone(), r);
        }
        let mut gateway = expert("g", &[3]);
        gateway.role = Role::Gateway;
        view.workers.insert("g".into(), gateway);
        let p = Placement::from_view(&view, 2, 4, &PlacementOverride::default());
        assert_eq!(p.shards.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(p.replicas(1, 0), [0]);
        assert_eq!(p.replicas(0, 1), [0, 1]);
        assert_eq!(p.replicas(1, 2), [1]);
        assert!(p.replicas(0, 3).is_empty() && p.replicas(9, 0).is_empty());
        assert_eq!(p.uncovered(0), [3]);
    }

    #[test]
    fn overrides_pin_experts_and_exclude_workers() {
        let mut view = RegistryView::default();
        for r in [expert("a", &[0, 1]), expert("b", &[0, 1, 2]), expert("c", &[2])] {
            view.workers.insert(r.id.clone(), r);
        }
        let o = PlacementOverride::from_json(r#"{"pin": {"1": ["b"]}, "exclude": ["c"]}"#).unwrap();
        let p = Placement::from_view(&view, 1, 3, &o);
        let ids = |e| p.replicas(0, e).iter().map(|&s| p.shards[s].id.as_str()).collect::<Vec<_>>();
        assert_eq!((ids(0), ids(1), ids(2)), (vec!["a", "b"], vec!["b"], vec!["b"]));
        assert!(PlacementOverride::from_json(r#"{"pinned": {}}"#).unwrap_err().contains("pinned"));
    }

    #[test]
    fn topology_distance() {
        let t = |sp: &str, n: &str| Topology { superpod: sp.into(), node: n.into(), device: String::new() };
        assert_eq!(distance(&t("p", "n1"), &t("p", "n1")), 0);
        assert_eq!(distance(&t("p", "n1"), &t("p", "n2")), 1);
        assert_eq!(distance(&t("p", "n1"), &t("q", "n1")), 2);
        assert_eq!(distance(&t("", ""), &t("", "")), 2);
    }
}
