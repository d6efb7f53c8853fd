//! Pure: the child objects of an EdgeDeployment — the build Job of a revision, the runtime
//! Deployment of each live revision, and its Services. Each carries a controller owner
//! reference and a hash of its own content, so the reconciler applies only what changed.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvFromSource, HTTPGetAction,
    HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PodSpec, PodTemplateSpec, Probe, SecretEnvSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use super::names::{
    COMPONENT_LABEL, HASH_ANNOTATION, NAME_LABEL, REVISION_LABEL, RUNTIME_COMPONENT, RUNTIME_PORT,
    SERVICE_PORT, deployment_name, fnv1a64, job_name,
};
use super::security::{self, Security};
use crate::api::edge_deployment::{
    ArtifactStatus, DeviceProfile, EdgeDeployment, PruningMethod, Quantization,
};
use crate::controller::compliance_profile::rules::REGION_LABEL;

/// How the operator's children are made: the image and where artifacts live.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The operator's image; it holds `kasmina build` and `kasmina serve`.
    pub image: String,
    /// Artifact store prefix; artifacts go to `<store>/<namespace>/<name>/<revision>/`.
    /// `file:///path` mounts that host path into Jobs and pods (single-node clusters, k3s on
    /// a device); object stores (`s3://`, `gs://`, `az://`) need credentials.
    pub artifact_store: String,
    /// A Secret in each EdgeDeployment's namespace with the artifact store's credentials
    /// (optional: pods start without it).
    pub artifact_store_secret: Option<String>,
    /// Folders on the nodes that a `file://` model source may name (it is mounted into the
    /// build pod); the artifact store's own folder is always allowed.
    pub host_paths: Vec<String>,
    /// The ClusterRole a gateway's ServiceAccount is bound to in its namespace.
    pub gateway_cluster_role: String,
}

impl Settings {
    /// Why a `file://` source may not be mounted (None: allowed, or not a file:// source).
    /// Without this any user who may create an EdgeDeployment could mount the node's `/`.
    pub fn host_source_refusal(&self, uri: &str) -> Option<String> {
        let path = uri.strip_prefix("file://")?;
        let allowed: Vec<&str> = self
            .host_paths
            .iter()
            .map(String::as_str)
            .chain(self.artifact_store.strip_prefix("file://"))
            .map(|p| p.trim_end_matches('/'))
            .filter(|p| !p.is_empty())
            .collect();
        let escapes = path.split('/').any(|c| c == ".." || c == ".");
        let under = |prefix: &&str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if !escapes && allowed.iter().any(under) {
            return None;
        }
        let list = if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        };
        Some(format!(
            "spec.model.source.uri: {uri:?} is not under a folder the operator may mount from its \
             nodes (allowed: {list}; the chart's value `hostPaths` adds folders)"
        ))
    }
}

/// Where the artifact of `revision` is stored.
/// Where a built revision's artifact is: the URI its build recorded, else where it was written.
pub fn built_artifact_uri(
    settings: &Settings,
    ed: &EdgeDeployment,
    revision: &str,
    artifact: &ArtifactStatus,
) -> String {
    artifact
        .uri
        .clone()
        .unwrap_or_else(|| artifact_uri(settings, ed, revision))
}

pub fn artifact_uri(settings: &Settings, ed: &EdgeDeployment, revision: &str) -> String {
    format!(
        "{}/{}/{}/{revision}/",
        settings.artifact_store.trim_end_matches('/'),
        ed.namespace().unwrap_or_default(),
        ed.name_any()
    )
}

pub(super) fn labels(
    ed: &EdgeDeployment,
    revision: Option<&str>,
    component: &str,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (NAME_LABEL.to_owned(), ed.name_any()),
        (COMPONENT_LABEL.to_owned(), component.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "kasmina".to_owned(),
        ),
    ]);
    if let Some(rev) = revision {
        labels.insert(REVISION_LABEL.to_owned(), rev.to_owned());
    }
    labels
}

fn owner(ed: &EdgeDeployment) -> Vec<OwnerReference> {
    ed.controller_owner_ref(&()).into_iter().collect()
}

pub(super) fn meta(
    ed: &EdgeDeployment,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ed.namespace(),
        labels: Some(labels),
        owner_references: Some(owner(ed)),
        ..ObjectMeta::default()
    }
}

