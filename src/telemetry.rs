//! Logs, the Prometheus registry's HTTP endpoint, and health probes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Sets up tracing; the level comes from `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: container logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Liveness and readiness as the probes see them.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

/// `/metrics`, `/healthz`, `/readyz`; anything else is a JSON 404.
pub fn router(registry: Arc<Registry>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "not found") })
        .with_state(AppState { registry, health })
}

/// A JSON error body with the status, as every Kasmina HTTP endpoint answers errors.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    metrics_response(&state.registry)
}

/// The registry in the OpenMetrics text format, as every Kasmina `/metrics` answers.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed"),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.health.is_ready() {
        "ok".into_response()
    } else {
        json_error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the router on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry, health))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Why a draining server stopped before its requests were done.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("drain timed out after {0:?} with requests still running")]
    Timeout(std::time::Duration),
}

/// Serves `app` until `shutdown` fires, then drains: readiness turns false, requests are still
/// taken for `drain_delay` (endpoints drop the pod meanwhile), then the listener closes and
/// the requests in flight get `drain_timeout` to finish. The runtime and the gateway stop so.
pub async fn serve_draining(
    listener: TcpListener,
    app: Router,
    health: Arc<Health>,
    drain_delay: std::time::Duration,
    drain_timeout: std::time::Duration,
    shutdown: CancellationToken,
) -> Result<(), DrainError> {
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health.set_ready(false);
            tracing::info!(?drain_delay, "draining: readiness is false");
            tokio::time::sleep(drain_delay).await;
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain_delay + drain_timeout).await;
    };
    tokio::select! {
        result = server => result.map_err(DrainError::Serve),
        () = deadline => Err(DrainError::Timeout(drain_timeout)),
    }
}

/// Cancels `token` on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C); a second
/// signal ends the process at once, without waiting for the drain.
pub async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .inspect_err(|error| tracing::warn!(%error, "cannot listen for SIGTERM"))
        .ok();
    for signals in 0.. {
        #[cfg(unix)]
        match term.as_mut() {
            Some(term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        if signals == 0 {
            tracing::info!("shutting down");
            token.cancel();
        } else {
            tracing::warn!("second signal: exiting without finishing the drain");
            std::process::exit(1);
        }
    }
}

/// An error with its causes, each said once: "GET …: error sending request: Connection refused".
/// Conditions, Events and exit messages need the cause, which `Display` alone omits.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_metrics_and_json_404() {
        let mut registry = Registry::with_prefix("kasmina");
        let metrics = crate::controller::context::Metrics::register(&mut registry);
        metrics.set_leader(true);
        drop(metrics.reconcile_started("edgedeployment"));
        metrics.reconcile_failed("edgedeployment", "write_status");
        let health = Arc::new(Health::default());
        let app = router(Arc::new(registry), health.clone());

        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, r#"{"error":"not ready"}"#);
        health.set_ready(true);
        assert_eq!(get(app.clone(), "/readyz").await.0, StatusCode::OK);

        let (status, body) = get(app.clone(), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        for line in [
            "kasmina_leader 1",
            r#"kasmina_reconciliations_total{controller="edgedeployment"} 1"#,
            r#"kasmina_reconcile_failures_total{controller="edgedeployment",error="write_status"} 1"#,
            r#"kasmina_reconcile_duration_seconds_count{controller="edgedeployment"} 1"#,
        ] {
            assert!(body.contains(line), "missing {line:?} in\n{body}");
        }
        let (status, body) = get(app, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, r#"{"error":"not found"}"#);
    }
}
