//! The EdgeDeployment controller: revisions, artifacts, workloads and rollouts.

pub mod analysis;
pub mod plan;
pub mod reconcile;
pub mod rollout;
pub mod traffic;

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::{Controller, watcher};

use super::context::Context;
use crate::api::EdgeDeployment;

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<EdgeDeployment> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "EdgeDeployment controller event");
            }
        })
        .await;
}
