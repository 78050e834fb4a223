//! Accepting client sockets, guarded before any request is read: a socket must send its request
//! headers within a deadline (a silent one is closed then too) and may stay plain HTTP for at
//! most a minute; the client sockets open at once (before and after a WebSocket
//! upgrade) are capped in total and per IP address, so that file descriptors stay free for the
//! process's own NATS and CQL sockets; a socket over a cap is answered `503` and closed rather
//! than left waiting.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use telemetry::metrics::Metrics;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use crate::slots::{Counts, Slot};

/// File descriptors kept free for the process's own sockets and files (NATS, CQL, the store,
/// logs), whatever the client load.
const RESERVED_DESCRIPTORS: u64 = 256;
/// Pause after a failed `accept` (out of descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The longest a socket may stay plain HTTP (not upgraded): keep-alive reuse is welcome, idling
/// forever is not.
const HTTP_SOCKET_LIFETIME: Duration = Duration::from_secs(60);
/// How long a refused socket is given to take its `503`.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// The caps of the accept loop.
#[derive(Debug, Clone)]
pub struct AcceptLimits {
    /// A socket must send its request headers within this (slow or half requests are closed).
    pub header_read_timeout: Duration,
    /// Client sockets open at once, upgraded or not (further capped by the descriptor limit).
    pub max_client_sockets: usize,
    /// Client sockets from one IP address at once; 0: no cap.
    pub max_sockets_per_ip: usize,
}

/// Held for as long as a client socket is open, through its WebSocket upgrade: frees its place
/// in the caps when dropped.
#[derive(Clone)]
pub struct SocketGuard(#[allow(dead_code)] Arc<Places>);

/// The places a socket holds.
struct Places {
    _permit: OwnedSemaphorePermit,
    _per_ip: Option<Slot<IpAddr>>,
}

/// The client sockets this process can hold: the configured cap, lowered so that
/// [`RESERVED_DESCRIPTORS`] stay free under the process's descriptor limit (raised to its hard
/// limit first).
pub fn socket_capacity(configured: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit; capping client sockets as configured");
            return configured;
        }
    };
    let available = usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    if available < configured {
        tracing::warn!(
            configured,
            available,
            open_file_limit = limit,
            "client sockets capped below the configuration to keep descriptors for the process's own sockets"
        );
    }
    configured.min(available).max(1)
}

/// Serves `app` on `listener` until `shutdown` resolves (then `on_shutdown` runs, the listener
/// closes, and HTTP requests still in progress get up to `grace` to finish).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: AcceptLimits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let sockets = Arc::new(Semaphore::new(limits.max_client_sockets));
    let per_ip = Counts::default();
    let graceful = GracefulShutdown::new();
    let mut http = auto::Builder::new(TokioExecutor::new()).http1_only();
    http.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let http = Arc::new(http);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Chat frames are small and latency-bound: without TCP_NODELAY, Nagle's algorithm holds
        // a frame back until the peer's (delayed, up to 40 ms) ACK of the previous one arrives.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let per_ip_slot = match limits.max_sockets_per_ip {
            0 => None,
            max => match per_ip.take(&peer.ip(), max) {
                Some(slot) => Some(slot),
                None => {
                    metrics.disconnects.with_label_values(&["ip_connection_limit"]).inc();
                    tokio::spawn(refuse(tcp, "too many connections from your address"));
                    continue;
                }
            },
        };
        let Ok(permit) = sockets.clone().try_acquire_owned() else {
            metrics.disconnects.with_label_values(&["socket_limit"]).inc();
            tokio::spawn(refuse(tcp, "connection limit reached; try another gateway"));
            continue;
        };
        let guard = SocketGuard(Arc::new(Places { _permit: permit, _per_ip: per_ip_slot }));
        let router = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // The upgrade handler moves a clone into the WebSocket's task, so the socket keeps
            // its place in the caps for as long as it is open.
            request.extensions_mut().insert(guard.clone());
            router.clone().call(request)
        });
        let (http, watcher, first_byte_within) = (http.clone(), graceful.watcher(), limits.header_read_timeout);
        tokio::spawn(async move {
            // hyper's header timer starts with the first byte: a socket that says nothing at
            // all is closed here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(first_byte_within, tcp.peek(&mut first)).await, Ok(Ok(1))) {
                return;
            }
            let connection = http.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            // The HTTP connection ends when it upgrades (the WebSocket lives on in its own task),
            // so this bounds only plain HTTP use, keep-alive idling included.
            match tokio::time::timeout(HTTP_SOCKET_LIFETIME, watcher.watch(connection)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "HTTP connection ended with an error"),
                Err(_) => tracing::debug!(%peer, "HTTP connection closed after its lifetime"),
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "HTTP requests still in progress after the grace period");
    }
}

/// Answers `503` with a JSON error (as every HTTP error of the gateway) and closes.
async fn refuse(mut tcp: TcpStream, why: &'static str) {
    let body = serde_json::json!({"error": {"code": "unavailable", "message": why}}).to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE, write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_stay_reserved() {
        let capacity = socket_capacity(usize::MAX);
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(u64::MAX);
        assert!((capacity as u64) <= limit.saturating_sub(RESERVED_DESCRIPTORS).max(1));
        assert_eq!(socket_capacity(10), 10.min(capacity));
    }
}
