//! Lifecycle: all-MiniLM from a `file://` source → build Job → Ready runtime pods → OIP v2
//! infer through the Service's ClusterIP → a new version as a replicaRatio canary, promoted →
//! a version whose analysis fails, rolled back with the reason in status and an Event. Probe
//! traffic runs through the whole story and must meet no failure.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::{Phase, RolloutOutcome};
use kube::ResourceExt;
use serde_json::json;

use crate::support::model::{self, healthy, infer_body, minilm, rolled_back_for};
use crate::support::traffic::{Load, Traffic, infer_once};
use crate::support::{Scenario, event, kubectl, wait, wait_gone};

const NAME: &str = "minilm";
const FIVE_MINUTES: Duration = Duration::from_secs(300);

fn canary(checks: serde_json::Value) -> serde_json::Value {
    json!({
        "type": "Canary",
        "canary": {"trafficRouting": {"replicaRatio": {}},
                   "steps": [{"setWeight": 50}, {"pause": {"duration": "5s"}}, {"analysis": {}}]},
        "analysis": {"interval": "5s", "failureLimit": 1, "checks": checks},
    })
}

/// The ClusterIP URL of a Service's OIP infer endpoint.
pub async fn infer_url(s: &Scenario, service: &str) -> String {
    let svc = wait(
        &s.api::<Service>(),
        service,
        "a ClusterIP",
        Duration::from_secs(60),
        |svc: &Service| {
            svc.spec
                .as_ref()
                .and_then(|sp| sp.cluster_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty() && ip != "None")
        },
    )
    .await;
    let ip = svc.spec.and_then(|sp| sp.cluster_ip).unwrap_or_default();
    format!("http://{ip}:80/v2/models/minilm/infer")
}

