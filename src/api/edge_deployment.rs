//! `EdgeDeployment`: a model, how to optimise it for the target devices, where it runs and how
//! new versions roll out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, conditions_schema};
use super::duration::Duration;
use super::validation::FieldErrors;

/// An ML model served on edge or cluster nodes by the Kasmina runtime, built into an artifact
/// sized for the target devices and rolled out blue-green, canary or rolling.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kasmina.dev",
    version = "v1alpha1",
    kind = "EdgeDeployment",
    namespaced,
    status = "EdgeDeploymentStatus",
    shortname = "ed",
    category = "kasmina",
    derive = "PartialEq",
    doc = "An ML model served on edge or cluster nodes by the Kasmina runtime, optimised for the target devices and rolled out with analysis and automatic rollback.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.name"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.model.version"),
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.strategy.type"),
    printcolumn(
        name = "Weight",
        type_ = "integer",
        json_path = ".status.canaryWeight",
        description = "Percent of traffic on the new revision"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeploymentSpec {
    /// The model to serve: its identity, where its weights live and its architecture.
    pub model: ModelSpec,

    /// How the model is optimised into an artifact for the target devices.
    #[serde(default)]
    pub optimization: OptimizationSpec,

    /// Desired number of runtime replicas. A ScalingPolicy targeting this EdgeDeployment sets
    /// it through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Scheduling and resources of the runtime pods.
    #[serde(default)]
    pub template: RuntimeTemplate,

    /// How a new revision replaces the current one.
    #[serde(default)]
    pub strategy: StrategySpec,

    /// Stop rollout progress where it is; traffic stays as it is until resumed.
    #[serde(default)]
    pub paused: bool,

    /// Built revisions remembered in status (their artifacts are reused when the spec returns
    /// to them, e.g. after a revert in git).
    #[serde(default = "default_revision_history_limit")]
    #[schemars(range(min = 1, max = 10))]
    pub revision_history_limit: u32,
}

fn default_revision_history_limit() -> u32 {
    5
}

fn default_replicas() -> i32 {
    1
}

/// Which model to serve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The model's name, served as the Open Inference Protocol model name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The model's version; changing it starts a new revision.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    )]
    pub version: String,

    /// Where the model's weights are.
    pub source: ModelSource,

    /// The network architecture of the model.
    pub architecture: Architecture,
}

/// The location of a model's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// URI of a Hugging Face layout folder (`config.json` + safetensors) or a single
    /// `.safetensors` file: `s3://`, `gs://`, `az://`, `https://` or `file://` (a PVC or hostPath
    /// mounted into the build Job).
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^(s3|gs|az|https|file)://.+$")
    )]
    pub uri: String,

    /// A Secret in the same namespace holding the credentials for the source (keys as the
    /// object store expects, e.g. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A reference to a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Model architectures the builder and runtime know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT-family sentence encoders (all-MiniLM and kin): text in, embeddings out.
    Bert,
    /// Multi-layer perceptrons for tabular data: FP32 tensors in and out.
    Mlp,
}

/// How the model is optimised for the target device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizationSpec {
    /// The device to plan for. When omitted the controller plans automatically for the smallest
    /// allocatable memory among the nodes the template selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<DeviceProfile>,

    /// Weight quantization; `auto` lets the planner choose per tensor to fit the profile.
    #[serde(default)]
    pub quantization: Quantization,

    /// Optional weight pruning before quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruningSpec>,

    /// The build fails when the measured quality loss (1 − cosine similarity against the
    /// original model) exceeds this.
    #[serde(default = "default_max_quality_loss")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_quality_loss: f64,
}

fn default_max_quality_loss() -> f64 {
    0.02
}

// By hand, not derived: an omitted `optimization` must allow the same 0.02 as an empty one
// (a derived Default gave 0.0, and the CRD's default for the object carried it).
impl Default for OptimizationSpec {
    fn default() -> Self {
        Self {
            profile: None,
            quantization: Quantization::default(),
            pruning: None,
            max_quality_loss: default_max_quality_loss(),
        }
    }
}

/// The resources of the target device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProfile {
    /// Memory available to the runtime, in MiB.
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = 16, max = 1048576))]
    pub memory_mib: u32,

    /// CPU cores available to the runtime.
    #[serde(default = "default_cpu_cores")]
    #[schemars(range(min = 1, max = 1024))]
    pub cpu_cores: u32,

    /// Accelerator on the device.
    #[serde(default)]
    pub accelerator: Accelerator,
}

