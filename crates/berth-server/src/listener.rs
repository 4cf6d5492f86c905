//! Accepting connections within limits. A connection that sends nothing (an idle keep-alive), or
//! its request head a byte at a time, is closed after the header timeout; a body that stalls is
//! cut by [`crate::request::JsonBody`]'s read timeout; past `max_connections` open at once, a new
//! connection gets a 503 and is closed, so that slow or idle clients cannot use up the process's
//! file descriptors. (axum's own `serve` sets none of these.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long connections may take and how many may be open.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From the moment the server waits for a request (a new connection, or a kept-alive one
    /// between requests) until the request's head has arrived.
    pub header_timeout: Duration,
    /// For a request's whole body to arrive.
    pub body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { max_connections: 1024, header_timeout: Duration::from_secs(30), body_timeout: Duration::from_secs(60) }
    }
}

/// Serve `app` on `listener` until `shutdown` completes; then close the listener (a new connection
/// is refused, which any client or proxy may safely retry elsewhere), let each connection finish
/// the request it is answering, close the idle ones, and return when all are closed.
pub async fn serve(listener: TcpListener, app: Router, limits: &ConnectionLimits, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: say so, and give the system a moment.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            connections.spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        let header_timeout = limits.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

/// Tell a connection over the limit why it is closed (with at most a second spent on it).
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = format!(
        r#"{{"error":{{"message":"the server has {limit} connections open, its limit; retry shortly","type":"server_error","param":null,"code":"too_many_connections"}}}}"#
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}
