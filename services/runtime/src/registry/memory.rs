//! The in-memory registry: one process's cluster (local mode) or a unit test. Clones share state.

use std::sync::{Arc, Mutex};
use tokio::sync::watch;

use super::{BoxFuture, Registry, RegistryStatus, RegistryView, StatusCell, WorkerRecord};
use crate::error::ServiceError;

#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    view: Mutex<RegistryView>,
    tx: watch::Sender<Arc<RegistryView>>,
    status: StatusCell,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        let status = StatusCell::default();
        status.set_connected(true);
        status.synced();
        let (tx, _) = watch::channel(Arc::new(RegistryView::default()));
        MemoryRegistry { inner: Arc::new(Inner { view: Mutex::new(RegistryView::default()), tx, status }) }
    }
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, f: impl FnOnce(&mut RegistryView)) {
        let mut view = self.inner.view.lock().unwrap();
        f(&mut view);
        self.inner.tx.send_replace(Arc::new(view.clone()));
    }
}

impl Registry for MemoryRegistry {
    fn announce(&self, record: WorkerRecord) -> BoxFuture<'_, Result<(), ServiceError>> {
        self.update(|v| {
            v.workers.insert(record.id.clone(), record);
        });
        Box::pin(async { Ok(()) })
    }

    fn withdraw(&self, id: &str) -> BoxFuture<'_, Result<(), ServiceError>> {
        self.update(|v| {
            v.workers.remove(id);
        });
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<RegistryView>> {
        self.inner.tx.subscribe()
    }

    fn status(&self) -> RegistryStatus {
        self.inner.status.snapshot()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