fn default_cpu_cores() -> u32 {
    1
}

/// Accelerators a device may have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    #[default]
    None,
    Cuda,
    Metal,
}

/// Weight quantization schemes (GGUF block formats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Quantization {
    /// Per-tensor choice by the planner to fit the device profile with the least loss.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_k")]
    Q4K,
    #[serde(rename = "f16")]
    F16,
    /// Keep the source precision.
    #[serde(rename = "none")]
    None,
}

/// Weight pruning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PruningSpec {
    /// `magnitude` zeroes the smallest weights of each tensor; `semi-structured-2:4` zeroes two
    /// of every four consecutive weights (sparsity 0.5).
    pub method: PruningMethod,

    /// Fraction of weights set to zero. Required for `magnitude`; `semi-structured-2:4` is
    /// always 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 0.95))]
    pub sparsity: Option<f64>,
}

/// Pruning methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PruningMethod {
    #[serde(rename = "magnitude")]
    Magnitude,
    #[serde(rename = "semi-structured-2:4")]
    SemiStructured24,
}

/// Scheduling and resources of the runtime pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeTemplate {
    /// Nodes the runtime may run on; also the nodes `profile: auto` plans for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the runtime pods (e.g. for tainted edge nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity of the runtime pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Compute resources of the runtime container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Priority class of the runtime pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// How a new revision replaces the current one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StrategySpec {
    /// `Rolling` replaces the old revision once the new one is ready; `BlueGreen` switches all
    /// traffic at once after an optional preview; `Canary` moves traffic step by step.
    #[serde(rename = "type", default)]
    pub type_: StrategyType,

    /// Settings for `type: Canary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStrategy>,

    /// Settings for `type: BlueGreen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreenStrategy>,

    /// Metric checks run during `analysis` steps and blue-green pre-promotion analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,
}

/// Rollout strategies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StrategyType {
    #[default]
    Rolling,
    BlueGreen,
    Canary,
}

/// A canary rollout: traffic moves to the new revision in steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStrategy {
    /// How traffic is split between revisions. Default: by replica ratio.
    #[serde(default)]
    pub traffic_routing: TrafficRouting,

    /// The steps, run in order; after the last one the new revision takes all traffic.
    #[schemars(length(min = 1, max = 64))]
    pub steps: Vec<CanaryStep>,
}

/// How traffic is split between the stable and canary revisions. Set exactly one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.replicaRatio), has(self.gatewayAPI), has(self.gateway)].filter(x, x).size() == 1",
    "message": "set exactly one of replicaRatio, gatewayAPI or gateway"
}]))]
pub struct TrafficRouting {
    /// Split by the number of replicas of each revision behind one Service; needs no mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_ratio: Option<ReplicaRatio>,

    /// Split by backend weights on a Gateway API HTTPRoute.
    #[serde(
        rename = "gatewayAPI",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_api: Option<GatewayApiRouting>,

    /// Split by Kasmina's own gateway (`kasmina gateway`), which the operator runs in front
    /// of the revisions: exact weights whatever the replica counts, a request header to pin a
    /// revision, load-aware balancing across pods. The EdgeDeployment's Service points at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRouting>,
}

impl Default for TrafficRouting {
    fn default() -> Self {
        Self {
            replica_ratio: Some(ReplicaRatio {}),
            gateway_api: None,
            gateway: None,
        }
    }
}

/// Traffic split and balanced by `kasmina gateway`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRouting {
    /// How the gateway picks a pod of the chosen revision. Default: PowerOfTwoChoices.
    #[serde(default)]
    pub balancing: Balancing,

    /// Gateway pods (each holds the whole split; two survive losing a node). Default 1.
    #[serde(default = "one_gateway", skip_serializing_if = "is_one_gateway")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: i32,

    /// Percent of the requests the gateway sends to stable that it also sends to the canary,
    /// to compare the answers, while analysis has an `outputAgreement` check. The canary's
    /// answer never reaches the caller. Default 10.
    #[serde(
        default = "default_mirror_percent",
        skip_serializing_if = "is_default_mirror_percent"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub mirror_percent: u8,
}

impl Default for GatewayRouting {
    fn default() -> Self {
        Self {
            balancing: Balancing::default(),
            replicas: one_gateway(),
            mirror_percent: default_mirror_percent(),
        }
    }
}

fn default_mirror_percent() -> u8 {
    10
}

