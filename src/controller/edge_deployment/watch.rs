//! What wakes the EdgeDeployment controller and what its reconciles read: one watch per kind,
//! each feeding both the controller's trigger and a cache, so a reconcile lists nothing.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use futures::Stream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use super::names::{
    COMPONENT_LABEL, GATEWAY_COMPONENT, NAME_LABEL, REVISION_LABEL, RUNTIME_COMPONENT,
};
use crate::api::EdgeDeployment;
use crate::api::condition;
use crate::controller::cache;
use crate::controller::compliance_profile::rules::COMPLIANT;

/// The children of every EdgeDeployment (objects labelled with its name), and its runtime
/// and gateway pods, kept current.
#[derive(Clone)]
pub struct ChildCaches {
    pub jobs: Store<Job>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    /// Runtime pods only (build pods are read once per build).
    pub pods: Store<Pod>,
}

/// The writing ends of `ChildCaches`: what the watches (or a test) fill them through.
pub struct ChildWriters {
    pub jobs: Writer<Job>,
    pub deployments: Writer<Deployment>,
    pub services: Writer<Service>,
    pub pods: Writer<Pod>,
}

impl ChildCaches {
    pub fn new() -> (Self, ChildWriters) {
        let (jobs, jobs_writer) = reflector::store();
        let (deployments, deployments_writer) = reflector::store();
        let (services, services_writer) = reflector::store();
        let (pods, pods_writer) = reflector::store();
        (
            Self {
                jobs,
                deployments,
                services,
                pods,
            },
            ChildWriters {
                jobs: jobs_writer,
                deployments: deployments_writer,
                services: services_writer,
                pods: pods_writer,
            },
        )
    }
}

/// The watch of one kind of child (objects labelled `selector`): events pass into its cache,
/// then on as triggers.
pub fn children<K>(
    client: &Client,
    selector: &str,
    writer: Writer<K>,
    slim: fn(&mut K),
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(
        Api::<K>::all(client.clone()),
        watcher::Config::default().labels(selector),
    )
    .default_backoff()
    .modify(slim)
    .reflect(writer)
    .touched_objects()
}

/// A Job as cached: its pod template is what it ran, which no reconcile reads.
pub fn slim_job(job: &mut Job) {
    cache::slim(job);
    if let Some(spec) = job.spec.as_mut() {
        spec.template = Default::default();
    }
}

/// A Deployment as cached: replicas, labels, the applied hash and status are what is read.
pub fn slim_deployment(deployment: &mut Deployment) {
    cache::slim(deployment);
    deployment.spec.template = Default::default();
}

/// A runtime pod as cached: its status (IP, readiness, start, container exits) is what
/// analysis and the refusal check read.
pub fn slim_pod(pod: &mut Pod) {
    cache::slim(pod);
    pod.spec = None;
}

/// Whether a pod takes requests: Ready, with an IP, and not terminating (a terminating pod
/// drains what it holds, and new requests go elsewhere at once).
pub fn routable(pod: &Pod) -> Option<std::net::IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// The runtime pods of one revision of EdgeDeployment `name` in `ns`.
pub fn revision_pods(pods: &Store<Pod>, ns: &str, name: &str, revision: &str) -> Vec<Pod> {
    labelled(
        pods,
        ns,
        &[
            (NAME_LABEL, name),
            (COMPONENT_LABEL, RUNTIME_COMPONENT),
            (REVISION_LABEL, revision),
        ],
    )
}

/// The `kasmina gateway` pods of EdgeDeployment `name` in `ns`.
pub fn gateway_pods(pods: &Store<Pod>, ns: &str, name: &str) -> Vec<Pod> {
    labelled(
        pods,
        ns,
        &[(NAME_LABEL, name), (COMPONENT_LABEL, GATEWAY_COMPONENT)],
    )
}

fn labelled(pods: &Store<Pod>, ns: &str, wanted: &[(&str, &str)]) -> Vec<Pod> {
    pods.state()
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && wanted
                    .iter()
                    .all(|(k, v)| p.labels().get(*k).map(String::as_str) == Some(*v))
        })
        .map(|p| Pod::clone(p))
        .collect()
}

