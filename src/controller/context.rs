//! What every reconcile shares: the client, the clock, metrics and the event recorder.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::cache::Policies;

/// The field manager of every server-side apply Kasmina makes.
pub const FIELD_MANAGER: &str = "kasmina";

/// The source of "now". Reconcilers never read the system clock directly, so tests drive time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that stands still at a given instant (tests and simulations).
pub struct FixedClock(pub Timestamp);

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// Per-object exponential backoff after failed reconciles, as client-go's per-item rate
/// limiter: 1 s, 2 s, 4 s … at most 5 min; a successful reconcile starts it over. A fixed
/// retry would hammer the API server with every broken object at the same pace.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Backoff {
    pub const FIRST: std::time::Duration = std::time::Duration::from_secs(1);
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(300);

    /// The key of an object: kind, namespace and name.
    pub fn key<K: kube::Resource<DynamicType = ()>>(object: &K) -> String {
        format!(
            "{}/{}/{}",
            K::kind(&()),
            object.meta().namespace.as_deref().unwrap_or_default(),
            object.meta().name.as_deref().unwrap_or_default()
        )
    }

    /// Records a failure of `key`; returns how long to wait before its next reconcile.
    pub fn failed(&self, key: &str) -> std::time::Duration {
        let mut failures = match self.failures.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let doublings = (*n - 1).min(16);
        Self::FIRST.saturating_mul(1 << doublings).min(Self::MAX)
    }

    /// Forgets the failures of `key` (its reconcile succeeded, or it is gone).
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

/// A clock that moves only when told (tests and simulations).
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<Timestamp>);

impl ManualClock {
    pub fn new(at: Timestamp) -> Self {
        Self(std::sync::Mutex::new(at))
    }

    pub fn advance(&self, by: std::time::Duration) {
        if let Ok(mut now) = self.0.lock() {
            *now = now
                .checked_add(k8s_openapi::jiff::SignedDuration::try_from(by).unwrap_or_default())
                .unwrap_or(*now);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.0
            .lock()
            .map(|now| *now)
            .unwrap_or_else(|e| *e.into_inner())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    controller: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    namespace: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScaleLabels {
    namespace: String,
    policy: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: &'static str,
    resource: String,
}

/// The operator's own metrics, per controller, and the autoscaler's decisions.
pub struct Metrics {
    api_requests: Family<RequestLabels, Counter>,
    reconciliations: Family<ControllerLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabel, Histogram>,
    leader: Gauge,
    scale_events: Family<ScaleLabels, Counter>,
    desired_replicas: Family<PolicyLabels, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them (names get the registry's `kasmina_` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            api_requests: Family::default(),
            reconciliations: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            leader: Gauge::default(),
            scale_events: Family::default(),
            desired_replicas: Family::default(),
        };
        registry.register(
            "scaling_events",
            "Replica changes made by ScalingPolicies, by policy and direction (up, down)",
            metrics.scale_events.clone(),
        );
        registry.register(
            "scaling_desired_replicas",
            "Replicas each ScalingPolicy last decided on",
            metrics.desired_replicas.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciliations started, by controller",
            metrics.reconciliations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed, by controller and error kind",
            metrics.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation, by controller",
            metrics.duration.clone(),
        );
        registry.register(
            "kube_api_requests",
            "Requests the operator sent the API server, by verb (get, list, watch, create, \
             apply, patch, update, delete) and resource",
            metrics.api_requests.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controllers",
            metrics.leader.clone(),
        );
        metrics
    }

    /// Counts a reconciliation and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciliations
            .get_or_create(&ControllerLabel { controller })
            .inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: std::time::Instant::now(),
        }
    }

    /// Counts one request to the API server.
    pub fn api_request(&self, method: &axum::http::Method, uri: &axum::http::Uri) {
        let (verb, resource) = request_labels(method, uri);
        self.api_requests
            .get_or_create(&RequestLabels { verb, resource })
            .inc();
    }

    pub fn reconcile_failed(&self, controller: &'static str, error: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { controller, error })
            .inc();
    }

    /// A ScalingPolicy changed its target's replicas.
    pub fn scaled(&self, namespace: &str, policy: &str, up: bool) {
        self.scale_events
            .get_or_create(&ScaleLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                direction: if up { "up" } else { "down" },
            })
            .inc();
    }

    pub fn desired_replicas(&self, namespace: &str, policy: &str, replicas: i32) {
        self.desired_replicas
            .get_or_create(&PolicyLabels {
                namespace: namespace.into(),
                policy: policy.into(),
            })
            .set(i64::from(replicas));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

/// The Kubernetes verb and resource (`pods`, `edgedeployments/status`) of a request, as the
/// API server's own metrics name them.
fn request_labels(method: &axum::http::Method, uri: &axum::http::Uri) -> (&'static str, String) {
    // /api/v1/[namespaces/<ns>/]<resource>[/<name>[/<subresource>]], /apis/<group>/<version>/…
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [] => ("", false),
        [resource] => (*resource, false),
        [resource, _name] => (*resource, true),
        [resource, _name, sub, ..] => {
            return (verb(method, uri, true), format!("{resource}/{sub}"));
        }
    };
    (verb(method, uri, named), resource.to_owned())
}