fn is_default_mirror_percent(p: &u8) -> bool {
    *p == default_mirror_percent()
}

fn one_gateway() -> i32 {
    1
}

fn is_one_gateway(n: &i32) -> bool {
    *n == 1
}

/// How the gateway balances one revision's requests over its ready pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Balancing {
    /// The less loaded of two random pods, by the requests the gateway has outstanding on each
    /// and the cognitive load each runtime reports, against its capacity.
    #[default]
    PowerOfTwoChoices,
    /// Every pod in turn, whatever its load (for comparison).
    RoundRobin,
}

/// Traffic split by replica counts. No settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaRatio {}

/// Traffic split by a Gateway API HTTPRoute's backend weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiRouting {
    /// Name of the HTTPRoute in the same namespace whose backendRefs Kasmina sets.
    #[schemars(length(min = 1, max = 253))]
    pub http_route: String,

    /// Name of the rule (`spec.rules[].name`) that carries the split. Unset: the rules that
    /// already send traffic to this EdgeDeployment's Service, or the route's only rule. Only
    /// the weights of this EdgeDeployment's two Services in those rules are ever changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub rule: Option<String>,
}

/// One step of a canary rollout. Set exactly one of its fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CanaryStep {
    /// Send this percent of traffic to the new revision.
    SetWeight(#[schemars(range(min = 0, max = 100))] i32),
    /// Wait: for `duration`, or until promoted when no duration is given.
    Pause(PauseStep),
    /// Run the analysis checks; the step passes when they pass.
    Analysis(AnalysisStep),
}

/// A pause in a canary rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PauseStep {
    /// How long to wait. Omit it to wait until promoted (annotation `kasmina.dev/promote` or
    /// `kubectl kasmina promote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

/// An analysis step of a canary rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AnalysisStep {
    /// Number of analysis intervals that must pass before the step completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub iterations: Option<u32>,
}

/// A blue-green rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlueGreenStrategy {
    /// Switch traffic to the new revision as soon as it is ready (and its pre-promotion
    /// analysis passed); otherwise wait to be promoted.
    #[serde(default = "default_true")]
    pub auto_promote: bool,

    /// Seconds the old revision keeps running after the switch, for an instant rollback.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: u32,

    /// Run the analysis checks against the preview Service before switching.
    #[serde(default)]
    pub pre_promotion_analysis: bool,
}

impl Default for BlueGreenStrategy {
    fn default() -> Self {
        Self {
            auto_promote: true,
            scale_down_delay_seconds: default_scale_down_delay(),
            pre_promotion_analysis: false,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_scale_down_delay() -> u32 {
    30
}

/// Metric analysis of a new revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// How often the runtime metrics are measured.
    #[serde(default = "default_analysis_interval")]
    pub interval: Duration,

    /// Failed measurements tolerated before the rollout is aborted and rolled back.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub failure_limit: u32,

    /// The checks; a measurement fails when any check fails.
    #[schemars(length(min = 1, max = 32))]
    pub checks: Vec<MetricCheck>,
}

fn default_analysis_interval() -> Duration {
    Duration::from_secs(15)
}

fn default_failure_limit() -> u32 {
    2
}

/// A limit on one runtime metric of the new revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.max) || has(self.maxRelativeToStable) || has(self.min)",
    "message": "set max, maxRelativeToStable or min"
}, {
    "rule": "self.metric != 'outputAgreement' || (has(self.min) && !has(self.max) && !has(self.maxRelativeToStable))",
    "message": "outputAgreement takes min only: the agreement (0 to 1) under which a measurement fails"
}]))]
pub struct MetricCheck {
    /// The metric, measured over the analysis interval.
    pub metric: AnalysisMetric,

    /// Fails when the metric is under this value (for `outputAgreement`, e.g. 0.995).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub min: Option<f64>,

    /// Fails when the metric exceeds this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max: Option<f64>,

    /// Fails when the metric exceeds this multiple of the stable revision's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_relative_to_stable: Option<f64>,
}

/// Metrics the runtime reports that analysis can check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AnalysisMetric {
    /// Fraction of requests answered with a 5xx status.
    ErrorRate,
    /// Median request latency in milliseconds.
    LatencyP50Ms,
    /// 95th percentile request latency in milliseconds.
    LatencyP95Ms,
    /// 99th percentile request latency in milliseconds.
    LatencyP99Ms,
    /// (in-flight + queued) / capacity, averaged over the revision's pods.
    CognitiveLoad,
    /// How far the canary's answers agree with stable's on the requests the gateway mirrors
    /// to it (1: the same): per answer, the lowest cosine similarity of its embeddings, or for
    /// other FP32 outputs 1 - the largest difference relative to stable's largest value;
    /// averaged over the interval. Needs `trafficRouting.gateway`.
    OutputAgreement,
}