/// What of an EdgeDeployment a reconcile acts on: its spec (generation, which its deletion
/// bumps too), labels, annotations (commands) and the Compliant condition the
/// ComplianceProfile controller writes. The controller's own status writes change none of
/// these, so they do not wake it again.
pub fn wakes(ed: &EdgeDeployment) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    ed.metadata.generation.hash(&mut hasher);
    ed.metadata.labels.hash(&mut hasher);
    ed.metadata.annotations.hash(&mut hasher);
    ed.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut hasher);
    let compliant = ed
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, COMPLIANT));
    compliant
        .map(|c| (format!("{:?}", c.status), &c.reason, c.observed_generation))
        .hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::condition::{Condition, ConditionStatus};
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn ed() -> EdgeDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
            "metadata": {"name": "m", "namespace": "ml", "generation": 1},
            "spec": {"model": {"name": "m", "version": "1", "source": {"uri": "s3://b/m"},
                               "architecture": "bert"},
                     "optimization": {"profile": {"memoryMiB": 256}}},
        }))
        .unwrap()
    }

    /// Found on the real control plane: every status write woke its own reconcile, so 1,000
    /// EdgeDeployments reconciled twice for every change.
    #[test]
    fn the_controllers_own_status_write_does_not_wake_it() {
        let before = ed();
        let mut after = before.clone();
        let mut status = after.status.clone().unwrap_or_default();
        status.phase = Some(crate::api::edge_deployment::Phase::Progressing);
        status.observed_generation = Some(1);
        after.status = Some(status);
        after.metadata.resource_version = Some("2".into());
        assert_eq!(wakes(&before), wakes(&after));
    }

    #[test]
    fn spec_commands_deletion_and_compliance_wake_it() {
        let base = wakes(&ed());
        let mut spec = ed();
        spec.metadata.generation = Some(2);
        let mut command = ed();
        command.metadata.annotations =
            Some([("kasmina.dev/abort".to_owned(), "1".to_owned())].into());
        let mut deleted = ed();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
            ));
        let mut judged = ed();
        let mut status = judged.status.clone().unwrap_or_default();
        status.conditions.push(Condition {
            type_: COMPLIANT.into(),
            status: ConditionStatus::False,
            reason: "Violation".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
            ),
        });
        judged.status = Some(status);
        for (what, changed) in [
            ("spec", spec),
            ("command", command),
            ("deletion", deleted),
            ("compliance", judged),
        ] {
            assert_ne!(wakes(&changed), base, "{what}");
        }
    }

    #[test]
    fn a_revisions_pods_are_its_runtime_pods_in_its_namespace() {
        let pod = |ns: &str, name: &str, rev: &str, component: &str| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some(ns.into());
            p.metadata.labels = Some(
                [
                    (NAME_LABEL.to_owned(), "m".to_owned()),
                    (COMPONENT_LABEL.to_owned(), component.to_owned()),
                    (REVISION_LABEL.to_owned(), rev.to_owned()),
                ]
                .into(),
            );
            p
        };
        let store = cache::filled(vec![
            pod("ml", "a", "r1", RUNTIME_COMPONENT),
            pod("ml", "b", "r2", RUNTIME_COMPONENT),
            pod("other", "c", "r1", RUNTIME_COMPONENT),
            pod("ml", "d", "r1", "build"),
        ]);
        let names: Vec<String> = revision_pods(&store, "ml", "m", "r1")
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn cached_children_keep_what_is_read_and_drop_the_rest() {
        let mut job = Job::default();
        job.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        job.spec = Some(k8s_openapi::api::batch::v1::JobSpec {
            template: PodTemplateSpec {
                spec: Some(Default::default()),
                ..Default::default()
            },
            backoff_limit: Some(3),
            ..Default::default()
        });
        job.status = Some(k8s_openapi::api::batch::v1::JobStatus {
            succeeded: Some(1),
            ..Default::default()
        });
        slim_job(&mut job);
        assert!(job.metadata.managed_fields.is_none());
        let spec = job.spec.as_ref().unwrap();
        assert!(spec.template.spec.is_none());
        assert_eq!(spec.backoff_limit, Some(3));
        assert_eq!(job.status.unwrap().succeeded, Some(1));
    }
}
