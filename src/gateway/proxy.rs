//! The proxy: each OIP request goes to a revision (the split, or the pinned one), then to one
//! of its ready pods (the balancer), over a pool of keep-alive connections. The request body is
//! read whole (bounded) so a failed attempt can be sent again; the answer streams back, but
//! for a request mirrored to the canary, whose answer stable's is held to be compared with.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::registry::Registry;

use super::balancer;
use super::metrics::Metrics;
use super::mirror;
use super::routes::{Pod, Table};
use super::slot::Slot;
use super::split::{self, PIN_HEADER, Refusal};
use super::wake::Holding;
use crate::api::edge_deployment::Balancing;
use crate::runtime::protocol::HEADER_LENGTH;
use crate::runtime::server::LOAD_HEADER;
use crate::telemetry::{Health, json_error};

/// The response header naming the revision that answered.
pub const REVISION_HEADER: &str = "kasmina-revision";

/// Seconds a client is told to wait when no pod can take its request.
const RETRY_AFTER_SECONDS: &str = "1";

/// Bounds of the proxy.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    /// From the request sent to the answer's headers.
    pub upstream_timeout: Duration,
}

/// The gateway's shared state: the table the watches keep current, the connection pool and
/// the counters.
pub struct Gateway {
    table: RwLock<Arc<Table>>,
    client: Client<HttpConnector, Full<Bytes>>,
    balancing: Balancing,
    limits: Limits,
    /// Requests routed by the split, for its exact weights.
    routed: AtomicU64,
    /// Requests that could be mirrored, for the exact mirror share.
    mirrorable: AtomicU64,
    /// Mirrors in flight (at most `mirror::MAX_IN_FLIGHT`).
    mirrors: Arc<AtomicUsize>,
    turn: AtomicUsize,
    /// Requests held while a revision with no ready pod wakes (with `--edge-deployment`).
    holding: Option<Holding>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
}

