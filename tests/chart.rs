//! The Helm chart: renders to valid YAML, grants exactly the permissions the code uses (no
//! wildcards), runs the operator hardened, and ships alerts and a dashboard that read only
//! metrics the runtime and the operator really export.
//!
//! Needs `helm` (on PATH, in `$HELM`, or `.tools/bin/helm` from `just install-helm`). Without
//! it the test says so and passes locally; under CI (`CI=true`) a missing helm fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use kasmina::controller::PERMISSIONS;
use serde_json::Value;

fn helm() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("HELM").map(PathBuf::from),
        Some(root.join(".tools/bin/helm")),
        Some(PathBuf::from("helm")),
    ];
    let found = candidates.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "helm is required under CI; run `just install-helm`"
        );
        eprintln!("SKIPPED: helm not found; run `just install-helm` to check the chart");
    }
    found
}

fn render(helm: &Path, args: &[&str]) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(helm)
        .args([
            "template",
            "kasmina",
            "charts/kasmina",
            "--namespace",
            "kasmina-system",
            "--include-crds",
        ])
        .args(args)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).expect("helm template output is valid YAML");
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    for doc in &docs {
        assert!(
            doc["apiVersion"].is_string() && doc["kind"].is_string(),
            "not a Kubernetes object: {doc}"
        );
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// (group, resource, verb) of each permission a table lists.
fn permission_set(table: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    table
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(|v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn rbac_is_exactly_what_the_code_uses() {
    let Some(helm) = helm() else { return };
    // With one namespace for EdgeDeployments' keys, so that every permission is rendered.
    let docs = render(&helm, &["--set", "keys.namespaces={ml}"]);
    let mut granted = BTreeSet::new();
    let mut gateway = BTreeSet::new();
    for role in of_kind(&docs, "ClusterRole")
        .into_iter()
        .chain(of_kind(&docs, "Role"))
    {
        let is_gateway = role["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-gateway"));
        let granted = if is_gateway {
            &mut gateway
        } else {
            &mut granted
        };
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s == "*"),
                    "wildcard in {field}: {rule}"
                );
            }
            assert!(rule.get("nonResourceURLs").is_none());
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        granted.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    let needed = permission_set(PERMISSIONS);
    assert_eq!(
        granted, needed,
        "the chart's RBAC and controller::PERMISSIONS differ"
    );
    let gateway_needs = permission_set(kasmina::gateway::PERMISSIONS);
    assert_eq!(
        gateway, gateway_needs,
        "the chart's gateway ClusterRole and gateway::PERMISSIONS differ"
    );
    // The controller may grant it: it holds every permission of the role it binds.
    assert!(gateway_needs.is_subset(&needed));
    // The Lease permission is namespaced, not cluster-wide.
    let role = of_kind(&docs, "Role")[0];
    assert_eq!(role["metadata"]["namespace"], "kasmina-system");
    assert_eq!(strings(&role["rules"][0]["resources"]), ["leases"]);
    assert!(
        of_kind(&docs, "ClusterRole")[0]["rules"]
            .to_string()
            .find("leases")
            .is_none()
    );
    // Secrets: only the webhook's, only in the release namespace; the webhook configuration
    // only by name.
    let cluster = of_kind(&docs, "ClusterRole")[0]["rules"].to_string();
    assert!(
        !cluster.contains("secrets"),
        "no cluster-wide Secrets access"
    );
    for role in of_kind(&docs, "Role") {
        let namespace = role["metadata"]["namespace"].as_str().unwrap();
        for rule in role["rules"].as_array().unwrap() {
            if !strings(&rule["resources"]).contains(&"secrets".to_owned()) {
                assert_eq!(namespace, "kasmina-system", "{role}");
                continue;
            }
            let verbs = strings(&rule["verbs"]);
            match namespace {
                "kasmina-system" => assert!(
                    verbs == ["create"]
                        || strings(&rule["resourceNames"]) == ["kasmina-webhook-tls"],
                    "{rule}"
                ),
                // Keys of EdgeDeployments: only in the listed namespace, no list or delete.
                "ml" => assert_eq!(verbs, ["get", "create", "patch"]),
                other => panic!("Secrets access in namespace {other}"),
            }
        }
    }
    let bindings: Vec<&str> = of_kind(&docs, "RoleBinding")
        .iter()
        .filter_map(|b| b["metadata"]["namespace"].as_str())
        .collect();
    assert!(bindings.contains(&"ml"), "{bindings:?}");
    // Without the value, no Secrets access outside the release namespace; cluster-wide only
    // when asked for.
    let plain = render(&helm, &[]);
    assert!(
        of_kind(&plain, "Role")
            .iter()
            .all(|r| r["metadata"]["namespace"] == "kasmina-system")
    );
    let everywhere = render(&helm, &["--set", "keys.allNamespaces=true"]);
    let keys = of_kind(&everywhere, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "kasmina-keys")
        .unwrap();
    assert_eq!(
        strings(&keys["rules"][0]["verbs"]),
        ["get", "create", "patch"]
    );
    let vwc = of_kind(&docs, "ClusterRole")[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| strings(&r["resources"]) == ["validatingwebhookconfigurations"])
        .unwrap();
    assert_eq!(strings(&vwc["resourceNames"]), ["kasmina"]);
}

