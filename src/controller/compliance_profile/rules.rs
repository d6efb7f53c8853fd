//! Pure: which EdgeDeployments a ComplianceProfile selects, and the status that follows.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::condition::{self, ConditionStatus};
use crate::api::{ComplianceProfile, ComplianceProfileStatus, EdgeDeployment};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;

pub const READY: &str = "Ready";

/// Labels of each namespace, by name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// What the reconciler should write and say.
#[derive(Debug, PartialEq)]
pub struct Evaluation {
    pub status: ComplianceProfileStatus,
    pub notices: Vec<Notice>,
}

/// The profile's selectors, parsed once.
pub struct Selection {
    deployments: Selector,
    namespaces: Option<Selector>,
}

impl Selection {
    pub fn new(profile: &ComplianceProfile) -> Result<Self, String> {
        let parse = |s: &LabelSelector, field: &str| {
            Selector::try_from(s.clone()).map_err(|e| format!("{field}: {e}"))
        };
        Ok(Self {
            deployments: parse(&profile.spec.selector, "spec.selector")?,
            namespaces: profile
                .spec
                .namespace_selector
                .as_ref()
                .map(|s| parse(s, "spec.namespaceSelector"))
                .transpose()?,
        })
    }

    /// Whether the profile applies to `ed`. A namespace we have not seen has no labels.
    pub fn selects(&self, ed: &EdgeDeployment, namespaces: &NamespaceLabels) -> bool {
        if !self.deployments.matches(ed.labels()) {
            return false;
        }
        match &self.namespaces {
            None => true,
            Some(selector) => {
                let empty = BTreeMap::new();
                let labels = ed
                    .namespace()
                    .and_then(|ns| namespaces.get(&ns))
                    .unwrap_or(&empty);
                selector.matches(labels)
            }
        }
    }
}

/// Evaluates `profile` over every EdgeDeployment in the cluster.
pub fn evaluate<'a>(
    profile: &ComplianceProfile,
    deployments: impl IntoIterator<Item = &'a EdgeDeployment>,
    namespaces: &NamespaceLabels,
    now: Timestamp,
) -> Evaluation {
    let generation = profile.metadata.generation;
    let mut status = profile.status.clone().unwrap_or_default();
    status.observed_generation = generation;

    let selection = profile
        .spec
        .validate()
        .map_err(|e| e.to_string())
        .and_then(|()| Selection::new(profile));
    let ready = match selection {
        Err(message) => {
            status.matched = None;
            cond(
                READY,
                ConditionStatus::False,
                "InvalidSpec",
                format!("invalid spec: {message}"),
                generation,
                now,
            )
        }
        Ok(selection) => {
            let matched = deployments
                .into_iter()
                .filter(|ed| selection.selects(ed, namespaces))
                .count();
            status.matched = Some(i32::try_from(matched).unwrap_or(i32::MAX));
            let noun = if matched == 1 {
                "EdgeDeployment"
            } else {
                "EdgeDeployments"
            };
            cond(
                READY,
                ConditionStatus::True,
                "Selected",
                format!("selects {matched} {noun}"),
                generation,
                now,
            )
        }
    };

    let mut notices = vec![];
    if condition::upsert(&mut status.conditions, ready.clone()) && !ready.is_true() {
        notices.push(Notice::warning(&ready.reason, "Validate", ready.message));
    }
    Evaluation { status, notices }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ComplianceProfileSpec;

    fn profile(spec: serde_json::Value) -> ComplianceProfile {
        let spec: ComplianceProfileSpec = serde_json::from_value(spec).unwrap();
        let mut p = ComplianceProfile::new("gdpr", spec);
        p.metadata.generation = Some(1);
        p
    }

    fn ed(ns: &str, name: &str, labels: &[(&str, &str)]) -> EdgeDeployment {
        let spec = serde_json::from_value(serde_json::json!({
            "model": {"name": "m", "version": "1", "source": {"uri": "s3://m/"}, "architecture": "mlp"},
        }))
        .unwrap();
        let mut ed = EdgeDeployment::new(name, spec);
        ed.metadata.namespace = Some(ns.into());
        ed.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        ed
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn counts_deployments_by_label_and_namespace_selectors() {
        let eds = vec![
            ed("eu", "a", &[("data-class", "personal")]),
            ed("eu", "b", &[("data-class", "public")]),
            ed("us", "c", &[("data-class", "personal")]),
        ];
        let namespaces: NamespaceLabels = [
            (
                "eu".to_string(),
                [("region".to_string(), "eu".to_string())].into(),
            ),
            (
                "us".to_string(),
                [("region".to_string(), "us".to_string())].into(),
            ),
        ]
        .into();
        let by_label =
            profile(serde_json::json!({"selector": {"matchLabels": {"data-class": "personal"}}}));
        assert_eq!(
            evaluate(&by_label, &eds, &namespaces, now()).status.matched,
            Some(2)
        );

        let by_both = profile(serde_json::json!({
            "selector": {"matchLabels": {"data-class": "personal"}},
            "namespaceSelector": {"matchExpressions": [{"key": "region", "operator": "In", "values": ["eu"]}]},
        }));
        let e = evaluate(&by_both, &eds, &namespaces, now());
        assert_eq!(e.status.matched, Some(1));
        let ready = condition::find(&e.status.conditions, READY).unwrap();
        assert_eq!(ready.message, "selects 1 EdgeDeployment");

        let everything = profile(serde_json::json!({}));
        assert_eq!(
            evaluate(&everything, &eds, &namespaces, now())
                .status
                .matched,
            Some(3)
        );
    }

    #[test]
    fn malformed_selector_is_reported_with_its_field() {
        let bad = profile(serde_json::json!({
            "selector": {"matchExpressions": [{"key": "x", "operator": "In"}]},
        }));
        let e = evaluate(&bad, [], &NamespaceLabels::new(), now());
        let ready = condition::find(&e.status.conditions, READY).unwrap();
        assert_eq!(ready.reason, "InvalidSpec");
        assert!(
            ready
                .message
                .contains("spec.selector.matchExpressions[0].values"),
            "{}",
            ready.message
        );
        assert_eq!(e.notices.len(), 1);
    }
}
