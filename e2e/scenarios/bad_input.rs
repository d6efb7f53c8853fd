//! Bad input on the real server: invalid specs refused naming the field (by the schema, and
//! by the webhook where the schema cannot say it); a source that does not exist ends in a
//! Failed condition saying so; deleting leaves nothing behind.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::Phase;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;

use crate::support::model::{condition, minilm};
use crate::support::{E2E_HOST_PATH, Scenario, event, run, until, wait, wait_gone};

fn refused(s: &Scenario, manifest: serde_json::Value) -> String {
    let mut manifest = manifest;
    manifest["metadata"]["namespace"] = json!(s.ns);
    let out = run(
        "kubectl",
        &["apply", "-f", "-"],
        Some(&manifest.to_string()),
    );
    assert!(!out.ok, "the server accepted {manifest}");
    out.stderr
}

pub async fn run_scenario() {
    let s = Scenario::begin("bad-input").await;

    // The schema: a weight over 100.
    let mut ed = minilm(
        "bad-weight",
        "1.0.0",
        1,
        json!({"type": "Canary", "canary": {"steps": [{"setWeight": 150}]}}),
    );
    let message = refused(&s, ed.clone());
    assert!(message.contains("setWeight"), "names the field: {message}");
    s.figure("schema refusal", message.trim());

    // The webhook: weights that fall (no schema can compare list elements on 1.19).
    ed["metadata"]["name"] = json!("falling-weights");
    ed["spec"]["strategy"] =
        json!({"type": "Canary", "canary": {"steps": [{"setWeight": 50}, {"setWeight": 20}]}});
    let message = refused(&s, ed.clone());
    assert!(
        message.contains("denied the request")
            && message.contains("spec.strategy.canary.steps[1].setWeight"),
        "the webhook names the field: {message}"
    );
    s.figure("webhook refusal", message.trim());

    // The webhook: a name too long for the names derived from it.
    let long = "sentiment-analysis-for-the-customer-support-team";
    ed["metadata"]["name"] = json!(long);
    ed["spec"]["strategy"] = json!({"type": "Rolling"});
    let message = refused(&s, ed.clone());
    assert!(
        message.contains("denied the request") && message.contains("metadata.name"),
        "the webhook names the field: {message}"
    );
    s.figure("name refusal", message.trim());

    // Neither was stored.
    let eds = s.api::<EdgeDeployment>();
    for name in ["bad-weight", "falling-weights", long] {
        assert!(
            eds.get_opt(name).await.ok().flatten().is_none(),
            "{name} was not stored"
        );
    }

    // A source that does not exist: the build fails and says so.
    let missing = format!("file://{E2E_HOST_PATH}/no-such-model");
    let mut ed = minilm("missing-model", "1.0.0", 1, json!({"type": "Rolling"}));
    ed["spec"]["model"]["source"]["uri"] = json!(missing);
    s.apply::<EdgeDeployment>(ed).await;
    let failed = wait(
        &eds,
        "missing-model",
        "a failed build",
        Duration::from_secs(120),
        |ed| {
            condition(ed, "ArtifactReady")
                .is_some_and(|(status, reason, _)| status == "False" && reason == "BuildFailed")
        },
    )
    .await;
    let (_, _, message) = condition(&failed, "ArtifactReady").unwrap_or_default();
    assert!(
        message.contains("no-such-model"),
        "names the source: {message}"
    );
    assert!(
        message.to_lowercase().contains("not found")
            || message.to_lowercase().contains("no such file"),
        "says it does not exist: {message}"
    );
    assert_eq!(
        failed.status.as_ref().and_then(|st| st.phase),
        Some(Phase::Failed)
    );
    let ready = condition(&failed, "Ready").unwrap_or_default();
    assert_eq!(ready.0, "False", "not Ready: {ready:?}");
    s.figure("missing source condition", &message);
    let note = event(
        &s.client,
        &s.ns,
        "EdgeDeployment",
        "missing-model",
        "BuildFailed",
        Duration::from_secs(30),
    )
    .await;
    assert!(note.contains("no-such-model"), "the Event says it: {note}");

    // A file:// source outside the folders the operator may mount: no build pod mounts the
    // node's `/`; the condition says why.
    let mut root = minilm("host-root", "1.0.0", 1, json!({"type": "Rolling"}));
    root["spec"]["model"]["source"]["uri"] = json!("file:///");
    s.apply::<EdgeDeployment>(root).await;
    let refused_source = wait(
        &eds,
        "host-root",
        "a refused source",
        Duration::from_secs(60),
        |ed| {
            condition(ed, "Ready").is_some_and(|(status, reason, _)| {
                status == "False" && reason == "SourceNotAllowed"
            })
        },
    )
    .await;
    let (_, _, message) = condition(&refused_source, "Ready").unwrap_or_default();
    assert!(message.contains("spec.model.source.uri"), "{message}");
    let jobs = s
        .api::<Job>()
        .list(&ListParams::default().labels("kasmina.dev/edge-deployment=host-root"))
        .await
        .expect("list Jobs");
    assert!(jobs.items.is_empty(), "no build Job for file:///");
    s.figure("file:/// source condition", &message);
    eds.delete("host-root", &DeleteParams::default())
        .await
        .expect("delete");

    // Deleted: every child goes with it (owner references, the garbage collector).
    eds.delete("missing-model", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(eds.clone(), "missing-model", Duration::from_secs(60)).await;
    let owned = ListParams::default().labels("kasmina.dev/edge-deployment=missing-model");
    until("no child left behind", Duration::from_secs(60), || async {
        let jobs = s.api::<Job>().list(&owned).await.ok()?.items.len();
        let deployments = s.api::<Deployment>().list(&owned).await.ok()?.items.len();
        let services = s.api::<Service>().list(&owned).await.ok()?.items.len();
        let pods = s.api::<Pod>().list(&owned).await.ok()?.items.len();
        (jobs + deployments + services + pods == 0).then_some(())
    })
    .await;
    s.end().await;
}
