//! Graceful shutdown. A service on SIGTERM: readiness off, stop admitting, drain in-flight work
//! within one deadline, withdraw from the registry (revoke the lease), exit. This module provides
//! the trigger every part of a process watches.

use tokio::sync::watch;

/// Cloneable; every clone sees the same trigger.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { tx: watch::channel(false).0 }
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once triggered (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|t| *t).await;
    }

    /// Triggers on SIGTERM or Ctrl-C (spawn it once per process).
    pub async fn on_signals(self) {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        self.trigger();
    }
}