fn verb(method: &axum::http::Method, uri: &axum::http::Uri, named: bool) -> &'static str {
    let query = uri.query().unwrap_or_default();
    match *method {
        axum::http::Method::GET
            if query
                .split('&')
                .any(|kv| kv == "watch=true" || kv == "watch=1") =>
        {
            "watch"
        }
        axum::http::Method::GET if named => "get",
        axum::http::Method::GET => "list",
        axum::http::Method::POST => "create",
        axum::http::Method::PUT => "update",
        axum::http::Method::DELETE => "delete",
        // Server-side apply is a PATCH with a field manager and the apply content type; the
        // query alone tells it from a merge patch here.
        axum::http::Method::PATCH if query.contains("fieldManager") && query.contains("force") => {
            "apply"
        }
        axum::http::Method::PATCH => "patch",
        _ => "other",
    }
}

/// Records the duration of a reconciliation when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&ControllerLabel {
                controller: self.controller,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// An Event a plan asks for: decided by pure code, published by the reconciler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    /// CamelCase reason, shown by `kubectl describe`.
    pub reason: String,
    /// What happened, for a person.
    pub message: String,
    /// The action taken, CamelCase.
    pub action: &'static str,
}

impl Notice {
    pub fn normal(reason: &str, action: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason: reason.into(),
            message: message.into(),
            action,
        }
    }

    /// The Event it is published as.
    pub fn event(&self) -> Event {
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.clone(),
            note: Some(truncate(&self.message, 1024)),
            action: self.action.into(),
            secondary: None,
        }
    }

    pub fn warning(reason: &str, action: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason: reason.into(),
            message: message.into(),
            action,
        }
    }
}

/// Shared state of the three controllers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// `kasmina (<pod>)`: who the operator's own decisions are by, in audit records.
    pub instance: String,
    /// Retry delays of failed reconciles, per object (the three controllers share it).
    pub backoff: Backoff,
    /// The ComplianceProfiles and namespace labels, from the process's one watch of each.
    pub policies: Policies,
}

impl Context {
    /// The error policy of the three controllers: the failure logged with its retry and
    /// counted by kind; the object retried after its backoff.
    pub fn retry_failed<K: kube::Resource<DynamicType = ()>>(
        &self,
        controller: &'static str,
        object: &K,
        error: &dyn std::fmt::Display,
        kind: &'static str,
    ) -> kube::runtime::controller::Action {
        let retry = self.backoff.failed(&Backoff::key(object));
        tracing::warn!(%error, ?retry, controller, "reconcile failed");
        self.metrics.reconcile_failed(controller, kind);
        kube::runtime::controller::Action::requeue(retry)
    }

    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        instance: Option<String>,
    ) -> Self {
        let name = match &instance {
            Some(i) => format!("kasmina ({i})"),
            None => "kasmina".into(),
        };
        let reporter = Reporter {
            controller: "kasmina".into(),
            instance,
        };
        Self {
            instance: name,
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            clock,
            backoff: Backoff::default(),
            policies: Policies::default(),
        }
    }

    /// The same context judging by `policies` (the process's watched caches, or a test's).
    pub fn with_policies(mut self, policies: Policies) -> Self {
        self.policies = policies;
        self
    }

    /// Publishes the notices as Events on `regarding`. Events are best effort: a failure is
    /// logged, never fails the reconcile.
    pub async fn publish(&self, regarding: &ObjectReference, notices: &[Notice]) {
        for notice in notices {
            if let Err(error) = self.recorder.publish(&notice.event(), regarding).await {
                tracing::warn!(%error, reason = %notice.reason, "could not publish event");
            }
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary (Event notes are limited to 1 kB).
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_verb_and_resource() {
        let cases = [
            (
                "GET",
                "/api/v1/namespaces/ml/pods?labelSelector=a%3Db",
                ("list", "pods"),
            ),
            (
                "GET",
                "/api/v1/pods?watch=true&resourceVersion=1",
                ("watch", "pods"),
            ),
            ("GET", "/api/v1/namespaces/ml", ("get", "namespaces")),
            ("GET", "/api/v1/namespaces", ("list", "namespaces")),
            (
                "PATCH",
                "/apis/kasmina.dev/v1alpha1/namespaces/ml/edgedeployments/a/status?fieldManager=kasmina&force=true",
                ("apply", "edgedeployments/status"),
            ),
            (
                "PATCH",
                "/apis/kasmina.dev/v1alpha1/namespaces/ml/edgedeployments/a",
                ("patch", "edgedeployments"),
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/ml/events",
                ("create", "events"),
            ),
            (
                "DELETE",
                "/apis/batch/v1/namespaces/ml/jobs/j",
                ("delete", "jobs"),
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/k/leases/l",
                ("update", "leases"),
            ),
        ];
        for (method, uri, (verb, resource)) in cases {
            let got = request_labels(&method.parse().unwrap(), &uri.parse().unwrap());
            assert_eq!(got, (verb, resource.to_owned()), "{method} {uri}");
        }
    }

    /// Found in review: every failing object was retried every 15 s, whatever the cause.
    #[test]
    fn failures_back_off_per_object_and_a_success_starts_over() {
        let backoff = Backoff::default();
        let secs: Vec<u64> = (0..11)
            .map(|_| backoff.failed("EdgeDeployment/ml/a").as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(
            backoff.failed("EdgeDeployment/ml/b").as_secs(),
            1,
            "per object"
        );
        backoff.succeeded("EdgeDeployment/ml/a");
        assert_eq!(backoff.failed("EdgeDeployment/ml/a").as_secs(), 1);
    }
}
