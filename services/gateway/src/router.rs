//! Picking an attention worker: from the registry's attention workers, the one with the lowest
//! load relative to its capacity (announced load plus the calls this gateway has in flight to
//! it), skipping workers that already failed this request.

use expertmesh_proto::v1::engine_service_client::EngineServiceClient;
use expertmesh_runtime::registry::{RegistryView, Role, WorkerRecord};
use expertmesh_runtime::serve::lazy_channel;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tonic::transport::Channel;

pub struct EngineRouter {
    view: watch::Receiver<Arc<RegistryView>>,
    clients: Mutex<HashMap<String, EngineServiceClient<Channel>>>,
    inflight: Arc<Mutex<HashMap<String, u32>>>,
}

/// A chosen worker; dropping it ends this gateway's in-flight count on it.
pub struct Lease {
    pub id: String,
    pub client: EngineServiceClient<Channel>,
    inflight: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(n) = self.inflight.lock().unwrap().get_mut(&self.id) {
            *n = n.saturating_sub(1);
        }
    }
}

impl EngineRouter {
    pub fn new(view: watch::Receiver<Arc<RegistryView>>) -> Self {
        EngineRouter { view, clients: Mutex::new(HashMap::new()), inflight: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Attention workers registered now.
    pub fn workers(&self) -> usize {
        self.view.borrow().of_role(Role::Attention).count()
    }

    /// The least loaded attention worker not in `exclude`, or `None` when there is none. A worker
    /// whose announced endpoint is not a usable URL is skipped (and logged), not chosen and not
    /// fatal: it would otherwise stay the least loaded forever, since it never gets work.
    pub fn pick(&self, exclude: &HashSet<String>) -> Option<Lease> {
        let view = self.view.borrow().clone();
        let mut inflight = self.inflight.lock().unwrap();
        let score = |w: &WorkerRecord| {
            let mine = *inflight.get(&w.id).unwrap_or(&0) as f64;
            (w.load.running as f64 + w.load.waiting as f64 + mine) / w.load.capacity.max(1) as f64
        };
        let mut candidates: Vec<&WorkerRecord> =
            view.of_role(Role::Attention).filter(|w| !exclude.contains(&w.id)).collect();
        candidates.sort_by(|a, b| score(a).total_cmp(&score(b)).then_with(|| a.id.cmp(&b.id)));
        let (best, client) = candidates.into_iter().find_map(|w| Some((w, self.client(w)?)))?;
        *inflight.entry(best.id.clone()).or_default() += 1;
        Some(Lease { id: best.id.clone(), client, inflight: self.inflight.clone() })
    }

    /// The (cached) client of `worker`'s endpoint; `None` when the endpoint is not a URL.
    fn client(&self, worker: &WorkerRecord) -> Option<EngineServiceClient<Channel>> {
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&worker.endpoint) {
            return Some(c.clone());
        }
        match lazy_channel(&worker.endpoint) {
            Ok(channel) => {
                let c = EngineServiceClient::new(channel);
                clients.insert(worker.endpoint.clone(), c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(worker = %worker.id, error = %e, "attention worker has an unusable endpoint; skipped");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_runtime::registry::Load;

    fn attention(id: &str, endpoint: &str, running: u32) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            role: Role::Attention,
            endpoint: endpoint.into(),
            topology: Default::default(),
            experts: None,
            resident_bytes: 0,
            load: Load { running, waiting: 0, capacity: 8 },
        }
    }

    /// The least loaded worker wins unless its endpoint is unusable; then the next one does.
    #[tokio::test]
    async fn picks_the_least_loaded_usable_worker() {
        let view = |records: Vec<WorkerRecord>| RegistryView {
            workers: records.into_iter().map(|r| (r.id.clone(), r)).collect(),
        };
        let busy = attention("a-busy", "http://127.0.0.1:7001", 5);
        let idle = attention("b-idle", "http://127.0.0.1:7002", 0);
        // Ranks first (least loaded, first by id), but its endpoint is not a URL.
        let broken = attention("a0-broken", "http://not a url", 0);
        let (_tx, rx) = watch::channel(Arc::new(view(vec![busy.clone(), idle.clone(), broken.clone()])));
        let router = EngineRouter::new(rx);
        assert_eq!(router.pick(&HashSet::new()).unwrap().id, "b-idle");
        let lease = router.pick(&HashSet::from(["b-idle".to_string()])).unwrap();
        assert_eq!(lease.id, "a-busy", "the broken worker is skipped, not fatal");
        assert!(router.pick(&HashSet::from(["a-busy".to_string(), "b-idle".to_string()])).is_none());
    }
}
