//! The etcd registry against a real etcd server on loopback.

use expertmesh_runtime::registry::{
    EtcdOptions, EtcdRegistry, HeldExperts, Registry, RegistryView, Role, WorkerRecord, wait_for,
};
use expertmesh_runtime::testkit::EtcdServer;
use std::time::{Duration, Instant};

fn record(id: &str) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        role: Role::Expert,
        endpoint: format!("http://{id}:1"),
        topology: Default::default(),
        experts: Some(HeldExperts { layers: None, experts: Some(vec![0, 1]), pairs: None }),
        resident_bytes: 7,
        load: Default::default(),
    }
}

fn registry(etcd: &EtcdServer, ttl_secs: u64) -> EtcdRegistry {
    let mut opts = EtcdOptions::new(vec![etcd.endpoint()]);
    opts.ttl = Duration::from_secs(ttl_secs);
    opts.request_timeout = Duration::from_millis(500);
    EtcdRegistry::start(opts).unwrap()
}

fn has(id: &'static str) -> impl Fn(&RegistryView) -> bool {
    move |v| v.workers.contains_key(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_seen_by_others_and_removed_on_withdraw_and_close() {
    let etcd = EtcdServer::start();
    let a = registry(&etcd, 5);
    let b = registry(&etcd, 5);
    a.announce(record("a1")).await.unwrap();
    a.announce(record("a2")).await.unwrap();
    let mut view = b.subscribe();
    let (ok, v) = wait_for(&mut view, Duration::from_secs(5), |v| v.workers.len() == 2).await;
    assert!(ok, "b sees a's records: {v:?}");
    assert_eq!(v.workers["a1"], record("a1"));

    // A load update replaces the record.
    let mut updated = record("a1");
    updated.load.running = 3;
    a.announce(updated).await.unwrap();
    let (ok, _) =
        wait_for(&mut view, Duration::from_secs(5), |v| v.workers.get("a1").is_some_and(|r| r.load.running == 3)).await;
    assert!(ok);

    a.withdraw("a2").await.unwrap();
    let (ok, _) = wait_for(&mut view, Duration::from_secs(5), |v| !v.workers.contains_key("a2")).await;
    assert!(ok, "withdrawn record disappears");

    // Closing revokes the lease: everything a published goes at once, not after the TTL.
    let t = Instant::now();
    a.close().await;
    let (ok, _) = wait_for(&mut view, Duration::from_secs(5), |v| v.workers.is_empty()).await;
    assert!(ok && t.elapsed() < Duration::from_secs(4), "closed registry's records vanish promptly");
    assert!(b.status().connected && b.status().since_last_sync.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_continues_on_the_last_view_while_etcd_is_away_and_records_come_back() {
    let mut etcd = EtcdServer::start();
    let a = registry(&etcd, 2);
    let b = registry(&etcd, 2);
    a.announce(record("a")).await.unwrap();
    let mut view = b.subscribe();
    assert!(wait_for(&mut view, Duration::from_secs(5), has("a")).await.0);

    etcd.stop();
    // Well past the TTL: the views keep the last known state and report the outage.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(view.borrow().workers.contains_key("a"), "last known view kept during the outage");
    assert!(!a.status().connected && !b.status().connected);
    // Announcing while etcd is away is accepted and published on reconnect.
    a.announce(record("a-late")).await.unwrap();

    etcd.restart();
    let (ok, v) = wait_for(&mut view, Duration::from_secs(15), |v| {
        v.workers.contains_key("a") && v.workers.contains_key("a-late")
    })
    .await;
    assert!(ok, "records come back after etcd returns: {v:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.status().connected && b.status().connected) {
        assert!(Instant::now() < deadline, "registries reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.status().lease_failures >= 1);
}
