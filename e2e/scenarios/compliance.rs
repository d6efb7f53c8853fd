//! Compliance: an Enforce profile makes `kubectl apply` fail naming rule, field and profile; a
//! Warn profile's findings print as warnings; a profile requiring signing, encryption and
//! authentication gives a signed, encrypted artifact and a runtime that answers 401 without a
//! token and 200 with one from `kubectl kasmina token`; a tampered artifact aborts the
//! rollout while stable serves.

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kasmina::api::edge_deployment::RolloutOutcome;
use kasmina::api::{ComplianceProfile, EdgeDeployment};
use kasmina::artifact::manifest::ENCRYPTED_GGUF_FILE;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::lifecycle::infer_url;
use crate::support::model::{healthy, infer_body, minilm};
use crate::support::traffic::{Load, Traffic, infer_once};
use crate::support::{MANAGER, Scenario, event, kubectl, run, until, wait};

const FIVE_MINUTES: Duration = Duration::from_secs(300);
const PROFILES: [&str; 4] = ["e2e-enforce", "e2e-warn", "e2e-secure", "e2e-late"];

async fn profile(s: &Scenario, name: &str, enforcement: &str, rules: serde_json::Value) {
    let profiles: Api<ComplianceProfile> = Api::all(s.client.clone());
    let profile: ComplianceProfile = serde_json::from_value(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "ComplianceProfile",
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"kasmina.dev/e2e-profile": name}},
                 "enforcement": enforcement, "rules": rules}
    }))
    .expect("a ComplianceProfile");
    profiles
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&profile),
        )
        .await
        .unwrap_or_else(|e| panic!("applying ComplianceProfile {name}: {e}"));
}

fn labelled(mut ed: serde_json::Value, ns: &str, profile: &str) -> serde_json::Value {
    ed["metadata"]["namespace"] = json!(ns);
    ed["metadata"]["labels"] = json!({"kasmina.dev/e2e-profile": profile});
    ed
}

pub async fn run_scenario() {
    let s = Scenario::begin("compliance").await;
    let approved = json!({"allowedModelSources": ["s3://approved-models/*"]});
    let secure = json!({"requireSignedArtifacts": true, "requireEncryptionAtRest": true,
                        "requireAuthentication": true});
    for (name, enforcement, rules) in [
        ("e2e-enforce", "Enforce", &approved),
        ("e2e-warn", "Warn", &approved),
        ("e2e-secure", "Enforce", &secure),
    ] {
        profile(&s, name, enforcement, rules.clone()).await;
    }

    enforce_denies_and_warn_warns(&s).await;
    metadata_stays_writable_under_a_later_enforce_profile(&s, &approved).await;
    let url = signed_encrypted_and_authenticated(&s).await;
    tampered_artifact_aborts_while_stable_serves(&s, &url).await;

    let profiles: Api<ComplianceProfile> = Api::all(s.client.clone());
    for name in PROFILES {
        let _ = profiles.delete(name, &DeleteParams::default()).await;
    }
    s.end().await;
}

async fn enforce_denies_and_warn_warns(s: &Scenario) {
    let apply = |name: &str, profile: &str| {
        let ed = labelled(
            minilm(name, "1.0.0", 1, json!({"type": "Rolling"})),
            &s.ns,
            profile,
        );
        run("kubectl", &["apply", "-f", "-"], Some(&ed.to_string()))
    };
    // Every replica's profile cache catches up within moments of the profile's creation.
    let denied = until(
        "the Enforce profile denying",
        Duration::from_secs(30),
        || async {
            let out = apply("e2e-denied", "e2e-enforce");
            if out.ok {
                let _ = s
                    .api::<EdgeDeployment>()
                    .delete("e2e-denied", &DeleteParams::default())
                    .await;
                None
            } else {
                Some(out.stderr)
            }
        },
    )
    .await;
    for part in [
        "denied the request",
        "spec.model.source.uri",
        "allowedModelSources of ComplianceProfile e2e-enforce",
    ] {
        assert!(denied.contains(part), "{part:?} not in: {denied}");
    }
    s.figure("Enforce denial", denied.trim());

    let warned = apply("e2e-warned", "e2e-warn");
    assert!(warned.ok, "Warn admits: {}", warned.stderr);
    assert!(
        warned.stderr.contains("Warning:") && warned.stderr.contains("allowedModelSources"),
        "kubectl prints the warning: {}",
        warned.stderr
    );
    let _ = s
        .api::<EdgeDeployment>()
        .delete("e2e-warned", &DeleteParams::default())
        .await;
}

