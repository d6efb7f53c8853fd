//! `ScalingPolicy`: autoscale an EdgeDeployment on the load its runtime reports.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, conditions_schema};
use super::duration::Duration;
use super::validation::FieldErrors;

/// Autoscales an EdgeDeployment on the cognitive load its runtime reports, plus queue depth,
/// latency, CPU, memory or a Prometheus query.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kasmina.dev",
    version = "v1alpha1",
    kind = "ScalingPolicy",
    plural = "scalingpolicies",
    namespaced,
    status = "ScalingPolicyStatus",
    shortname = "sp",
    category = "kasmina",
    derive = "PartialEq",
    doc = "Autoscales an EdgeDeployment on the cognitive load its runtime reports (in-flight and queued work against capacity), queue depth, latency, CPU and memory.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicas"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicas"),
    printcolumn(
        name = "Current",
        type_ = "integer",
        json_path = ".status.currentReplicas"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Load",
        type_ = "number",
        json_path = ".status.cognitiveLoad",
        description = "Mean cognitive load per replica"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicySpec {
    /// The EdgeDeployment to scale, in the same namespace.
    pub target_ref: TargetRef,

    /// Never fewer replicas than this. 0 lets the target go to zero after `idleWindow`
    /// without a request, which needs the target's `trafficRouting.gateway`: the gateway
    /// holds the next request and wakes it.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,

    /// Never more replicas than this.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// How often the runtime pods' metrics are scraped.
    #[serde(default = "default_scrape_interval")]
    pub scrape_interval: Duration,

    /// With `minReplicas: 0`: how long the gateway must see no request, none in flight and
    /// none held, before the target goes to zero. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_window: Option<Duration>,

    /// The metrics to scale on; the largest proposal wins.
    #[schemars(length(min = 1, max = 16))]
    pub metrics: Vec<MetricSpec>,

    /// Tolerance, stabilization windows, cooldowns and rate limits.
    #[serde(default)]
    pub behavior: Behavior,

    /// Scale up ahead of a rising trend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictive: Option<Predictive>,

    /// What to do when metrics cannot be collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_scrape_interval() -> Duration {
    Duration::from_secs(5)
}

/// The idle window when `idleWindow` is not set (KEDA's default cooldown).
pub const DEFAULT_IDLE_WINDOW: Duration = Duration::from_secs(300);

impl ScalingPolicySpec {
    /// How long the target must be idle before it goes to zero.
    pub fn idle_window(&self) -> Duration {
        self.idle_window.unwrap_or(DEFAULT_IDLE_WINDOW)
    }
}

/// The object a ScalingPolicy scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API version of the target; only `kasmina.dev/v1alpha1`.
    #[serde(default = "default_target_api_version")]
    #[schemars(regex(pattern = r"^kasmina\.dev/v1alpha1$"))]
    pub api_version: String,

    /// Kind of the target; only `EdgeDeployment`.
    pub kind: TargetKind,

    /// Name of the target in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_target_api_version() -> String {
    "kasmina.dev/v1alpha1".into()
}

/// Kinds a ScalingPolicy can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TargetKind {
    EdgeDeployment,
}

/// Kinds of scaling metrics.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum MetricType {
    /// (in-flight + queued) / capacity per replica, as the runtime reports it. Uses `target`.
    CognitiveLoad,
    /// Requests waiting for a batch slot per replica. Uses `targetPerReplica`.
    QueueDepth,
    /// A latency percentile in milliseconds. Uses `percentile` and `targetMs`.
    Latency,
    /// CPU utilization in percent of the requests. Uses `utilization`.
    Cpu,
    /// Memory utilization in percent of the requests. Uses `utilization`.
    Memory,
    /// A Prometheus query's value against `target`. Uses `query`, `serverAddress`, `target`.
    Prometheus,
}

