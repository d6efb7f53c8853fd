//! Pure: the children of an EdgeDeployment whose canary is routed by `trafficRouting.gateway`:
//! a Deployment running `kasmina gateway`, the Service in front of it (the EdgeDeployment's
//! own Service name, so callers keep their address), and the ServiceAccount and RoleBinding
//! that let the gateway watch its EdgeDeployment and runtime pods.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;

use super::names::{COMPONENT_LABEL, NAME_LABEL, RUNTIME_PORT};
use super::security;
use super::workload::{Settings, http_service, labels, meta, pin_regions, probe, stamp};
use crate::api::edge_deployment::{Balancing, EdgeDeployment, GatewayRouting};

pub use super::names::GATEWAY_COMPONENT;

/// Name of the gateway's Deployment, ServiceAccount and RoleBinding.
pub fn gateway_name(ed: &EdgeDeployment) -> String {
    format!("{}-gateway", ed.name_any())
}

fn selector(ed: &EdgeDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_owned(), ed.name_any()),
        (COMPONENT_LABEL.to_owned(), GATEWAY_COMPONENT.to_owned()),
    ])
}

fn balancing_arg(b: Balancing) -> &'static str {
    match b {
        Balancing::PowerOfTwoChoices => "PowerOfTwoChoices",
        Balancing::RoundRobin => "RoundRobin",
    }
}

/// The gateway Deployment. `regions` pins it like the runtime (requests pass through it, so
/// data residency holds for it too).
pub fn deployment(
    settings: &Settings,
    ed: &EdgeDeployment,
    routing: &GatewayRouting,
    regions: &[String],
) -> Deployment {
    let labels = labels(ed, None, GATEWAY_COMPONENT);
    let args = vec![
        "gateway".into(),
        "--edge-deployment".into(),
        ed.name_any(),
        "--balancing".into(),
        balancing_arg(routing.balancing).into(),
        "--port".into(),
        RUNTIME_PORT.to_string(),
        // Endpoints take a few seconds to drop a terminating pod: keep routing meanwhile.
        "--drain-delay".into(),
        "5s".into(),
    ];
    stamp(Deployment {
        metadata: meta(ed, gateway_name(ed), labels.clone()),
        spec: DeploymentSpec {
            replicas: Some(routing.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(ed)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gateway_name(ed)),
                    containers: vec![Container {
                        name: "gateway".into(),
                        image: Some(settings.image.clone()),
                        args: Some(args),
                        env: Some(vec![EnvVar {
                            name: "POD_NAMESPACE".into(),
                            value_from: Some(EnvVarSource {
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.namespace".into(),
                                    ..ObjectFieldSelector::default()
                                }),
                                ..EnvVarSource::default()
                            }),
                            ..EnvVar::default()
                        }]),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: RUNTIME_PORT,
                            protocol: Some("TCP".into()),
                            ..ContainerPort::default()
                        }]),
                        readiness_probe: Some(probe("/readyz", 2)),
                        liveness_probe: Some(probe("/healthz", 10)),
                        ..Container::default()
                    }],
                    affinity: pin_regions(None, regions),
                    security_context: Some(security::pod_security()),
                    // drain delay + the gateway's drain timeout.
                    termination_grace_period_seconds: Some(40),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    })
}

/// The EdgeDeployment's Service, in front of the gateway pods.
pub fn service(ed: &EdgeDeployment) -> Service {
    http_service(ed, ed.name_any(), GATEWAY_COMPONENT, selector(ed))
}

/// The gateway's identity and what it may read: the ServiceAccount, and its RoleBinding to the
/// chart's gateway ClusterRole in this namespace only.
pub fn access(settings: &Settings, ed: &EdgeDeployment) -> (ServiceAccount, RoleBinding) {
    let name = gateway_name(ed);
    let labels = labels(ed, None, GATEWAY_COMPONENT);
    let account = stamp(ServiceAccount {
        metadata: meta(ed, name.clone(), labels.clone()),
        ..ServiceAccount::default()
    });
    let binding = stamp(RoleBinding {
        metadata: meta(ed, name.clone(), labels),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: settings.gateway_cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: ed.namespace(),
            ..Subject::default()
        }]),
    });
    (account, binding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::edge_deployment::plan::tests::sample;

    fn settings() -> Settings {
        Settings {
            image: "kasmina:test".into(),
            artifact_store: "file:///var/lib/kasmina".into(),
            artifact_store_secret: None,
            host_paths: vec![],
            gateway_cluster_role: "kasmina-gateway".into(),
        }
    }

    #[test]
    fn the_gateway_runs_as_its_own_account_and_the_service_selects_it_only() {
        let ed = sample();
        let routing = GatewayRouting {
            balancing: Balancing::RoundRobin,
            replicas: 2,
            ..GatewayRouting::default()
        };
        let d = deployment(&settings(), &ed, &routing, &["eu-west-1".into()]);
        assert_eq!(d.name_any(), format!("{}-gateway", ed.name_any()));
        let spec = &d.spec;
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(d.name_any().as_str())
        );
        let args = pod.containers[0].args.clone().unwrap();
        let at = args.iter().position(|a| a == "--balancing").unwrap();
        assert_eq!(args[at + 1], "RoundRobin");
        assert!(args.contains(&ed.name_any()));
        assert!(pod.affinity.is_some(), "pinned to the allowed regions");
        assert!(
            d.owner_references()
                .iter()
                .any(|o| o.controller == Some(true)),
            "owned by its EdgeDeployment"
        );
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        let svc = service(&ed);
        let selector = svc.spec.unwrap().selector.unwrap();
        assert!(
            selector
                .iter()
                .all(|(k, v)| template_labels.get(k) == Some(v))
        );
        assert_eq!(selector[COMPONENT_LABEL], GATEWAY_COMPONENT);
        let (account, binding) = access(&settings(), &ed);
        assert_eq!(account.name_any(), d.name_any());
        assert_eq!(binding.role_ref.name, "kasmina-gateway");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.kind.as_str(), subject.name.as_str()),
            ("ServiceAccount", d.name_any().as_str())
        );
        assert_eq!(subject.namespace, ed.namespace());
    }
}
