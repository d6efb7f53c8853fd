//! The runtime's HTTP routes: Open Inference Protocol v2, `/metrics`, and the layers that
//! keep a replica healthy under load — authentication, a global admission limit with load
//! shedding (503 + Retry-After), a per-request timeout (504) and a body limit (413).
//! Every error is a JSON `{"error": "..."}`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::Semaphore;
use tower::{BoxError, ServiceBuilder};

use super::Limits;
use super::auth::Verifier;
use super::batch::{BatchError, Batcher};
use super::load::{self, Load};
use super::protocol::{self, HEADER_LENGTH, ProtocolError, Signature};
use super::served::ServedModel;
use crate::telemetry::{Health, json_error, metrics_response};

/// What the routes say about the model.
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub digest: String,
    pub quantization: String,
    pub signature: Signature,
}

impl From<&ServedModel> for ModelInfo {
    fn from(m: &ServedModel) -> Self {
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            architecture: m.architecture.clone(),
            digest: m.digest.clone(),
            quantization: m.quantization.clone(),
            signature: m.signature.clone(),
        }
    }
}

#[derive(Clone)]
pub struct State {
    pub model: Arc<ModelInfo>,
    pub batcher: Batcher,
    pub load: Arc<Load>,
    pub health: Arc<Health>,
    pub registry: Arc<Registry>,
    pub verifier: Option<Arc<Verifier>>,
}

/// Seconds a shed client is asked to wait: about one batch's time, rounded up.
const RETRY_AFTER_SECONDS: &str = "1";

