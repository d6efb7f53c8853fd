//! A canary through a Gateway API HTTPRoute the user owns (GitOps): the operator sets only its
//! two Services' weights in the named rule, on a route whose backendRefs the API server
//! defaulted; another team's rule and every other field stay as written (a merge patch of
//! `spec.rules` replaced them all).

use std::time::Duration;

use kasmina::api::EdgeDeployment;
use serde_json::{Value, json};

use crate::support::model::{healthy, minilm};
use crate::support::{Scenario, kubectl, until, wait};

const NAME: &str = "routed";
const ROUTE: &str = "web";
const FIVE_MINUTES: Duration = Duration::from_secs(300);

fn canary() -> Value {
    json!({"type": "Canary",
           "canary": {"trafficRouting": {"gatewayAPI": {"httpRoute": ROUTE, "rule": "model"}},
                      "steps": [{"setWeight": 25}, {"pause": {"duration": "15s"}}]}})
}

/// The route as another tool (Argo CD, Flux) applies it: no weights, group or kind written.
fn route() -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": ROUTE},
           "spec": {"parentRefs": [{"name": "edge-gateway"}],
                    "rules": [
                        {"name": "model", "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                         "backendRefs": [{"name": NAME, "port": 80}]},
                        {"name": "docs", "backendRefs": [{"name": "docs", "port": 8080}]}]}})
}

fn get_route(ns: &str) -> Value {
    serde_json::from_str(&kubectl(
        &["get", "httproute", ROUTE, "-n", ns, "-o", "json"],
        None,
    ))
    .expect("an HTTPRoute")
}

/// The (name, weight) of each backend of the named rule.
fn weights(route: &Value, rule: &str) -> Vec<(String, i64)> {
    route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == rule)
        .flat_map(|r| r["backendRefs"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_owned(),
                b["weight"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

async fn route_weights(ns: &str, want: &[(&str, i64)], within: Duration) -> Value {
    let want: Vec<(String, i64)> = want.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect();
    until(
        &format!("rule `model` of HTTPRoute {ROUTE} at {want:?}"),
        within,
        || async {
            let route = get_route(ns);
            (weights(&route, "model") == want).then_some(route)
        },
    )
    .await
}

pub async fn run_scenario() {
    let s = Scenario::begin("gateway-route").await;
    kubectl(
        &[
            "apply",
            "-f",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/e2e/fixtures/httproute-crd.yaml"
            ),
        ],
        None,
    );
    kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/httproutes.gateway.networking.k8s.io",
        ],
        None,
    );
    let manifest = serde_json::to_string(&route()).unwrap_or_default();
    kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=e2e-gitops",
            "-n",
            &s.ns,
            "-f",
            "-",
        ],
        Some(&manifest),
    );
    let docs_rule = get_route(&s.ns)["spec"]["rules"][1].clone();
    assert_eq!(
        docs_rule["backendRefs"][0]["weight"], 1,
        "the server defaults weights"
    );

    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(NAME, "1.0.0", 2, canary()))
        .await;
    healthy(&eds, NAME, "1.0.0", FIVE_MINUTES).await;
    let serving = route_weights(
        &s.ns,
        &[(NAME, 100), ("routed-canary", 0)],
        Duration::from_secs(60),
    )
    .await;

    // The next version: a quarter of the rule's traffic to the canary Service.
    s.apply::<EdgeDeployment>(minilm(NAME, "2.0.0", 2, canary()))
        .await;
    wait(&eds, NAME, "the canary at 25 %", FIVE_MINUTES, |ed| {
        ed.status
            .as_ref()
            .is_some_and(|st| st.canary_weight == Some(25))
    })
    .await;
    let split = route_weights(
        &s.ns,
        &[(NAME, 75), ("routed-canary", 25)],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        split["spec"]["rules"][1], docs_rule,
        "another team's rule is not touched"
    );
    assert_eq!(split["spec"]["parentRefs"], serving["spec"]["parentRefs"]);
    assert_eq!(
        split["spec"]["rules"][0]["matches"],
        serving["spec"]["rules"][0]["matches"]
    );
    healthy(&eds, NAME, "2.0.0", FIVE_MINUTES).await;
    let promoted = route_weights(
        &s.ns,
        &[(NAME, 100), ("routed-canary", 0)],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(promoted["spec"]["rules"][1], docs_rule);
    s.end().await;
}
