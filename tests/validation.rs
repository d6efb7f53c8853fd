//! Validation tables for each kind, and every example loaded through the same checks the
//! controller runs.

use std::path::Path;

use kasmina::api::{ComplianceProfileSpec, EdgeDeploymentSpec, ScalingPolicySpec};
use kasmina::manifests::validate_yaml;
use serde_json::{Value, json};

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Runs a table: each row patches a valid base spec and names the field that must be
/// reported (`None`: the spec stays valid).
fn table<T: serde::de::DeserializeOwned>(
    base: Value,
    rows: &[(&str, Value, Option<&str>)],
    validate: impl Fn(&T) -> Result<(), kasmina::api::FieldErrors>,
) {
    for (case, patch, field) in rows {
        let mut spec = base.clone();
        merge(&mut spec, patch);
        let typed: T = serde_json::from_value(spec).unwrap_or_else(|e| panic!("{case}: {e}"));
        match (validate(&typed), field) {
            (Ok(()), None) => {}
            (Ok(()), Some(field)) => panic!("{case}: expected an error on {field}"),
            (Err(errors), None) => panic!("{case}: unexpected errors: {errors}"),
            (Err(errors), Some(field)) => assert!(
                errors.0.iter().any(|e| e.field == *field),
                "{case}: expected {field}, got: {errors}"
            ),
        }
    }
}

