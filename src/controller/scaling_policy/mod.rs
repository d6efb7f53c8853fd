//! The ScalingPolicy controller: autoscaling EdgeDeployments on their runtime's load.

pub mod collect;
pub mod decide;
pub mod forecast;
pub mod hpa;
pub mod idle;
pub mod reconcile;

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, controller, watcher};
use kube::{Api, ResourceExt};

use crate::api::{EdgeDeployment, ScalingPolicy};
use reconcile::ScalingContext;

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
pub async fn run(
    ctx: Arc<ScalingContext>,
    config: controller::Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let policies: Api<ScalingPolicy> = Api::all(ctx.base.client.clone());
    let targets: Api<EdgeDeployment> = Api::all(ctx.base.client.clone());
    let controller = Controller::new(policies, watcher::Config::default().any_semantic());
    let store = controller.store();
    let controller = controller
        .with_config(config)
        // A target appearing, vanishing or changing re-evaluates the policies that name it.
        .watches(
            targets,
            watcher::Config::default(),
            move |ed: EdgeDeployment| {
                let namespace = ed.namespace();
                let name = ed.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|p| p.namespace() == namespace && p.spec.target_ref.name == name)
                    .map(|p| ObjectRef::from_obj(&*p))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown);
    crate::controller::scaffold::run(controller, reconcile::CONTROLLER, ctx, reconcile::reconcile)
        .await;
}