#[test]
fn deployment_is_hardened_and_highly_available() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &[]);
    let deployment = of_kind(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["args"][0], "controller");
    assert_eq!(of_kind(&docs, "PodDisruptionBudget").len(), 1);
    assert_eq!(of_kind(&docs, "CustomResourceDefinition").len(), 3);
    assert!(of_kind(&docs, "ServiceMonitor").is_empty());

    let with_monitor = render(&helm, &["--set", "metrics.serviceMonitor.enabled=true"]);
    assert_eq!(of_kind(&with_monitor, "ServiceMonitor").len(), 1);
}

#[test]
fn values_schema_rejects_bad_values() {
    let Some(helm) = helm() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&helm)
        .args([
            "template",
            "kasmina",
            "charts/kasmina",
            "--set",
            "logFormat=xml",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("logFormat"));
}

/// Every metric name the runtime and the operator export, from their real registries.
fn exported_metrics() -> BTreeSet<String> {
    use kasmina::controller::context::Metrics;
    use kasmina::runtime::load::{InfoLabels, Load};
    use prometheus_client::registry::Registry;

    let mut runtime = Registry::default();
    let info = InfoLabels {
        model: "m".into(),
        version: "1".into(),
        revision: "r".into(),
        digest: "sha256:0".into(),
        quantization: "q8_0".into(),
        kernel: "avx2".into(),
    };
    let load = Load::new(&mut runtime, info, 8, std::time::Instant::now());
    load.record(200, "success", 0.01);
    let mut operator = Registry::with_prefix("kasmina");
    let metrics = Metrics::register(&mut operator);
    metrics.scaled("ns", "p", true);
    metrics.desired_replicas("ns", "p", 3);
    metrics.reconcile_failed("scalingpolicy", "scale");
    let mut gateway = Registry::default();
    let g = kasmina::gateway::metrics::Metrics::new(&mut gateway);
    g.answered("r", 200, 0.001);
    g.retried("r");
    g.upstream_error("r", "connect");
    g.inflight("r").set(1);
    g.ready_pods
        .get_or_create(&kasmina::gateway::metrics::RevisionLabels {
            revision: "r".into(),
        })
        .set(1);
    g.mirrored("r", "compared");
    g.agreed("r", 0.999);
    g.held("r").set(1);
    g.woke("r", "scaled");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &runtime).unwrap();
    prometheus_client::encoding::text::encode(&mut text, &operator).unwrap();
    prometheus_client::encoding::text::encode(&mut text, &gateway).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

