//! Who is in the cluster: worker endpoints, the experts each expert worker holds, topology labels
//! and load. One trait, two backends: [`EtcdRegistry`] (production: one lease per process,
//! keep-alive, prefix watch) and [`MemoryRegistry`] (local mode, tests).
//!
//! Every process publishes its own [`WorkerRecord`]s and reads everyone's through a
//! [`RegistryView`] kept current by the backend. When etcd is away the last view stays in force,
//! so serving continues on what was last known.

mod etcd;
mod memory;
mod record;

pub use etcd::{EtcdOptions, EtcdRegistry, EtcdTls};
pub use memory::MemoryRegistry;
pub use record::{HeldExperts, Load, Role, Topology, WorkerRecord};

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::error::ServiceError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Every record currently registered, by worker id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryView {
    pub workers: BTreeMap<String, WorkerRecord>,
}

impl RegistryView {
    pub fn of_role(&self, role: Role) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values().filter(move |w| w.role == role)
    }
}

pub trait Registry: Send + Sync + 'static {
    /// Publishes (or replaces) one of this process's records; it stays until withdrawn or until
    /// the process dies (etcd: its lease expires).
    fn announce(&self, record: WorkerRecord) -> BoxFuture<'_, Result<(), ServiceError>>;
    /// Removes one of this process's records.
    fn withdraw(&self, id: &str) -> BoxFuture<'_, Result<(), ServiceError>>;
    /// The live view; updated on every change the backend sees.
    fn subscribe(&self) -> watch::Receiver<Arc<RegistryView>>;
    /// Connection state and lease bookkeeping (for health and metrics).
    fn status(&self) -> RegistryStatus;
    /// Withdraws everything this process published (etcd: revokes the lease). Idempotent.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// A snapshot of a backend's health.
#[derive(Clone, Debug, PartialEq)]
pub struct RegistryStatus {
    pub connected: bool,
    pub lease_renewals: u64,
    pub lease_failures: u64,
    /// Time since the view was last confirmed against the backend.
    pub since_last_sync: Option<Duration>,
}

/// Counters shared between a backend's task and its handle.
#[derive(Default)]
pub(crate) struct StatusCell {
    connected: AtomicBool,
    renewals: AtomicU64,
    failures: AtomicU64,
    last_sync: std::sync::Mutex<Option<Instant>>,
}

impl StatusCell {
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }
    pub(crate) fn renewed(&self) {
        self.renewals.fetch_add(1, Ordering::Relaxed);
        self.synced();
    }
    pub(crate) fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn synced(&self) {
        *self.last_sync.lock().unwrap() = Some(Instant::now());
    }
    pub(crate) fn snapshot(&self) -> RegistryStatus {
        RegistryStatus {
            connected: self.connected.load(Ordering::Relaxed),
            lease_renewals: self.renewals.load(Ordering::Relaxed),
            lease_failures: self.failures.load(Ordering::Relaxed),
            since_last_sync: self.last_sync.lock().unwrap().map(|t| t.elapsed()),
        }
    }
}

/// Waits until `view` satisfies `pred` or `timeout` passes; returns the last view either way.
pub async fn wait_for(
    rx: &mut watch::Receiver<Arc<RegistryView>>,
    timeout: Duration,
    pred: impl Fn(&RegistryView) -> bool,
) -> (bool, Arc<RegistryView>) {
    let ok = tokio::time::timeout(timeout, rx.wait_for(|v| pred(v))).await.is_ok_and(|r| r.is_ok());
    (ok, rx.borrow().clone())
}
