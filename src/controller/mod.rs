//! `kasmina controller`: the operator. Connects to the cluster, checks the CRDs, serves
//! metrics and health, wins the leader election, then runs the three controllers until
//! SIGTERM (finishing running reconciles and releasing the lease).

pub mod audit;
pub mod compliance_profile;
pub mod context;
pub mod edge_deployment;
pub mod leader;
pub mod scaling_policy;
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

    /// This replica's identity in the election; defaults to the pod name or host name.
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
    // Build pods' termination messages and runtime pods' IPs for analysis scrapes.
    ("", "pods", &["list"]),
    // `optimization.profile: auto` plans for the smallest selected node.
    ("", "nodes", &["list"]),
    // Canary weights through a user's HTTPRoute.
    ("gateway.networking.k8s.io", "httproutes", &["get", "patch"]),
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
    let client = Client::try_default().await.map_err(Error::Connect)?;
    ensure_crds_installed(&client).await?;

    let mut registry = Registry::with_prefix("kasmina");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::cancel_on_signal(shutdown.clone()));

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
    // Every replica serves the webhook: the API server calls whichever the Service picks.
    let webhook = if config.webhook {
        let location = compliance_profile::certs::Location {
            namespace: namespace.clone(),
            secret: config.webhook_secret.clone(),
            service: config.webhook_service.clone(),
            webhook_configuration: (config.webhook_certs == WebhookCerts::SelfManaged)
                .then(|| config.webhook_configuration.clone()),
        };
        let settings = compliance_profile::serve::WebhookConfig {
            addr: config.webhook_addr,
            location,
            clock: Arc::new(SystemClock),
        };
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
    health.set_ready(true);

    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let settings = Settings {
        image: config.image.clone(),
        artifact_store: config.artifact_store.clone(),
        artifact_store_secret: config.artifact_store_secret.clone(),
    };
    let clock = Arc::new(SystemClock);
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        clock.clone(),
        Some(identity.clone()),
    ));

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
        lead(&elector, ctx, settings, &metrics, &shutdown).await
    } else {
        metrics.set_leader(true);
        run_controllers(ctx, settings, shutdown.clone()).await;
        Ok(())
    };

    health.set_ready(false);
    shutdown.cancel();
    if let Ok(Err(source)) = http.await {
        tracing::warn!(%source, "metrics server");
    }
    if let Some(webhook) = webhook
        && let Ok(Err(error)) = webhook.await
    {
        tracing::error!(%error, "admission webhook");
        return result.and(Err(Error::Webhook(error)));
    }
    result
}

/// Waits to lead, runs the controllers while leading, and releases the lease on shutdown.
async fn lead(
    elector: &LeaderElector,
    ctx: Arc<Context>,
    settings: Settings,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    if !elector.acquire(shutdown).await {
        return Ok(());
    }
    metrics.set_leader(true);
    let leading = shutdown.child_token();
    let controllers = tokio::spawn(run_controllers(ctx, settings, leading.clone()));
    let held = elector.hold(&leading).await;
    // Stop reconciling first (running reconciles finish), then hand the lease over.
    leading.cancel();
    let _ = controllers.await;
    metrics.set_leader(false);
    match held {
        Held::Stopped => {
            if let Err(error) = elector.release().await {
                tracing::warn!(%error, "could not release the lease; a standby takes over when it expires");
            }
            Ok(())
        }
        Held::Lost(why) => Err(Error::LeadershipLost(why)),
    }
}

/// Runs the three controllers until `stop` fires, then lets their running reconciles finish.
async fn run_controllers(ctx: Arc<Context>, settings: Settings, stop: CancellationToken) {
    tracing::info!("starting controllers");
    let edge = Arc::new(edge_deployment::reconcile::EdgeContext::new(
        ctx.clone(),
        settings,
    ));
    tokio::join!(
        edge_deployment::run(edge, stop.clone().cancelled_owned()),
        scaling_policy::run(
            Arc::new(scaling_policy::reconcile::ScalingContext::new(ctx.clone())),
            stop.clone().cancelled_owned()
        ),
        compliance_profile::run(ctx, stop.cancelled_owned()),
    );
    tracing::info!("controllers stopped");
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "kasmina".into());
    format!("{host}-{}", std::process::id())
}
