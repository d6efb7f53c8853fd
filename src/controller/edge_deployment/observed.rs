//! What the reconciler read before planning: the input of every pure step.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use serde_json::Value;

use super::rollout::Measurement;
use super::security::Security;
use crate::api::edge_deployment::{AnalysisStatus, DeviceProfile};

/// What the reconciler read before planning.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The runtime Deployments it owns.
    pub deployments: Vec<Deployment>,
    /// The Services it owns.
    pub services: Vec<Service>,
    /// The build Jobs it owns.
    pub jobs: Vec<Job>,
    /// The termination message of the target's build pod, once the Job ended.
    pub build_message: Option<String>,
    /// For `profile: auto`: the device the smallest selected node amounts to (None when the
    /// nodes were not listed or none matched).
    pub auto_profile: Option<DeviceProfile>,
    /// A fresh analysis step of the candidate (the measurement and the status to keep).
    pub analysis: Option<(Option<Measurement>, AnalysisStatus)>,
    /// The HTTPRoute named by `gatewayAPI.httpRoute`, when that router is used.
    pub route: Option<Value>,
    /// Regions the ComplianceProfiles selecting it allow (empty: no pin).
    pub allowed_regions: Vec<String>,
    /// What the profiles ask of artifacts and runtime, and the keys Secret.
    pub security: Security,
    /// Why the keys the profiles call for could not be read or made.
    pub keys_error: Option<String>,
    /// Why the candidate's runtime refused its artifact, if one of its pods did.
    pub candidate_refused: Option<String>,
    /// The profiles' `retentionDays`: older revisions and their artifacts are deleted.
    pub retention_days: Option<u32>,
}
