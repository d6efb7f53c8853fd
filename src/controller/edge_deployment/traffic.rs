//! Traffic routers, pure: how a canary weight becomes replica counts (no mesh needed; the
//! weight actually achieved is reported) or Gateway API HTTPRoute backend weights.

use serde_json::{Value, json};

/// Replicas of each revision behind the one Service, and the weight that split achieves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaSplit {
    pub stable: i32,
    pub canary: i32,
    /// Percent of traffic the canary gets with these counts (round-robin across pods).
    pub achieved_weight: i32,
}

/// Splits `replicas` for a canary `weight` (0–100). A non-zero weight gets at least one canary
/// pod; below 100 the stable revision keeps at least one, so the total may exceed `replicas`
/// by one when `replicas` is 1 (a canary always needs a pod of its own).
pub fn replica_ratio(replicas: i32, weight: i32) -> ReplicaSplit {
    let replicas = replicas.max(0);
    let weight = weight.clamp(0, 100);
    let (stable, canary) = match weight {
        0 => (replicas, 0),
        100 => (0, replicas.max(1)),
        w => {
            let canary = ((replicas * w) as f64 / 100.0).ceil().max(1.0) as i32;
            let stable = (replicas - canary).max(1);
            (stable, canary)
        }
    };
    let total = stable + canary;
    let achieved_weight = if total == 0 {
        0
    } else {
        ((100 * canary) as f64 / total as f64).round() as i32
    };
    ReplicaSplit {
        stable,
        canary,
        achieved_weight,
    }
}

/// Which of an HTTPRoute's rules carry the canary split, and the Services it splits between.
#[derive(Clone, Copy, Debug)]
pub struct RouteTarget<'a> {
    /// `gatewayAPI.rule`: the rule of this name only. None: the rules that already send traffic
    /// to one of the two Services, or the route's only rule.
    pub rule: Option<&'a str>,
    pub stable_service: &'a str,
    pub canary_service: &'a str,
    pub port: i32,
}

/// Why an HTTPRoute cannot carry the split.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "HTTPRoute {route} has no rule named {rule} (spec.strategy.canary.trafficRouting.gatewayAPI.rule)"
    )]
    NoSuchRule { route: String, rule: String },
    #[error(
        "no rule of HTTPRoute {route} sends traffic to Service {service}; add a backendRef to it or name the rule in spec.strategy.canary.trafficRouting.gatewayAPI.rule"
    )]
    NoRuleForService { route: String, service: String },
}

/// The route to write for a canary `weight` (0–100), or None when it already sends that split.
///
/// Gateway API declares `spec.rules` and each rule's `backendRefs` atomic lists, so server-side
/// apply cannot own a part of them: an apply would own, and replace, every rule. Instead only
/// the weights of this EdgeDeployment's two Services in the chosen rules change (a missing one
/// is appended); every other rule, backend and field is written back as it was read, and the
/// caller replaces the route under its resourceVersion, so a concurrent edit conflicts instead
/// of being lost. Weights are compared as the API server defaults them (absent weight: 1;
/// absent or empty group and kind Service), so a defaulted route is not rewritten.
pub fn route_update(
    route: &Value,
    target: RouteTarget<'_>,
    weight: i32,
) -> Result<Option<Value>, RouteError> {
    let weight = weight.clamp(0, 100);
    let route_name = route
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let rules = route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let chosen: Vec<usize> = match target.rule {
        Some(name) => rules
            .iter()
            .position(|r| r.get("name").and_then(Value::as_str) == Some(name))
            .map(|i| vec![i])
            .ok_or_else(|| RouteError::NoSuchRule {
                route: route_name.clone(),
                rule: name.to_string(),
            })?,
        None => {
            let ours: Vec<usize> = (0..rules.len())
                .filter(|&i| {
                    backend_refs(&rules[i]).iter().any(|b| {
                        is_service(b, target.stable_service) || is_service(b, target.canary_service)
                    })
                })
                .collect();
            if ours.is_empty() && rules.len() == 1 {
                vec![0]
            } else {
                ours
            }
        }
    };
    if chosen.is_empty() {
        return Err(RouteError::NoRuleForService {
            route: route_name,
            service: target.stable_service.to_string(),
        });
    }
    let mut route = route.clone();
    let mut changed = false;
    for i in chosen {
        let Some(rule) = route.pointer_mut(&format!("/spec/rules/{i}")) else {
            continue;
        };
        let mut refs = backend_refs(rule);
        for (service, want) in [
            (target.stable_service, 100 - weight),
            (target.canary_service, weight),
        ] {
            match refs.iter_mut().find(|b| is_service(b, service)) {
                Some(b) if effective_weight(b) == i64::from(want) => {}
                Some(b) => {
                    b["weight"] = json!(want);
                    changed = true;
                }
                None => {
                    refs.push(json!({"name": service, "port": target.port, "weight": want}));
                    changed = true;
                }
            }
        }
        rule["backendRefs"] = Value::Array(refs);
    }
    Ok(changed.then_some(route))
}