/// The observed state of an EdgeDeployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeploymentStatus {
    /// The `.metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// A one-word summary of the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The revision the spec asks for: a hash of model, optimization and template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<String>,

    /// The revision serving (most) traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,

    /// The revision being rolled out, while a rollout runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,

    /// Percent of traffic on the canary revision, as the router achieves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<i32>,

    /// Index of the canary step being run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,

    /// The artifact built for the target revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactStatus>,

    /// Runtime replicas across all live revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Runtime replicas that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Label selector of the runtime pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Ready, Progressing, ArtifactReady, AnalysisPassing (and Compliant, owned by the
    /// ComplianceProfile controller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The most recent rollouts, newest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub history: Vec<RolloutRecord>,

    /// The rollout's state machine, persisted so a restarted controller resumes at the same
    /// step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutState>,

    /// Built revisions and their artifacts, newest first (bounded by
    /// `spec.revisionHistoryLimit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub revisions: Vec<RevisionRecord>,

    /// The candidate's metric analysis while a rollout runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStatus>,
}

/// The rollout state machine's memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// The revision serving; unset before the first one is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    /// The revision being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// When the candidate's rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Index of the canary step being run.
    #[serde(default)]
    pub step: u32,
    /// When the current step (or the rollout) started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// Percent of traffic the strategy asks for on the candidate.
    #[serde(default)]
    pub weight: u8,
    /// Passing analysis measurements in the current step.
    #[serde(default)]
    pub passed: u32,
    /// Failed analysis measurements in this rollout.
    #[serde(default)]
    pub failed: u32,
    /// The previous stable revision, kept running until `scaleDownAt` for an instant rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// When the previous stable revision is scaled down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_at: Option<Time>,
    /// A revision that was rolled back; it is not tried again until `retry` or a new target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
    /// Paused by command (as opposed to `spec.paused`).
    #[serde(default)]
    pub paused: bool,
    /// The last imperative command consumed (`verb@value` of its annotation), so a command is
    /// acted on once even if removing the annotation fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_command: Option<String>,
}

/// A built revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    /// The revision hash.
    pub name: String,
    /// `spec.model.version` of the revision.
    pub model_version: String,
    /// The artifact built for it.
    pub artifact: ArtifactStatus,
    /// When the build finished; a ComplianceProfile's `retentionDays` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_at: Option<Time>,
}

/// Analysis of the candidate revision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    /// The revision measured.
    pub revision: String,
    /// The last measurement: `Passed`, `Failed` or `Inconclusive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
    /// What the last measurement saw, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The metric values of the last conclusive measurement, by metric name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
    /// Counters at the start of the interval being measured, so a restart loses no interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<AnalysisBaseline>,
}

/// Counters of the candidate and stable revisions' pods at the start of an interval. Deltas are
/// taken per pod, so a pod missing from one scrape or scaled away is not mistaken for a counter
/// reset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisBaseline {
    /// When the counters were read.
    pub at: Time,
    /// Each answering candidate pod's counters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub candidate_pods: Vec<PodCounters>,
    /// Each answering stable pod's counters, for limits relative to stable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub stable_pods: Vec<PodCounters>,
    /// Each answering gateway pod's agreement counters for the candidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub gateway_pods: Vec<PodCounters>,
}

/// One runtime pod's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodCounters {
    /// The pod's name.
    pub pod: String,
    #[serde(flatten)]
    pub counters: Counters,
}

/// Request counters of one runtime pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// `kasmina_requests_total`, all codes.
    pub requests: f64,
    /// `kasmina_requests_total` with a 5xx code.
    pub errors: f64,
    /// Cumulative latency histogram buckets, ascending, `+Inf` last.
    #[serde(default)]
    pub buckets: Vec<Bucket>,
    /// A gateway's `kasmina_gateway_output_agreement` sum for the candidate.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub agreement_sum: f64,
    /// A gateway's `kasmina_gateway_output_agreement` count for the candidate.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub agreement_count: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// One cumulative histogram bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Bucket {
    /// Upper bound in seconds, or `+Inf`.
    pub le: String,
    /// Requests at or under the bound.
    pub count: f64,
}

