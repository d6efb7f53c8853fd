//! End-to-end tests against a real cluster (KUBECONFIG or in-cluster). `cargo test` lists
//! them as ignored with the reason; `just e2e` runs them (`KASMINA_E2E=1`, `--ignored`).
//!
//! They install the CRDs, start `kasmina controller` out of cluster, apply the examples and
//! wait for the status and conditions the controllers promise. `just kind-up` creates a
//! cluster where Docker runs; `just e2e` runs this suite.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kasmina::api::{self, ComplianceProfile, EdgeDeployment, ScalingPolicy};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

const MANAGER: &str = "kasmina-e2e";

const NEEDS_CLUSTER: &str =
    "needs a cluster: run `just e2e` with KUBECONFIG set (`just kind-up` makes one)";

async fn cluster() -> Client {
    assert_eq!(
        std::env::var("KASMINA_E2E").as_deref(),
        Ok("1"),
        "{NEEDS_CLUSTER}"
    );
    match Client::try_default().await {
        Ok(client) => match client.apiserver_version().await {
            Ok(_) => client,
            Err(e) => panic!("KASMINA_E2E=1 but the cluster is unreachable: {e}"),
        },
        Err(e) => panic!("KASMINA_E2E=1 but no cluster is configured: {e}"),
    }
}

/// The controller as a child process, killed when dropped.
struct Controller(Child);

impl Controller {
    fn start() -> Self {
        let image = std::env::var("KASMINA_E2E_IMAGE").unwrap_or_else(|_| "kasmina:0.1.0".into());
        let child = Command::new(env!("CARGO_BIN_EXE_kasmina"))
            .args([
                "controller",
                "--leader-elect=false",
                "--metrics-addr=127.0.0.1:0",
                &format!("--image={image}"),
                "--artifact-store=file:///var/lib/kasmina/artifacts",
            ])
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting kasmina controller");
        Self(child)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in api::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established in 30s"))
        .unwrap();
    }
}

/// Applies every document of an example file that is of kind `K` through `api`.
async fn apply_example<K>(api: Api<K>, file: &str) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let mut applied = vec![];
    for doc in docs
        .into_iter()
        .filter(|d| d["kind"] == K::kind(&()).as_ref())
    {
        let object: K = serde_json::from_value(doc).unwrap();
        let name = object.meta().name.clone().unwrap();
        applied.push(
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap(),
        );
    }
    applied
}

async fn ensure_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .unwrap();
    api.patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(&ns))
        .await
        .unwrap();
}

/// Waits up to 60 s for `check` to hold on the named object.
async fn eventually<K>(api: Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let condition = move |obj: Option<&K>| obj.is_some_and(&check);
    wait_for(api, name, what, Duration::from_secs(60), condition).await;
}

/// Waits up to `within` for `check` to hold on the named object (None: it does not exist).
async fn wait_for<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    within: Duration,
    check: impl Fn(Option<&K>) -> bool,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    if tokio::time::timeout(within, await_condition(api, name, check))
        .await
        .is_err()
    {
        panic!("{name}: {what} did not happen within {within:?}");
    }
}

fn has_condition(conditions: &[api::Condition], type_: &str, status: &str, reason: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && format!("{:?}", c.status) == status && c.reason == reason)
}

