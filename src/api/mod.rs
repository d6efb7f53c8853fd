//! The three custom resources of `kasmina.dev/v1alpha1`: what users write.

// Each `printcolumn(...)` repeats `type_ = ...`; clippy reads the repeats as duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod compliance_profile;
pub mod condition;
pub mod duration;
pub mod edge_deployment;
pub mod quantity;
pub mod scaling_policy;
pub mod validation;

pub use compliance_profile::{ComplianceProfile, ComplianceProfileSpec, ComplianceProfileStatus};
pub use condition::{Condition, ConditionStatus};
pub use duration::Duration;
pub use edge_deployment::{EdgeDeployment, EdgeDeploymentSpec, EdgeDeploymentStatus};
pub use scaling_policy::{ScalingPolicy, ScalingPolicySpec, ScalingPolicyStatus};
pub use validation::{FieldError, FieldErrors};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Kasmina kind.
pub const GROUP: &str = "kasmina.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CustomResourceDefinition Kasmina installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        EdgeDeployment::crd(),
        ScalingPolicy::crd(),
        ComplianceProfile::crd(),
    ]
}