pub fn router(state: State, limits: &Limits) -> Router {
    // One semaphore for both infer routes: the admission limit is per replica, not per route.
    let admitted = Arc::new(Semaphore::new(limits.batch.admitted()));
    let infer_routes = Router::new()
        .route("/v2/models/{model}/infer", post(infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                    admitted,
                ))
                .timeout(limits.request_timeout),
        )
        .layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let model_routes = Router::new()
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_version_metadata),
        )
        .merge(infer_routes)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route(
            "/v2/health/live",
            get(|| async { axum::Json(json!({ "live": true })) }),
        )
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_version_ready),
        )
        .route("/metrics", get(metrics))
        .merge(model_routes)
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "not found") })
        .method_not_allowed_fallback(|| async {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// The response header with the replica's load: `<in-flight + queued>/<capacity>`.
pub const LOAD_HEADER: &str = "kasmina-load";

/// Counts and times every inference request, whatever answered it (auth, shedding, timeout),
/// and tells the client the server-side time.
async fn record(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    let is_infer =
        request.method() == axum::http::Method::POST && request.uri().path().ends_with("/infer");
    let started = Instant::now();
    let mut response = next.run(request).await;
    // Draining (SIGTERM): every answer closes its connection, so keep-alive clients open a
    // new one, which the Service sends to a replica that is not leaving. Without it a client
    // stays on this pod until it exits and its next request on the old connection fails.
    if !state.health.is_ready() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if is_infer {
        let status = response.status().as_u16();
        let seconds = started.elapsed().as_secs_f64();
        state.load.record(status, load::outcome(status), seconds);
        // W3C Server-Timing: the time inside the runtime (queueing included), so a client
        // or load generator can tell server time from network time.
        if let Ok(value) = HeaderValue::from_str(&format!("total;dur={:.3}", seconds * 1e3)) {
            response.headers_mut().insert("server-timing", value);
        }
        // The replica's cognitive load as it answers (work held / capacity), so a gateway
        // balances on what each pod holds from every caller, not only its own requests.
        let (held, capacity) = state.load.held_of_capacity();
        if let Ok(value) = HeaderValue::from_str(&format!("{held}/{capacity}")) {
            response.headers_mut().insert(LOAD_HEADER, value);
        }
    }
    response
}

async fn authenticate(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    let Some(verifier) = &state.verifier else {
        return next.run(request).await;
    };
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match verifier.verify_header(header) {
        Ok(_) => next.run(request).await,
        Err(e) => {
            let message = e.to_string();
            let mut response = json_error(StatusCode::UNAUTHORIZED, &message);
            let challenge = format!(
                "Bearer realm=\"kasmina\", error=\"invalid_token\", error_description=\"{}\"",
                message.replace('"', "'")
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
    }
}

async fn overloaded(error: BoxError) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        shed("the replica is at capacity; retry shortly")
    } else if error.is::<tower::timeout::error::Elapsed>() {
        json_error(StatusCode::GATEWAY_TIMEOUT, "the request timed out")
    } else {
        json_error(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())
    }
}

fn shed(message: &str) -> Response {
    let mut response = json_error(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}

fn unknown_model(state: &State, name: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        &format!(
            "model {name:?} is not served here; this server serves {:?}",
            state.model.name
        ),
    )
}

/// The 404 for a model or version this server does not serve.
fn wrong_model(state: &State, name: &str, version: Option<&str>) -> Option<Response> {
    if name != state.model.name {
        return Some(unknown_model(state, name));
    }
    match version {
        Some(v) if v != state.model.version => Some(json_error(
            StatusCode::NOT_FOUND,
            &format!(
                "model {name:?} has no version {v:?}; this server serves {:?}",
                state.model.version
            ),
        )),
        _ => None,
    }
}

async fn ready(Extract(state): Extract<State>) -> Response {
    if state.health.is_ready() {
        axum::Json(json!({ "ready": true })).into_response()
    } else {
        json_error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "kasmina",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

fn model_ready_response(state: &State, name: &str, version: Option<&str>) -> Response {
    if let Some(response) = wrong_model(state, name, version) {
        return response;
    }
    if state.health.is_ready() {
        axum::Json(json!({ "name": name, "ready": true })).into_response()
    } else {
        json_error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn model_ready(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    model_ready_response(&state, &name, None)
}

async fn model_version_ready(
    Extract(state): Extract<State>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    model_ready_response(&state, &name, Some(&version))
}

fn metadata_response(state: &State, name: &str, version: Option<&str>) -> Response {
    if let Some(response) = wrong_model(state, name, version) {
        return response;
    }
    let m = &state.model;
    let (inputs, outputs) = m.signature.metadata();
    axum::Json(json!({
        "name": m.name,
        "versions": [m.version],
        "platform": format!("kasmina_{}", m.architecture),
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "digest": m.digest,
            "quantization": m.quantization,
        },
    }))
    .into_response()
}

async fn model_metadata(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    metadata_response(&state, &name, None)
}

async fn model_version_metadata(
    Extract(state): Extract<State>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata_response(&state, &name, Some(&version))
}

async fn infer(
    Extract(state): Extract<State>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_infer(&state, &name, None, &headers, body).await
}

async fn infer_version(
    Extract(state): Extract<State>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_infer(&state, &name, Some(&version), &headers, body).await
}

async fn run_infer(
    state: &State,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(response) = wrong_model(state, name, version) {
        return response;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "the request body is larger than the limit (--max-body-bytes)".to_owned()
            } else {
                rejection.body_text()
            };
            return json_error(status, &message);
        }
    };
    let json_length = match headers
        .get(HEADER_LENGTH)
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()))
    {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "Inference-Header-Content-Length is not a number",
            );
        }
    };
    let model = &state.model;
    let decoded = match protocol::decode(&body, json_length, &model.signature) {
        Ok(d) => d,
        Err(e @ ProtocolError::Malformed(_)) => {
            return json_error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        Err(e @ ProtocolError::Invalid(_)) => {
            return json_error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string());
        }
    };
    drop(body);
    let rows = match state.batcher.infer(decoded.items).await {
        Ok(rows) => rows,
        Err(BatchError::Full) => return shed("the request queue is full; retry shortly"),
        Err(BatchError::TooSlow) => {
            return shed("the queue is longer than the delay limit; retry shortly");
        }
        Err(BatchError::Closed) => {
            return shed("the runtime is shutting down; retry on another replica");
        }
        Err(e @ BatchError::Failed(_)) => {
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
    };
    let encoded = protocol::encode(
        &model.name,
        &model.version,
        decoded.id.as_deref(),
        &model.signature,
        &rows,
        decoded.binary_output,
    );
    match encoded.json_length {
        None => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            encoded.body,
        )
            .into_response(),
        Some(n) => {
            let mut response = (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )],
                encoded.body,
            )
                .into_response();
            response
                .headers_mut()
                .insert(HEADER_LENGTH, HeaderValue::from(n));
            response
        }
    }
}

async fn metrics(Extract(state): Extract<State>) -> Response {
    state.load.refresh(Instant::now());
    metrics_response(&state.registry)
}