#[tokio::test]
#[ignore = "needs a cluster: `just e2e` with KUBECONFIG set"]
async fn examples_reach_their_first_status() {
    let client = cluster().await;
    install_crds(&client).await;
    ensure_namespace(&client, "ml").await;
    let _controller = Controller::start();

    apply_example(
        Api::<ComplianceProfile>::all(client.clone()),
        "compliance-profile.yaml",
    )
    .await;
    apply_example(
        Api::<ScalingPolicy>::namespaced(client.clone(), "ml"),
        "scaling-policy.yaml",
    )
    .await;
    eventually(
        Api::<ScalingPolicy>::namespaced(client.clone(), "ml"),
        "sentiment",
        "TargetNotFound",
        |sp| {
            sp.status.as_ref().is_some_and(|s| {
                has_condition(&s.conditions, "AbleToScale", "False", "TargetNotFound")
            })
        },
    )
    .await;

    let eds = apply_example(
        Api::<EdgeDeployment>::namespaced(client.clone(), "ml"),
        "edge-deployment.yaml",
    )
    .await;
    let generation = eds[0].metadata.generation;
    let ed_api = Api::<EdgeDeployment>::namespaced(client.clone(), "ml");
    eventually(
        ed_api.clone(),
        "sentiment",
        "observedGeneration and a revision",
        |ed| {
            ed.status.as_ref().is_some_and(|s| {
                // Building, or NoMatchingNodes when no node carries the example's edge label.
                s.observed_generation == generation
                    && s.target_revision.is_some()
                    && s.conditions.iter().any(|c| c.type_ == "ArtifactReady")
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && !c.is_true())
            })
        },
    )
    .await;
    eventually(
        Api::<ScalingPolicy>::namespaced(client.clone(), "ml"),
        "sentiment",
        "the target found",
        |sp| {
            sp.status
                .as_ref()
                .is_some_and(|s| has_condition(&s.conditions, "AbleToScale", "True", "TargetFound"))
        },
    )
    .await;
    eventually(
        Api::<ComplianceProfile>::all(client.clone()),
        "personal-data",
        "one match",
        |cp| cp.status.as_ref().is_some_and(|s| s.matched == Some(1)),
    )
    .await;

    // The scale subresource works against the EdgeDeployment.
    let scale = ed_api.get_scale("sentiment").await.unwrap();
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));

    for (kind, result) in [
        (
            "EdgeDeployment",
            ed_api
                .delete("sentiment", &DeleteParams::default())
                .await
                .map(|_| ()),
        ),
        (
            "ScalingPolicy",
            Api::<ScalingPolicy>::namespaced(client.clone(), "ml")
                .delete("sentiment", &DeleteParams::default())
                .await
                .map(|_| ()),
        ),
        (
            "ComplianceProfile",
            Api::<ComplianceProfile>::all(client.clone())
                .delete("personal-data", &DeleteParams::default())
                .await
                .map(|_| ()),
        ),
    ] {
        result.unwrap_or_else(|e| panic!("cleaning up {kind}: {e}"));
    }
}

#[tokio::test]
#[ignore = "needs a cluster: `just e2e` with KUBECONFIG set"]
async fn schema_rejects_an_invalid_object_naming_the_field() {
    let client = cluster().await;
    install_crds(&client).await;
    ensure_namespace(&client, "ml").await;
    let api: Api<EdgeDeployment> = Api::namespaced(client, "ml");
    let bad = serde_json::json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
        "metadata": {"name": "bad-weight"},
        "spec": {"model": {"name": "m", "version": "1", "source": {"uri": "s3://m/"}, "architecture": "bert"},
                 "strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 150}]}}},
    });
    let error = api
        .patch(
            "bad-weight",
            &PatchParams::apply(MANAGER),
            &Patch::Apply(&bad),
        )
        .await
        .expect_err("the apiserver must reject setWeight 150");
    assert!(error.to_string().contains("setWeight"), "{error}");
}

/// The whole path on a real cluster: the image must be loaded into it and the model copied to
/// the node at /var/lib/kasmina/models/minilm (`just e2e-setup` does both on kind).
#[tokio::test]
#[ignore = "needs a cluster: `just e2e` with KUBECONFIG set"]
async fn a_new_version_is_built_served_and_rolled_out() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Service;
    use kasmina::api::edge_deployment::{Phase, RolloutOutcome};
    use kasmina::controller::edge_deployment::plan::revision;

    let client = cluster().await;
    install_crds(&client).await;
    ensure_namespace(&client, "e2e-rollout").await;
    let _controller = Controller::start();
    let eds = Api::<EdgeDeployment>::namespaced(client.clone(), "e2e-rollout");
    let mut ed: EdgeDeployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
        "metadata": {"name": "minilm", "namespace": "e2e-rollout"},
        "spec": {"model": {"name": "minilm", "version": "1.0.0",
                           "source": {"uri": "file:///var/lib/kasmina/models/minilm"}, "architecture": "bert"},
                 "optimization": {"profile": {"memoryMiB": 256}, "quantization": "q8_0"},
                 "replicas": 1, "strategy": {"type": "BlueGreen", "blueGreen": {"scaleDownDelaySeconds": 5}}},
    }))
    .unwrap();
    let first = revision(&ed.spec, &Default::default());
    eds.patch(
        "minilm",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&ed),
    )
    .await
    .unwrap();

    let jobs = Api::<Job>::namespaced(client.clone(), "e2e-rollout");
    eventually(
        jobs,
        &format!("minilm-build-{}", &first[..8]),
        "the build Job",
        |j| {
            j.owner_references()
                .iter()
                .any(|o| o.kind == "EdgeDeployment")
        },
    )
    .await;
    let healthy = |rev: String| {
        move |ed: Option<&EdgeDeployment>| {
            ed.and_then(|ed| ed.status.as_ref()).is_some_and(|s| {
                s.phase == Some(Phase::Healthy)
                    && s.stable_revision.as_deref() == Some(rev.as_str())
            })
        }
    };
    let five_minutes = Duration::from_secs(300);
    wait_for(
        eds.clone(),
        "minilm",
        "the first version serving",
        five_minutes,
        healthy(first.clone()),
    )
    .await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), "e2e-rollout");
    assert!(
        deployments
            .get_opt(&format!("minilm-{}", &first[..8]))
            .await
            .unwrap()
            .is_some()
    );
    let services = Api::<Service>::namespaced(client.clone(), "e2e-rollout");
    for name in ["minilm", "minilm-preview"] {
        assert!(
            services.get_opt(name).await.unwrap().is_some(),
            "Service {name}"
        );
    }

    ed.spec.model.version = "2.0.0".into();
    let second = revision(&ed.spec, &Default::default());
    eds.patch(
        "minilm",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&ed),
    )
    .await
    .unwrap();
    wait_for(
        eds.clone(),
        "minilm",
        "the second version promoted",
        five_minutes,
        healthy(second.clone()),
    )
    .await;
    let status = eds.get("minilm").await.unwrap().status.unwrap();
    assert_eq!(status.history[0].outcome, RolloutOutcome::Promoted);
    assert_eq!(status.history[0].revision, second);
    let old = format!("minilm-{}", &first[..8]);
    wait_for(
        deployments,
        &old,
        "the old revision scaled away after the delay",
        Duration::from_secs(60),
        |d: Option<&Deployment>| d.is_none(),
    )
    .await;
    eds.delete("minilm", &DeleteParams::default())
        .await
        .unwrap();
}

