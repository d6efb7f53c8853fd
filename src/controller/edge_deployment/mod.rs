//! The EdgeDeployment controller: revisions, artifacts, workloads and rollouts.

pub mod analysis;
pub mod cleanup;
pub mod plan;
pub mod reconcile;
pub mod rollout;
pub mod scrape;
pub mod security;
pub mod traffic;
pub mod workload;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};

use crate::api::EdgeDeployment;
use reconcile::EdgeContext;

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
pub async fn run(
    ctx: Arc<EdgeContext>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.base.client.clone();
    let api: Api<EdgeDeployment> = Api::all(client.clone());
    // Children wake their owner: a Job finishing, a Deployment becoming available, a Service
    // edited by hand (and put back).
    let owned = || watcher::Config::default().labels(workload::NAME_LABEL);
    // Runtime pods belong to ReplicaSets, not to the EdgeDeployment: a metadata-only watch
    // maps them to it by label, so a revision whose pods crash (a refused artifact) wakes it
    // at once instead of at its next requeue.
    let runtime_pods = watcher::Config::default().labels(&format!(
        "{},{}={}",
        workload::NAME_LABEL,
        workload::COMPONENT_LABEL,
        workload::RUNTIME_COMPONENT
    ));
    Controller::new(api, watcher::Config::default().any_semantic())
        .owns(Api::<Job>::all(client.clone()), owned())
        .owns(Api::<Deployment>::all(client.clone()), owned())
        .owns(Api::<Service>::all(client.clone()), owned())
        .watches(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            runtime_pods,
            |pod| {
                let name = pod.labels().get(workload::NAME_LABEL)?;
                Some(ObjectRef::new(name).within(&pod.namespace()?))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile_and_reset, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "EdgeDeployment controller event");
            }
        })
        .await;
}