/// An EdgeDeployment made before the Enforce profile it violates: its spec changes are denied,
/// but `kubectl kasmina abort` (an annotation) is admitted and the operator's removal of the
/// consumed annotation too. Before, every update was judged and both were denied.
async fn metadata_stays_writable_under_a_later_enforce_profile(
    s: &Scenario,
    rules: &serde_json::Value,
) {
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(labelled(
        minilm("e2e-late", "1.0.0", 1, json!({"type": "Rolling"})),
        &s.ns,
        "e2e-late",
    ))
    .await;
    profile(s, "e2e-late", "Enforce", rules.clone()).await;
    let denied = until(
        "a spec change denied by the later profile",
        Duration::from_secs(30),
        || async {
            let out = run(
                "kubectl",
                &[
                    "patch",
                    "edgedeployment",
                    "e2e-late",
                    "-n",
                    &s.ns,
                    "--type",
                    "merge",
                    "-p",
                    r#"{"spec":{"replicas":2}}"#,
                ],
                None,
            );
            (!out.ok).then_some(out.stderr)
        },
    )
    .await;
    assert!(
        denied.contains("allowedModelSources of ComplianceProfile e2e-late"),
        "{denied}"
    );
    let abort = run(
        "kubectl",
        &["kasmina", "abort", "e2e-late", "-n", &s.ns],
        None,
    );
    assert!(
        abort.ok,
        "an annotation of a violating EdgeDeployment is admitted: {}",
        abort.stderr
    );
    until(
        "the operator removing the consumed command",
        Duration::from_secs(60),
        || async {
            let ed = eds.get("e2e-late").await.ok()?;
            let pending = ed
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key("kasmina.dev/abort");
            (!pending).then_some(())
        },
    )
    .await;
    s.figure("spec change under a later Enforce profile", denied.trim());
    s.figure("abort annotation and its removal", "admitted");
    let _ = eds.delete("e2e-late", &DeleteParams::default()).await;
}

/// The secure EdgeDeployment: built signed and encrypted, served only with a token.
async fn signed_encrypted_and_authenticated(s: &Scenario) -> String {
    let eds = s.api::<EdgeDeployment>();
    let started = Instant::now();
    s.apply::<EdgeDeployment>(labelled(
        minilm("secure", "1.0.0", 1, canary()),
        &s.ns,
        "e2e-secure",
    ))
    .await;
    let ed = healthy(&eds, "secure", "1.0.0", FIVE_MINUTES).await;
    s.seconds("secure: time to Ready", started.elapsed());
    let artifact = ed
        .status
        .and_then(|st| st.artifact)
        .expect("status.artifact");
    assert!(artifact.signed, "signed: {artifact:?}");
    assert!(artifact.encrypted, "encrypted: {artifact:?}");

    let url = infer_url(s, "secure").await;
    let body = infer_body("who may ask?");
    let (code, answer) = infer_once(&url, &body, &[]).await.expect("an answer");
    assert_eq!(code, 401, "no token: {answer}");
    assert!(answer.contains("error"), "a JSON error: {answer}");
    let bearer = bearer(s);
    let (code, answer) = infer_once(&url, &body, &[("authorization", &bearer)])
        .await
        .expect("an answer");
    assert_eq!(code, 200, "with the token: {answer}");
    url
}

/// `Authorization` for the secure runtime, from `kubectl kasmina token` as a user mints it.
fn bearer(s: &Scenario) -> String {
    let token = kubectl(
        &[
            "kasmina",
            "token",
            "secure",
            "-n",
            &s.ns,
            "--lifetime",
            "1h",
        ],
        None,
    );
    format!("Bearer {}", token.trim())
}

fn canary() -> serde_json::Value {
    json!({"type": "Canary",
           "canary": {"trafficRouting": {"replicaRatio": {}},
                      "steps": [{"setWeight": 50}, {"pause": {}}]}})
}

