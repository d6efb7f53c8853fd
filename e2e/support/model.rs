//! The model the scenarios serve (all-MiniLM-L6-v2, `just fetch-model`) and EdgeDeployments
//! of it, as a user writes them.

use std::time::Duration;

use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::{Phase, RolloutOutcome};
use kube::Api;
use serde_json::{Value, json};

use super::{Scenario, event, wait};

/// Where pods read the model: `KASMINA_E2E_MODEL_URI`, else the fetched copy in `models/`
/// (the local control plane's pods run on this host; on kind, copy it to the node and set
/// the variable).
pub fn model_uri() -> String {
    std::env::var("KASMINA_E2E_MODEL_URI").unwrap_or_else(|_| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");
        assert!(
            std::path::Path::new(dir).join("model.safetensors").exists(),
            "the model is missing: run `just fetch-model` (or set KASMINA_E2E_MODEL_URI)"
        );
        format!("file://{dir}")
    })
}

/// An EdgeDeployment of all-MiniLM at `version`, built to Q8_0 for a 256 MiB device;
/// `strategy` is the spec's `strategy` field.
pub fn minilm(name: &str, version: &str, replicas: i32, strategy: Value) -> Value {
    json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "minilm", "version": version,
                      "source": {"uri": model_uri()}, "architecture": "bert"},
            "optimization": {"profile": {"memoryMiB": 256}, "quantization": "q8_0"},
            "replicas": replicas,
            "strategy": strategy,
        }
    })
}

/// One OIP v2 infer request body.
pub fn infer_body(text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]
    }))
    .unwrap_or_default()
}

/// Waits until the EdgeDeployment is Healthy on `stable` (a revision hash prefix, or any).
pub async fn healthy(
    api: &Api<EdgeDeployment>,
    name: &str,
    version: &str,
    within: Duration,
) -> EdgeDeployment {
    wait(api, name, &format!("Healthy on {version}"), within, |ed| {
        ed.spec.model.version == version
            && ed.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Healthy)
                    && s.observed_generation == ed.metadata.generation
                    && s.canary_revision.is_none()
                    && s.stable_revision.is_some()
                    && s.stable_revision == s.target_revision
            })
    })
    .await
}

/// The condition of `type_` on the EdgeDeployment: (status, reason, message).
pub fn condition(ed: &EdgeDeployment, type_: &str) -> Option<(String, String, String)> {
    ed.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                format!("{:?}", c.status),
                c.reason.clone(),
                c.message.clone(),
            )
        })
}

/// Asserts that the EdgeDeployment's last rollout (of `revision`, when given) was rolled back
/// for its `check`: the history entry's reason and the RolledBack Event both name it.
pub async fn rolled_back_for(
    s: &Scenario,
    ed: &EdgeDeployment,
    revision: Option<&str>,
    check: &str,
) {
    let status = ed.status.clone().unwrap_or_default();
    let last = &status.history[0];
    assert_eq!(
        last.outcome,
        RolloutOutcome::RolledBack,
        "{:?}",
        status.history
    );
    if let Some(revision) = revision {
        assert_eq!(last.revision, revision, "{:?}", status.history);
    }
    assert!(
        last.reason.contains(check),
        "the reason names the check: {}",
        last.reason
    );
    let name = ed.metadata.name.as_deref().unwrap_or_default();
    let within = Duration::from_secs(30);
    let note = event(
        &s.client,
        &s.ns,
        "EdgeDeployment",
        name,
        "RolledBack",
        within,
    )
    .await;
    assert!(note.contains(check), "the Event names the check: {note}");
}
