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

/// The operator's own metrics, per controller, and the autoscaler's decisions.
pub struct Metrics {
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
}

impl Context {
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
        }
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
