//! The ComplianceProfile controller: which EdgeDeployments each profile governs and whether
//! they comply.

pub mod certs;
pub mod reconcile;
pub mod rules;
pub mod serve;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, controller, watcher};

use super::cache::Changes;
use super::context::Context;
use crate::api::{ComplianceProfile, EdgeDeployment};
use reconcile::ComplianceContext;

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
/// `deployments` is the EdgeDeployment controller's cache and `changes` tells when it
/// changed: one watch of EdgeDeployments serves both controllers.
pub async fn run(
    ctx: Arc<Context>,
    config: controller::Config,
    deployments: Store<EdgeDeployment>,
    changes: Changes,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let namespaces = ctx.policies.namespaces.clone();
    // Any EdgeDeployment or namespace change can change what any profile selects.
    let any_change = futures::stream::select(
        changes.stream(),
        ctx.policies.namespace_changes.clone().stream(),
    );

    let controller = Controller::new(
        Api::<ComplianceProfile>::all(client),
        watcher::Config::default().any_semantic(),
    );
    let cc = Arc::new(ComplianceContext {
        ctx,
        deployments,
        namespaces,
        profiles: controller.store(),
    });
    controller
        .with_config(config.debounce(Duration::from_secs(1)))
        .reconcile_all_on(any_change)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile_and_reset, reconcile::error_policy, cc)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "ComplianceProfile controller event");
            }
        })
        .await;
}
