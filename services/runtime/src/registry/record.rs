//! What a worker publishes about itself (JSON in etcd under `<prefix>/workers/<id>`).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Gateway,
    Attention,
    Expert,
}

/// Where a worker sits in the machine hierarchy (placement prefers close replicas).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    #[serde(default)]
    pub superpod: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub device: String,
}

/// The routed experts an expert worker holds: every `(layer, expert)` of `layers × experts`
/// (`None` = all), or exactly `pairs` when given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldExperts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<Vec<(u32, u32)>>,
}

impl HeldExperts {
    pub fn holds(&self, layer: u32, expert: u32) -> bool {
        if let Some(pairs) = &self.pairs {
            return pairs.contains(&(layer, expert));
        }
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
            && self.experts.as_ref().is_none_or(|e| e.contains(&expert))
    }
}

/// Load figures a worker refreshes while it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Sequences (attention) or in-flight calls (expert) now.
    pub running: u32,
    pub waiting: u32,
    /// Most sequences the worker admits at once (attention).
    pub capacity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique per process and role (`expert-<host>-<port>` by default).
    pub id: String,
    pub role: Role,
    /// gRPC endpoint, `http://host:port`.
    pub endpoint: String,
    #[serde(default)]
    pub topology: Topology,
    /// Expert workers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<HeldExperts>,
    /// Bytes of weights the worker holds in memory.
    #[serde(default)]
    pub resident_bytes: u64,
    #[serde(default)]
    pub load: Load,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_experts_are_a_product_or_explicit_pairs() {
        let product = HeldExperts { layers: Some(vec![3, 4]), experts: Some(vec![0, 1]), pairs: None };
        assert!(product.holds(3, 1) && product.holds(4, 0));
        assert!(!product.holds(2, 0) && !product.holds(3, 2));
        let all_layers = HeldExperts { layers: None, experts: Some(vec![5]), pairs: None };
        assert!(all_layers.holds(60, 5) && !all_layers.holds(60, 4));
        let pairs = HeldExperts { pairs: Some(vec![(1, 2)]), ..product };
        assert!(pairs.holds(1, 2) && !pairs.holds(3, 1));
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = WorkerRecord {
            id: "expert-a".into(),
            role: Role::Expert,
            endpoint: "http://127.0.0.1:5000".into(),
            topology: Topology { superpod: "sp0".into(), node: "n3".into(), device: "2".into() },
            experts: Some(HeldExperts { layers: None, experts: Some(vec![0, 1]), pairs: None }),
            resident_bytes: 42,
            load: Load::default(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"role\":\"expert\""));
        assert_eq!(serde_json::from_str::<WorkerRecord>(&json).unwrap(), r);
    }
}