impl Gateway {
    pub fn new(balancing: Balancing, limits: Limits) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            client,
            balancing,
            limits,
            routed: AtomicU64::new(0),
            mirrorable: AtomicU64::new(0),
            mirrors: Arc::new(AtomicUsize::new(0)),
            turn: AtomicUsize::new(0),
            holding: None,
            metrics: Arc::new(metrics),
            registry: Arc::new(registry),
            health: Arc::new(Health::default()),
        }
    }

    /// Holds the requests for a stable revision with no ready pod and wakes it, instead of
    /// answering 503 at once.
    pub fn holding(mut self, holding: Holding) -> Self {
        self.holding = Some(holding);
        self
    }

    pub fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a new table in force; requests already routed finish on the pods they chose.
    pub fn set_table(&self, table: Table) {
        let mut slot = match self.table.write() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.metrics.routes(&table, &slot);
        *slot = Arc::new(table);
        drop(slot);
        if let Some(holding) = &self.holding {
            holding.table_changed();
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): meaningful for one connection only, never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

fn unavailable(message: &str) -> Response {
    let mut response = json_error(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}

/// Why one attempt got no answer.
enum Failed {
    /// Nothing was answered (refused, reset, closed before the headers): safe to send again,
    /// as an inference changes nothing.
    Unanswered(&'static str, String),
    /// The pod took longer than the upstream timeout; it may still be computing, so a retry
    /// would only double the work.
    TimedOut,
}

/// Every request under /v2.
pub async fn forward(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, gateway.limits.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the request body is over the gateway's {} byte limit",
                    gateway.limits.max_body_bytes
                ),
            );
        }
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {e}"),
            );
        }
    };
    let table = gateway.table();
    let pin = parts
        .headers
        .get(PIN_HEADER)
        .map(|v| v.to_str().unwrap_or("<not text>"));
    let n = if pin.is_none() {
        gateway.routed.fetch_add(1, Ordering::Relaxed)
    } else {
        0
    };
    let revision = match split::choose(&table, pin, n) {
        Ok(revision) => revision.to_owned(),
        Err(refusal @ Refusal::UnknownPin(_)) => {
            return json_error(StatusCode::NOT_FOUND, &refusal.to_string());
        }
        Err(refusal @ Refusal::NoRevision) => return unavailable(&refusal.to_string()),
    };
    // Stable with no ready pod (scaled to zero): wait for the pod it is woken to start.
    let table = match &gateway.holding {
        Some(holding)
            if table.pods(&revision).is_empty()
                && table.split.stable.as_deref() == Some(revision.as_str()) =>
        {
            let now = || gateway.table();
            match holding.until_ready(&revision, now, &gateway.metrics).await {
                Ok(table) => table,
                Err(refusal) => return unavailable(&refusal.to_string()),
            }
        }
        _ => table,
    };
    let infer = parts.method == axum::http::Method::POST && parts.uri.path().ends_with("/infer");
    let mirror_to = mirror::target(&table, &revision, pin.is_some(), infer, || {
        gateway.mirrorable.fetch_add(1, Ordering::Relaxed)
    })
    .map(str::to_owned);
    let inflight = gateway.metrics.inflight(&revision);
    inflight.inc();
    let mut response = attempts(&gateway, &table, &revision, &parts, body.clone()).await;
    if let Some(canary) = mirror_to {
        response = mirrored(&gateway, &table, canary, &parts, body, response).await;
    }
    inflight.dec();
    gateway.metrics.answered(
        &revision,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Up to two attempts, the second on another pod when there is one.
async fn attempts(
    gateway: &Gateway,
    table: &Table,
    revision: &str,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Response {
    let pods = table.pods(revision);
    let mut failed_on: Option<Arc<Pod>> = None;
    let mut attempt = 0;
    loop {
        let Some(pod) = balancer::pick(
            pods,
            gateway.balancing,
            failed_on.as_deref(),
            Instant::now(),
            &mut balancer::random_below,
            &gateway.turn,
        ) else {
            return unavailable(&format!("revision {revision} has no ready pod"));
        };
        match send(gateway, &pod, parts, body.clone()).await {
            Ok(mut response) => {
                response.headers_mut().insert(
                    REVISION_HEADER,
                    HeaderValue::from_str(revision).unwrap_or(HeaderValue::from_static("-")),
                );
                return response;
            }
            Err(Failed::TimedOut) => {
                gateway.metrics.upstream_error(revision, "timeout");
                pod.load
                    .answered(gateway.limits.upstream_timeout, Instant::now());
                return json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "pod {} of revision {revision} did not answer within {:?}",
                        pod.name, gateway.limits.upstream_timeout
                    ),
                );
            }
            Err(Failed::Unanswered(kind, why)) => {
                gateway.metrics.upstream_error(revision, kind);
                // No answer counts as the longest wait a connection may take, so the balancer
                // avoids the pod for a while (the estimate decays) instead of retrying on it.
                pod.load
                    .answered(gateway.limits.connect_timeout, Instant::now());
                tracing::debug!(pod = %pod.name, %revision, attempt, error = %why, "no answer");
                if attempt == 1 {
                    return json_error(
                        StatusCode::BAD_GATEWAY,
                        &format!("pod {} of revision {revision}: {why}", pod.name),
                    );
                }
                gateway.metrics.retried(revision);
                failed_on = Some(pod);
                attempt += 1;
            }
        }
    }
}