/// Stamps `object` with the hash of its content (without the stamp).
pub fn stamp<K: Resource + Serialize>(mut object: K) -> K {
    let hash = format!(
        "{:016x}",
        fnv1a64(&serde_json::to_vec(&object).unwrap_or_default())
    );
    object
        .annotations_mut()
        .insert(HASH_ANNOTATION.to_owned(), hash);
    object
}

/// Whether a live object already carries what `desired` would apply.
pub fn up_to_date<K: Resource>(live: &K, desired: &K) -> bool {
    let hash = |k: &K| k.meta().annotations.as_ref()?.get(HASH_ANNOTATION).cloned();
    hash(live).is_some() && hash(live) == hash(desired)
}

/// A host folder for a `file://` URI, as a volume and its mount at the same path (None for
/// other schemes).
fn host_path(
    name: &str,
    uri: &str,
    type_: Option<&str>,
    read_only: bool,
) -> Option<(Volume, VolumeMount)> {
    let path = uri.strip_prefix("file://")?;
    Some((
        Volume {
            name: name.into(),
            host_path: Some(HostPathVolumeSource {
                path: path.to_owned(),
                type_: type_.map(str::to_owned),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: name.into(),
            mount_path: path.to_owned(),
            read_only: read_only.then_some(true),
            ..VolumeMount::default()
        },
    ))
}

fn store_volume(settings: &Settings) -> Option<(Volume, VolumeMount)> {
    host_path(
        "artifacts",
        &settings.artifact_store,
        Some("DirectoryOrCreate"),
        false,
    )
}

/// For a `file://` store: the init container that gives the store's folder, and this
/// EdgeDeployment's folders in it, to the image's user before the Job's container (that user)
/// writes or deletes there. The kubelet makes a missing hostPath folder root's, mode 0755.
/// Root with only `CAP_CHOWN`: a hostPath volume already needs a namespace that admits
/// privileged pods (Pod Security `privileged`).
fn own_store(settings: &Settings, ed: &EdgeDeployment) -> Option<Container> {
    let (_, mount) = store_volume(settings)?;
    let root = mount.mount_path.trim_end_matches('/').to_owned();
    let ns = format!("{root}/{}", ed.namespace().unwrap_or_default());
    let own = format!("{ns}/{}", ed.name_any());
    let owner = format!("{}:{}", security::IMAGE_USER, security::IMAGE_USER);
    Some(Container {
        name: "own-store".into(),
        image: Some(settings.image.clone()),
        args: Some(vec![
            "own-store".into(),
            "--owner".into(),
            owner,
            root,
            ns,
            own,
        ]),
        volume_mounts: Some(vec![mount]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["CHOWN".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    })
}

fn non_empty<T>(list: Vec<T>) -> Option<Vec<T>> {
    (!list.is_empty()).then_some(list)
}

fn env_from(secrets: impl IntoIterator<Item = String>) -> Option<Vec<EnvFromSource>> {
    let list: Vec<EnvFromSource> = secrets
        .into_iter()
        .map(|name| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name,
                optional: Some(true),
            }),
            ..EnvFromSource::default()
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

fn quantization_arg(q: Quantization) -> &'static str {
    match q {
        Quantization::Auto => "auto",
        Quantization::Q8_0 => "q8_0",
        Quantization::Q4_0 => "q4_0",
        Quantization::Q4K => "q4_k",
        Quantization::F16 => "f16",
        Quantization::None => "none",
    }
}

/// The build Job of `revision`, planning for `profile` (the spec's, or the one `auto` found).
pub fn build_job(
    settings: &Settings,
    ed: &EdgeDeployment,
    revision: &str,
    profile: Option<&DeviceProfile>,
    security: &Security,
) -> Job {
    let spec = &ed.spec;
    let opt = &spec.optimization;
    let mut args: Vec<String> = vec![
        "build".into(),
        "--source".into(),
        spec.model.source.uri.clone(),
        "--architecture".into(),
        serde_json::to_value(spec.model.architecture)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        "--quantization".into(),
        quantization_arg(opt.quantization).into(),
        "--max-quality-loss".into(),
        opt.max_quality_loss.to_string(),
        "--name".into(),
        spec.model.name.clone(),
        "--version".into(),
        spec.model.version.clone(),
        "--out".into(),
        artifact_uri(settings, ed, revision),
        // The revision's folder is this Job's: a retried attempt, or the same revision built
        // again for an EdgeDeployment made anew, replaces what is there.
        "--replace".into(),
        "--termination-log".into(),
        "/dev/termination-log".into(),
    ];
    if let Some(p) = profile {
        args.push("--profile".into());
        args.push(format!(
            "memoryMiB={},cpuCores={}",
            p.memory_mib, p.cpu_cores
        ));
    }
    if let Some(pruning) = &opt.pruning {
        args.push("--pruning".into());
        args.push(match pruning.method {
            PruningMethod::Magnitude => format!("magnitude:{}", pruning.sparsity.unwrap_or(0.0)),
            PruningMethod::SemiStructured24 => "2:4".into(),
        });
    }
    let (key_args, keys) = security::build_keys(security.needs, security.keys.as_ref());
    args.extend(key_args);
    // A file:// source is a folder or a file on the node (or a PVC the cluster mounts at that
    // path). No hostPath type: `Directory` would refuse a single-file source, and a missing
    // path would leave the pod waiting on its mount forever instead of failing the build
    // with the builder's message (the node mounts an empty folder there).
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) = store_volume(settings)
        .into_iter()
        .chain(host_path("source", &spec.model.source.uri, None, true))
        .chain(keys)
        .unzip();
    let secrets = spec
        .model
        .source
        .credentials_secret_ref
        .iter()
        .map(|s| s.name.clone())
        .chain(settings.artifact_store_secret.clone());
    let container = Container {
        name: "build".into(),
        image: Some(settings.image.clone()),
        args: Some(args),
        env_from: env_from(secrets),
        volume_mounts: non_empty(mounts),
        ..Container::default()
    };
    let labels = labels(ed, Some(revision), "build");
    // The outcome is copied into status; the Job only needs to outlive one reconcile.
    run_once(
        settings,
        ed,
        job_name(ed, revision),
        labels,
        1,
        container,
        volumes,
    )
}

/// The Job that deletes the artifacts at `uris` (revisions past a profile's `retentionDays` or
/// the history limit), with the store's credentials. Named by the set, so planning it twice
/// creates it once.
pub fn retention_job(settings: &Settings, ed: &EdgeDeployment, uris: &[String]) -> Job {
    let hash = fnv1a64(uris.join("\n").as_bytes());
    let name = format!("{}-retention-{:08x}", ed.name_any(), hash as u32);
    delete_artifacts_job(settings, ed, name, "retention", uris)
}

/// The Job that deletes every artifact of an EdgeDeployment being deleted. Not owned by it: a
/// foreground deletion would collect an owned Job before it ran. It goes an hour after it
/// ends.
pub fn cleanup_job(settings: &Settings, ed: &EdgeDeployment, name: String, uris: &[String]) -> Job {
    let mut job = delete_artifacts_job(settings, ed, name, "cleanup", uris);
    job.metadata.owner_references = None;
    stamp(job)
}

fn delete_artifacts_job(
    settings: &Settings,
    ed: &EdgeDeployment,
    name: String,
    component: &str,
    uris: &[String],
) -> Job {
    let mut args = vec!["delete-artifacts".to_owned()];
    args.extend(uris.iter().cloned());
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) =
        store_volume(settings).into_iter().unzip();
    let container = Container {
        name: component.into(),
        image: Some(settings.image.clone()),
        args: Some(args),
        env_from: env_from(settings.artifact_store_secret.clone()),
        volume_mounts: non_empty(mounts),
        ..Container::default()
    };
    let labels = labels(ed, None, component);
    run_once(settings, ed, name, labels, 3, container, volumes)
}

/// A Job of one container run to completion, kept an hour after it ends. Its error text
/// becomes the termination message, which the reconciler reads.
fn run_once(
    settings: &Settings,
    ed: &EdgeDeployment,
    name: String,
    labels: BTreeMap<String, String>,
    backoff_limit: i32,
    container: Container,
    volumes: Vec<Volume>,
) -> Job {
    stamp(Job {
        metadata: meta(ed, name, labels.clone()),
        spec: Some(JobSpec {
            backoff_limit: Some(backoff_limit),
            ttl_seconds_after_finished: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    security_context: Some(security::pod_security()),
                    init_containers: own_store(settings, ed).map(|c| vec![c]),
                    containers: vec![Container {
                        termination_message_policy: Some("FallbackToLogsOnError".into()),
                        ..container
                    }],
                    volumes: non_empty(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

pub(super) fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The template's affinity, with the runtime required to run in `regions` (the
/// ComplianceProfiles' `allowedRegions`; empty: unchanged). Node selector terms are ORed, so
/// the region requirement goes into each of them.
pub fn pin_regions(affinity: Option<&Affinity>, regions: &[String]) -> Option<Affinity> {
    if regions.is_empty() {
        return affinity.cloned();
    }
    let requirement = NodeSelectorRequirement {
        key: REGION_LABEL.into(),
        operator: "In".into(),
        values: Some(regions.to_vec()),
    };
    let mut affinity = affinity.cloned().unwrap_or_default();
    let node = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = node
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default);
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .push(requirement.clone());
    }
    Some(affinity)
}

/// The runtime Deployment of one live revision; `regions` pins its pods (data residency),
/// `security` says which keys it verifies, decrypts and authenticates with.
pub fn runtime_deployment(
    settings: &Settings,
    ed: &EdgeDeployment,
    revision: &str,
    artifact: &ArtifactStatus,
    replicas: i32,
    regions: &[String],
    security: &Security,
) -> Deployment {
    let template = &ed.spec.template;
    let selector = BTreeMap::from([
        (NAME_LABEL.to_owned(), ed.name_any()),
        (REVISION_LABEL.to_owned(), revision.to_owned()),
    ]);
    let labels = labels(ed, Some(revision), RUNTIME_COMPONENT);
    let (key_args, keys) = security::runtime_keys(
        artifact,
        security.needs.authenticate,
        security.keys.as_ref(),
    );
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) =
        store_volume(settings).into_iter().chain(keys).unzip();
    let uri = built_artifact_uri(settings, ed, revision, artifact);
    let mut args = vec![
        "serve".into(),
        "--artifact".into(),
        uri,
        "--expect-digest".into(),
        artifact.digest.clone(),
        "--port".into(),
        RUNTIME_PORT.to_string(),
        "--revision".into(),
        revision.to_owned(),
        // Endpoints take a few seconds to drop a terminating pod: keep serving meanwhile.
        "--drain-delay".into(),
        "5s".into(),
        // Why an artifact was refused, for the rollout's abort reason (see build::refusal).
        "--termination-log".into(),
        "/dev/termination-log".into(),
    ];
    args.extend(key_args);
    stamp(Deployment {
        metadata: meta(ed, deployment_name(ed, revision), labels.clone()),
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "runtime".into(),
                        image: Some(settings.image.clone()),
                        args: Some(args),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: RUNTIME_PORT,
                            // A list key of server-side apply; servers before 1.21 refuse
                            // an apply that omits it.
                            protocol: Some("TCP".into()),
                            ..ContainerPort::default()
                        }]),
                        readiness_probe: Some(probe("/v2/health/ready", 2)),
                        liveness_probe: Some(probe("/v2/health/live", 10)),
                        resources: template.resources.clone(),
                        env_from: env_from(settings.artifact_store_secret.clone()),
                        volume_mounts: non_empty(mounts),
                        // A refusal's reason becomes the termination message (see build::refusal).
                        termination_message_policy: Some("FallbackToLogsOnError".into()),
                        ..Container::default()
                    }],
                    volumes: non_empty(volumes),
                    node_selector: (!template.node_selector.is_empty())
                        .then(|| template.node_selector.clone()),
                    tolerations: (!template.tolerations.is_empty())
                        .then(|| template.tolerations.clone()),
                    affinity: pin_regions(template.affinity.as_ref(), regions),
                    priority_class_name: template.priority_class_name.clone(),
                    security_context: Some(security::pod_security()),
                    // drain delay + drain timeout of the runtime.
                    termination_grace_period_seconds: Some(40),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    })
}

