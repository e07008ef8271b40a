//! Picking an attention worker: from the registry's attention workers, the one with the lowest
//! load relative to its capacity (announced load plus the calls this gateway has in flight to
//! it), skipping workers that already failed this request.

use expertmesh_proto::v1::engine_service_client::EngineServiceClient;
use expertmesh_runtime::registry::{RegistryView, Role};
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

    /// The least loaded attention worker not in `exclude`, or `None` when there is none.
    pub fn pick(&self, exclude: &HashSet<String>) -> Option<Lease> {
        let view = self.view.borrow().clone();
        let mut inflight = self.inflight.lock().unwrap();
        let best = view
            .of_role(Role::Attention)
            .filter(|w| !exclude.contains(&w.id))
            .min_by(|a, b| {
                let score = |w: &expertmesh_runtime::registry::WorkerRecord| {
                    let mine = *inflight.get(&w.id).unwrap_or(&0) as f64;
                    (w.load.running as f64 + w.load.waiting as f64 + mine) / w.load.capacity.max(1) as f64
                };
                score(a).total_cmp(&score(b)).then_with(|| a.id.cmp(&b.id))
            })?
            .clone();
        let client = {
            let mut clients = self.clients.lock().unwrap();
            match clients.get(&best.endpoint) {
                Some(c) => c.clone(),
                None => {
                    let c = EngineServiceClient::new(lazy_channel(&best.endpoint).ok()?);
                    clients.insert(best.endpoint.clone(), c.clone());
                    c
                }
            }
        };
        *inflight.entry(best.id.clone()).or_default() += 1;
        Some(Lease { id: best.id, client, inflight: self.inflight.clone() })
    }
}
