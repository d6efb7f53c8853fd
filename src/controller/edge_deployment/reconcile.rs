//! I/O glue: observe the EdgeDeployment, ask `plan`, write status only when it changed.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::plan::plan;
use crate::api::EdgeDeployment;
use crate::controller::context::Context;
use crate::controller::status::apply_status;

pub const CONTROLLER: &str = "edgedeployment";

/// Errors of the EdgeDeployment controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("EdgeDeployment {name} has no namespace")]
    MissingNamespace { name: String },
    #[error("writing status of EdgeDeployment {namespace}/{name}: {source}")]
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
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

pub async fn reconcile(ed: Arc<EdgeDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let name = ed.name_any();
    let namespace = ed
        .namespace()
        .ok_or_else(|| Error::MissingNamespace { name: name.clone() })?;

    let plan = plan(&ed, ctx.clock.now());

    if ed.status.as_ref() != Some(&plan.status) {
        let api: Api<EdgeDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
        apply_status(&api, &name, &plan.status)
            .await
            .map_err(|source| Error::WriteStatus {
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
    }
    ctx.publish(&ed.object_ref(&()), &plan.notices).await;
    Ok(Action::requeue(Duration::from_secs(600)))
}

pub fn error_policy(_ed: Arc<EdgeDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "EdgeDeployment reconcile failed");
    ctx.metrics.reconcile_failed(CONTROLLER, error.kind());
    Action::requeue(Duration::from_secs(15))
}
