//! The EdgeDeployment controller: revisions, artifacts, workloads and rollouts.

pub mod analysis;
pub mod build;
pub mod cleanup;
pub mod conditions;
pub mod desired;
pub mod gateway;
pub mod names;
pub mod observed;
pub mod plan;
pub mod readiness;
pub mod reconcile;
pub mod replicas;
pub mod retention;
pub mod rollout;
pub mod rollout_status;
pub mod scrape;
pub mod security;
pub mod traffic;
pub mod watch;
pub mod workload;

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, controller, watcher};
use kube::{Api, ResourceExt};

use super::context::{Backoff, Context};
use crate::api::EdgeDeployment;
use reconcile::EdgeContext;
use watch::ChildCaches;
use workload::Settings;

/// The cache of EdgeDeployments this controller's watch fills, and who is told it changed
/// (the ComplianceProfile controller reads the same cache).
pub struct Shared {
    pub writer: Writer<EdgeDeployment>,
    pub changed: tokio::sync::watch::Sender<()>,
}

/// Runs the controller until `shutdown` resolves, letting running reconciles finish.
pub async fn run(
    base: Arc<Context>,
    settings: Settings,
    config: controller::Config,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = base.client.clone();
    let (children, writers) = ChildCaches::new();
    let ctx = Arc::new(EdgeContext::new(base.clone(), settings, children));
    let eds = shared.writer.as_reader();
    let changed = shared.changed;
    // Only what a reconcile acts on wakes it (not its own status writes); a deleted object's
    // backoff is forgotten with it.
    let edge_deployments = watcher(
        Api::<EdgeDeployment>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .reflect(shared.writer)
    .inspect(move |event| {
        if let Ok(watcher::Event::Delete(ed)) = event {
            base.backoff.succeeded(&Backoff::key(ed));
        }
        changed.send_replace(());
    })
    .touched_objects()
    .predicate_filter(watch::wakes, PredicateConfig::default());
    // Children wake their owner: a Job finishing, a Deployment becoming available, a Service
    // edited by hand (and put back). Jobs map by label, so the cleanup Job of a deleted
    // object (which it does not own) wakes it too.
    let owned = names::NAME_LABEL;
    let jobs = watch::children(&client, owned, writers.jobs, watch::slim_job);
    let deployments = watch::children(&client, owned, writers.deployments, watch::slim_deployment);
    let services = watch::children(&client, owned, writers.services, super::cache::slim);
    // Runtime pods belong to ReplicaSets, not to the EdgeDeployment: they map to it by label,
    // so a revision whose pods crash (a refused artifact) wakes it at once instead of at its
    // next requeue; analysis reads their addresses (and the gateway pods', for the answers
    // they compared) from the cache.
    let serving = format!(
        "{},{} in ({},{})",
        names::NAME_LABEL,
        names::COMPONENT_LABEL,
        names::RUNTIME_COMPONENT,
        names::GATEWAY_COMPONENT
    );
    let pods = watch::children(&client, &serving, writers.pods, watch::slim_pod);
    let controller = Controller::for_stream(edge_deployments, eds)
        .with_config(config)
        .watches_stream(jobs, |job| by_name_label(&job))
        .owns_stream(deployments)
        .owns_stream(services)
        .watches_stream(pods, |pod| by_name_label(&pod))
        .graceful_shutdown_on(shutdown);
    super::scaffold::run(controller, reconcile::CONTROLLER, ctx, reconcile::reconcile).await;
}

/// The EdgeDeployment an object is labelled with, in its namespace.
fn by_name_label<K: ResourceExt>(object: &K) -> Option<ObjectRef<EdgeDeployment>> {
    let name = object.labels().get(names::NAME_LABEL)?;
    Some(ObjectRef::new(name).within(&object.namespace()?))
}
