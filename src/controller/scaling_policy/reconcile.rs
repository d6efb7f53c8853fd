//! I/O glue: resolve the target, ask `decide`, write status only when it changed.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::decide::decide;
use crate::api::{EdgeDeployment, ScalingPolicy};
use crate::controller::context::Context;
use crate::controller::status::apply_status;

pub const CONTROLLER: &str = "scalingpolicy";

/// Errors of the ScalingPolicy controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ScalingPolicy {name} has no namespace")]
    MissingNamespace { name: String },
    #[error("reading target EdgeDeployment {namespace}/{name}: {source}")]
    ReadTarget {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status of ScalingPolicy {namespace}/{name}: {source}")]
    WriteStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::MissingNamespace { .. } => "missing_namespace",
            Error::ReadTarget { .. } => "read_target",
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

pub async fn reconcile(policy: Arc<ScalingPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let name = policy.name_any();
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::MissingNamespace { name: name.clone() })?;

    let targets: Api<EdgeDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let target_name = &policy.spec.target_ref.name;
    let target = targets
        .get_opt(target_name)
        .await
        .map_err(|source| Error::ReadTarget {
            namespace: namespace.clone(),
            name: target_name.clone(),
            source,
        })?;

    let decision = decide(&policy, target.as_ref(), ctx.clock.now());

    if policy.status.as_ref() != Some(&decision.status) {
        let api: Api<ScalingPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        apply_status(&api, &name, &decision.status)
            .await
            .map_err(|source| Error::WriteStatus {
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
    }
    ctx.publish(&policy.object_ref(&()), &decision.notices)
        .await;
    Ok(Action::requeue(Duration::from_secs(300)))
}

pub fn error_policy(_policy: Arc<ScalingPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "ScalingPolicy reconcile failed");
    ctx.metrics.reconcile_failed(CONTROLLER, error.kind());
    Action::requeue(Duration::from_secs(15))
}
