//! The operator installed as a user installs it: the Helm chart rendered (`helm template`,
//! CRDs included) and applied with kubectl, so it runs in the cluster under the chart's
//! ServiceAccount and RBAC, two replicas with leader election, the webhook with
//! self-managed certificates. Servers older than the chart's floor get the two adaptations
//! their API needs, said when made (see `adapt`).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tokio::sync::OnceCell;

use super::{kubectl, run, until};

/// The node folder of the model's `file://` source (mounted into build pods).
fn model_folder() -> String {
    let uri = super::model::model_uri();
    let path = uri.strip_prefix("file://").unwrap_or(super::E2E_HOST_PATH);
    std::path::Path::new(path)
        .parent()
        .map_or_else(|| path.to_owned(), |p| p.display().to_string())
}

pub const NAMESPACE: &str = "kasmina-system";
pub const RELEASE: &str = "kasmina";
/// The operator's Deployment, Lease, webhook configuration: the release's full name.
pub const NAME: &str = "kasmina";
/// Where the chart lets the operator keep EdgeDeployments' keys (`keys.namespaces`).
pub const KEYS_NAMESPACES: &[&str] = &["e2e-compliance"];
/// The pod label the chart's selector uses.
pub const SELECTOR: &str = "app.kubernetes.io/name=kasmina,app.kubernetes.io/instance=kasmina";

/// What installing took, for the Install scenario's figures.
#[derive(Clone, Debug)]
pub struct Installed {
    pub seconds_to_ready: f64,
    pub server_version: String,
    pub adaptations: Vec<String>,
}

static INSTALLED: OnceCell<Installed> = OnceCell::const_new();

/// Installs the operator once per test process; afterwards waits until it is ready again (a
/// fault scenario may have just killed a replica).
pub async fn ensure(client: &Client) -> Installed {
    let installed = INSTALLED.get_or_init(|| install(client.clone())).await;
    wait_ready(client, Duration::from_secs(120)).await;
    installed.clone()
}

fn helm() -> String {
    std::env::var("HELM")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/bin/helm").to_owned())
}

async fn install(client: Client) -> Installed {
    let started = Instant::now();
    let info = client.apiserver_version().await.expect("server version");
    let minor: u32 = info
        .minor
        .trim_end_matches('+')
        .parse()
        .expect("a numeric minor version");
    let server_version = format!("{}.{}", info.major, info.minor);
    let served = |group_version: &str| {
        run(
            "kubectl",
            &["get", "--raw", &format!("/apis/{group_version}")],
            None,
        )
        .ok
    };
    let mut adaptations = vec![];
    let mut values = vec![
        format!("keys.namespaces={{{}}}", KEYS_NAMESPACES.join(",")),
        // The suite reads plain lines from the pods' logs when a scenario fails.
        "logFormat=text".to_owned(),
        // file:// sources: the model's folder, and the missing one bad input names.
        format!("hostPaths={{{},{}}}", model_folder(), super::E2E_HOST_PATH),
    ];
    if !served("policy/v1") {
        adaptations.push("podDisruptionBudget off (policy/v1 is served from 1.21)".to_owned());
        values.push("podDisruptionBudget.enabled=false".to_owned());
    }
    let kube_version = if minor >= 30 {
        server_version.clone()
    } else {
        adaptations.push(format!(
            "rendered with --kube-version 1.30.0 (the chart's floor; the server is {server_version})"
        ));
        "1.30.0".to_owned()
    };
    let mut args = vec![
        "template".to_owned(),
        RELEASE.to_owned(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kasmina").to_owned(),
        "--namespace".to_owned(),
        NAMESPACE.to_owned(),
        "--include-crds".to_owned(),
        "--kube-version".to_owned(),
        kube_version,
    ];
    for value in &values {
        args.push("--set".to_owned());
        args.push(value.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rendered = run(&helm(), &args, None);
    assert!(
        rendered.ok,
        "helm template (run `just install-helm`): {}",
        rendered.stderr
    );
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&rendered.stdout).expect("helm renders YAML documents");
    let mut docs: Vec<Value> = docs.into_iter().filter(|d| d.is_object()).collect();
    if minor < 25 {
        adaptations.push(
            "CRDs without x-kubernetes-validations (CEL, 1.25+) and empty-string defaults (1.20+)"
                .to_owned(),
        );
        for doc in &mut docs {
            if doc["kind"] == "CustomResourceDefinition" {
                strip_for_old_servers(doc);
            }
        }
    }
    for ns in std::iter::once(&NAMESPACE).chain(KEYS_NAMESPACES) {
        super::ensure_namespace(&client, ns).await;
    }
    let (crds, rest): (Vec<Value>, Vec<Value>) = docs
        .into_iter()
        .partition(|d| d["kind"] == "CustomResourceDefinition");
    apply_list(crds.clone());
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in &crds {
        let name = crd["metadata"]["name"].as_str().expect("CRD name");
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(crd_api.clone(), name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established in 60 s"))
        .expect("watching CRDs");
    }
    apply_list(rest);
    wait_ready(&client, Duration::from_secs(180)).await;
    for adaptation in &adaptations {
        println!("install on {server_version}: {adaptation}");
    }
    Installed {
        seconds_to_ready: started.elapsed().as_secs_f64(),
        server_version,
        adaptations,
    }
}

/// `kubectl apply --server-side` of the documents as one List.
fn apply_list(items: Vec<Value>) {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    kubectl(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=helm",
            "-f",
            "-",
        ],
        Some(&list.to_string()),
    );
}

/// What `../shared/k8s/install-crds.sh` does for 1.19, on parsed CRDs.
fn strip_for_old_servers(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("x-kubernetes-validations");
            if map.get("default") == Some(&Value::String(String::new())) {
                map.remove("default");
            }
            map.values_mut().for_each(strip_for_old_servers);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_for_old_servers),
        _ => {}
    }
}

