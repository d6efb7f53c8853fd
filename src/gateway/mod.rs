//! `kasmina gateway`: an OIP-aware proxy in front of one EdgeDeployment's revisions. It splits
//! requests between the stable and the canary revision by exact weights (or a pinning header),
//! balances each revision's requests over its ready pods by the load they hold (power of two
//! choices), retries once on another pod a request that got no answer, mirrors a share of
//! stable's requests to the canary to compare the answers, and drains on SIGTERM.

pub mod balancer;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod routes;
pub mod slot;
pub mod split;
pub mod wake;
pub mod watch;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::duration::Duration as KubeDuration;
use crate::api::edge_deployment::Balancing;
use crate::telemetry::{DrainError, json_error, metrics_response, serve_draining};
use proxy::{Gateway, Limits};
use routes::{Split, Table};

/// What the gateway reads and writes through the API server: the chart's gateway ClusterRole
/// grants exactly this (tests/chart.rs), bound per namespace by the controller. The scale
/// subresource wakes a revision scaled to zero.
pub const PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("kasmina.dev", "edgedeployments", &["get", "list", "watch"]),
    ("kasmina.dev", "edgedeployments/scale", &["get", "patch"]),
    ("", "pods", &["list", "watch"]),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("connecting to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Drain(#[from] DrainError),
}

/// Bound of each call to the scale subresource when waking a revision.
const WAKE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `kasmina gateway` options.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// The EdgeDeployment whose revisions to route to, watched through the API server
    /// (in-cluster config or KUBECONFIG).
    #[arg(
        long,
        env = "KASMINA_EDGE_DEPLOYMENT",
        required_unless_present = "backend"
    )]
    pub edge_deployment: Option<String>,
    /// Its namespace (in a pod: the downward API's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Fixed routes instead of a watch (to try the gateway, and benchmarks):
    /// REVISION=HOST:PORT, repeated per pod; the first revision named is stable, a second one
    /// the canary.
    #[arg(long, value_parser = parse_backend, conflicts_with = "edge_deployment")]
    pub backend: Vec<(String, SocketAddr)>,
    /// With --backend: percent of requests for the canary.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub canary_weight: u8,
    /// With --backend: percent of stable's infer requests also sent to the canary to compare
    /// the answers (kasmina_gateway_output_agreement).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub mirror_percent: u8,
    /// How a revision's requests are spread over its pods: PowerOfTwoChoices or RoundRobin.
    #[arg(long, default_value = "PowerOfTwoChoices", value_parser = parse_balancing)]
    pub balancing: Balancing,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port for OIP (/v2/...), /metrics, /healthz and /readyz.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Largest request body in bytes; bigger gets 413 (it is held whole to retry it).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest wait for a connection to a pod.
    #[arg(long, default_value = "1s")]
    pub connect_timeout: KubeDuration,
    /// Longest wait for a pod's answer.
    #[arg(long, default_value = "30s")]
    pub upstream_timeout: KubeDuration,
    /// After SIGTERM, keep serving this long with readiness false, so endpoints drop the pod
    /// before the listener closes.
    #[arg(long, default_value = "0s")]
    pub drain_delay: KubeDuration,
    /// Longest wait for requests in flight after the listener closes.
    #[arg(long, default_value = "30s")]
    pub drain_timeout: KubeDuration,
    /// With --edge-deployment: requests held at most at once while the stable revision has no
    /// ready pod (scaled to zero) and is woken; more get 503 at once.
    #[arg(long, default_value_t = 256)]
    pub max_held_requests: usize,
    /// With --edge-deployment: longest a request is held for a woken revision's pod; then 503.
    #[arg(long, default_value = "30s")]
    pub hold_timeout: KubeDuration,
}