/// A one-word summary of an EdgeDeployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted; waiting for the first build.
    Pending,
    /// The artifact of the target revision is being built.
    Building,
    /// A new revision is being rolled out.
    Progressing,
    /// The rollout is paused.
    Paused,
    /// All traffic is on the target revision and it is ready.
    Healthy,
    /// Serving, but with fewer ready replicas than desired.
    Degraded,
    /// The last rollout failed analysis; traffic is back on the stable revision.
    RolledBack,
    /// The spec cannot be acted on, or a build failed; see the conditions.
    Failed,
}

/// Summary of the artifact built for a revision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStatus {
    /// sha256 digest of the GGUF file, `sha256:<hex>`.
    pub digest: String,
    /// Where the artifact is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Size of the optimized artifact in bytes.
    pub size_bytes: i64,
    /// Size of the source weights in bytes.
    pub original_size_bytes: i64,
    /// The quantization scheme, or `mixed` when the planner chose per tensor.
    pub quantization: String,
    /// Fraction of weights that are zero after pruning.
    #[serde(default)]
    pub sparsity: f64,
    /// Measured quality loss (1 − min cosine similarity against the source model).
    pub quality_loss: f64,
    /// Whether the manifest is signed.
    #[serde(default)]
    pub signed: bool,
    /// Whether the artifact is encrypted at rest.
    #[serde(default)]
    pub encrypted: bool,
}

/// One past rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    /// The revision rolled out.
    pub revision: String,
    /// How it ended.
    pub outcome: RolloutOutcome,
    /// Why, in words.
    #[serde(default)]
    pub reason: String,
    /// When it started.
    pub started_at: Time,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}

/// How a rollout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutOutcome {
    Promoted,
    RolledBack,
    Aborted,
    Superseded,
    Failed,
}

/// The longest name an EdgeDeployment may have: its longest derived name,
/// `<name>-retention-<8 hex>`, is a Job name and a label value, 63 characters at most.
pub const MAX_NAME_LENGTH: usize = 63 - "-retention-".len() - 8;

impl EdgeDeployment {
    /// The spec's checks and the name's: Services, Jobs and label values are named after it.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        if let Some(name) = self.metadata.name.as_deref() {
            validate_name(name, &mut errors);
        }
        self.spec.checks(&mut errors);
        errors.into_result()
    }
}

/// Names of the children (Services among them) are DNS-1035 labels: an EdgeDeployment's name,
/// a DNS-1123 subdomain, is narrowed to what they allow.
fn validate_name(name: &str, errors: &mut FieldErrors) {
    if name.len() > MAX_NAME_LENGTH {
        errors.push(
            "metadata.name",
            format!(
                "{name:?} is {} characters; at most {MAX_NAME_LENGTH}, so that the names derived \
                 from it (e.g. {name}-retention-0123abcd) fit in 63",
                name.len()
            ),
        );
    }
    if name.contains('.') || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        errors.push(
            "metadata.name",
            format!(
                "{name:?}: must start with a letter and contain no '.', as the name of its Service \
                 (a DNS-1035 label) must"
            ),
        );
    }
}

