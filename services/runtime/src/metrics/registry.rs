//! The registry as seen from each process: connection, lease upkeep, sync age, membership.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use super::process::on_scrape;
use super::{counter, counter_vec, gauge, int_gauge, int_gauge_vec};
use crate::registry::{Registry, RegistryView, Role};

struct RegistryMetrics {
    connected: IntGauge,
    renewals: IntCounter,
    failures: IntCounter,
    sync_age: Gauge,
    workers: IntGaugeVec,
    changes: IntCounterVec,
}

fn metrics() -> &'static RegistryMetrics {
    static M: OnceLock<RegistryMetrics> = OnceLock::new();
    M.get_or_init(|| RegistryMetrics {
        connected: int_gauge("registry_connected", "1 while the registry (etcd) session is up."),
        renewals: counter("registry_lease_renewals_total", "Lease keep-alives acknowledged."),
        failures: counter("registry_lease_failures_total", "Registry sessions lost (keep-alive or watch failed)."),
        sync_age: gauge(
            "registry_last_sync_age_seconds",
            "Seconds since the registry view was last confirmed (-1: never).",
        ),
        workers: int_gauge_vec("registry_workers", "Workers registered, by role.", &["role"]),
        changes: counter_vec(
            "registry_worker_changes_total",
            "Workers joining or leaving the registry, by role and worker.",
            &["role", "worker", "change"],
        ),
    })
}

fn role_label(r: Role) -> &'static str {
    match r {
        Role::Gateway => "gateway",
        Role::Attention => "attention",
        Role::Expert => "expert",
    }
}

/// Exports `registry`'s health (read at each scrape) and follows its membership; the watch ends
/// with the registry. A process serves through one registry: calls after the first are ignored.
/// Call within a tokio runtime.
pub fn watch_registry(registry: Arc<dyn Registry>) {
    static WATCHING: OnceLock<()> = OnceLock::new();
    if WATCHING.set(()).is_err() {
        return;
    }
    let m = metrics();
    let status_of = registry.clone();
    let seen = std::sync::Mutex::new((0u64, 0u64));
    on_scrape(move || {
        let s = status_of.status();
        m.connected.set(s.connected as i64);
        m.sync_age.set(s.since_last_sync.map_or(-1.0, |d| d.as_secs_f64()));
        let mut last = seen.lock().unwrap();
        m.renewals.inc_by(s.lease_renewals.saturating_sub(last.0));
        m.failures.inc_by(s.lease_failures.saturating_sub(last.1));
        *last = (s.lease_renewals.max(last.0), s.lease_failures.max(last.1));
    });
    for r in [Role::Gateway, Role::Attention, Role::Expert] {
        m.workers.with_label_values(&[role_label(r)]);
    }
    let mut rx = registry.subscribe();
    tokio::spawn(async move {
        let mut before: BTreeMap<String, Role> = BTreeMap::new();
        loop {
            let view: Arc<RegistryView> = rx.borrow_and_update().clone();
            let now: BTreeMap<String, Role> = view.workers.iter().map(|(id, w)| (id.clone(), w.role)).collect();
            for (id, role) in &now {
                if !before.contains_key(id) {
                    m.changes.with_label_values(&[role_label(*role), id, "joined"]).inc();
                    // Created at zero now, so `increase()` sees the first departure.
                    m.changes.with_label_values(&[role_label(*role), id, "left"]);
                }
            }
            for (id, role) in &before {
                if !now.contains_key(id) {
                    m.changes.with_label_values(&[role_label(*role), id, "left"]).inc();
                }
            }
            for r in [Role::Gateway, Role::Attention, Role::Expert] {
                let n = now.values().filter(|&&x| x == r).count();
                m.workers.with_label_values(&[role_label(r)]).set(n as i64);
            }
            before = now;
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}