/// The `kasmina_*` metric names a PromQL expression reads.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = expr;
    while let Some(i) = rest.find("kasmina_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alerts_and_dashboard_read_exported_metrics_with_the_seed_thresholds() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &[]);
    assert!(
        of_kind(&docs, "PrometheusRule").is_empty(),
        "off by default"
    );
    let docs = render(
        &helm,
        &[
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--set",
            "monitoring.dashboard.enabled=true",
            "--set",
            "monitoring.podMonitor.enabled=true",
        ],
    );
    let exported = exported_metrics();
    assert!(exported.contains("kasmina_cognitive_load"), "{exported:?}");
    assert!(
        exported.contains("kasmina_scaling_events_total"),
        "{exported:?}"
    );

    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let mut exprs = BTreeMap::new();
    for group in rules[0]["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.insert(
                rule["alert"].as_str().unwrap().to_owned(),
                rule["expr"].as_str().unwrap().to_owned(),
            );
        }
    }
    // The seed's thresholds: load 0.8 / 0.9, latency 100 ms / 500 ms.
    assert!(exprs["KasminaCognitiveLoadHigh"].ends_with("> 0.8"));
    assert!(exprs["KasminaCognitiveLoadCritical"].ends_with("> 0.9"));
    assert!(exprs["KasminaLatencyHigh"].ends_with("> 0.1"));
    assert!(exprs["KasminaLatencyCritical"].ends_with("> 0.5"));
    assert!(
        exprs.contains_key("KasminaErrorRatioHigh") && exprs.contains_key("KasminaScalingFlapping")
    );

    let dashboard = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a dashboard ConfigMap for Grafana's sidecar");
    let json: Value =
        serde_json::from_str(dashboard["data"]["kasmina.json"].as_str().unwrap()).unwrap();
    let mut read = vec![];
    for panel in json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            read.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(read.len() >= 7, "{read:?}");
    // The gateway's panels: its requests, latency, retries, the canary's agreement and the
    // requests held while a revision wakes from zero.
    for metric in [
        "kasmina_gateway_held_requests",
        "kasmina_gateway_wakes_total",
        "kasmina_gateway_requests_total",
        "kasmina_gateway_request_duration_seconds_bucket",
        "kasmina_gateway_retries_total",
        "kasmina_gateway_output_agreement_sum",
        "kasmina_gateway_mirrored_total",
    ] {
        assert!(
            read.iter().any(|e| e.contains(metric)),
            "no panel reads {metric}"
        );
    }
    for expr in exprs.values().chain(&read) {
        for name in metrics_in(expr) {
            assert!(
                exported.contains(&name),
                "{name} in {expr:?} is not exported"
            );
        }
    }
    let monitors = of_kind(&docs, "PodMonitor");
    assert_eq!(monitors.len(), 1);
    // It scrapes the pods the controller labels as runtime and gateway, and no build Job's.
    use kasmina::controller::edge_deployment::names::{
        COMPONENT_LABEL, GATEWAY_COMPONENT, NAME_LABEL, RUNTIME_COMPONENT,
    };
    let selects = |component: &str| {
        let labels = BTreeMap::from([(NAME_LABEL, "ed"), (COMPONENT_LABEL, component)]);
        monitors[0]["spec"]["selector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| {
                let value = labels.get(e["key"].as_str().unwrap());
                match e["operator"].as_str().unwrap() {
                    "Exists" => value.is_some(),
                    "In" => value.is_some_and(|v| strings(&e["values"]).iter().any(|s| s == v)),
                    other => panic!("operator {other}"),
                }
            })
    };
    assert!(selects(RUNTIME_COMPONENT) && selects(GATEWAY_COMPONENT));
    assert!(!selects("build"));
}

#[test]
fn the_webhook_configuration_points_at_what_the_operator_serves() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &[]);
    let deployment = of_kind(&docs, "Deployment")[0];
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name} in {args:?}"))
            .to_owned()
    };
    assert_eq!(arg("webhook"), "true");
    assert_eq!(arg("webhook-certs"), "self");
    let vwc = of_kind(&docs, "ValidatingWebhookConfiguration")[0];
    assert_eq!(
        vwc["metadata"]["name"].as_str().unwrap(),
        arg("webhook-configuration")
    );
    let hook = &vwc["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    let service = &hook["clientConfig"]["service"];
    assert_eq!(service["name"].as_str().unwrap(), arg("webhook-service"));
    assert_eq!(service["path"], "/validate");
    assert_eq!(strings(&hook["rules"][0]["resources"]), ["edgedeployments"]);
    // The other kinds fail open: with every replica down, a ComplianceProfile's finalizer can
    // still be removed (their controllers validate them again).
    let config = &vwc["webhooks"][1];
    assert_eq!(config["failurePolicy"], "Ignore");
    assert_eq!(
        strings(&config["rules"][0]["resources"]),
        ["scalingpolicies", "complianceprofiles"]
    );
    assert_eq!(config["clientConfig"], hook["clientConfig"]);
    let svc = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == service["name"])
        .expect("the webhook Service");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "https-webhook");
    assert!(arg("webhook-addr").ends_with(":8443"));

    // cert-manager: a Certificate writes the Secret the operator reads; the CA is injected.
    let docs = render(&helm, &["--set", "webhook.certManager.enabled=true"]);
    let vwc = of_kind(&docs, "ValidatingWebhookConfiguration")[0];
    assert_eq!(
        vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "kasmina-system/kasmina-webhook"
    );
    let cert = of_kind(&docs, "Certificate")[0];
    assert_eq!(cert["spec"]["secretName"], "kasmina-webhook-tls");
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "Issuer");
    let deployment = of_kind(&docs, "Deployment")[0];
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(
        args.contains(&"--webhook-certs=cert-manager".to_owned()),
        "{args:?}"
    );

    // Off: no webhook objects and no Secrets access.
    let docs = render(&helm, &["--set", "webhook.enabled=false"]);
    assert!(of_kind(&docs, "ValidatingWebhookConfiguration").is_empty());
    assert!(
        !serde_json::to_string(&of_kind(&docs, "Role"))
            .unwrap()
            .contains("secrets")
    );
}
