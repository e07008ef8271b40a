//! The cluster through real processes and a real etcd: expert workers register and vanish,
//! placement follows, replicas absorb a killed shard, etcd outages do not fail requests, and the
//! engine batches many concurrent sequences, each equal to its in-process run.

mod common;

use common::{Reference, Worker, engine_client, generate, greedy_request, prompt, wait_ready};
use expertmesh_runtime::registry::{EtcdOptions, EtcdRegistry, EtcdTls, Registry, Role, wait_for};
use expertmesh_runtime::testkit::EtcdServer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

/// Lease TTL of the workers, seconds (short, so that kill -9 shows within a test).
const TTL: &str = "2";

// Fields drop in order: workers before the etcd they talk to.
struct Cluster {
    attention: Worker,
    experts: Vec<Worker>,
    etcd: EtcdServer,
}

fn etcd_args(etcd: &EtcdServer) -> Vec<String> {
    etcd_args_ttl(etcd, TTL)
}

fn etcd_args_ttl(etcd: &EtcdServer, ttl: &str) -> Vec<String> {
    vec!["--etcd".into(), etcd.endpoint(), "--lease-ttl".into(), ttl.into()]
}

/// Expert workers holding `ranges`, and an attention worker (f32 on the wire, so that greedy
/// tokens can be compared with the in-process engine exactly).
async fn cluster(ranges: &[&str]) -> Cluster {
    cluster_ttl(ranges, TTL).await
}

async fn cluster_ttl(ranges: &[&str], ttl: &str) -> Cluster {
    let etcd = EtcdServer::start();
    let args = etcd_args_ttl(&etcd, ttl);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let experts = ranges.iter().map(|r| Worker::expert(r, &args)).collect();
    let mut attention_args = args.clone();
    attention_args.extend_from_slice(&["--wire-dtype", "f32", "--expert-timeout-ms", "3000"]);
    let attention = Worker::spawn("attention", &attention_args);
    wait_ready(&attention.endpoint, 20).await;
    Cluster { attention, experts, etcd }
}