fn parse_backend(s: &str) -> Result<(String, SocketAddr), String> {
    let (revision, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected REVISION=HOST:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{s:?}: {addr:?} is not HOST:PORT ({e})"))?;
    if revision.is_empty() {
        return Err(format!("{s:?}: the revision is empty"));
    }
    Ok((revision.to_owned(), addr))
}

fn parse_balancing(s: &str) -> Result<Balancing, String> {
    match s {
        "PowerOfTwoChoices" => Ok(Balancing::PowerOfTwoChoices),
        "RoundRobin" => Ok(Balancing::RoundRobin),
        other => Err(format!(
            "{other:?}: expected PowerOfTwoChoices or RoundRobin"
        )),
    }
}

impl Options {
    fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            connect_timeout: self.connect_timeout.as_std(),
            upstream_timeout: self.upstream_timeout.as_std(),
        }
    }
}

/// The table of fixed `--backend` routes.
pub fn fixed_table(backends: &[(String, SocketAddr)], canary_weight: u8, mirror: u8) -> Table {
    let mut order: Vec<&str> = vec![];
    let mut pods: BTreeMap<String, Vec<(String, SocketAddr)>> = BTreeMap::new();
    for (revision, addr) in backends {
        if !order.contains(&revision.as_str()) {
            order.push(revision);
        }
        pods.entry(revision.clone())
            .or_default()
            .push((addr.to_string(), *addr));
    }
    let split = Split {
        stable: order.first().map(|s| (*s).to_owned()),
        canary: order.get(1).map(|s| (*s).to_owned()),
        weight: canary_weight,
        mirror,
    };
    Table::default().next(split, pods)
}

/// The gateway's routes: OIP under /v2 is proxied; its own metrics and health beside it.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v2", any(proxy::forward))
        .route("/v2/{*rest}", any(proxy::forward))
        .fallback(|| async {
            json_error(
                StatusCode::NOT_FOUND,
                "not found: the gateway serves the Open Inference Protocol under /v2",
            )
        })
        .with_state(gateway)
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    metrics_response(&gateway.registry)
}

async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.health.is_ready() {
        "ok".into_response()
    } else {
        json_error(StatusCode::SERVICE_UNAVAILABLE, "routes not synced yet")
    }
}

/// Routes until `shutdown` fires and the drain ends.
pub async fn run(options: Options, shutdown: CancellationToken) -> Result<(), Error> {
    let gateway = Gateway::new(options.balancing, options.limits());
    let gateway = if options.backend.is_empty() {
        let name = options
            .edge_deployment
            .clone()
            .ok_or_else(|| Error::Config("--edge-deployment or --backend is required".into()))?;
        let client = kube::Client::try_default().await?;
        let scale = wake::ScaleSubresource {
            api: kube::Api::namespaced(client.clone(), &options.namespace),
            name: name.clone(),
            timeout: WAKE_CALL_TIMEOUT,
        };
        let limits = wake::HoldLimits {
            max_held: options.max_held_requests,
            max_wait: options.hold_timeout.as_std(),
        };
        let gateway = Arc::new(gateway.holding(wake::Holding::new(Arc::new(scale), limits)));
        tokio::spawn(watch::follow(
            client,
            options.namespace.clone(),
            name.clone(),
            gateway.clone(),
            shutdown.child_token(),
        ));
        tracing::info!(edge_deployment = %name, namespace = %options.namespace, balancing = ?options.balancing, "routing");
        gateway
    } else {
        let gateway = Arc::new(gateway);
        gateway.set_table(fixed_table(
            &options.backend,
            options.canary_weight,
            options.mirror_percent,
        ));
        gateway.health.set_ready(true);
        tracing::info!(split = ?gateway.table().split, balancing = ?options.balancing, "routing to fixed backends");
        gateway
    };
    let addr = SocketAddr::new(options.host, options.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    serve(
        gateway,
        listener,
        options.drain_delay.as_std(),
        options.drain_timeout.as_std(),
        shutdown,
    )
    .await
}

/// Serves `gateway` on `listener` until `shutdown` fires and the drain ends (see
/// `telemetry::serve_draining`).
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    drain_delay: Duration,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let health = gateway.health.clone();
    serve_draining(
        listener,
        router(gateway),
        health,
        drain_delay,
        drain_timeout,
        shutdown,
    )
    .await?;
    tracing::info!("drained");
    Ok(())
}
