//! `kasmina controller`: the operator. Connects to the cluster, checks the CRDs, serves
//! metrics and health, wins the leader election, then runs the three controllers until
//! SIGTERM (finishing running reconciles and releasing the lease).

pub mod audit;
pub mod cache;
pub mod compliance_profile;
pub mod context;
pub mod edge_deployment;
pub mod http;
pub mod leader;
pub mod scaffold;
pub mod scaling_policy;
pub mod shutdown;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use kube::Client;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::{GROUP, VERSION};
use crate::telemetry::{self, Health};
use context::{Context, Metrics, SystemClock};
use edge_deployment::workload::Settings;
use leader::{Held, LeaderElector, LeaseTiming};

/// Settings of `kasmina controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "KASMINA_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Elect a leader among replicas through a Lease; only the leader reconciles.
    /// Turn off only when exactly one replica runs (e.g. `just run` on a laptop).
    #[arg(long, env = "KASMINA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "KASMINA_LEASE_NAME", default_value = "kasmina-controller")]
    pub lease_name: String,

    /// Namespace of the Lease; defaults to the pod's namespace or the kubeconfig's.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Who this replica is in the election and its Events: the pod name (or host name), to
    /// which each process adds a suffix of its own, so a container restarted in the same pod
    /// is a new candidate and waits for the lease like any other, as client-go's are.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a lease is valid without renewal; bounds how long a dead leader blocks others.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: std::time::Duration,

    /// The leader steps down when it could not renew for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: std::time::Duration,

    /// How often the leader renews and standbys look at the lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub retry_period: std::time::Duration,

    /// After SIGTERM: the longest the replica takes to finish running reconciles, hand the
    /// lease over and stop its servers before it exits anyway. Keep it under the pod's
    /// terminationGracePeriodSeconds (the chart: 30 s).
    #[arg(long, env = "KASMINA_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,

    /// The image of build Jobs and runtime pods (it holds `kasmina build` and `kasmina serve`);
    /// the chart sets it to the operator's own image.
    #[arg(long, env = "KASMINA_IMAGE", default_value = concat!("kasmina:", env!("CARGO_PKG_VERSION")))]
    pub image: String,

    /// Where built artifacts are stored: `s3://`, `gs://`, `az://` prefix, or `file:///path`
    /// on the nodes (single-node clusters and devices).
    #[arg(
        long,
        env = "KASMINA_ARTIFACT_STORE",
        default_value = "file:///var/lib/kasmina/artifacts"
    )]
    pub artifact_store: String,

    /// Folders on the nodes that `file://` model sources may name (comma-separated); they are
    /// mounted into build pods. The artifact store's folder is always allowed.
    #[arg(
        long,
        env = "KASMINA_HOST_PATHS",
        value_delimiter = ',',
        default_value = "/var/lib/kasmina/models"
    )]
    pub host_paths: Vec<String>,

    /// The ClusterRole bound, in an EdgeDeployment's namespace, to the ServiceAccount of its
    /// gateway (`trafficRouting.gateway`): get/list/watch EdgeDeployments, list/watch pods.
    #[arg(
        long,
        env = "KASMINA_GATEWAY_CLUSTER_ROLE",
        default_value = "kasmina-gateway"
    )]
    pub gateway_cluster_role: String,

    /// Hosts a ScalingPolicy's Prometheus `serverAddress` may name (comma-separated; exact
    /// names or `*.suffix`). Empty: no Prometheus metric is queried.
    #[arg(long, env = "KASMINA_PROMETHEUS_HOSTS", value_delimiter = ',')]
    pub prometheus_hosts: Vec<String>,

    /// A Secret, in each EdgeDeployment's namespace, with the artifact store's credentials.
    #[arg(long, env = "KASMINA_ARTIFACT_STORE_SECRET")]
    pub artifact_store_secret: Option<String>,

    /// Serve the validating admission webhook (on every replica). Off for `just run` on a
    /// laptop, where the API server cannot call back.
    #[arg(long, env = "KASMINA_WEBHOOK", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook: bool,

    /// Address of the webhook's HTTPS server.
    #[arg(long, env = "KASMINA_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,

    /// The Service in front of the webhook, in the operator's namespace (certificate names).
    #[arg(
        long,
        env = "KASMINA_WEBHOOK_SERVICE",
        default_value = "kasmina-webhook"
    )]
    pub webhook_service: String,

    /// The Secret holding the webhook's certificate (and, when self-managed, its CA).
    #[arg(
        long,
        env = "KASMINA_WEBHOOK_SECRET",
        default_value = "kasmina-webhook-tls"
    )]
    pub webhook_secret: String,

    /// The ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, env = "KASMINA_WEBHOOK_CONFIGURATION", default_value = "kasmina")]
    pub webhook_configuration: String,

    /// `self`: issue and rotate the certificates; `cert-manager`: read the Secret
    /// cert-manager writes (its CA injector sets the caBundle).
    #[arg(long, env = "KASMINA_WEBHOOK_CERTS", default_value = "self")]
    pub webhook_certs: WebhookCerts,

    /// The most reconciles each controller runs at once; the others wait in its queue.
    #[arg(long, env = "KASMINA_MAX_CONCURRENT_RECONCILES", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,

    /// The most requests per second the operator sends the API server (watches count once,
    /// when they start); the rest wait their turn.
    #[arg(long, env = "KASMINA_KUBE_API_QPS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_api_qps: u32,
}

