//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! Invariant: handlers only read [`Metrics`] in memory; no request ever
//! waits on Postgres or Kafka, so probes answer even when those hang.

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

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "the metrics and health endpoint stopped; the relay goes on without it");
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.encode())
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.ready() {
        Ok(()) => (
            StatusCode::OK,
            format!("ready: {}\n", metrics.state().name()),
        ),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
