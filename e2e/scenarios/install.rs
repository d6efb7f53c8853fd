//! Install: the chart rendered and applied as a user would; the operator runs in the cluster
//! under the chart's ServiceAccount and RBAC, two replicas with one leader, the webhook with
//! its self-managed certificate and caBundle; the CRDs established; every example accepted.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kasmina::controller::PERMISSIONS;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

use crate::support::operator::{self, KEYS_NAMESPACES, NAME, NAMESPACE};
use crate::support::{Scenario, ensure_namespace, kubectl, run};

pub async fn run_scenario() {
    let s = Scenario::begin("install").await;
    let installed = operator::ensure(&s.client).await;
    s.figure("server version", &installed.server_version);
    for adaptation in &installed.adaptations {
        s.figure("adapted for the server", adaptation);
    }
    s.figure(
        "operator ready after apply (s)",
        format!("{:.1}", installed.seconds_to_ready),
    );

    // CRDs: established, with the short names and printer columns users type and read.
    let crds: Api<CustomResourceDefinition> = Api::all(s.client.clone());
    for (plural, short) in [
        ("edgedeployments", "ed"),
        ("scalingpolicies", "sp"),
        ("complianceprofiles", "cp"),
    ] {
        let crd = crds
            .get(&format!("{plural}.kasmina.dev"))
            .await
            .unwrap_or_else(|e| panic!("CRD {plural}: {e}"));
        let names = &crd.spec.names;
        assert!(
            names.short_names.iter().flatten().any(|n| n == short),
            "{plural}: short name {short}"
        );
        assert!(
            names.categories.iter().flatten().any(|c| c == "kasmina"),
            "{plural}: in `kubectl get kasmina`"
        );
    }

    // Two replicas under the chart's ServiceAccount; exactly one leads.
    let pods = operator::operator_pods(&s.client).await;
    assert_eq!(pods.len(), 2, "two operator replicas");
    for pod in &pods {
        let spec = pod.spec.as_ref().expect("pod spec");
        assert_eq!(spec.service_account_name.as_deref(), Some(NAME));
    }
    let leader = operator::leader(&s.client).await.expect("a leader");
    let mut leading = vec![];
    for pod in &pods {
        let ip = pod
            .status
            .as_ref()
            .and_then(|st| st.pod_ip.clone())
            .expect("pod IP");
        let metrics = reqwest::get(format!("http://{ip}:8080/metrics"))
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("operator metrics of {}: {e}", pod.name_any()));
        let text = metrics.text().await.unwrap_or_default();
        if text.lines().any(|l| l.trim() == "kasmina_leader 1") {
            leading.push(pod.name_any());
        }
    }
    assert_eq!(leading, vec![leader.clone()], "only the Lease holder leads");
    s.figure("leader", &leader);

    // The webhook's certificate is the operator's own, its CA in the configuration.
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NAMESPACE);
    let tls = secrets
        .get(&format!("{NAME}-webhook-tls"))
        .await
        .expect("the webhook certificate Secret");
    let data = tls.data.unwrap_or_default();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(data.contains_key(key), "webhook Secret has {key}");
    }
    let bundle = operator::ca_bundle(&s.client).await.unwrap_or_default();
    let ca = String::from_utf8_lossy(&data["ca.crt"].0).into_owned();
    assert!(
        bundle.contains(ca.trim()),
        "the caBundle carries the Secret's CA"
    );

    every_permission_is_granted(&s.client).await;
    every_example_is_accepted(&s).await;
    s.end().await;
}