/// Who manages the webhook's certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookCerts {
    #[value(name = "self")]
    SelfManaged,
    CertManager,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<crate::api::Duration>()
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the cluster (in-cluster config or KUBECONFIG): {0}")]
    Connect(#[source] kube::Error),
    #[error(
        "the {GROUP}/{VERSION} CRDs are not installed in this cluster (missing: {missing}). \
         Install them with `kubectl apply -f crds/` (or `kasmina crdgen | kubectl apply -f -`), \
         or install the Helm chart charts/kasmina, then start the controller again"
    )]
    CrdsMissing { missing: String },
    #[error("checking for the {GROUP}/{VERSION} CRDs: {0}")]
    Discovery(#[source] kube::Error),
    #[error("invalid leader election timing: {0}")]
    Timing(String),
    #[error("serving metrics and health on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("lost leadership ({0}); exiting so this replica restarts as a standby")]
    LeadershipLost(String),
    #[error("{0}; the lease was handed over, exiting so this replica restarts")]
    ControllersStopped(String),
    #[error("admission webhook: {0}")]
    Webhook(#[from] compliance_profile::serve::Error),
}

/// Every API permission the operator's code uses: (API group, resource, verbs). The Helm
/// chart's RBAC grants exactly these, which `tests/chart.rs` checks.
pub const PERMISSIONS: &[(&str, &str, &[&str])] = &[
    // patch: only to remove consumed command annotations (never `spec`).
    (
        "kasmina.dev",
        "edgedeployments",
        &["get", "list", "watch", "patch"],
    ),
    ("kasmina.dev", "scalingpolicies", &["get", "list", "watch"]),
    // patch: only the profile's own finalizer (deleting a profile re-evaluates what it governed).
    (
        "kasmina.dev",
        "complianceprofiles",
        &["get", "list", "watch", "patch"],
    ),
    ("kasmina.dev", "edgedeployments/status", &["patch"]),
    ("kasmina.dev", "scalingpolicies/status", &["patch"]),
    ("kasmina.dev", "complianceprofiles/status", &["patch"]),
    // ScalingPolicies set replicas only through the scale subresource, as HPA does.
    ("kasmina.dev", "edgedeployments/scale", &["get", "patch"]),
    // CPU and memory for Cpu and Memory scaling metrics.
    ("metrics.k8s.io", "pods", &["list"]),
    // Namespace labels for ComplianceProfiles' namespaceSelector.
    ("", "namespaces", &["get", "list", "watch"]),
    // Children of EdgeDeployments.
    (
        "batch",
        "jobs",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "services",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // Build pods' termination messages and runtime pods' IPs for analysis scrapes; runtime
    // pods are watched (metadata only) so a crash-looping revision wakes its owner at once.
    ("", "pods", &["list", "watch"]),
    // `optimization.profile: auto` plans for the smallest selected node.
    ("", "nodes", &["list"]),
    // A gateway's ServiceAccount and its RoleBinding to the gateway ClusterRole (bind: that
    // role only).
    ("", "serviceaccounts", &["create", "patch", "delete"]),
    (
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["create", "patch", "delete"],
    ),
    ("rbac.authorization.k8s.io", "clusterroles", &["bind"]),
    // Canary weights through a user's HTTPRoute.
    (
        "gateway.networking.k8s.io",
        "httproutes",
        &["get", "update"],
    ),
    // The webhook's caBundle (the chart narrows it to its own configuration by name).
    (
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
        &["get", "patch"],
    ),
    // Secrets only through Roles: the webhook's certificate in the operator's namespace (get,
    // create, update), and EdgeDeployments' keys in the namespaces the chart's `keys` value
    // lists (get, create, patch).
    ("", "secrets", &["get", "create", "update", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    // Namespaced to the operator's own namespace (a Role, not a ClusterRole).
    (
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
];

/// The cluster's client (in-cluster config or KUBECONFIG), sending at most `qps` requests a
/// second: a burst of reconciles queues in the client instead of storming the API server.
/// Every request is counted, by verb and resource, in `metrics`.
async fn client(qps: u32, metrics: Arc<Metrics>) -> Result<Client, Error> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Connect(kube::Error::InferConfig(e)))?;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(Error::Connect)?;
    let count = tower::util::MapRequestLayer::new(move |request: axum::http::Request<_>| {
        metrics.api_request(request.method(), request.uri());
        request
    });
    Ok(builder
        .with_layer(&rate_limit(qps))
        .with_layer(&count)
        .build())
}

/// `qps` requests a second, granted in tenths of a second so a burst is at most a tenth.
fn rate_limit(qps: u32) -> tower::limit::RateLimitLayer {
    let per_tick = u64::from(qps).div_ceil(10).max(1);
    tower::limit::RateLimitLayer::new(per_tick, std::time::Duration::from_millis(100))
}

/// The plural names the controllers need served.
const PLURALS: [&str; 3] = ["edgedeployments", "scalingpolicies", "complianceprofiles"];

/// Fails with installation instructions when the CRDs are missing, instead of letting the
/// watches retry forever.
pub async fn ensure_crds_installed(client: &Client) -> Result<(), Error> {
    let served: Vec<String> = match client
        .list_api_group_resources(&format!("{GROUP}/{VERSION}"))
        .await
    {
        Ok(list) => list.resources.into_iter().map(|r| r.name).collect(),
        Err(kube::Error::Api(status)) if status.is_not_found() => vec![],
        Err(e) => return Err(Error::Discovery(e)),
    };
    let missing: Vec<&str> = PLURALS
        .iter()
        .copied()
        .filter(|p| !served.iter().any(|s| s == p))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::CrdsMissing {
            missing: missing.join(", "),
        })
    }
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    if config.renew_deadline >= config.lease_duration
        || config.retry_period >= config.renew_deadline
    {
        return Err(Error::Timing(
            "need retry-period < renew-deadline < lease-duration".into(),
        ));
    }
    let mut registry = Registry::with_prefix("kasmina");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let client = client(config.kube_api_qps, metrics.clone()).await?;
    ensure_crds_installed(&client).await?;
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::cancel_on_signal(shutdown.clone()));
    shutdown::watchdog(shutdown.clone(), config.drain_timeout);
    let drain = Drain::new(config.drain_timeout);

    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| Error::Http {
            addr: config.metrics_addr,
            source,
        })?;
    let http = tokio::spawn(telemetry::serve(
        listener,
        Arc::new(registry),
        health.clone(),
        shutdown.clone(),
    ));
    // The operator's own namespace: its Lease and its webhook certificate live there.
    let namespace = config
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    // One watch of the profiles and one of the namespaces, for the webhook and the controllers.
    let policies = cache::Policies::watch(&client, shutdown.clone());
    // Every replica serves the webhook: the API server calls whichever the Service picks.
    let webhook = if config.webhook {
        let location = compliance_profile::certs::Location {
            namespace: namespace.clone(),
            secret: config.webhook_secret.clone(),
            service: config.webhook_service.clone(),
            webhook_configuration: (config.webhook_certs == WebhookCerts::SelfManaged)
                .then(|| config.webhook_configuration.clone()),
        };
        let (ready, webhook_ready) = tokio::sync::oneshot::channel();
        let settings = compliance_profile::serve::WebhookConfig {
            addr: config.webhook_addr,
            location,
            clock: Arc::new(SystemClock),
            ready: Some(ready),
            policies: policies.clone(),
        };
        // The Service sends admission reviews to ready replicas only: ready once the webhook
        // answers truly (caBundle published, caches synced, listener bound).
        let health = health.clone();
        tokio::spawn(async move {
            if webhook_ready.await.is_ok() {
                health.set_ready(true);
            }
        });
        let (client, stop) = (client.clone(), shutdown.clone());
        Some(tokio::spawn(async move {
            let served = compliance_profile::serve::run(client, settings, stop.clone()).await;
            // Without its webhook the replica is not whole: stop, and let it restart.
            if served.is_err() {
                stop.cancel();
            }
            served
        }))
    } else {
        None
    };
    // Standby replicas are ready too: they are healthy and take over when the leader goes.
    if webhook.is_none() {
        health.set_ready(true);
    }

    let identity = process_identity(
        config.identity.as_deref(),
        std::time::SystemTime::now(),
        std::process::id(),
    );
    let controllers = Controllers {
        workload: Settings {
            image: config.image.clone(),
            artifact_store: config.artifact_store.clone(),
            artifact_store_secret: config.artifact_store_secret.clone(),
            host_paths: config.host_paths.clone(),
            gateway_cluster_role: config.gateway_cluster_role.clone(),
        },
        prometheus_hosts: config.prometheus_hosts.clone(),
        concurrency: config.max_concurrent_reconciles,
    };
    let clock = Arc::new(SystemClock);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            metrics.clone(),
            clock.clone(),
            Some(identity.clone()),
        )
        .with_policies(policies),
    );

    let result = if config.leader_elect {
        let timing = LeaseTiming {
            lease_duration: config.lease_duration,
            renew_deadline: config.renew_deadline,
            retry_period: config.retry_period,
        };
        let elector = LeaderElector::new(
            client,
            &namespace,
            &config.lease_name,
            &identity,
            timing,
            clock,
        );
        lead(&elector, ctx, controllers, &metrics, &shutdown, &drain).await
    } else {
        metrics.set_leader(true);
        run_controllers(ctx, controllers, shutdown.clone(), drain.reconciles).await;
        Ok(())
    };

    health.set_ready(false);
    shutdown.cancel();
    match shutdown::within_grace(http, &shutdown, drain.servers).await {
        Some(Ok(Err(source))) => tracing::warn!(%source, "metrics server"),
        None => tracing::warn!("the metrics server did not stop in time"),
        Some(_) => {}
    }
    if let Some(webhook) = webhook {
        match shutdown::within_grace(webhook, &shutdown, drain.servers).await {
            Some(Ok(Err(error))) => {
                tracing::error!(%error, "admission webhook");
                return result.and(Err(Error::Webhook(error)));
            }
            None => tracing::warn!("the webhook server did not stop in time"),
            Some(_) => {}
        }
    }
    tracing::info!("stopped");
    result
}

