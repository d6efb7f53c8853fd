//! The ComplianceProfile controller: which EdgeDeployments each profile governs and whether
//! they comply.

pub mod certs;
pub mod reconcile;
pub mod rules;
pub mod serve;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, controller, watcher};

use super::cache::{Changes, Synced};
use super::context::Context;
use crate::api::{ComplianceProfile, EdgeDeployment};
use reconcile::ComplianceContext;

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
/// `deployments` is the EdgeDeployment controller's cache, `changes` tells when it changed
/// and `synced` when it first held a full list: one watch of EdgeDeployments serves both
/// controllers.
pub async fn run(
    ctx: Arc<Context>,
    config: controller::Config,
    deployments: Store<EdgeDeployment>,
    changes: Changes,
    synced: Synced,
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
        synced,
        namespaces,
        profiles: controller.store(),
    });
    let controller = controller
        .with_config(config.debounce(Duration::from_secs(1)))
        .reconcile_all_on(any_change)
        .graceful_shutdown_on(shutdown);
    super::scaffold::run(controller, reconcile::CONTROLLER, cc, reconcile::reconcile).await;
}