/// The operator Deployment available with every replica ready, a leader elected, and the
/// webhook's caBundle published.
pub async fn wait_ready(client: &Client, within: Duration) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    until("the operator's replicas all ready", within, || async {
        let d = deployments.get_opt(NAME).await.ok().flatten()?;
        let want = d.spec.replicas.unwrap_or(1);
        let status = d.status.as_ref()?;
        (status.ready_replicas.unwrap_or(0) == want
            && status.updated_replicas.unwrap_or(0) == want
            && status.replicas.unwrap_or(0) == want
            && status.observed_generation == d.metadata.generation)
            .then_some(())
    })
    .await;
    until("a leader holding the Lease", within, || async {
        leader(client).await
    })
    .await;
    until("the webhook's caBundle published", within, || async {
        ca_bundle(client).await.filter(|b| !b.is_empty())
    })
    .await;
}

/// The Lease's holder: `<pod name>_<process suffix>`.
pub async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    leases
        .get_opt(NAME)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// The pod of the process named by a Lease holder.
pub fn pod_of_holder(holder: &str) -> &str {
    holder.rsplit_once('_').map_or(holder, |(pod, _)| pod)
}

/// The name of the leading pod, if the Lease's holder is a live operator pod.
pub async fn leader(client: &Client) -> Option<String> {
    let holder = lease_holder(client).await?;
    let pod = pod_of_holder(&holder).to_owned();
    let pods = operator_pods(client).await;
    pods.iter()
        .any(|p| p.name_any() == pod && p.metadata.deletion_timestamp.is_none())
        .then_some(pod)
}

/// The operator's pods.
pub async fn operator_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.list(&ListParams::default().labels(SELECTOR))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// The caBundle of the chart's webhook configuration (the first webhook's).
pub async fn ca_bundle(client: &Client) -> Option<String> {
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let config = api.get_opt(NAME).await.ok()??;
    let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
    Some(String::from_utf8_lossy(&bundle.0).into_owned())
}

/// The last `lines` of a pod's log: proc-kubelet's log file on the local control plane,
/// else `kubectl logs`.
pub fn logs(ns: &str, pod: &str, lines: usize) -> String {
    let dir = std::env::var("KASMINA_K8S_DIR").unwrap_or_else(|_| "/tmp/kasmina-k8s".into());
    let file = format!("{dir}/pods/{ns}_{pod}.log");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let all: Vec<&str> = text.lines().collect();
        return all[all.len().saturating_sub(lines)..].join("\n");
    }
    let tail = format!("--tail={lines}");
    run("kubectl", &["logs", "-n", ns, pod, &tail], None).stdout
}
