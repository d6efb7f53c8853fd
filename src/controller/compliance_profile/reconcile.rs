//! I/O glue: read the cached EdgeDeployments and namespaces, ask `rules`, write status only
//! when it changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};

use super::rules::{NamespaceLabels, evaluate};
use crate::api::{ComplianceProfile, EdgeDeployment};
use crate::controller::context::Context;
use crate::controller::status::apply_status;

pub const CONTROLLER: &str = "complianceprofile";

/// The ComplianceProfile controller's view of the cluster, kept current by watches.
pub struct ComplianceContext {
    pub ctx: Arc<Context>,
    pub deployments: Store<EdgeDeployment>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
}

/// Errors of the ComplianceProfile controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the EdgeDeployment and Namespace caches never synced")]
    CacheNotReady,
    #[error("writing status of ComplianceProfile {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::CacheNotReady => "cache_not_ready",
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

pub async fn reconcile(
    profile: Arc<ComplianceProfile>,
    cc: Arc<ComplianceContext>,
) -> Result<Action, Error> {
    let ctx = &cc.ctx;
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    // Counting against a half-filled cache would publish a wrong number.
    cc.deployments
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheNotReady)?;
    cc.namespaces
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheNotReady)?;

    let namespaces: NamespaceLabels = cc
        .namespaces
        .state()
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();
    let deployments = cc.deployments.state();
    let evaluation = evaluate(
        &profile,
        deployments.iter().map(AsRef::as_ref),
        &namespaces,
        ctx.clock.now(),
    );

    let name = profile.name_any();
    if profile.status.as_ref() != Some(&evaluation.status) {
        let api: Api<ComplianceProfile> = Api::all(ctx.client.clone());
        apply_status(&api, &name, &evaluation.status)
            .await
            .map_err(|source| Error::WriteStatus { name, source })?;
    }
    ctx.publish(&profile.object_ref(&()), &evaluation.notices)
        .await;
    Ok(Action::requeue(Duration::from_secs(300)))
}

pub fn error_policy(
    _profile: Arc<ComplianceProfile>,
    error: &Error,
    cc: Arc<ComplianceContext>,
) -> Action {
    tracing::warn!(%error, "ComplianceProfile reconcile failed");
    cc.ctx.metrics.reconcile_failed(CONTROLLER, error.kind());
    Action::requeue(Duration::from_secs(15))
}