/// One scaling metric. Which fields apply depends on `type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(self.type in ['CognitiveLoad', 'Prometheus']) || has(self.target)",
     "message": "target is required for CognitiveLoad and Prometheus metrics"},
    {"rule": "self.type != 'QueueDepth' || has(self.targetPerReplica)",
     "message": "targetPerReplica is required for QueueDepth metrics"},
    {"rule": "self.type != 'Latency' || has(self.targetMs)",
     "message": "targetMs is required for Latency metrics"},
    {"rule": "!(self.type in ['Cpu', 'Memory']) || has(self.utilization)",
     "message": "utilization is required for Cpu and Memory metrics"},
    {"rule": "self.type != 'Prometheus' || (has(self.query) && has(self.serverAddress))",
     "message": "query and serverAddress are required for Prometheus metrics"}
]))]
pub struct MetricSpec {
    /// The kind of metric.
    #[serde(rename = "type")]
    pub type_: MetricType,

    /// Target value: per-replica cognitive load (e.g. 0.7), or the Prometheus query's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub target: Option<f64>,

    /// Target queued requests per replica (QueueDepth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub target_per_replica: Option<f64>,

    /// Latency percentile (Latency), default 95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 99.99))]
    pub percentile: Option<f64>,

    /// Target latency in milliseconds at the percentile (Latency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub target_ms: Option<f64>,

    /// Target utilization in percent of the container's requests (Cpu, Memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub utilization: Option<i32>,

    /// PromQL query returning one number (Prometheus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: Option<String>,

    /// Base URL of the Prometheus HTTP API (Prometheus), e.g. `http://prometheus.monitoring:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+$"))]
    pub server_address: Option<String>,
}

/// How fast, and how steadily, replicas change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Behavior {
    /// Relative deviation from target ignored as noise (HPA's tolerance). Default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: Option<f64>,

    /// Rules for scaling up. Defaults: no stabilization, no cooldown, +900 % or +4 pods per 15 s
    /// (the cognitive load measures demand directly, so one step reaches it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,

    /// Rules for scaling down. Defaults: 60 s stabilization, 60 s cooldown, -100 % per 15 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

/// Rules for one direction of scaling, with HPA's semantics plus a cooldown.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// Use the most conservative recommendation of this many past seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: Option<i32>,

    /// Minimum seconds between two scale events in this direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub cooldown_seconds: Option<i32>,

    /// Which policy limits the change when several apply. Default Max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<SelectPolicy>,

    /// Rate limits on the change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub policies: Vec<RatePolicy>,
}

/// How several rate policies combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectPolicy {
    /// The policy allowing the largest change.
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// A rate limit: at most `value` pods, or `value` percent, per `periodSeconds`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RatePolicy {
    /// Pods or Percent.
    #[serde(rename = "type")]
    pub type_: RatePolicyType,
    /// The amount of change allowed per period.
    #[schemars(range(min = 1))]
    pub value: i32,
    /// The period in seconds.
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: i32,
}

/// Units of a rate policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RatePolicyType {
    Pods,
    Percent,
}

/// Predictive scale-up from the trend of recent samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Predictive {
    /// Whether forecasts may raise the replica count (they never lower it).
    #[serde(default)]
    pub enabled: bool,
    /// How far ahead to forecast, in seconds; about the runtime's start-up time.
    #[serde(default = "default_horizon")]
    #[schemars(range(min = 5, max = 3600))]
    pub horizon_seconds: i32,
}

fn default_horizon() -> i32 {
    60
}

/// Replicas to hold when metrics cannot be collected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// Consecutive failed collections before falling back.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
    /// Replicas while falling back.
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
}

fn default_failure_threshold() -> i32 {
    3
}

/// The observed state of a ScalingPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicyStatus {
    /// The `.metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas of the target now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Replicas the policy last decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Mean cognitive load per replica at the last collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cognitive_load: Option<f64>,
    /// When replicas last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The value of each metric at the last collection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current_metrics: Vec<MetricValue>,
    /// AbleToScale, ScalingActive, ScalingLimited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The most recent scale decisions, newest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub history: Vec<ScaleRecord>,
}

/// One metric's value against its target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricValue {
    /// The kind of metric.
    #[serde(rename = "type")]
    pub type_: MetricType,
    /// Measured value (per replica where the metric is per replica).
    pub value: f64,
    /// The target it is compared with.
    pub target: f64,
    /// Replicas this metric alone proposes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed_replicas: Option<i32>,
}

