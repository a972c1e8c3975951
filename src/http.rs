//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! Invariant: handlers only read [`Metrics`] in memory; no request ever
//! waits on Postgres or Kafka, so probes answer even when those hang. A
//! process relaying several outboxes serves them all on one endpoint:
//! `/metrics` tells them apart by the `relay` label, and `/readyz` is
//! ready only when every one of them is.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// OpenMetrics text, which Prometheus negotiates and parses.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `listen` (so a taken port fails at start-up, naming the key) and
/// serves until `shutdown` resolves.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| {
        Error::stop(format!(
            "http.listen: cannot listen on {listen}: {e}. Choose a free address (or port 0 for any)"
        ))
    })
}

/// The relays of this process, one per outbox.
type Relays = Arc<Vec<Arc<Metrics>>>;

pub async fn serve(
    listener: TcpListener,
    relays: Vec<Arc<Metrics>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Arc::new(relays));
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "the metrics and health endpoint stopped; the relay goes on without it");
    }
}

async fn metrics_text(State(relays): State<Relays>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        crate::metrics::encode_all(&relays),
    )
}

async fn ready(State(relays): State<Relays>) -> impl IntoResponse {
    if let [only] = relays.as_slice() {
        return match only.ready() {
            Ok(()) => (StatusCode::OK, format!("ready: {}\n", only.state().name())),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        };
    }
    let mut all_ready = true;
    let mut body = String::new();
    for relay in relays.iter() {
        let line = match relay.ready() {
            Ok(()) => format!("{}: ready: {}\n", relay.name(), relay.state().name()),
            Err(why) => {
                all_ready = false;
                format!("{}: not ready: {why}\n", relay.name())
            }
        };
        body.push_str(&line);
    }
    let status = match all_ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, body)
}