/// What the controllers are started with, from the command line.
struct Controllers {
    /// How EdgeDeployments' children are made.
    workload: Settings,
    /// Hosts a ScalingPolicy's Prometheus queries may go to.
    prometheus_hosts: Vec<String>,
    /// The most reconciles each controller runs at once.
    concurrency: u16,
}

/// How the drain timeout is shared out after SIGTERM; the watchdog ends the process at the
/// whole of it.
#[derive(Clone, Copy, Debug)]
struct Drain {
    /// Running reconciles finish (then they are abandoned).
    reconciles: std::time::Duration,
    /// Handing the lease over: one read and one write.
    release: std::time::Duration,
    /// Each HTTP server's graceful stop.
    servers: std::time::Duration,
}

impl Drain {
    fn new(total: std::time::Duration) -> Self {
        Self {
            reconciles: total.mul_f64(0.6),
            release: total.mul_f64(0.15),
            servers: total.mul_f64(0.1),
        }
    }
}

/// Waits to lead, runs the controllers while leading, and releases the lease on shutdown.
async fn lead(
    elector: &LeaderElector,
    ctx: Arc<Context>,
    controllers: Controllers,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    drain: &Drain,
) -> Result<(), Error> {
    if !elector.acquire(shutdown).await {
        return Ok(());
    }
    metrics.set_leader(true);
    let leading = shutdown.child_token();
    // A leader whose controllers stopped (a panic, a stream that ended) reconciles nothing:
    // it steps down instead of renewing on, and exits.
    let done = CancellationToken::new();
    let controllers = {
        let finished = done.clone().drop_guard();
        let (leading, grace) = (leading.clone(), drain.reconciles);
        tokio::spawn(async move {
            let _finished = finished;
            run_controllers(ctx, controllers, leading, grace).await;
        })
    };
    let held = elector.hold_while(&leading, &done).await;
    // Stop reconciling first (running reconciles finish, within their share of the drain),
    // then hand the lease over.
    leading.cancel();
    let ended = controllers.await;
    metrics.set_leader(false);
    let held = match (held, ended) {
        (Held::Abandoned(_), Err(e)) if e.is_panic() => {
            Held::Abandoned("the controllers panicked".into())
        }
        (held, _) => held,
    };
    if let Held::Abandoned(why) = &held {
        tracing::error!(%why, "stepping down");
    }
    if matches!(held, Held::Stopped | Held::Abandoned(_)) {
        match tokio::time::timeout(drain.release, elector.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                %error,
                "could not release the lease; a standby takes over when it expires"
            ),
            Err(_) => tracing::warn!(
                "the lease release got no answer in time; a standby takes over when it expires"
            ),
        }
    }
    match held {
        Held::Stopped => Ok(()),
        Held::Lost(why) => Err(Error::LeadershipLost(why)),
        Held::Abandoned(why) => Err(Error::ControllersStopped(why)),
    }
}

