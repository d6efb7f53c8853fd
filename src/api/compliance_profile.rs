//! `ComplianceProfile`: data-protection rules for the EdgeDeployments it selects.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, conditions_schema};
use super::validation::{FieldErrors, validate_label_selector};

/// Data-protection rules (regulation packs and explicit rules) for the EdgeDeployments it
/// selects, enforced at admission and as a rollout gate.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kasmina.dev",
    version = "v1alpha1",
    kind = "ComplianceProfile",
    status = "ComplianceProfileStatus",
    shortname = "cp",
    category = "kasmina",
    derive = "PartialEq",
    doc = "Data-protection rules (GDPR, HIPAA, FERPA, ... packs and explicit rules) for the EdgeDeployments it selects, enforced at admission and as a rollout gate.",
    printcolumn(
        name = "Enforcement",
        type_ = "string",
        json_path = ".spec.enforcement"
    ),
    printcolumn(name = "Matched", type_ = "integer", json_path = ".status.matched"),
    printcolumn(name = "Compliant", type_ = "integer", json_path = ".status.compliant"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceProfileSpec {
    /// EdgeDeployments whose labels match. An empty selector matches every EdgeDeployment.
    #[serde(default)]
    pub selector: LabelSelector,

    /// Namespaces whose labels match; omit for all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Regulations whose built-in rule packs apply, on top of `rules`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub regulations: Vec<Regulation>,

    /// Explicit rules; combined with the regulation packs, the strictest value wins.
    #[serde(default)]
    pub rules: ComplianceRules,

    /// `Enforce` denies violating objects at admission and blocks promotion; `Warn` admits them
    /// with warnings; `Audit` only records violations in status.
    #[serde(default)]
    pub enforcement: Enforcement,
}

/// Regulations with built-in rule packs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Regulation {
    /// EU General Data Protection Regulation.
    #[serde(rename = "GDPR")]
    Gdpr,
    /// US Health Insurance Portability and Accountability Act.
    #[serde(rename = "HIPAA")]
    Hipaa,
    /// US Family Educational Rights and Privacy Act.
    #[serde(rename = "FERPA")]
    Ferpa,
    /// US Children's Online Privacy Protection Act.
    #[serde(rename = "COPPA")]
    Coppa,
    /// EU Medical Device Regulation.
    #[serde(rename = "MDR")]
    Mdr,
    /// AICPA SOC 2.
    #[serde(rename = "SOC2")]
    Soc2,
    /// ISO/IEC 27001.
    #[serde(rename = "ISO27001")]
    Iso27001,
}

/// Explicit data-protection rules. Unset rules do not apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceRules {
    /// Artifacts must carry a valid signature that the runtime verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_signed_artifacts: Option<bool>,

    /// Artifacts must be encrypted at rest (AES-256-GCM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_encryption_at_rest: Option<bool>,

    /// The runtime must authenticate requests with JWTs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_authentication: Option<bool>,

    /// Regions (`topology.kubernetes.io/region`) the runtime pods may run in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_regions: Vec<String>,

    /// Glob patterns of allowed model source URIs, e.g. `s3://approved-models/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_model_sources: Vec<String>,

    /// Every admission decision, build, promotion, rollback and scale is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_logging: Option<bool>,

    /// Artifacts and revisions older than this many days are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 36500))]
    pub retention_days: Option<u32>,

    /// Upper bound on the optimized model's measured quality loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_quality_loss: Option<f64>,
}

/// How violations are handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Enforcement {
    /// Deny at admission and never promote a violating revision.
    #[default]
    Enforce,
    /// Admit with warnings that kubectl prints.
    Warn,
    /// Only record violations in status.
    Audit,
}

/// The observed state of a ComplianceProfile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceProfileStatus {
    /// The `.metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// EdgeDeployments the selectors match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<i32>,
    /// Matched EdgeDeployments that comply with every rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliant: Option<i32>,
    /// Rule violations, one per deployment and rule (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub violations: Vec<Violation>,
    /// Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// One EdgeDeployment breaking one rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// `namespace/name` of the EdgeDeployment.
    pub deployment: String,
    /// The rule, e.g. `requireSignedArtifacts`.
    pub rule: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ComplianceProfileSpec {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        validate_label_selector(&self.selector, "spec.selector", &mut errors);
        if let Some(ns) = &self.namespace_selector {
            validate_label_selector(ns, "spec.namespaceSelector", &mut errors);
        }
        for (i, region) in self.rules.allowed_regions.iter().enumerate() {
            let valid = !region.is_empty()
                && region.len() <= 63
                && region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                errors.push(
                    format!("spec.rules.allowedRegions[{i}]"),
                    format!("{region:?} is not a valid label value (e.g. eu-west-1)"),
                );
            }
        }
        for (i, pattern) in self.rules.allowed_model_sources.iter().enumerate() {
            let scheme_ok = ["s3://", "gs://", "az://", "https://", "file://"]
                .iter()
                .any(|s| pattern.starts_with(s));
            if !scheme_ok {
                errors.push(
                    format!("spec.rules.allowedModelSources[{i}]"),
                    format!("{pattern:?} must start with s3://, gs://, az://, https:// or file://"),
                );
            }
        }
        errors.into_result()
    }
}