/// `kubectl apply` through the chart's admission webhook: an Enforce profile denies a
/// violating EdgeDeployment with a message naming the rule and the field; a Warn profile admits
/// it and kubectl prints the warning. The API server calls the webhook in the cluster, so this
/// needs the chart installed (`just e2e-webhook` installs it on kind and runs this test).
#[tokio::test]
#[ignore = "needs a cluster with the chart installed: `just e2e-webhook`"]
async fn admission_enforce_denies_and_warn_warns_at_kubectl_apply() {
    if std::env::var("KASMINA_E2E_WEBHOOK").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: needs the chart (and so the webhook) in the cluster; run `just e2e-webhook`"
        );
        return;
    }
    let client = cluster().await;
    let configurations: Api<
        k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration,
    > = Api::all(client.clone());
    assert!(
        configurations.get_opt("kasmina").await.unwrap().is_some(),
        "no ValidatingWebhookConfiguration kasmina: install the chart (`just e2e-webhook`)"
    );
    ensure_namespace(&client, "ml").await;
    let profiles: Api<ComplianceProfile> = Api::all(client.clone());
    for (name, enforcement) in [("e2e-enforce", "Enforce"), ("e2e-warn", "Warn")] {
        let profile: ComplianceProfile = serde_json::from_value(serde_json::json!({
            "apiVersion": "kasmina.dev/v1alpha1", "kind": "ComplianceProfile",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"kasmina.dev/e2e": name}},
                     "enforcement": enforcement,
                     "rules": {"allowedModelSources": ["s3://approved-models/*"]}}}))
        .unwrap();
        profiles
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&profile),
            )
            .await
            .unwrap();
    }
    let manifest = |name: &str, profile: &str| {
        serde_json::json!({
            "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
            "metadata": {"name": name, "namespace": "ml", "labels": {"kasmina.dev/e2e": profile}},
            "spec": {"model": {"name": "minilm", "version": "1.0.0", "architecture": "bert",
                               "source": {"uri": "s3://scratch/minilm/"}},
                     "optimization": {"profile": {"memoryMiB": 256}}}})
        .to_string()
    };
    let kubectl_apply = |doc: String| {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(doc.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Every replica's profile cache catches up within a few seconds of the profile.
    let mut denied = None;
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..30 {
        retry.tick().await;
        let (ok, stderr) = kubectl_apply(manifest("e2e-denied", "e2e-enforce"));
        if !ok {
            denied = Some(stderr);
            break;
        }
        let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), "ml");
        let _ = eds.delete("e2e-denied", &DeleteParams::default()).await;
    }
    let denied = denied.expect("the Enforce profile never denied the EdgeDeployment");
    for part in [
        "denied the request",
        "spec.model.source.uri",
        "allowedModelSources of ComplianceProfile e2e-enforce",
    ] {
        assert!(denied.contains(part), "{part:?} not in: {denied}");
    }

    let (ok, stderr) = kubectl_apply(manifest("e2e-warned", "e2e-warn"));
    assert!(ok, "Warn admits: {stderr}");
    assert!(
        stderr.contains("Warning:") && stderr.contains("allowedModelSources"),
        "kubectl prints the warning: {stderr}"
    );

    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), "ml");
    let _ = eds.delete("e2e-warned", &DeleteParams::default()).await;
    for name in ["e2e-enforce", "e2e-warn"] {
        let _ = profiles.delete(name, &DeleteParams::default()).await;
    }
}
