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
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector;
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};

use super::context::Context;
use crate::api::{ComplianceProfile, EdgeDeployment};
use reconcile::ComplianceContext;

/// How the ComplianceProfiles selecting `ed` judge it, read from the API server: the
/// strictest rules the workload carries out and the profiles' names. The namespace's labels
/// are read only when a profile selects by them.
pub async fn verdict_for(
    client: &kube::Client,
    ed: &EdgeDeployment,
    ns: &str,
) -> Result<rules::Verdict, kube::Error> {
    let profiles = Api::<ComplianceProfile>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await?
        .items;
    let mut namespaces = rules::NamespaceLabels::new();
    if profiles.iter().any(|p| p.spec.namespace_selector.is_some())
        && let Some(meta) = Api::<Namespace>::all(client.clone())
            .get_metadata_opt(ns)
            .await?
    {
        namespaces.insert(ns.to_owned(), meta.metadata.labels.unwrap_or_default());
    }
    Ok(rules::judge(&profiles, ed, &namespaces))
}

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (deployments, deployments_writer) = reflector::store();
    let (namespaces, namespaces_writer) = reflector::store();
    let deployment_changes = watcher(
        Api::<EdgeDeployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(deployments_writer)
    .touched_objects()
    .map(|r| r.map(|_| ()));
    let namespace_changes = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(namespaces_writer)
    .touched_objects()
    .map(|r| r.map(|_| ()));
    // Any EdgeDeployment or namespace change can change what any profile selects; the
    // controller polls these streams, which also keeps the caches current.
    let any_change =
        futures::stream::select(deployment_changes, namespace_changes).filter_map(|r| async move {
            r.inspect_err(|error| tracing::warn!(%error, "watching EdgeDeployments or Namespaces"))
                .ok()
        });

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
        .with_config(controller::Config::default().debounce(Duration::from_secs(1)))
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
