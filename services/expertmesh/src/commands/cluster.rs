//! Flags shared by the cluster roles (every one also an `EXPERTMESH_*` environment variable, so
//! Kubernetes can set it) and the registry they select.

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_runtime::metrics::{self, MetricsServer};
use expertmesh_runtime::registry::{EtcdOptions, EtcdRegistry, EtcdTls, MemoryRegistry, Registry, Topology};
use expertmesh_runtime::shutdown::Shutdown;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct RegistryArgs {
    /// etcd endpoints, comma separated (e.g. http://10.0.0.5:2379). Without it the worker uses an
    /// in-memory registry (only useful inside one process).
    #[arg(long, env = "EXPERTMESH_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "EXPERTMESH_ETCD_PREFIX", default_value = "/expertmesh")]
    pub etcd_prefix: String,
    /// Lease time-to-live in seconds: a dead worker disappears from the registry within it.
    #[arg(long, env = "EXPERTMESH_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// etcd user (with --etcd-password).
    #[arg(long, env = "EXPERTMESH_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "EXPERTMESH_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// PEM file of the CA that signed etcd's certificate (TLS; `https://` endpoints without it
    /// trust the system's roots).
    #[arg(long, env = "EXPERTMESH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for an etcd that checks clients (with --etcd-key).
    #[arg(long, env = "EXPERTMESH_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "EXPERTMESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn build(&self) -> Result<Arc<dyn Registry>> {
        if self.etcd.is_empty() {
            return Ok(Arc::new(MemoryRegistry::new()));
        }
        let mut opts = EtcdOptions::new(self.etcd.clone());
        opts.prefix = self.etcd_prefix.clone();
        opts.ttl = Duration::from_secs(self.lease_ttl.max(1));
        opts.user = self.etcd_user.clone().zip(self.etcd_password.clone());
        let read = |flag: &str, p: &PathBuf| std::fs::read(p).with_context(|| format!("{flag} {}", p.display()));
        if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
            opts.tls = Some(EtcdTls {
                ca: self.etcd_ca.as_ref().map(|p| read("--etcd-ca", p)).transpose()?,
                identity: match (&self.etcd_cert, &self.etcd_key) {
                    (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
                    _ => None,
                },
            });
        }
        Ok(Arc::new(EtcdRegistry::start(opts)?))
    }
}

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "EXPERTMESH_LISTEN", default_value = "0.0.0.0:0")]
    pub listen: String,
    /// Address others reach this worker at (default: the bound address).
    #[arg(long, env = "EXPERTMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Registry id (default: role and port).
    #[arg(long, env = "EXPERTMESH_WORKER_ID")]
    pub id: Option<String>,
    /// HTTP address of `/metrics` (Prometheus), `/health` and `/ready` (port 0 picks a free
    /// port; the bound address is printed).
    #[arg(long, env = "EXPERTMESH_METRICS_LISTEN", default_value = "0.0.0.0:0")]
    pub metrics_listen: String,
    /// Seconds shutdown waits for in-flight work.
    #[arg(long, env = "EXPERTMESH_DRAIN_SECONDS", default_value_t = 30)]
    pub drain_seconds: u64,
    #[arg(long, env = "EXPERTMESH_SUPERPOD", default_value = "")]
    pub superpod: String,
    #[arg(long, env = "EXPERTMESH_NODE", default_value = "")]
    pub node: String,
    #[arg(long, env = "EXPERTMESH_DEVICE", default_value = "")]
    pub device: String,
}

impl ServeArgs {
    pub fn topology(&self) -> Topology {
        Topology { superpod: self.superpod.clone(), node: self.node.clone(), device: self.device.clone() }
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    /// Serves the metrics port (ready while `ready` says so and shutdown has not begun) and
    /// exports the registry's health. Call within the runtime.
    pub async fn metrics(
        &self,
        registry: &Arc<dyn Registry>,
        shutdown: &Shutdown,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<MetricsServer> {
        metrics::watch_registry(registry.clone());
        let stopping = shutdown.clone();
        let ready = Arc::new(move || !stopping.is_triggered() && ready());
        Ok(metrics::serve(&self.metrics_listen, ready, shutdown.clone()).await?)
    }
}

/// The async runtime for network work (model math runs on the compute pool, not here).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("io").enable_all().build()?)
}