pub async fn run_scenario() {
    let s = Scenario::begin("lifecycle").await;
    let eds = s.api::<EdgeDeployment>();
    let good = json!([{"metric": "errorRate", "max": 0.01}]);

    // 1. The first version: a build Job owned by the EdgeDeployment, then Ready pods.
    let started = Instant::now();
    s.apply::<EdgeDeployment>(minilm(NAME, "1.0.0", 2, canary(good.clone())))
        .await;
    let ed = wait(
        &eds,
        NAME,
        "a target revision",
        Duration::from_secs(30),
        |ed| {
            ed.status
                .as_ref()
                .is_some_and(|st| st.target_revision.is_some())
        },
    )
    .await;
    let first = ed
        .status
        .clone()
        .and_then(|st| st.target_revision)
        .unwrap_or_default();
    let job = wait(
        &s.api::<Job>(),
        &format!("{NAME}-build-{}", &first[..8]),
        "the build Job",
        Duration::from_secs(30),
        |j: &Job| {
            j.owner_references()
                .iter()
                .any(|o| o.kind == "EdgeDeployment" && o.controller == Some(true))
        },
    )
    .await;
    wait(
        &s.api::<Job>(),
        &job.name_any(),
        "the build to succeed",
        FIVE_MINUTES,
        |j: &Job| j.status.as_ref().and_then(|st| st.succeeded).unwrap_or(0) >= 1,
    )
    .await;
    s.seconds("first build", started.elapsed());
    let ed = healthy(&eds, NAME, "1.0.0", FIVE_MINUTES).await;
    s.seconds("time to Ready from apply", started.elapsed());
    let status = ed.status.clone().unwrap_or_default();
    let artifact = status.artifact.clone().expect("status.artifact");
    assert!(artifact.digest.starts_with("sha256:"), "{artifact:?}");
    assert_eq!(artifact.quantization, "q8_0");
    assert!(
        artifact.size_bytes < artifact.original_size_bytes,
        "{artifact:?}"
    );
    s.figure("artifact bytes", artifact.size_bytes);
    let ready = model::condition(&ed, "Ready").expect("a Ready condition");
    assert_eq!(ready.0, "True", "{ready:?}");
    let deployment = s
        .api::<Deployment>()
        .get(&format!("{NAME}-{}", &first[..8]))
        .await
        .expect("the runtime Deployment");
    assert!(
        deployment
            .owner_references()
            .iter()
            .any(|o| o.kind == "EdgeDeployment")
    );
    event(
        &s.client,
        &s.ns,
        "EdgeDeployment",
        NAME,
        "ArtifactBuilt",
        Duration::from_secs(30),
    )
    .await;

    // 2. OIP v2 through the Service's ClusterIP.
    let url = infer_url(&s, NAME).await;
    let (code, body) = infer_once(&url, &infer_body("Kasmina takes models to the edge."), &[])
        .await
        .expect("an answer through the ClusterIP");
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["model_version"], "1.0.0");
    assert_eq!(answer["outputs"][0]["shape"], json!([1, 384]), "{answer}");

    let probe = Traffic::start(url.clone(), infer_body("probe sentence"), Load::probe());

    // 3. A new version: canary at 50 % (one pod of each), analysis passes, promoted.
    let updated = Instant::now();
    s.apply::<EdgeDeployment>(minilm(NAME, "2.0.0", 2, canary(good)))
        .await;
    let ed = wait(&eds, NAME, "a canary", FIVE_MINUTES, |ed| {
        ed.status
            .as_ref()
            .is_some_and(|st| st.canary_revision.is_some() && st.canary_weight.unwrap_or(0) > 0)
    })
    .await;
    let second = ed
        .status
        .and_then(|st| st.canary_revision)
        .unwrap_or_default();
    s.seconds("canary serving after update", updated.elapsed());
    let canary_at = Instant::now();
    let ed = healthy(&eds, NAME, "2.0.0", FIVE_MINUTES).await;
    s.seconds(
        "canary promotion, canary serving → promoted",
        canary_at.elapsed(),
    );
    let status = ed.status.unwrap_or_default();
    assert_eq!(status.stable_revision.as_deref(), Some(second.as_str()));
    assert_eq!(
        status.history[0].outcome,
        RolloutOutcome::Promoted,
        "{:?}",
        status.history
    );
    event(
        &s.client,
        &s.ns,
        "EdgeDeployment",
        NAME,
        "Promoted",
        Duration::from_secs(30),
    )
    .await;

    // 4. A version whose analysis cannot pass (p99 under a microsecond): rolled back.
    let strict =
        json!([{"metric": "errorRate", "max": 0.01}, {"metric": "latencyP99Ms", "max": 0.001}]);
    s.apply::<EdgeDeployment>(minilm(NAME, "3.0.0", 2, canary(strict)))
        .await;
    wait(&eds, NAME, "the bad canary serving", FIVE_MINUTES, |ed| {
        ed.status.as_ref().is_some_and(|st| {
            st.canary_revision.is_some() && st.canary_revision.as_deref() != Some(second.as_str())
        })
    })
    .await;
    let failing = wait(&eds, NAME, "a failing analysis", FIVE_MINUTES, |ed| {
        ed.status.as_ref().is_some_and(|st| {
            st.rollout.as_ref().is_some_and(|r| r.failed > 0) || st.phase == Some(Phase::RolledBack)
        })
    })
    .await;
    let _ = failing;
    let failed_at = Instant::now();
    let ed = wait(&eds, NAME, "rolled back", Duration::from_secs(120), |ed| {
        ed.status
            .as_ref()
            .is_some_and(|st| st.phase == Some(Phase::RolledBack) && st.canary_revision.is_none())
    })
    .await;
    s.seconds(
        "rollback after the first failing interval",
        failed_at.elapsed(),
    );
    let status = ed.status.clone().unwrap_or_default();
    assert_eq!(
        status.stable_revision.as_deref(),
        Some(second.as_str()),
        "stable stays"
    );
    rolled_back_for(&s, &ed, None, "latencyP99Ms").await;

    // 5. The probe saw every answer succeed, from both stable versions.
    let tally = probe.stop().await;
    s.traffic("probe", &tally);
    tally.assert_no_failures("probe traffic through the lifecycle");
    tally.assert_answered_by(&["1.0.0", "2.0.0"]);

    // 6. Deleting it deletes every artifact it built before the object goes (its finalizer).
    let built = status.revisions.len();
    let store = std::path::PathBuf::from(format!("/var/lib/kasmina/artifacts/{}/{NAME}", s.ns));
    // The local control plane's pods write this host's store; a kind node's is not visible.
    let local = store.is_dir();
    let deleting = Instant::now();
    kubectl(
        &[
            "delete",
            "edgedeployment",
            NAME,
            "-n",
            &s.ns,
            "--wait=false",
        ],
        None,
    );
    wait_gone(eds.clone(), NAME, Duration::from_secs(120)).await;
    s.seconds(
        "delete → artifacts deleted, object gone",
        deleting.elapsed(),
    );
    let note = event(
        &s.client,
        &s.ns,
        "EdgeDeployment",
        NAME,
        "ArtifactsDeleted",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        note.contains(&second) && note.contains(&first),
        "the Event names the artifacts: {note}"
    );
    if local {
        let left: Vec<_> = std::fs::read_dir(&store)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{built} artifacts built, left: {left:?}");
    }
    s.end().await;
}