fn backend_refs(rule: &Value) -> Vec<Value> {
    rule.get("backendRefs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether a backendRef names the Service `name` of the route's own namespace.
fn is_service(backend: &Value, name: &str) -> bool {
    let field = |k: &str| backend.get(k).and_then(Value::as_str);
    field("name") == Some(name)
        && field("group").unwrap_or("").is_empty()
        && field("kind").unwrap_or("Service") == "Service"
        && field("namespace").is_none()
}

/// The weight as Gateway API defaults it.
fn effective_weight(backend: &Value) -> i64 {
    backend.get("weight").and_then(Value::as_i64).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ratio_reports_what_it_achieves() {
        let cases = [
            // (replicas, weight) → (stable, canary, achieved)
            ((4, 0), (4, 0, 0)),
            ((4, 25), (3, 1, 25)),
            ((4, 20), (3, 1, 25)),
            ((10, 20), (8, 2, 20)),
            ((10, 55), (4, 6, 60)),
            ((3, 50), (1, 2, 67)),
            ((1, 10), (1, 1, 50)),
            ((4, 100), (0, 4, 100)),
            ((0, 0), (0, 0, 0)),
        ];
        for ((replicas, weight), (stable, canary, achieved)) in cases {
            assert_eq!(
                replica_ratio(replicas, weight),
                ReplicaSplit {
                    stable,
                    canary,
                    achieved_weight: achieved
                },
                "{replicas} replicas at {weight}%"
            );
        }
    }

    const TARGET: RouteTarget<'static> = RouteTarget {
        rule: None,
        stable_service: "m",
        canary_service: "m-canary",
        port: 8080,
    };

    /// An HTTPRoute as the API server returns it: defaults filled in, another team's rule.
    fn defaulted_route() -> Value {
        json!({
            "metadata": {"name": "web", "resourceVersion": "7"},
            "spec": {"rules": [
                {"name": "api", "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                 "backendRefs": [
                    {"group": "", "kind": "Service", "name": "m", "port": 8080, "weight": 80},
                    {"group": "", "kind": "Service", "name": "m-canary", "port": 8080, "weight": 20},
                    {"group": "", "kind": "Service", "name": "mirror", "port": 80, "weight": 1}]},
                {"name": "docs", "backendRefs": [
                    {"group": "", "kind": "Service", "name": "docs", "port": 80, "weight": 1}]}
            ]}
        })
    }

    #[test]
    fn a_route_with_the_split_and_the_servers_defaults_is_not_rewritten() {
        assert_eq!(route_update(&defaulted_route(), TARGET, 20), Ok(None));
        let named = RouteTarget {
            rule: Some("api"),
            ..TARGET
        };
        assert_eq!(route_update(&defaulted_route(), named, 20), Ok(None));
        // Absent weights are 1 on the server: 1/1 is not a 0 % canary.
        let mut route = defaulted_route();
        for b in route["spec"]["rules"][0]["backendRefs"]
            .as_array_mut()
            .unwrap()
        {
            b.as_object_mut().unwrap().remove("weight");
        }
        assert!(route_update(&route, TARGET, 0).unwrap().is_some());
    }

    #[test]
    fn only_this_deployments_weights_in_the_chosen_rule_change() {
        let before = defaulted_route();
        let after = route_update(&before, TARGET, 30).unwrap().unwrap();
        let refs = &after["spec"]["rules"][0]["backendRefs"];
        assert_eq!(refs[0]["weight"], 70);
        assert_eq!(refs[1]["weight"], 30);
        // The other backend of the rule, the other rule and the metadata are as read.
        assert_eq!(refs[2], before["spec"]["rules"][0]["backendRefs"][2]);
        assert_eq!(after["spec"]["rules"][1], before["spec"]["rules"][1]);
        assert_eq!(
            after["spec"]["rules"][0]["matches"],
            before["spec"]["rules"][0]["matches"]
        );
        assert_eq!(after["metadata"], before["metadata"]);
        let mut touched = after.clone();
        touched["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(80);
        touched["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(20);
        assert_eq!(touched, before, "nothing else changed");
    }

    #[test]
    fn a_missing_backend_is_appended_and_weights_sum_to_100() {
        let route = json!({"metadata": {"name": "web"}, "spec": {"rules": [
            {"backendRefs": [{"name": "m", "port": 8080}]}]}});
        for w in [-5, 0, 30, 100, 250] {
            let after = route_update(&route, TARGET, w).unwrap().unwrap();
            let refs = after["spec"]["rules"][0]["backendRefs"].as_array().unwrap();
            assert_eq!(refs.len(), 2);
            assert_eq!(refs[1]["name"], "m-canary");
            let sum: i64 = refs.iter().map(|b| b["weight"].as_i64().unwrap()).sum();
            assert_eq!(sum, 100);
        }
        // A route's only rule, even with no backends yet, carries the split.
        let empty = json!({"metadata": {"name": "web"}, "spec": {"rules": [{}]}});
        let after = route_update(&empty, TARGET, 10).unwrap().unwrap();
        assert_eq!(after["spec"]["rules"][0]["backendRefs"][1]["weight"], 10);
    }

    #[test]
    fn a_rule_is_found_by_name_or_the_route_is_refused_naming_why() {
        let named = RouteTarget {
            rule: Some("docs"),
            ..TARGET
        };
        let after = route_update(&defaulted_route(), named, 50)
            .unwrap()
            .unwrap();
        assert_eq!(
            after["spec"]["rules"][0],
            defaulted_route()["spec"]["rules"][0]
        );
        assert_eq!(
            after["spec"]["rules"][1]["backendRefs"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        let missing = RouteTarget {
            rule: Some("nope"),
            ..TARGET
        };
        let err = route_update(&defaulted_route(), missing, 50).unwrap_err();
        assert!(err.to_string().contains("gatewayAPI.rule"), "{err}");
        // Two rules, neither routing to this deployment: which one is meant is not guessed.
        let other = RouteTarget {
            stable_service: "x",
            canary_service: "x-canary",
            ..TARGET
        };
        assert!(matches!(
            route_update(&defaulted_route(), other, 50),
            Err(RouteError::NoRuleForService { .. })
        ));
        // Another namespace's or kind's "m" is not this deployment's Service.
        let mut foreign = defaulted_route();
        foreign["spec"]["rules"][0]["backendRefs"][0]["namespace"] = json!("other");
        foreign["spec"]["rules"][0]["backendRefs"][1]["kind"] = json!("ServiceImport");
        let api = RouteTarget {
            rule: Some("api"),
            ..TARGET
        };
        let after = route_update(&foreign, api, 20).unwrap().unwrap();
        assert_eq!(
            after["spec"]["rules"][0]["backendRefs"]
                .as_array()
                .unwrap()
                .len(),
            5
        );
    }
}
