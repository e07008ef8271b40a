//! Listening for gRPC: `TCP_NODELAY` on every accepted socket (without it small activation
//! messages wait for Nagle's timer and a step's latency balloons), and the address to advertise.

use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

use crate::error::ServiceError;

pub struct Listener {
    pub incoming: TcpIncoming,
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
}

/// Binds `addr` (`host:port`; port 0 picks a free one). Call inside a tokio runtime.
pub fn bind(addr: &str) -> Result<Listener, ServiceError> {
    let parsed: SocketAddr =
        addr.parse().map_err(|e| ServiceError::invalid("listen", format!("{addr:?} is not host:port ({e})")))?;
    let incoming = TcpIncoming::bind(parsed)
        .map_err(|e| ServiceError::Unavailable(format!("cannot listen on {addr}: {e}")))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().map_err(|e| ServiceError::Internal(format!("listener address: {e}")))?;
    Ok(Listener { incoming, addr })
}

/// The URL other workers use to reach this one: `--advertise` when given (a pod IP, a service
/// name), else the bound address (an unspecified IP becomes loopback).
pub fn advertised_endpoint(bound: SocketAddr, advertise: Option<&str>) -> String {
    match advertise {
        Some(a) if a.contains("://") => a.to_string(),
        Some(a) => format!("http://{a}"),
        None => {
            let ip = if bound.ip().is_unspecified() { "127.0.0.1".parse().unwrap() } else { bound.ip() };
            format!("http://{}", SocketAddr::new(ip, bound.port()))
        }
    }
}

/// A client channel to another worker that connects on first use: `TCP_NODELAY`, a short
/// connect timeout, HTTP/2 keep-alives to notice dead peers. Call within a tokio runtime context.
pub fn lazy_channel(url: &str) -> Result<Channel, String> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad endpoint {url:?}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_a_reachable_url() {
        let bound: SocketAddr = "0.0.0.0:5000".parse().unwrap();
        assert_eq!(advertised_endpoint(bound, None), "http://127.0.0.1:5000");
        assert_eq!(advertised_endpoint(bound, Some("pod-3.experts:5000")), "http://pod-3.experts:5000");
        assert_eq!(advertised_endpoint(bound, Some("https://x:1")), "https://x:1");
    }

    #[tokio::test]
    async fn rejects_a_bad_listen_address_by_name() {
        let e = bind("localhost-ish").err().unwrap();
        assert!(e.to_string().starts_with("listen:"), "{e}");
        let l = bind("127.0.0.1:0").unwrap();
        assert_ne!(l.addr.port(), 0);
    }
}