/// One scale decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleRecord {
    /// When replicas changed.
    pub time: Time,
    /// Replicas before.
    pub from: i32,
    /// Replicas after.
    pub to: i32,
    /// Why, in words, e.g. "cognitive load 0.93 > 0.70: 4 → 6".
    pub reason: String,
}

impl ScalingPolicySpec {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        if self.min_replicas > self.max_replicas {
            errors.push(
                "spec.minReplicas",
                format!(
                    "{} is greater than spec.maxReplicas {}",
                    self.min_replicas, self.max_replicas
                ),
            );
        }
        if self.scrape_interval.as_std() < std::time::Duration::from_secs(1) {
            errors.push(
                "spec.scrapeInterval",
                format!("{} is shorter than the 1s minimum", self.scrape_interval),
            );
        }
        if let Some(window) = &self.idle_window
            && window.as_std() < 2 * self.scrape_interval.as_std()
        {
            // One scrape cannot tell a quiet interval from a missed one.
            errors.push(
                "spec.idleWindow",
                format!(
                    "{window} is shorter than two spec.scrapeInterval ({})",
                    self.scrape_interval
                ),
            );
        }
        if self.metrics.is_empty() {
            errors.push("spec.metrics", "needs at least one metric");
        }
        for (i, metric) in self.metrics.iter().enumerate() {
            validate_metric(metric, &format!("spec.metrics[{i}]"), &mut errors);
        }
        if let Some(fallback) = &self.fallback
            && !(self.min_replicas..=self.max_replicas).contains(&fallback.replicas)
        {
            errors.push(
                "spec.fallback.replicas",
                format!(
                    "{} is outside spec.minReplicas..spec.maxReplicas ({}..{})",
                    fallback.replicas, self.min_replicas, self.max_replicas
                ),
            );
        }
        for (direction, rules) in [
            ("scaleUp", &self.behavior.scale_up),
            ("scaleDown", &self.behavior.scale_down),
        ] {
            for (i, policy) in rules.iter().flat_map(|r| r.policies.iter()).enumerate() {
                if policy.type_ == RatePolicyType::Percent && policy.value > 1000 {
                    errors.push(
                        format!("spec.behavior.{direction}.policies[{i}].value"),
                        format!("{}% is more than the 1000% maximum", policy.value),
                    );
                }
            }
        }
        errors.into_result()
    }
}

fn validate_metric(metric: &MetricSpec, path: &str, errors: &mut FieldErrors) {
    use MetricType::*;
    // Each type has its own fields: a missing one is an error, and so is another type's field,
    // which would silently do nothing.
    let fields: [(&str, bool, &[MetricType]); 7] = [
        (
            "target",
            metric.target.is_some(),
            &[CognitiveLoad, Prometheus],
        ),
        (
            "targetPerReplica",
            metric.target_per_replica.is_some(),
            &[QueueDepth],
        ),
        ("percentile", metric.percentile.is_some(), &[Latency]),
        ("targetMs", metric.target_ms.is_some(), &[Latency]),
        ("utilization", metric.utilization.is_some(), &[Cpu, Memory]),
        ("query", metric.query.is_some(), &[Prometheus]),
        (
            "serverAddress",
            metric.server_address.is_some(),
            &[Prometheus],
        ),
    ];
    for (field, set, used_by) in fields {
        let applies = used_by.contains(&metric.type_);
        // percentile is optional for Latency (default 95); everything else that applies is required.
        let required = applies && field != "percentile";
        if required && !set {
            errors.push(
                format!("{path}.{field}"),
                format!("required for type {:?}", metric.type_),
            );
        } else if !applies && set {
            errors.push(
                format!("{path}.{field}"),
                format!("does not apply to type {:?}", metric.type_),
            );
        }
    }
    for (field, value) in [
        ("target", metric.target),
        ("targetPerReplica", metric.target_per_replica),
        ("targetMs", metric.target_ms),
    ] {
        if value.is_some_and(|v| v <= 0.0) {
            errors.push(format!("{path}.{field}"), "must be greater than 0");
        }
    }
}