/// A SubjectAccessReview for each permission the code uses, as the operator's
/// ServiceAccount, where the chart grants it: a permission missing from the chart fails here.
async fn every_permission_is_granted(client: &Client) {
    let user = format!("system:serviceaccount:{NAMESPACE}:{NAME}");
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let webhook_secret = format!("{NAME}-webhook-tls");
    let gateway_role = format!("{NAME}-gateway");
    let mut checked = 0;
    let mut denied = vec![];
    for (group, resource, verbs) in PERMISSIONS {
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, sub)) => (r, Some(sub.to_owned())),
            None => (*resource, None),
        };
        // (namespace, name) where the chart grants it: Roles for Secrets and the Lease.
        let scopes: Vec<(Option<&str>, Option<&str>)> = match resource {
            "leases" => vec![(Some(NAMESPACE), None)],
            "secrets" => KEYS_NAMESPACES
                .iter()
                .map(|ns| (Some(*ns), None))
                .chain([(Some(NAMESPACE), Some(webhook_secret.as_str()))])
                .collect(),
            "validatingwebhookconfigurations" => vec![(None, Some(NAME))],
            // bind: the gateway's ClusterRole only.
            "clusterroles" => vec![(None, Some(gateway_role.as_str()))],
            _ => vec![(None, None)],
        };
        for verb in *verbs {
            for (namespace, name) in &scopes {
                // The webhook Secret: get, create, update; keys Secrets: get, create, patch.
                if resource == "secrets" {
                    let webhook = name.is_some();
                    if (webhook && *verb == "patch") || (!webhook && *verb == "update") {
                        continue;
                    }
                }
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.clone()),
                        groups: Some(vec![
                            "system:serviceaccounts".into(),
                            format!("system:serviceaccounts:{NAMESPACE}"),
                        ]),
                        resource_attributes: Some(ResourceAttributes {
                            group: Some((*group).to_owned()),
                            resource: Some(resource.to_owned()),
                            subresource: subresource.clone(),
                            verb: Some((*verb).to_owned()),
                            namespace: namespace.map(str::to_owned),
                            name: (*verb != "create")
                                .then_some(*name)
                                .flatten()
                                .map(str::to_owned),
                            ..ResourceAttributes::default()
                        }),
                        ..SubjectAccessReviewSpec::default()
                    },
                    ..SubjectAccessReview::default()
                };
                let answer = reviews
                    .create(&PostParams::default(), &review)
                    .await
                    .expect("SubjectAccessReview");
                checked += 1;
                if !answer.status.is_some_and(|st| st.allowed) {
                    denied.push(format!(
                        "{verb} {group}/{resource}{} in {}",
                        subresource
                            .as_ref()
                            .map(|s| format!("/{s}"))
                            .unwrap_or_default(),
                        namespace.unwrap_or("all namespaces")
                    ));
                }
            }
        }
    }
    assert!(denied.is_empty(), "the chart's RBAC misses: {denied:#?}");
    assert!(checked > 40, "checked {checked} permissions");
}

/// `kubectl apply --dry-run=server` of every file in examples/: the schema and the webhook
/// accept them as shipped. The namespaces they name exist for the dry run only.
async fn every_example_is_accepted(s: &Scenario) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "examples: {files:?}");
    let mut made = vec![];
    for file in &files {
        let text = std::fs::read_to_string(file).expect("an example");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        for doc in docs {
            if let Some(ns) = doc["metadata"]["namespace"].as_str()
                && !made.contains(&ns.to_owned())
            {
                made.push(ns.to_owned());
            }
        }
    }
    // Only namespaces this run makes are deleted after (a user's cluster may have an `ml`).
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(s.client.clone());
    let mut ours = vec![];
    for ns in &made {
        if namespaces.get_opt(ns).await.ok().flatten().is_none() {
            ensure_namespace(&s.client, ns).await;
            ours.push(ns.clone());
        }
    }
    for file in &files {
        let path = file.display().to_string();
        let out = run("kubectl", &["apply", "--dry-run=server", "-f", &path], None);
        assert!(out.ok, "{path} refused: {}", out.stderr);
        assert!(
            out.stdout.contains("(server dry run)"),
            "{path}: {}",
            out.stdout
        );
    }
    s.figure("examples accepted", files.len());
    for ns in ours {
        kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
    }
}
