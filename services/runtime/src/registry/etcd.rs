//! The etcd backend. One lease per process; every record this process announces is attached to
//! it, so `kill -9` removes them within the TTL. The session (connect, grant, put, list, watch,
//! keep-alive) runs on its own OS thread with its own runtime, so no amount of model work or
//! request load can delay a keep-alive. When etcd goes away the last view stays in force and the
//! session reconnects with backoff, re-granting the lease and re-putting the records.

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{BoxFuture, Registry, RegistryStatus, RegistryView, StatusCell, WorkerRecord};
use crate::error::ServiceError;

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix shared by one cluster (several clusters can share an etcd).
    pub prefix: String,
    /// Lease time-to-live; keep-alives go out every third of it.
    pub ttl: Duration,
    /// Per-request deadline (connect, put, get).
    pub request_timeout: Duration,
    pub user: Option<(String, String)>,
    /// TLS to etcd (`https://` endpoints): CA and optional client identity, PEM.
    pub tls: Option<EtcdTls>,
}

/// PEM material for TLS to etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate (default: the system's roots).
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key, for an etcd with `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Adds TLS to the connect options (builds with the `tls` feature).
#[cfg(feature = "tls")]
fn with_tls(options: ConnectOptions, tls: &EtcdTls) -> ConnectOptions {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let mut config = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    options.with_tls(config)
}

#[cfg(not(feature = "tls"))]
fn with_tls(options: ConnectOptions, _: &EtcdTls) -> ConnectOptions {
    options
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: "/expertmesh".into(),
            ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            user: None,
            tls: None,
        }
    }

    fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix.trim_end_matches('/'))
    }
}

enum Command {
    Announce(WorkerRecord, oneshot::Sender<Result<(), ServiceError>>),
    Withdraw(String, oneshot::Sender<Result<(), ServiceError>>),
    Close(oneshot::Sender<()>),
}

pub struct EtcdRegistry {
    cmds: mpsc::UnboundedSender<Command>,
    view: watch::Receiver<Arc<RegistryView>>,
    status: Arc<StatusCell>,
}

impl EtcdRegistry {
    /// Starts the session thread and returns at once; the first sync happens in the background
    /// (use [`super::wait_for`] or [`Registry::status`] to wait for it).
    pub fn start(mut opts: EtcdOptions) -> Result<Self, ServiceError> {
        opts.ttl = opts.ttl.max(Duration::from_secs(1));
        if opts.endpoints.is_empty() {
            return Err(ServiceError::invalid("etcd", "no endpoints given"));
        }
        let https = opts.endpoints.iter().any(|e| e.starts_with("https://"));
        if https && opts.tls.is_none() {
            // (The system's roots then vouch for etcd's certificate.)
            opts.tls = Some(EtcdTls::default());
        }
        if opts.tls.is_some() && !cfg!(feature = "tls") {
            return Err(ServiceError::invalid("etcd", "TLS needs a build with the `tls` feature"));
        }
        let (cmds, rx) = mpsc::unbounded_channel();
        let (view_tx, view) = watch::channel(Arc::new(RegistryView::default()));
        let status = Arc::new(StatusCell::default());
        let session_status = status.clone();
        std::thread::Builder::new()
            .name("etcd-registry".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("registry runtime");
                let session = Session {
                    opts,
                    rx,
                    view_tx,
                    status: session_status,
                    own: BTreeMap::new(),
                    lease: None,
                    stale_leases: Vec::new(),
                };
                rt.block_on(session.run());
            })
            .map_err(|e| ServiceError::Internal(format!("starting the etcd registry thread: {e}")))?;
        Ok(EtcdRegistry { cmds, view, status })
    }

    fn call<T: Send + 'static>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command, closed: T) -> BoxFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.cmds.send(make(tx)).is_ok();
        Box::pin(async move { if sent { rx.await.unwrap_or(closed) } else { closed } })
    }
}

impl Registry for EtcdRegistry {
    fn announce(&self, record: WorkerRecord) -> BoxFuture<'_, Result<(), ServiceError>> {
        self.call(|tx| Command::Announce(record, tx), Err(ServiceError::Unavailable("registry closed".into())))
    }

    fn withdraw(&self, id: &str) -> BoxFuture<'_, Result<(), ServiceError>> {
        let id = id.to_string();
        self.call(|tx| Command::Withdraw(id, tx), Err(ServiceError::Unavailable("registry closed".into())))
    }

    fn subscribe(&self) -> watch::Receiver<Arc<RegistryView>> {
        self.view.clone()
    }

    fn status(&self) -> RegistryStatus {
        self.status.snapshot()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.call(Command::Close, ())
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        // The session revokes the lease when its command channel closes.
        let (tx, _) = oneshot::channel();
        let _ = self.cmds.send(Command::Close(tx));
    }
}

/// Why a session ended.
enum End {
    Closed,
    Lost(String),
}

struct Session {
    opts: EtcdOptions,
    rx: mpsc::UnboundedReceiver<Command>,
    view_tx: watch::Sender<Arc<RegistryView>>,
    status: Arc<StatusCell>,
    /// This process's records, re-put after every reconnect.
    own: BTreeMap<String, WorkerRecord>,
    /// The current session's lease.
    lease: Option<i64>,
    /// Leases of lost sessions. etcd may still hold them (the client lost etcd, not etcd the
    /// lease), with records withdrawn meanwhile: revoked as soon as etcd is reachable again.
    stale_leases: Vec<i64>,
}

fn lost(what: &str) -> impl FnOnce(etcd_client::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Session {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.connected().await {
                End::Closed => return,
                End::Lost(why) => {
                    self.stale_leases.extend(self.lease.take());
                    // Warn once per outage; the retries while it lasts are debug noise.
                    if self.status.snapshot().connected {
                        warn!(reason = %why, "etcd session lost; serving on the last known view");
                        backoff = Duration::from_millis(100);
                    } else {
                        tracing::debug!(reason = %why, "etcd still unreachable");
                    }
                    self.status.set_connected(false);
                    self.status.failed();
                }
            }
            // Offline: keep taking commands (records are put on reconnect) until the backoff ends.
            let deadline = tokio::time::sleep(backoff);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    cmd = self.rx.recv() => match cmd {
                        None | Some(Command::Close(_)) => {
                            // One bounded attempt to take our records out now rather than at TTL.
                            let _ = tokio::time::timeout(self.opts.request_timeout * 2, self.revoke_stale()).await;
                            return;
                        }
                        Some(Command::Announce(r, reply)) => {
                            self.own.insert(r.id.clone(), r);
                            let _ = reply.send(Ok(()));
                        }
                        Some(Command::Withdraw(id, reply)) => {
                            self.own.remove(&id);
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Revokes the leases of lost sessions (best effort).
    async fn revoke_stale(&mut self) {
        if self.stale_leases.is_empty() {
            return;
        }
        if let Ok(mut client) = self.connect().await {
            for lease in std::mem::take(&mut self.stale_leases) {
                let _ = client.lease_revoke(lease).await;
            }
        }
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.opts.workers_prefix())
    }

    async fn connect(&self) -> Result<Client, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.opts.request_timeout)
            .with_timeout(self.opts.request_timeout)
            .with_keep_alive(Duration::from_secs(1), self.opts.request_timeout);
        if let Some((user, password)) = &self.opts.user {
            options = options.with_user(user, password);
        }
        if let Some(tls) = &self.opts.tls {
            options = with_tls(options, tls);
        }
        match tokio::time::timeout(self.opts.request_timeout, Client::connect(&self.opts.endpoints, Some(options)))
            .await
        {
            Ok(r) => r.map_err(lost("connect")),
            Err(_) => Err("connect: timed out".into()),
        }
    }

    async fn put(&self, client: &mut Client, lease: i64, record: &WorkerRecord) -> Result<(), String> {
        let value = serde_json::to_vec(record).map_err(|e| format!("encoding record: {e}"))?;
        client
            .put(self.key(&record.id), value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(lost("put"))?;
        Ok(())
    }

    /// One connected session: returns when etcd is lost or the registry is closed.
    async fn connected(&mut self) -> End {
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(e) => return End::Lost(e),
        };
        let ttl_secs = self.opts.ttl.as_secs().max(1) as i64;
        let lease = match client.lease_grant(ttl_secs, None).await {
            Ok(r) => r.id(),
            Err(e) => return End::Lost(format!("lease grant: {e}")),
        };
        self.lease = Some(lease);
        for record in self.own.values() {
            if let Err(e) = self.put(&mut client, lease, record).await {
                return End::Lost(e);
            }
        }
        // Our records now hang on the new lease; the old ones may go (with anything withdrawn
        // while we were away).
        for old in std::mem::take(&mut self.stale_leases) {
            let _ = client.lease_revoke(old).await;
        }
        let prefix = self.opts.workers_prefix();
        let listed = match client.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await {
            Ok(r) => r,
            Err(e) => return End::Lost(format!("list: {e}")),
        };
        let mut view = RegistryView::default();
        for kv in listed.kvs() {
            if let Some(r) = parse(kv.value()) {
                view.workers.insert(r.id.clone(), r);
            }
        }
        let revision = listed.header().map_or(0, |h| h.revision());
        self.view_tx.send_replace(Arc::new(view.clone()));
        let (_watcher, mut events) = match client
            .watch(prefix.clone(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
            .await
        {
            Ok(w) => w,
            Err(e) => return End::Lost(format!("watch: {e}")),
        };
        let (mut keeper, mut acks) = match client.lease_keep_alive(lease).await {
            Ok(k) => k,
            Err(e) => return End::Lost(format!("keep-alive: {e}")),
        };
        self.status.set_connected(true);
        self.status.synced();
        info!(lease, workers = view.workers.len(), "etcd registry connected");

        let mut tick = tokio::time::interval(self.opts.ttl / 3);
        let mut last_ack = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Two missed renewals leave a third of the TTL: give up on this connection.
                    if last_ack.elapsed() > self.opts.ttl * 2 / 3 + self.opts.request_timeout / 2 {
                        return End::Lost("keep-alive unanswered".into());
                    }
                    if let Err(e) = keeper.keep_alive().await {
                        return End::Lost(format!("keep-alive: {e}"));
                    }
                }
                ack = acks.message() => match ack {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        last_ack = Instant::now();
                        self.status.renewed();
                    }
                    Ok(Some(_)) => return End::Lost("lease expired".into()),
                    Ok(None) => return End::Lost("keep-alive stream closed".into()),
                    Err(e) => return End::Lost(format!("keep-alive: {e}")),
                },
                msg = events.message() => match msg {
                    Ok(Some(w)) if w.canceled() => return End::Lost(format!("watch cancelled: {}", w.cancel_reason())),
                    Ok(Some(w)) => {
                        for ev in w.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let id = String::from_utf8_lossy(kv.key()).trim_start_matches(prefix.as_str()).to_string();
                            match ev.event_type() {
                                EventType::Put => match parse(kv.value()) {
                                    Some(r) => { view.workers.insert(id, r); }
                                    None => { view.workers.remove(&id); }
                                },
                                EventType::Delete => { view.workers.remove(&id); }
                            }
                        }
                        self.view_tx.send_replace(Arc::new(view.clone()));
                        self.status.synced();
                    }
                    Ok(None) => return End::Lost("watch stream closed".into()),
                    Err(e) => return End::Lost(format!("watch: {e}")),
                },
                cmd = self.rx.recv() => match cmd {
                    None => {
                        let _ = client.lease_revoke(lease).await;
                        return End::Closed;
                    }
                    Some(Command::Close(reply)) => {
                        if let Err(e) = client.lease_revoke(lease).await {
                            warn!(error = %e, "revoking the etcd lease");
                        }
                        self.own.clear();
                        let _ = reply.send(());
                        return End::Closed;
                    }
                    Some(Command::Announce(r, reply)) => {
                        let result = self.put(&mut client, lease, &r).await;
                        self.own.insert(r.id.clone(), r);
                        // The record is kept either way: a failed put is redone on reconnect.
                        let _ = reply.send(Ok(()));
                        if let Err(e) = result {
                            return End::Lost(e);
                        }
                    }
                    Some(Command::Withdraw(id, reply)) => {
                        self.own.remove(&id);
                        let result = client.delete(self.key(&id), None).await;
                        let _ = reply.send(Ok(()));
                        if let Err(e) = result {
                            return End::Lost(format!("delete: {e}"));
                        }
                    }
                },
            }
        }
    }
}

fn parse(value: &[u8]) -> Option<WorkerRecord> {
    match serde_json::from_slice(value) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %e, "ignoring a malformed registry record");
            None
        }
    }
}