impl EdgeDeploymentSpec {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        self.checks(&mut errors);
        errors.into_result()
    }

    fn checks(&self, errors: &mut FieldErrors) {
        self.validate_source(errors);
        self.validate_optimization(errors);
        self.validate_strategy(errors);
    }

    fn validate_source(&self, errors: &mut FieldErrors) {
        let uri = &self.model.source.uri;
        if let Some(path) = uri.strip_prefix("file://")
            && !path.starts_with('/')
        {
            errors.push(
                "spec.model.source.uri",
                format!(
                    "{uri:?}: a file:// URI needs an absolute path, e.g. file:///models/minilm"
                ),
            );
        }
    }

    fn validate_optimization(&self, errors: &mut FieldErrors) {
        if let Some(pruning) = &self.optimization.pruning {
            match (pruning.method, pruning.sparsity) {
                (PruningMethod::Magnitude, None) => errors.push(
                    "spec.optimization.pruning.sparsity",
                    "required for method magnitude (e.g. 0.3)",
                ),
                (PruningMethod::SemiStructured24, Some(s)) if (s - 0.5).abs() > f64::EPSILON => {
                    errors.push(
                        "spec.optimization.pruning.sparsity",
                        format!("semi-structured-2:4 always prunes 0.5 of the weights, not {s}"),
                    )
                }
                _ => {}
            }
        }
    }

    fn validate_strategy(&self, errors: &mut FieldErrors) {
        let strategy = &self.strategy;
        if strategy.canary.is_some() && strategy.type_ != StrategyType::Canary {
            errors.push(
                "spec.strategy.canary",
                format!("set, but spec.strategy.type is {:?}", strategy.type_),
            );
        }
        if strategy.blue_green.is_some() && strategy.type_ != StrategyType::BlueGreen {
            errors.push(
                "spec.strategy.blueGreen",
                format!("set, but spec.strategy.type is {:?}", strategy.type_),
            );
        }
        let needs_analysis = match strategy.type_ {
            StrategyType::Canary => match &strategy.canary {
                None => {
                    errors.push(
                        "spec.strategy.canary",
                        "required when spec.strategy.type is Canary",
                    );
                    false
                }
                Some(canary) => validate_canary(canary, errors),
            },
            StrategyType::BlueGreen => strategy
                .blue_green
                .as_ref()
                .is_some_and(|bg| bg.pre_promotion_analysis),
            StrategyType::Rolling => false,
        };
        if needs_analysis && strategy.analysis.is_none() {
            errors.push(
                "spec.strategy.analysis",
                "required: the strategy runs an analysis, but no checks are defined",
            );
        }
        if let Some(analysis) = &strategy.analysis {
            for (i, check) in analysis.checks.iter().enumerate() {
                let field = format!("spec.strategy.analysis.checks[{i}]");
                if check.max.is_none()
                    && check.max_relative_to_stable.is_none()
                    && check.min.is_none()
                {
                    errors.push(field.clone(), "set max, maxRelativeToStable or min");
                }
                if check.metric == AnalysisMetric::OutputAgreement {
                    if check.min.is_none()
                        || check.max.is_some()
                        || check.max_relative_to_stable.is_some()
                    {
                        errors.push(
                            field.clone(),
                            "outputAgreement takes min only: the agreement (0 to 1) under \
                             which a measurement fails",
                        );
                    }
                    let gateway = strategy
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.traffic_routing.gateway.is_some());
                    if !gateway {
                        errors.push(
                            format!("{field}.metric"),
                            "outputAgreement compares the answers kasmina gateway mirrors \
                             to the canary: it needs spec.strategy.canary.trafficRouting.gateway",
                        );
                    }
                }
            }
            if analysis.interval.as_std() < std::time::Duration::from_secs(1) {
                errors.push(
                    "spec.strategy.analysis.interval",
                    format!("{} is shorter than the 1s minimum", analysis.interval),
                );
            }
        }
    }
}

/// Checks the canary steps; returns whether any step runs an analysis.
fn validate_canary(canary: &CanaryStrategy, errors: &mut FieldErrors) -> bool {
    if canary.steps.is_empty() {
        errors.push("spec.strategy.canary.steps", "needs at least one step");
    }
    let routing = &canary.traffic_routing;
    let routers = [
        routing.replica_ratio.is_some(),
        routing.gateway_api.is_some(),
        routing.gateway.is_some(),
    ];
    if routers.iter().filter(|set| **set).count() != 1 {
        errors.push(
            "spec.strategy.canary.trafficRouting",
            "set exactly one of replicaRatio, gatewayAPI or gateway",
        );
    }
    if let Some(gateway) = &routing.gateway
        && !(1..=16).contains(&gateway.replicas)
    {
        errors.push(
            "spec.strategy.canary.trafficRouting.gateway.replicas",
            format!("{} is outside 1–16", gateway.replicas),
        );
    }
    let mut previous: Option<(usize, i32)> = None;
    let mut has_analysis = false;
    for (i, step) in canary.steps.iter().enumerate() {
        match step {
            CanaryStep::SetWeight(w) => {
                if !(0..=100).contains(w) {
                    errors.push(
                        format!("spec.strategy.canary.steps[{i}].setWeight"),
                        format!("{w} is outside 0–100"),
                    );
                } else if let Some((j, prev)) = previous
                    && *w < prev
                {
                    errors.push(
                        format!("spec.strategy.canary.steps[{i}].setWeight"),
                        format!("{w} is lower than {prev} at steps[{j}]; canary weights must rise"),
                    );
                }
                previous = Some((i, *w));
            }
            CanaryStep::Analysis(_) => has_analysis = true,
            CanaryStep::Pause(_) => {}
        }
    }
    has_analysis
}