#[test]
fn edge_deployment_rules() {
    let base = json!({
        "model": {"name": "minilm", "version": "1", "source": {"uri": "s3://m/"}, "architecture": "bert"},
    });
    let canary = |steps: Value| json!({"strategy": {"type": "Canary", "canary": {"steps": steps}}});
    let analysis = json!({"interval": "15s", "checks": [{"metric": "errorRate", "max": 0.01}]});
    table::<EdgeDeploymentSpec>(
        base,
        &[
            ("defaults are valid", json!({}), None),
            (
                "rising weights",
                canary(json!([{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}])),
                None,
            ),
            (
                "equal weights",
                canary(json!([{"setWeight": 10}, {"setWeight": 10}])),
                None,
            ),
            (
                "falling weights",
                canary(json!([{"setWeight": 50}, {"setWeight": 20}])),
                Some("spec.strategy.canary.steps[1].setWeight"),
            ),
            (
                "weight above 100",
                canary(json!([{"setWeight": 120}])),
                Some("spec.strategy.canary.steps[0].setWeight"),
            ),
            (
                "weight below 0",
                canary(json!([{"setWeight": -1}])),
                Some("spec.strategy.canary.steps[0].setWeight"),
            ),
            (
                "no steps",
                canary(json!([])),
                Some("spec.strategy.canary.steps"),
            ),
            (
                "canary without settings",
                json!({"strategy": {"type": "Canary"}}),
                Some("spec.strategy.canary"),
            ),
            (
                "canary settings on rolling",
                json!({"strategy": {"type": "Rolling", "canary": {"steps": [{"setWeight": 5}]}}}),
                Some("spec.strategy.canary"),
            ),
            (
                "blueGreen settings on canary",
                json!({"strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 5}]}, "blueGreen": {}}}),
                Some("spec.strategy.blueGreen"),
            ),
            (
                "analysis step without checks",
                canary(json!([{"setWeight": 5}, {"analysis": {}}])),
                Some("spec.strategy.analysis"),
            ),
            (
                "analysis step with checks",
                json!({"strategy": {"type": "Canary", "canary": {"steps": [{"analysis": {}}]}, "analysis": analysis}}),
                None,
            ),
            (
                "pre-promotion analysis without checks",
                json!({"strategy": {"type": "BlueGreen", "blueGreen": {"prePromotionAnalysis": true}}}),
                Some("spec.strategy.analysis"),
            ),
            (
                "check with no limit",
                json!({"strategy": {"analysis": {"checks": [{"metric": "errorRate"}]}}}),
                Some("spec.strategy.analysis.checks[0]"),
            ),
            (
                "outputAgreement through the gateway",
                json!({"strategy": {"type": "Canary",
                    "canary": {"steps": [{"setWeight": 5}], "trafficRouting": {"gateway": {"mirrorPercent": 20}}},
                    "analysis": {"checks": [{"metric": "outputAgreement", "min": 0.995}]}}}),
                None,
            ),
            (
                "outputAgreement without the gateway",
                json!({"strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 5}]},
                    "analysis": {"checks": [{"metric": "outputAgreement", "min": 0.995}]}}}),
                Some("spec.strategy.analysis.checks[0].metric"),
            ),
            (
                "outputAgreement with max",
                json!({"strategy": {"type": "Canary",
                    "canary": {"steps": [{"setWeight": 5}], "trafficRouting": {"gateway": {}}},
                    "analysis": {"checks": [{"metric": "outputAgreement", "max": 0.995}]}}}),
                Some("spec.strategy.analysis.checks[0]"),
            ),
            (
                "interval under 1s",
                json!({"strategy": {"analysis": {"interval": "500ms", "checks": [{"metric": "errorRate", "max": 1}]}}}),
                Some("spec.strategy.analysis.interval"),
            ),
            (
                "two routers",
                json!({"strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 5}], "trafficRouting": {"replicaRatio": {}, "gatewayAPI": {"httpRoute": "web"}}}}}),
                Some("spec.strategy.canary.trafficRouting"),
            ),
            (
                "no router",
                json!({"strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 5}], "trafficRouting": {}}}}),
                Some("spec.strategy.canary.trafficRouting"),
            ),
            (
                "relative file uri",
                json!({"model": {"source": {"uri": "file://models/x"}}}),
                Some("spec.model.source.uri"),
            ),
            (
                "magnitude without sparsity",
                json!({"optimization": {"pruning": {"method": "magnitude"}}}),
                Some("spec.optimization.pruning.sparsity"),
            ),
            (
                "2:4 with other sparsity",
                json!({"optimization": {"pruning": {"method": "semi-structured-2:4", "sparsity": 0.3}}}),
                Some("spec.optimization.pruning.sparsity"),
            ),
            (
                "2:4 without sparsity",
                json!({"optimization": {"pruning": {"method": "semi-structured-2:4"}}}),
                None,
            ),
        ],
        EdgeDeploymentSpec::validate,
    );
}

#[test]
fn scaling_policy_rules() {
    let base = json!({
        "targetRef": {"kind": "EdgeDeployment", "name": "sentiment"},
        "minReplicas": 1, "maxReplicas": 10,
        "metrics": [{"type": "CognitiveLoad", "target": 0.7}],
    });
    table::<ScalingPolicySpec>(
        base,
        &[
            ("valid", json!({}), None),
            ("min equals max", json!({"minReplicas": 10}), None),
            (
                "min above max",
                json!({"minReplicas": 11}),
                Some("spec.minReplicas"),
            ),
            ("no metrics", json!({"metrics": []}), Some("spec.metrics")),
            (
                "cognitive load without target",
                json!({"metrics": [{"type": "CognitiveLoad"}]}),
                Some("spec.metrics[0].target"),
            ),
            (
                "zero target",
                json!({"metrics": [{"type": "CognitiveLoad", "target": 0.0}]}),
                Some("spec.metrics[0].target"),
            ),
            (
                "queue depth",
                json!({"metrics": [{"type": "QueueDepth", "targetPerReplica": 4}]}),
                None,
            ),
            (
                "queue depth with target",
                json!({"metrics": [{"type": "QueueDepth", "target": 4}]}),
                Some("spec.metrics[0].target"),
            ),
            (
                "latency without percentile",
                json!({"metrics": [{"type": "Latency", "targetMs": 100}]}),
                None,
            ),
            (
                "latency without targetMs",
                json!({"metrics": [{"type": "Latency", "percentile": 99}]}),
                Some("spec.metrics[0].targetMs"),
            ),
            (
                "cpu",
                json!({"metrics": [{"type": "Cpu", "utilization": 70}]}),
                None,
            ),
            (
                "memory without utilization",
                json!({"metrics": [{"type": "Memory"}]}),
                Some("spec.metrics[0].utilization"),
            ),
            (
                "prometheus",
                json!({"metrics": [{"type": "Prometheus", "query": "sum(rate(x[1m]))", "serverAddress": "http://prom:9090", "target": 100}]}),
                None,
            ),
            (
                "prometheus without server",
                json!({"metrics": [{"type": "Prometheus", "query": "x", "target": 1}]}),
                Some("spec.metrics[0].serverAddress"),
            ),
            (
                "fallback outside bounds",
                json!({"fallback": {"replicas": 20}}),
                Some("spec.fallback.replicas"),
            ),
            (
                "fallback inside bounds",
                json!({"fallback": {"replicas": 2}}),
                None,
            ),
            (
                "scrape interval under 1s",
                json!({"scrapeInterval": "100ms"}),
                Some("spec.scrapeInterval"),
            ),
            (
                "huge percent policy",
                json!({"behavior": {"scaleUp": {"policies": [{"type": "Percent", "value": 5000, "periodSeconds": 15}]}}}),
                Some("spec.behavior.scaleUp.policies[0].value"),
            ),
        ],
        ScalingPolicySpec::validate,
    );
}

#[test]
fn compliance_profile_rules() {
    let base =
        json!({"selector": {"matchLabels": {"data-class": "personal"}}, "regulations": ["GDPR"]});
    table::<ComplianceProfileSpec>(
        base,
        &[
            ("valid", json!({}), None),
            (
                "In without values",
                json!({"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
                Some("spec.selector.matchExpressions[0].values"),
            ),
            (
                "Exists with values",
                json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
                Some("spec.namespaceSelector.matchExpressions[0].values"),
            ),
            (
                "unknown operator",
                json!({"selector": {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]}}),
                Some("spec.selector.matchExpressions[0].operator"),
            ),
            (
                "bad region",
                json!({"rules": {"allowedRegions": ["eu west 1"]}}),
                Some("spec.rules.allowedRegions[0]"),
            ),
            (
                "good region",
                json!({"rules": {"allowedRegions": ["eu-west-1"]}}),
                None,
            ),
            (
                "bad source pattern",
                json!({"rules": {"allowedModelSources": ["ftp://x/*"]}}),
                Some("spec.rules.allowedModelSources[0]"),
            ),
        ],
        ComplianceProfileSpec::validate,
    );
}

#[test]
fn an_omitted_optimization_allows_the_documented_quality_loss() {
    let model =
        json!({"name": "m", "version": "1", "source": {"uri": "s3://m/"}, "architecture": "mlp"});
    let omitted: EdgeDeploymentSpec = serde_json::from_value(json!({"model": model})).unwrap();
    let empty: EdgeDeploymentSpec =
        serde_json::from_value(json!({"model": model, "optimization": {}})).unwrap();
    assert_eq!(omitted.optimization.max_quality_loss, 0.02);
    assert_eq!(omitted.optimization, empty.optimization);
}

#[test]
fn every_example_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for verdict in validate_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            assert!(
                verdict.problems.is_empty(),
                "{} {}: {:?}",
                path.display(),
                verdict.object,
                verdict.problems
            );
            checked += usize::from(!verdict.skipped);
        }
    }
    assert!(checked >= 6, "only {checked} Kasmina objects in examples/");
}

#[test]
fn invalid_examples_are_rejected_naming_the_field() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let read = |name: &str| std::fs::read_to_string(fixtures.join(name)).unwrap();

    let ed = validate_yaml(&read("invalid-edge-deployment.yaml")).unwrap();
    assert_eq!(
        ed[0].problems,
        [
            "spec.replcias: unknown field",
            "spec.strategy.canary.steps[1].setWeight: 20 is lower than 50 at steps[0]; canary weights must rise",
        ]
    );
    let sp = validate_yaml(&read("invalid-scaling-policy.yaml")).unwrap();
    assert_eq!(
        sp[0].problems,
        [
            "spec.minReplicas: 10 is greater than spec.maxReplicas 2",
            "spec.metrics[0].target: does not apply to type Latency",
            "spec.metrics[0].targetMs: required for type Latency",
        ]
    );
    assert_eq!(
        sp[1].problems,
        ["spec.targetRef.kind: unknown variant `Deployment`, expected `EdgeDeployment`"]
    );
}