/// A new version whose artifact is altered after the build: its runtime refuses it, the
/// rollout aborts at once, and stable answers every request meanwhile.
async fn tampered_artifact_aborts_while_stable_serves(s: &Scenario, url: &str) {
    let eds = s.api::<EdgeDeployment>();
    let load = Load {
        headers: vec![("authorization".into(), bearer(s))],
        ..Load::probe()
    };
    let probe = Traffic::start(url.to_owned(), infer_body("stable keeps serving"), load);

    s.apply::<EdgeDeployment>(labelled(
        minilm("secure", "2.0.0", 1, canary()),
        &s.ns,
        "e2e-secure",
    ))
    .await;
    let ed = wait(
        &eds,
        "secure",
        "the new revision",
        Duration::from_secs(30),
        |ed| {
            ed.status
                .as_ref()
                .is_some_and(|st| st.target_revision != st.stable_revision)
        },
    )
    .await;
    let status = ed.status.unwrap_or_default();
    let (stable, target) = (
        status.stable_revision.unwrap_or_default(),
        status.target_revision.unwrap_or_default(),
    );
    wait(
        &s.api::<Job>(),
        &format!("secure-build-{}", &target[..8]),
        "the build to succeed",
        FIVE_MINUTES,
        |j: &Job| j.status.as_ref().and_then(|st| st.succeeded).unwrap_or(0) >= 1,
    )
    .await;
    // The built artifact, altered where it lies by someone with access to the node: one byte
    // of the encrypted model changed, by a pod with the store's host folder.
    let tampered_at = Instant::now();
    tamper(
        s,
        &format!("{}/{}/secure/{target}/{ENCRYPTED_GGUF_FILE}", STORE, s.ns),
    )
    .await;
    // A runtime pod that read the artifact before the flip serves it: start it again.
    let pods: Api<Pod> = s.api();
    let candidate = ListParams::default().labels(&format!("kasmina.dev/revision={target}"));
    for pod in pods
        .list(&candidate)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let _ = pods.delete(&pod.name_any(), &DeleteParams::default()).await;
    }

    let ed = wait(
        &eds,
        "secure",
        "the rollout aborted",
        Duration::from_secs(120),
        |ed| {
            ed.status.as_ref().is_some_and(|st| {
                st.history
                    .first()
                    .is_some_and(|h| h.revision == target && h.outcome == RolloutOutcome::Aborted)
            })
        },
    )
    .await;
    s.seconds("tampered artifact → rollout aborted", tampered_at.elapsed());
    let status = ed.status.unwrap_or_default();
    assert_eq!(
        status.stable_revision.as_deref(),
        Some(stable.as_str()),
        "stable stays"
    );
    let reason = &status.history[0].reason;
    // The runtime's own words, from its termination message. A pod that checked the stored
    // file's digest just before the flip meets the altered byte when it decrypts (found in
    // CI: the candidate's first pod loads while the tamper pod writes); either way it refuses.
    assert!(
        reason.contains("refused")
            && (reason.contains("has digest") || reason.contains("decryption failed")),
        "the reason says why: {reason}"
    );
    let note = event(
        &s.client,
        &s.ns,
        "EdgeDeployment",
        "secure",
        "ArtifactRefused",
        Duration::from_secs(30),
    )
    .await;
    s.figure("ArtifactRefused Event", &note);

    let tally = probe.stop().await;
    s.traffic("stable probe during the tampered rollout", &tally);
    tally.assert_no_failures("stable while the tampered revision was refused");
}

/// The chart's default artifact store, a folder on the nodes.
const STORE: &str = "/var/lib/kasmina/artifacts";

/// Changes the byte in the middle of `file` on the node, from a pod mounting the store (so it
/// works wherever the store is a host folder: this control plane, kind, k3s).
async fn tamper(s: &Scenario, file: &str) {
    let script = r#"f=$0; m=$(( $(wc -c < "$f") / 2 ));
b=$(dd if="$f" bs=1 skip=$m count=1 2>/dev/null | od -An -tu1 | tr -d ' ');
printf "\\$(printf %o $((255 - b)))" | dd of="$f" bs=1 seek=$m conv=notrunc 2>/dev/null"#;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tamper", "namespace": s.ns},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "tamper", "image": "busybox:1.36",
                            "command": ["sh", "-c", script, file],
                            "volumeMounts": [{"name": "store", "mountPath": STORE}]}],
            "volumes": [{"name": "store", "hostPath": {"path": STORE, "type": "Directory"}}],
        }
    }))
    .expect("a Pod");
    let pods: Api<Pod> = s.api();
    pods.create(&kube::api::PostParams::default(), &pod)
        .await
        .expect("creating the tamper pod");
    let done = wait(
        &pods,
        "tamper",
        "the tamper pod to finish",
        Duration::from_secs(120),
        |p| {
            p.status
                .as_ref()
                .and_then(|st| st.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
        },
    )
    .await;
    let phase = done.status.and_then(|st| st.phase).unwrap_or_default();
    assert_eq!(phase, "Succeeded", "tampering with {file}");
}
