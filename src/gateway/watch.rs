//! The gateway's view of the cluster: its EdgeDeployment (for the split its rollout status
//! holds) and that EdgeDeployment's runtime pods (for who is ready where), each one watch;
//! every change rebuilds the routing table.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::proxy::Gateway;
use super::routes::Split;
use crate::api::EdgeDeployment;
use crate::controller::edge_deployment::names::{REVISION_LABEL, RUNTIME_PORT, runtime_selector};
use crate::controller::edge_deployment::replicas::kasmina_gateway;
// A runtime pod as the controller caches it: status (IP, readiness) and labels are what is read.
use crate::controller::edge_deployment::watch::{routable, slim_pod};

/// The split an EdgeDeployment's rollout status asks for, mirroring to the canary while its
/// analysis judges the canary's answers.
pub fn split_of(ed: &EdgeDeployment) -> Split {
    let rollout = ed.status.as_ref().and_then(|s| s.rollout.as_ref());
    let judged = ed
        .spec
        .strategy
        .analysis
        .as_ref()
        .is_some_and(crate::controller::edge_deployment::analysis::compares_outputs);
    let mirror = kasmina_gateway(&ed.spec)
        .filter(|_| judged)
        .map_or(0, |g| g.mirror_percent.min(100));
    Split {
        stable: rollout.and_then(|r| r.stable.clone()),
        canary: rollout.and_then(|r| r.candidate.clone()),
        weight: rollout.map_or(0, |r| r.weight.min(100)),
        mirror,
    }
}

/// Ready pods by revision, each by name and address, in name order.
pub fn ready_pods(pods: &[Arc<Pod>], port: u16) -> BTreeMap<String, Vec<(String, SocketAddr)>> {
    let mut out: BTreeMap<String, Vec<(String, SocketAddr)>> = BTreeMap::new();
    for pod in pods {
        let (Some(revision), Some(ip)) = (pod.labels().get(REVISION_LABEL), routable(pod)) else {
            continue;
        };
        out.entry(revision.clone())
            .or_default()
            .push((pod.name_any(), SocketAddr::new(ip, port)));
    }
    for pods in out.values_mut() {
        pods.sort();
    }
    out
}

/// Keeps `gateway`'s table current until `stop`; readiness turns true once both watches have
/// listed what exists.
pub async fn follow(
    client: Client,
    namespace: String,
    name: String,
    gateway: Arc<Gateway>,
    stop: CancellationToken,
) {
    let (eds, ed_writer) = reflector::store::<EdgeDeployment>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let ed_events = watcher(
        Api::<EdgeDeployment>::namespaced(client.clone(), &namespace),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .reflect(ed_writer)
    .map(|_| ());
    let pod_events = watcher(
        Api::<Pod>::namespaced(client, &namespace),
        watcher::Config::default().labels(&runtime_selector(&name, None)),
    )
    .default_backoff()
    .modify(slim_pod)
    .reflect(pod_writer)
    .map(|_| ());
    let mut events = std::pin::pin!(futures::stream::select(ed_events, pod_events));
    let synced = {
        let (eds, pods) = (eds.clone(), pods.clone());
        async move {
            let _ = eds.wait_until_ready().await;
            let _ = pods.wait_until_ready().await;
        }
    };
    tokio::pin!(synced);
    let mut ready = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = &mut synced, if !ready => {
                ready = true;
                rebuild(&gateway, &eds, &pods);
                gateway.health.set_ready(true);
                tracing::info!(edge_deployment = %name, "routes synced");
            }
            event = events.next() => {
                if event.is_none() {
                    return;
                }
                if ready {
                    rebuild(&gateway, &eds, &pods);
                }
            }
        }
    }
}

fn rebuild(gateway: &Gateway, eds: &Store<EdgeDeployment>, pods: &Store<Pod>) {
    let split = eds
        .state()
        .first()
        .map(|ed| split_of(ed))
        .unwrap_or_default();
    let ready = ready_pods(&pods.state(), RUNTIME_PORT as u16);
    let current = gateway.table();
    let table = current.next(split, ready);
    if table.split != current.split {
        tracing::info!(split = ?table.split, "split changed");
    }
    gateway.set_table(table);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, rev: &str, ip: &str, ready: &str, deleting: bool) -> Arc<Pod> {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {REVISION_LABEL: rev}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap();
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
                ));
        }
        Arc::new(p)
    }

    #[test]
    fn only_ready_pods_with_an_ip_that_are_not_leaving_take_requests() {
        let pods = vec![
            pod("b", "r1", "10.0.0.2", "True", false),
            pod("a", "r1", "10.0.0.1", "True", false),
            pod("c", "r1", "10.0.0.3", "False", false),
            pod("d", "r2", "10.0.0.4", "True", true),
            pod("e", "r2", "", "True", false),
            pod("f", "r3", "10.0.0.6", "True", false),
        ];
        let ready = ready_pods(&pods, 8080);
        let names = |rev: &str| -> Vec<String> {
            ready
                .get(rev)
                .map(|p| p.iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(names("r1"), ["a", "b"]);
        assert!(names("r2").is_empty());
        assert_eq!(ready["r3"][0].1, "10.0.0.6:8080".parse().unwrap());
    }

    #[test]
    fn the_split_is_the_rollout_status() {
        let ed: EdgeDeployment = serde_json::from_value(json!({
            "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
            "metadata": {"name": "m"},
            "spec": {"model": {"name": "m", "version": "1", "source": {"uri": "s3://b/m"},
                               "architecture": "bert"},
                     "optimization": {"profile": {"memoryMiB": 256}}},
            "status": {"rollout": {"stable": "r1", "candidate": "r2", "weight": 5}}
        }))
        .unwrap();
        assert_eq!(
            split_of(&ed),
            Split {
                stable: Some("r1".into()),
                canary: Some("r2".into()),
                weight: 5,
                mirror: 0,
            }
        );
        let mut none = ed.clone();
        none.status = None;
        assert_eq!(split_of(&none), Split::default());
        // An outputAgreement check through the gateway mirrors its share; any other does not.
        let mut judged = ed.clone();
        judged.spec.strategy = serde_json::from_value(json!({
            "type": "Canary",
            "canary": {"trafficRouting": {"gateway": {"mirrorPercent": 25}},
                       "steps": [{"setWeight": 5}]},
            "analysis": {"checks": [{"metric": "outputAgreement", "min": 0.995}]}
        }))
        .unwrap();
        assert_eq!(split_of(&judged).mirror, 25);
        let mut errors_only = judged.clone();
        errors_only.spec.strategy.analysis = serde_json::from_value(json!({
            "checks": [{"metric": "errorRate", "max": 0.01}]}))
        .unwrap();
        assert_eq!(split_of(&errors_only).mirror, 0);
    }
}