/// Runs the three controllers until `stop` fires, then lets their running reconciles finish
/// for at most `grace` (a controller whose caches never synced would wait forever).
async fn run_controllers(
    ctx: Arc<Context>,
    controllers: Controllers,
    stop: CancellationToken,
    grace: std::time::Duration,
) {
    // A reconcile judging by a half-filled profile cache would miss an Enforce profile.
    tokio::select! {
        synced = ctx.policies.synced() => if synced.is_err() {
            return;
        },
        () = stop.cancelled() => return,
    }
    tracing::info!("starting controllers");
    let config = kube::runtime::controller::Config::default().concurrency(controllers.concurrency);
    // One watch of EdgeDeployments: the EdgeDeployment controller fills the cache, the
    // ComplianceProfile controller reads it.
    let (deployments, writer) = kube::runtime::reflector::store();
    let (changed, changes) = cache::Changes::channel();
    let deployments_synced = cache::Synced::store(deployments.clone());
    let shared = edge_deployment::Shared { writer, changed };
    let all = async {
        tokio::join!(
            edge_deployment::run(
                ctx.clone(),
                controllers.workload,
                config.clone(),
                shared,
                stop.clone().cancelled_owned()
            ),
            scaling_policy::run(
                Arc::new(
                    scaling_policy::reconcile::ScalingContext::new(ctx.clone())
                        .with_prometheus_hosts(controllers.prometheus_hosts)
                ),
                config.clone(),
                stop.clone().cancelled_owned()
            ),
            compliance_profile::run(
                ctx,
                config.clone(),
                deployments,
                changes,
                deployments_synced,
                stop.clone().cancelled_owned()
            ),
        )
    };
    match shutdown::within_grace(all, &stop, grace).await {
        Some(_) => tracing::info!("controllers stopped"),
        None => tracing::warn!(
            ?grace,
            "controllers did not stop in time (caches never synced, or reconciles still \
             running); abandoned"
        ),
    }
}