fn observer(etcd: &EtcdServer) -> EtcdRegistry {
    let mut opts = EtcdOptions::new(vec![etcd.endpoint()]);
    opts.ttl = Duration::from_secs(2);
    EtcdRegistry::start(opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_register_vanish_after_kill9_and_placement_follows() {
    let mut c = cluster(&["0-7", "8-15", "0-7"]).await;
    let reference = Reference::grouped(&[0..8, 8..16]);
    let watcher = observer(&c.etcd);
    let mut view = watcher.subscribe();
    let (ok, v) = wait_for(&mut view, Duration::from_secs(10), |v| v.of_role(Role::Expert).count() == 3).await;
    assert!(ok, "three expert workers registered: {v:?}");
    assert!(v.of_role(Role::Attention).count() == 1);

    let mut client = engine_client(&c.attention.endpoint).await;
    let p = prompt(3, 12);
    assert_eq!(generate(&mut client, greedy_request(p.clone(), 8)).await.unwrap(), reference.greedy(&p, 8));

    // kill -9 one replica of 0-7: gone from the registry within the lease TTL (+ slack).
    let killed = c.experts[2].id.clone();
    c.experts[2].kill9();
    let t = Instant::now();
    let (ok, _) = wait_for(&mut view, Duration::from_secs(6), |v| !v.workers.contains_key(&killed)).await;
    assert!(ok, "killed shard deregistered after {:?}", t.elapsed());
    // etcd expires leases on a ~0.5 s sweep; the rest is slack for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(2 + 3), "within the TTL (2 s) plus slack: {:?}", t.elapsed());
    assert_eq!(generate(&mut client, greedy_request(p.clone(), 8)).await.unwrap(), reference.greedy(&p, 8));

    // No live holder of experts 0-7: requests fail fast with UNAVAILABLE naming an expert.
    c.experts[0].kill9();
    let t = Instant::now();
    let err = generate(&mut client, greedy_request(p.clone(), 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("expert"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(5), "failed fast: {:?}", t.elapsed());
    // And the engine says it is not ready once the registry drops the shard.
    let (ok, _) = wait_for(&mut view, Duration::from_secs(6), |v| v.of_role(Role::Expert).count() == 1).await;
    assert!(ok);

    // A new shard for 0-7 restores service.
    let args = etcd_args(&c.etcd);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.experts.push(Worker::expert("0-7", &args));
    wait_ready(&c.attention.endpoint, 10).await;
    assert_eq!(generate(&mut client, greedy_request(p.clone(), 8)).await.unwrap(), reference.greedy(&p, 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_mid_stream_loses_no_request() {
    let mut c = cluster(&["0-7", "8-15", "0-7", "8-15"]).await;
    let reference = Arc::new(Reference::grouped(&[0..8, 8..16]));
    let client = engine_client(&c.attention.endpoint).await;
    let (first_token_tx, mut first_token) = tokio::sync::mpsc::channel::<()>(64);
    let mut tasks = Vec::new();
    for i in 0..12u32 {
        let mut client = client.clone();
        let tx = first_token_tx.clone();
        tasks.push(tokio::spawn(async move {
            let p = prompt(10 + i, 8 + i as usize);
            let mut stream = client.generate(greedy_request(p.clone(), 40)).await.unwrap().into_inner();
            let mut tokens = Vec::new();
            while let Some(e) = stream.message().await.unwrap_or_else(|s| panic!("request {i} failed: {s:?}")) {
                if let Some(expertmesh_proto::v1::generate_event::Event::Token(t)) = e.event {
                    tokens.push(t.token_id);
                    let _ = tx.try_send(());
                }
            }
            (p, tokens)
        }));
    }
    first_token.recv().await;
    // One replica of each range dies while every request is mid-stream.
    c.experts[0].kill9();
    c.experts[3].kill9();
    for t in tasks {
        let (p, tokens) = t.await.unwrap();
        assert_eq!(tokens, reference.greedy(&p, 40), "prompt {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_succeeding_while_etcd_is_down_and_registrations_return() {
    let mut c = cluster(&["0-7", "8-15"]).await;
    let reference = Reference::grouped(&[0..8, 8..16]);
    let mut client = engine_client(&c.attention.endpoint).await;
    c.etcd.stop();
    // Longer than the lease TTL: without etcd nobody can renew, but nobody can expire either,
    // and every process keeps serving on its last view.
    let until = Instant::now() + Duration::from_secs(5);
    let mut served = 0;
    while Instant::now() < until {
        let p = prompt(20 + served, 10);
        let got = generate(&mut client, greedy_request(p.clone(), 6)).await.unwrap();
        assert_eq!(got, reference.greedy(&p, 6), "request {served} during the outage");
        served += 1;
    }
    assert!(served >= 2);
    c.etcd.restart();
    let watcher = observer(&c.etcd);
    let mut view = watcher.subscribe();
    let (ok, v) = wait_for(&mut view, Duration::from_secs(20), |v| v.workers.len() == 3).await;
    assert!(ok, "all three workers registered again: {v:?}");
    let p = prompt(99, 10);
    assert_eq!(generate(&mut client, greedy_request(p.clone(), 6)).await.unwrap(), reference.greedy(&p, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_sequences_each_equal_their_solo_run() {
    let c = cluster(&["0-9", "10-15"]).await;
    let reference = Arc::new(Reference::grouped(&[0..10, 10..16]));
    let client = engine_client(&c.attention.endpoint).await;
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let mut client = client.clone();
        // Different prompt lengths and budgets: sequences join and leave at different steps.
        let (len, max_tokens) = (3 + (i as usize * 5) % 40, 4 + (i * 7) % 20);
        tasks.push(tokio::spawn(async move {
            let p = prompt(100 + i, len);
            let tokens = generate(&mut client, greedy_request(p.clone(), max_tokens)).await.unwrap();
            (p, max_tokens, tokens)
        }));
    }
    let mut total = 0;
    for t in tasks {
        let (p, max_tokens, tokens) = t.await.unwrap();
        total += tokens.len() as u64;
        assert_eq!(tokens, reference.greedy(&p, max_tokens as usize), "prompt of {} tokens", p.len());
    }
    let stats = client.clone().get_stats(expertmesh_proto::v1::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.generated_tokens, total);
    // Batching happened: far fewer steps than tokens.
    assert!(stats.steps * 2 < total, "{} steps for {total} tokens", stats.steps);
    assert_eq!((stats.running, stats.waiting, stats.kv_bytes_used), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_the_registry_at_once_and_drains_running_requests() {
    // A long TTL, so that "withdrawn at once" cannot be confused with the lease running out.
    let mut c = cluster_ttl(&["0-15", "0-15"], "10").await;
    let reference = Reference::new();
    let watcher = observer(&c.etcd);
    let mut view = watcher.subscribe();
    assert!(wait_for(&mut view, Duration::from_secs(10), |v| v.workers.len() == 3).await.0);

    // Requests open the engine's call streams to both expert workers.
    let mut client = engine_client(&c.attention.endpoint).await;
    for i in 0..4 {
        generate(&mut client, greedy_request(prompt(40 + i, 6), 4)).await.unwrap();
    }
    // An expert worker on SIGTERM withdraws at once (not after the 10 s TTL), ends its open call
    // streams, and exits cleanly.
    let gone = c.experts[1].id.clone();
    let t = Instant::now();
    assert!(c.experts[1].terminate(), "expert exits with success");
    let (ok, _) = wait_for(&mut view, Duration::from_secs(5), |v| !v.workers.contains_key(&gone)).await;
    assert!(ok && t.elapsed() < Duration::from_secs(5), "withdrawn after {:?}", t.elapsed());

    // The attention worker on SIGTERM finishes the request it is running, then exits.
    let p = prompt(7, 6);
    let running = tokio::spawn(async move { generate(&mut client, greedy_request(p, 60)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid = c.attention.pid();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let tokens = running.await.unwrap().expect("the running request completes during the drain");
    assert_eq!(tokens, reference.greedy(&prompt(7, 6), 60));
    assert!(c.attention.wait_success(), "attention worker exits with success");
}

/// etcd over TLS with client certificates: a worker given the CA and its certificate registers;
/// a client without a certificate is refused by etcd and never connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = expertmesh_runtime::testkit::TestCerts::generate(dir.path());
    let etcd = EtcdServer::start_tls(certs.clone());
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ca, cert, key) = (path(&certs.ca), path(&certs.client_cert), path(&certs.client_key));
    let _expert = Worker::expert(
        "0-15",
        &["--etcd", &endpoint, "--lease-ttl", TTL, "--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );

    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let mut opts = EtcdOptions::new(vec![endpoint.clone()]);
    opts.tls = Some(EtcdTls {
        ca: Some(read(&certs.ca)),
        identity: Some((read(&certs.client_cert), read(&certs.client_key))),
    });
    let trusted = EtcdRegistry::start(opts).unwrap();
    let (seen, view) =
        wait_for(&mut trusted.subscribe(), Duration::from_secs(10), |v| v.of_role(Role::Expert).count() == 1).await;
    assert!(seen, "the worker registered over TLS: {view:?}");

    let mut anonymous = EtcdOptions::new(vec![endpoint]);
    anonymous.tls = Some(EtcdTls { ca: Some(read(&certs.ca)), identity: None });
    let refused = EtcdRegistry::start(anonymous).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!refused.status().connected, "etcd requires a client certificate");
    assert!(refused.subscribe().borrow().workers.is_empty());
    refused.close().await;
    trusted.close().await;
}