fn json_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(HEADER_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Stable answered a request sampled for mirroring: its answer is held (bounded) and given to
/// the caller, and the request goes to the canary in the background to compare the answers.
/// The caller waits for nothing of the canary's.
async fn mirrored(
    gateway: &Arc<Gateway>,
    table: &Arc<Table>,
    canary: String,
    parts: &axum::http::request::Parts,
    body: Bytes,
    response: Response,
) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let slot = length
        .filter(|n| *n <= mirror::MAX_ANSWER_BYTES)
        .and_then(|_| Slot::take(&gateway.mirrors, mirror::MAX_IN_FLIGHT));
    let Some(slot) = slot else {
        gateway.metrics.mirrored(&canary, "skipped");
        return response;
    };
    let (head, stream) = response.into_parts();
    let read = tokio::time::timeout(
        gateway.limits.upstream_timeout,
        Limited::new(stream, mirror::MAX_ANSWER_BYTES).collect(),
    )
    .await;
    let answer = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => {
            return json_error(
                StatusCode::BAD_GATEWAY,
                "the answer of the stable revision broke off",
            );
        }
    };
    let stable_json = json_length(&head.headers);
    let mut copy = axum::http::Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.headers = parts.headers.clone();
    tokio::spawn(compare(
        gateway.clone(),
        table.clone(),
        canary,
        copy,
        body,
        (answer.clone(), stable_json),
        slot,
    ));
    Response::from_parts(head, Body::from(answer))
}

/// Sends the mirrored request to a canary pod and records how far its answer agrees.
async fn compare(
    gateway: Arc<Gateway>,
    table: Arc<Table>,
    canary: String,
    parts: axum::http::request::Parts,
    body: Bytes,
    (stable, stable_json): (Bytes, Option<usize>),
    _slot: Slot,
) {
    let outcome = async {
        let pod = balancer::pick(
            table.pods(&canary),
            gateway.balancing,
            None,
            Instant::now(),
            &mut balancer::random_below,
            &gateway.turn,
        )
        .ok_or("failed")?;
        let response = send(&gateway, &pod, &parts, body)
            .await
            .map_err(|_| "failed")?;
        if response.status() != StatusCode::OK {
            return Err("failed");
        }
        let (head, stream) = response.into_parts();
        let answer = tokio::time::timeout(
            gateway.limits.upstream_timeout,
            Limited::new(stream, mirror::MAX_ANSWER_BYTES).collect(),
        )
        .await
        .map_err(|_| "failed")?
        .map_err(|_| "failed")?
        .to_bytes();
        let theirs = mirror::outputs(&stable, stable_json);
        let ours = mirror::outputs(&answer, json_length(&head.headers));
        match (theirs, ours) {
            (Ok(s), Ok(c)) => Ok(mirror::agreement(&s, &c)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(%canary, error = %e, "answers not compared");
                Err("incomparable")
            }
        }
    }
    .await;
    match outcome {
        Ok(agreement) => {
            gateway.metrics.agreed(&canary, agreement);
            gateway.metrics.mirrored(&canary, "compared");
        }
        Err(outcome) => gateway.metrics.mirrored(&canary, outcome),
    }
}

/// One attempt on `pod`: the answer's headers, its body streaming behind them.
async fn send(
    gateway: &Gateway,
    pod: &Pod,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, Failed> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("http://{}{path}", pod.addr)
        .parse()
        .map_err(|e| Failed::Unanswered("connect", format!("{e}")))?;
    let mut upstream = hyper::Request::new(Full::new(body));
    *upstream.method_mut() = parts.method.clone();
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = parts.headers.clone();
    strip_hop_by_hop(upstream.headers_mut());
    upstream.headers_mut().remove(header::HOST);
    let outstanding = pod.load.start();
    let sent = Instant::now();
    let work = pod.load.work(sent).0;
    let answer = tokio::time::timeout(
        gateway.limits.upstream_timeout,
        gateway.client.request(upstream),
    )
    .await;
    drop(outstanding);
    let answer = match answer {
        Err(_) => return Err(Failed::TimedOut),
        Ok(Err(e)) => {
            let kind = if e.is_connect() { "connect" } else { "closed" };
            return Err(Failed::Unanswered(kind, crate::telemetry::error_chain(&e)));
        }
        Ok(Ok(answer)) => answer,
    };
    let (mut head, incoming) = answer.into_parts();
    let now = Instant::now();
    pod.load.served(now - sent, work, now);
    if let Some(load) = head.headers.get(LOAD_HEADER).and_then(|v| v.to_str().ok()) {
        pod.load.report(load, now);
    }
    strip_hop_by_hop(&mut head.headers);
    Ok(Response::from_parts(head, Body::new(incoming)).into_response())
}