/// A Service named `name` over the runtime pods; `revision` narrows it to one revision
/// (None: every live revision, which is how `replicaRatio` splits traffic).
pub fn service(ed: &EdgeDeployment, name: String, revision: Option<&str>) -> Service {
    let mut selector = BTreeMap::from([
        (NAME_LABEL.to_owned(), ed.name_any()),
        (COMPONENT_LABEL.to_owned(), RUNTIME_COMPONENT.to_owned()),
    ]);
    if let Some(rev) = revision {
        selector.insert(REVISION_LABEL.to_owned(), rev.to_owned());
    }
    http_service(ed, name, RUNTIME_COMPONENT, selector)
}

/// A Service named `name` of `component`, over the pods `selector` matches, on the HTTP port.
pub(super) fn http_service(
    ed: &EdgeDeployment,
    name: String,
    component: &str,
    selector: BTreeMap<String, String>,
) -> Service {
    stamp(Service {
        metadata: meta(ed, name, labels(ed, None, component)),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVICE_PORT,
                // A list key of server-side apply (see the container port).
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String("http".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::edge_deployment::names::runtime_selector;
    use crate::controller::edge_deployment::plan::tests::sample;

    fn settings() -> Settings {
        Settings {
            image: "kasmina:0.1.0".into(),
            artifact_store: "s3://artifacts/kasmina/".into(),
            artifact_store_secret: Some("artifact-store".into()),
            host_paths: vec!["/models".into()],
            gateway_cluster_role: "kasmina-gateway".into(),
        }
    }

    /// Found in review: `source.uri: file:///` mounted the node's `/` into a build pod.
    #[test]
    fn file_sources_are_allowed_only_under_the_configured_folders() {
        let mut s = settings();
        s.artifact_store = "file:///var/lib/kasmina/artifacts/".into();
        for allowed in [
            "file:///models",
            "file:///models/minilm",
            "file:///var/lib/kasmina/artifacts/ml/x/0123/model.gguf",
            "s3://models/minilm",
        ] {
            assert_eq!(s.host_source_refusal(allowed), None, "{allowed}");
        }
        for refused in [
            "file:///",
            "file:///etc",
            "file:///models-private/x",
            "file:///models/../etc/shadow",
            "file:///var/lib/kasmina",
        ] {
            let why = s.host_source_refusal(refused).expect(refused);
            assert!(why.starts_with("spec.model.source.uri:"), "{why}");
            assert!(
                why.contains("allowed: /models, /var/lib/kasmina/artifacts"),
                "{why}"
            );
        }
        s.host_paths.clear();
        s.artifact_store = "s3://a".into();
        assert!(
            s.host_source_refusal("file:///models/x")
                .unwrap()
                .contains("allowed: none")
        );
    }

    /// Found in review: the scale subresource's selector and the Services matched every pod
    /// labelled with the EdgeDeployment's name, build and retention Jobs' pods too (the
    /// Service would send requests to a build pod; `kubectl scale` counted it).
    #[test]
    fn selectors_match_runtime_pods_only() {
        let ed = sample();
        let rev = "0123456789abcdef";
        let matches = |selector: &str, labels: &BTreeMap<String, String>| {
            selector.split(',').all(|term| {
                let (k, v) = term.split_once('=').unwrap();
                labels.get(k).map(String::as_str) == Some(v)
            })
        };
        let pod_labels = |job: Job| job.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        let build = pod_labels(build_job(&settings(), &ed, rev, None, &Security::default()));
        let retention = pod_labels(retention_job(&settings(), &ed, &["s3://a/b".into()]));
        let runtime = runtime_deployment(
            &settings(),
            &ed,
            rev,
            &ArtifactStatus::default(),
            1,
            &[],
            &Security::default(),
        )
        .spec
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap();
        for selector in [
            runtime_selector("sentiment", None),
            runtime_selector("sentiment", Some(rev)),
        ] {
            assert!(matches(&selector, &runtime), "{selector}");
            assert!(
                !matches(&selector, &build),
                "{selector} matches a build pod"
            );
            assert!(
                !matches(&selector, &retention),
                "{selector} matches a retention pod"
            );
        }
        for revision in [None, Some(rev)] {
            let selector = service(&ed, "sentiment".into(), revision)
                .spec
                .unwrap()
                .selector
                .unwrap();
            assert!(selector.iter().all(|(k, v)| runtime.get(k) == Some(v)));
            assert!(!selector.iter().all(|(k, v)| build.get(k) == Some(v)));
        }
    }

    #[test]
    fn build_job_writes_under_the_store_and_reports_through_the_termination_message() {
        let mut ed = sample();
        ed.metadata.uid = Some("uid-1".into());
        ed.spec.model.source.credentials_secret_ref =
            Some(crate::api::edge_deployment::SecretRef { name: "hf".into() });
        let profile = DeviceProfile {
            memory_mib: 256,
            cpu_cores: 2,
            accelerator: Default::default(),
        };
        let job = build_job(
            &settings(),
            &ed,
            "0123456789abcdef",
            Some(&profile),
            &Security::default(),
        );
        assert_eq!(job.name_any(), "sentiment-build-01234567");
        assert_eq!(job.owner_references()[0].uid, "uid-1");
        assert_eq!(job.owner_references()[0].controller, Some(true));
        let pod = job.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.contains("--out s3://artifacts/kasmina/ml/sentiment/0123456789abcdef/"),
            "{args}"
        );
        assert!(
            args.contains("--profile memoryMiB=256,cpuCores=2"),
            "{args}"
        );
        assert!(args.contains("--termination-log /dev/termination-log"));
        assert!(args.contains(" --replace "), "{args}");
        let secrets: Vec<_> = c
            .env_from
            .iter()
            .flatten()
            .filter_map(|e| e.secret_ref.as_ref().map(|s| s.name.as_str()))
            .collect();
        assert_eq!(secrets, ["hf", "artifact-store"]);
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn runtime_deployment_serves_the_verified_digest_with_oip_probes() {
        let ed = sample();
        let artifact = ArtifactStatus {
            digest: "sha256:abc".into(),
            uri: Some("s3://a/b/".into()),
            ..ArtifactStatus::default()
        };
        let d = runtime_deployment(
            &settings(),
            &ed,
            "0123456789abcdef",
            &artifact,
            3,
            &[],
            &Security::default(),
        );
        assert_eq!(d.name_any(), "sentiment-01234567");
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(3));
        let c = &spec.template.spec.unwrap().containers[0];
        let args = c.args.clone().unwrap().join(" ");
        assert!(args.starts_with("serve --artifact s3://a/b/ --expect-digest sha256:abc"));
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/v2/health/ready"));
        assert_eq!(
            spec.template.metadata.unwrap().labels.unwrap()[REVISION_LABEL],
            "0123456789abcdef"
        );
    }

    /// Servers before 1.21 refuse a server-side apply whose port omits `protocol` (a list
    /// key there); found on a real 1.19 API server, where the first Service never appeared.
    #[test]
    fn every_port_names_its_protocol_for_server_side_apply() {
        let ed = sample();
        let d = runtime_deployment(
            &settings(),
            &ed,
            "0123456789abcdef",
            &ArtifactStatus::default(),
            1,
            &[],
            &Security::default(),
        );
        for c in d.spec.template.spec.unwrap().containers {
            for port in c.ports.unwrap() {
                assert_eq!(port.protocol.as_deref(), Some("TCP"), "{port:?}");
            }
        }
        for revision in [None, Some("r1")] {
            let s = service(&ed, "sentiment".into(), revision);
            for port in s.spec.unwrap().ports.unwrap() {
                assert_eq!(port.protocol.as_deref(), Some("TCP"), "{port:?}");
            }
        }
    }

    #[test]
    fn the_hash_changes_with_the_content_only() {
        let ed = sample();
        let a = service(&ed, "sentiment".into(), Some("r1"));
        let b = service(&ed, "sentiment".into(), Some("r1"));
        let c = service(&ed, "sentiment".into(), Some("r2"));
        assert!(up_to_date(&a, &b));
        assert!(!up_to_date(&a, &c));
        let mut unstamped = a.clone();
        unstamped.metadata.annotations = None;
        assert!(
            !up_to_date(&unstamped, &a),
            "a live object without the stamp is re-applied"
        );
    }

    #[test]
    fn a_file_store_and_source_are_mounted_from_the_host() {
        let mut s = settings();
        s.artifact_store = "file:///var/lib/kasmina".into();
        let mut ed = sample();
        ed.spec.model.source.uri = "file:///models/minilm".into();
        let job = build_job(&s, &ed, "r", None, &Security::default());
        let pod = job.spec.unwrap().template.spec.unwrap();
        let paths: Vec<_> = pod
            .volumes
            .unwrap()
            .iter()
            .map(|v| {
                let h = v.host_path.as_ref().unwrap();
                (h.path.clone(), h.type_.clone())
            })
            .collect();
        // The source has no type: it may be a file, and a missing one must fail the build
        // with the builder's message, not hang the pod on its mount.
        assert_eq!(
            paths,
            [
                ("/var/lib/kasmina".into(), Some("DirectoryOrCreate".into())),
                ("/models/minilm".into(), None)
            ]
        );
    }

    /// Found in review: the kubelet makes a missing hostPath folder root's (0755), and the
    /// builder runs as the image's user, so on a real node a `file://` store took no artifact.
    #[test]
    fn the_jobs_give_a_file_store_to_the_image_user_first() {
        let mut s = settings();
        s.artifact_store = "file:///var/lib/kasmina/artifacts/".into();
        let ed = sample();
        let jobs = [
            build_job(&s, &ed, "r", None, &Security::default()),
            retention_job(
                &s,
                &ed,
                &["file:///var/lib/kasmina/artifacts/ml/sentiment/a/".into()],
            ),
            cleanup_job(&s, &ed, "c".into(), &[]),
        ];
        for job in jobs {
            let pod = job.spec.unwrap().template.spec.unwrap();
            let init = pod.init_containers.as_deref().unwrap_or_default();
            assert_eq!(init.len(), 1, "{:?}", job.metadata.name);
            let own = &init[0];
            assert_eq!(
                own.args.clone().unwrap(),
                [
                    "own-store",
                    "--owner",
                    "65532:65532",
                    "/var/lib/kasmina/artifacts",
                    "/var/lib/kasmina/artifacts/ml",
                    "/var/lib/kasmina/artifacts/ml/sentiment",
                ]
            );
            assert_eq!(
                own.volume_mounts.as_ref().unwrap()[0].mount_path,
                "/var/lib/kasmina/artifacts/"
            );
            let sc = own.security_context.as_ref().unwrap();
            assert_eq!((sc.run_as_user, sc.run_as_non_root), (Some(0), Some(false)));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            let caps = sc.capabilities.as_ref().unwrap();
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
            assert_eq!(caps.add.as_deref(), Some(&["CHOWN".to_owned()][..]));
            // The Job's own container stays the image's non-root user.
            assert!(pod.containers[0].security_context.is_none());
            assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        }
        // An object store has no folder to give.
        let job = build_job(&settings(), &ed, "r", None, &Security::default());
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert!(pod.init_containers.is_none());
    }

    fn required_terms(affinity: Affinity) -> Vec<NodeSelectorTerm> {
        affinity
            .node_affinity
            .and_then(|n| n.required_during_scheduling_ignored_during_execution)
            .map(|r| r.node_selector_terms)
            .unwrap_or_default()
    }

    #[test]
    fn compliance_regions_pin_every_node_selector_term() {
        let regions = vec!["eu-west-1".to_owned(), "eu-central-1".to_owned()];
        assert_eq!(pin_regions(None, &[]), None, "no profile, no pin");
        let pinned = pin_regions(None, &regions).unwrap();
        let terms = required_terms(pinned);
        assert_eq!(terms.len(), 1);
        let e = &terms[0].match_expressions.as_ref().unwrap()[0];
        assert_eq!((e.key.as_str(), e.operator.as_str()), (REGION_LABEL, "In"));
        assert_eq!(e.values.as_ref().unwrap(), &regions);

        // The user's own terms are kept, and each of them gets the region (terms are ORed).
        let own: Affinity = serde_json::from_value(serde_json::json!({"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kasmina.dev/accelerator", "operator": "In", "values": ["npu"]}]},
                {"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["edge"]}]}]}},
            "podAntiAffinity": {}}))
        .unwrap();
        let pinned = pin_regions(Some(&own), &regions).unwrap();
        assert!(pinned.pod_anti_affinity.is_some());
        let terms = required_terms(pinned);
        assert_eq!(terms.len(), 2);
        for term in terms {
            let keys: Vec<String> = term
                .match_expressions
                .unwrap()
                .into_iter()
                .map(|e| e.key)
                .collect();
            assert_eq!(keys.len(), 2);
            assert_eq!(keys[1], REGION_LABEL);
        }

        // And the runtime Deployment carries it.
        let artifact = ArtifactStatus {
            digest: "sha256:abc".into(),
            ..ArtifactStatus::default()
        };
        let d = runtime_deployment(
            &settings(),
            &sample(),
            "0123456789abcdef",
            &artifact,
            3,
            &regions,
            &Security::default(),
        );
        let affinity = d.spec.template.spec.unwrap().affinity.unwrap();
        assert!(
            serde_json::to_string(&affinity)
                .unwrap()
                .contains("eu-central-1")
        );
    }
}