/// `<pod or host name>_<suffix>`: the suffix differs for every process started, so the
/// holder of a Lease names the process that holds its state in memory.
fn process_identity(base: Option<&str>, started: std::time::SystemTime, pid: u32) -> String {
    let base = base
        .map(str::to_owned)
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "kasmina".into());
    let nanos = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let suffix = edge_deployment::names::fnv1a64(format!("{pid}/{nanos}").as_bytes());
    format!("{base}_{:08x}", suffix as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found on the real control plane: 1,000 EdgeDeployments applied at once sent their
    /// Service applies all together, and the API server answered thousands of them 504.
    #[tokio::test(start_paused = true)]
    async fn the_client_sends_at_most_its_rate() {
        use tower::{Layer, Service, ServiceExt};
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = served.clone();
        let inner = tower::service_fn(move |()| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(()) }
        });
        let mut limited = rate_limit(100).layer(inner);
        let start = tokio::time::Instant::now();
        for _ in 0..250 {
            limited.ready().await.unwrap().call(()).await.unwrap();
        }
        let took = start.elapsed();
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 250);
        // 100 a second: the 250th request goes out in the 25th tenth of a second.
        assert!(took >= std::time::Duration::from_millis(2400), "{took:?}");
        assert!(took < std::time::Duration::from_millis(2600), "{took:?}");
    }

    /// Found on a real cluster: a leader SIGKILLed and restarted in its pod came back under the
    /// same name and went on as leader at once, as if nothing had happened.
    #[test]
    fn a_restarted_process_is_a_new_candidate() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let first = process_identity(Some("kasmina-7d9-abcde"), t, 1);
        let again = process_identity(
            Some("kasmina-7d9-abcde"),
            t + std::time::Duration::from_secs(2),
            1,
        );
        assert!(first.starts_with("kasmina-7d9-abcde_"), "{first}");
        assert_ne!(first, again, "same pod, new process, new identity");
        assert_eq!(first, process_identity(Some("kasmina-7d9-abcde"), t, 1));
    }
}
