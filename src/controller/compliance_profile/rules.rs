//! Pure: which EdgeDeployments a ComplianceProfile selects, the rules it asks of them
//! (regulation packs as data, combined with the explicit rules, strictest wins), what each
//! EdgeDeployment breaks, and the statuses and conditions that follow. The admission webhook
//! and both controllers ask these functions; docs/compliance.md is the same table for people.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{PartialObjectMeta, Selector, SelectorExt};

use crate::api::compliance_profile::{ComplianceRules, Enforcement, Regulation, Violation};
use crate::api::condition::{self, Condition, ConditionStatus};
use crate::api::{ComplianceProfile, ComplianceProfileStatus, EdgeDeployment};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;

pub const READY: &str = "Ready";
/// The condition this controller owns on each EdgeDeployment.
pub const COMPLIANT: &str = "Compliant";
/// Compliant=False with this reason stops promotion: an `Enforce` profile is violated.
pub const ENFORCED_VIOLATION: &str = "Violation";
/// Compliant=False, but only `Warn` or `Audit` profiles are violated: recorded, not blocking.
pub const UNENFORCED_VIOLATION: &str = "ViolationNotEnforced";
/// Node label the region rules read (and the workload's node affinity pins).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The region list when profiles allow none in common: no node carries it, so pinned pods
/// stay Pending rather than run where one of the profiles forbids.
pub const NO_COMMON_REGION: &str = "kasmina.dev-no-common-region";
/// Violations kept in a profile's status (the schema's bound).
pub const MAX_VIOLATIONS: usize = 100;

/// Labels of each namespace, by name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// The labels of cached namespaces (a reflector's `state()`), by name.
pub fn namespace_labels(namespaces: &[Arc<PartialObjectMeta<Namespace>>]) -> NamespaceLabels {
    namespaces
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect()
}

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

/// One regulation's rules, as data, with the clause each rule answers to.
#[derive(Clone, Debug, PartialEq)]
pub struct Pack {
    pub regulation: Regulation,
    pub rules: ComplianceRules,
    /// The runtime must stay in the profile's `allowedRegions` (data residency): a profile
    /// with this pack and no regions is itself a violation.
    pub region_pinning: bool,
    /// (rule, clause), shown in messages and in docs/compliance.md.
    pub basis: &'static [(&'static str, &'static str)],
}

/// The built-in rule pack of `regulation`.
pub fn pack(regulation: Regulation) -> Pack {
    let on = Some(true);
    let (rules, region_pinning, basis): (ComplianceRules, bool, &'static [(&str, &str)]) =
        match regulation {
            Regulation::Gdpr => (
                ComplianceRules {
                    require_encryption_at_rest: on,
                    require_authentication: on,
                    audit_logging: on,
                    retention_days: Some(365),
                    ..ComplianceRules::default()
                },
                true,
                &[
                    ("requireEncryptionAtRest", "GDPR Art. 32(1)(a)"),
                    ("requireAuthentication", "GDPR Art. 32(1)(b), Art. 25"),
                    ("auditLogging", "GDPR Art. 5(2), Art. 30"),
                    ("retentionDays", "GDPR Art. 5(1)(e)"),
                    ("allowedRegions", "GDPR Ch. V, Art. 44"),
                ],
            ),
            Regulation::Hipaa => (
                ComplianceRules {
                    require_signed_artifacts: on,
                    require_encryption_at_rest: on,
                    require_authentication: on,
                    audit_logging: on,
                    ..ComplianceRules::default()
                },
                false,
                &[
                    ("requireSignedArtifacts", "HIPAA §164.312(c)(1)"),
                    ("requireEncryptionAtRest", "HIPAA §164.312(a)(2)(iv)"),
                    ("requireAuthentication", "HIPAA §164.312(d)"),
                    ("auditLogging", "HIPAA §164.312(b)"),
                ],
            ),
            Regulation::Ferpa => (
                ComplianceRules {
                    require_encryption_at_rest: on,
                    require_authentication: on,
                    audit_logging: on,
                    ..ComplianceRules::default()
                },
                false,
                &[
                    ("requireEncryptionAtRest", "FERPA 34 CFR §99.31(a)(1)(ii)"),
                    ("requireAuthentication", "FERPA 34 CFR §99.31(a)(1)(ii)"),
                    ("auditLogging", "FERPA 34 CFR §99.32"),
                ],
            ),
            Regulation::Coppa => (
                ComplianceRules {
                    require_encryption_at_rest: on,
                    require_authentication: on,
                    retention_days: Some(365),
                    ..ComplianceRules::default()
                },
                false,
                &[
                    ("requireEncryptionAtRest", "COPPA 16 CFR §312.8"),
                    ("requireAuthentication", "COPPA 16 CFR §312.8"),
                    ("retentionDays", "COPPA 16 CFR §312.10"),
                ],
            ),
            Regulation::Mdr => (
                ComplianceRules {
                    require_signed_artifacts: on,
                    require_encryption_at_rest: on,
                    audit_logging: on,
                    max_quality_loss: Some(0.01),
                    ..ComplianceRules::default()
                },
                false,
                &[
                    ("requireSignedArtifacts", "MDR Annex I §17.2"),
                    ("requireEncryptionAtRest", "MDR Annex I §17.4"),
                    ("auditLogging", "MDR Art. 10(9)"),
                    ("maxQualityLoss", "MDR Annex I §17.1"),
                ],
            ),
            Regulation::Soc2 => (
                ComplianceRules {
                    require_signed_artifacts: on,
                    require_authentication: on,
                    audit_logging: on,
                    ..ComplianceRules::default()
                },
                false,
                &[
                    ("requireSignedArtifacts", "SOC 2 CC8.1"),
                    ("requireAuthentication", "SOC 2 CC6.1"),
                    ("auditLogging", "SOC 2 CC7.2"),
                ],
            ),
            Regulation::Iso27001 => (
                ComplianceRules {
                    require_signed_artifacts: on,
                    require_encryption_at_rest: on,
                    require_authentication: on,
                    audit_logging: on,
                    ..ComplianceRules::default()
                },
                false,
                &[
                    ("requireSignedArtifacts", "ISO/IEC 27001 A.8.32"),
                    ("requireEncryptionAtRest", "ISO/IEC 27001 A.8.24"),
                    ("requireAuthentication", "ISO/IEC 27001 A.8.5"),
                    ("auditLogging", "ISO/IEC 27001 A.8.15"),
                ],
            ),
        };
    Pack {
        regulation,
        rules,
        region_pinning,
        basis,
    }
}

/// The strictest of two rule sets: a requirement either asks for holds; regions narrow to
/// those both allow; retention and quality loss take the lower bound. Source patterns are
/// not merged (a URI must match each list), so `a`'s list is kept unless it has none.
pub fn strictest(a: &ComplianceRules, b: &ComplianceRules) -> ComplianceRules {
    let either = |x: Option<bool>, y: Option<bool>| match (x, y) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (x, y) => x.or(y),
    };
    fn lower<T: PartialOrd>(x: Option<T>, y: Option<T>) -> Option<T> {
        match (x, y) {
            (Some(x), Some(y)) => Some(if y < x { y } else { x }),
            (x, y) => x.or(y),
        }
    }
    let allowed_regions = match (a.allowed_regions.is_empty(), b.allowed_regions.is_empty()) {
        (false, false) => {
            let common: Vec<String> = a
                .allowed_regions
                .iter()
                .filter(|r| b.allowed_regions.contains(r))
                .cloned()
                .collect();
            if common.is_empty() {
                vec![NO_COMMON_REGION.to_owned()]
            } else {
                common
            }
        }
        (true, _) => b.allowed_regions.clone(),
        (false, true) => a.allowed_regions.clone(),
    };
    ComplianceRules {
        require_signed_artifacts: either(a.require_signed_artifacts, b.require_signed_artifacts),
        require_encryption_at_rest: either(
            a.require_encryption_at_rest,
            b.require_encryption_at_rest,
        ),
        require_authentication: either(a.require_authentication, b.require_authentication),
        allowed_regions,
        allowed_model_sources: if a.allowed_model_sources.is_empty() {
            b.allowed_model_sources.clone()
        } else {
            a.allowed_model_sources.clone()
        },
        audit_logging: either(a.audit_logging, b.audit_logging),
        retention_days: lower(a.retention_days, b.retention_days),
        max_quality_loss: lower(a.max_quality_loss, b.max_quality_loss),
    }
}

/// A profile's rules with its packs applied, and where each requirement comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub profile: String,
    pub enforcement: Enforcement,
    pub rules: ComplianceRules,
    /// The pack that pins regions, if one does.
    pub region_pinning: Option<Regulation>,
    /// rule → "GDPR Art. 32(1)(a), HIPAA §164.312(a)(2)(iv)"; explicit rules have none.
    pub basis: BTreeMap<&'static str, String>,
}

impl Resolved {
    pub fn new(profile: &ComplianceProfile) -> Self {
        let spec = &profile.spec;
        let mut rules = spec.rules.clone();
        let mut basis: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut region_pinning = None;
        for regulation in spec.regulations.iter().copied().collect::<BTreeSet<_>>() {
            let p = pack(regulation);
            rules = strictest(&rules, &p.rules);
            if p.region_pinning && region_pinning.is_none() {
                region_pinning = Some(regulation);
            }
            for (rule, clause) in p.basis {
                let entry = basis.entry(rule).or_default();
                if !entry.is_empty() {
                    entry.push_str(", ");
                }
                entry.push_str(clause);
            }
        }
        Self {
            profile: profile.name_any(),
            enforcement: spec.enforcement,
            rules,
            region_pinning,
            basis,
        }
    }

    /// "(requireSignedArtifacts of ComplianceProfile hipaa: HIPAA §164.312(c)(1))".
    fn origin(&self, rule: &str) -> String {
        match self.basis.get(rule) {
            Some(clause) => format!("({rule} of ComplianceProfile {}: {clause})", self.profile),
            None => format!("({rule} of ComplianceProfile {})", self.profile),
        }
    }
}

/// One rule an EdgeDeployment breaks.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub rule: &'static str,
    /// The field to change, e.g. `spec.model.source.uri`.
    pub field: String,
    /// `field: what is wrong (rule of ComplianceProfile p: clause)`.
    pub message: String,
}

/// The region values a pod template pins, with the field that says so: the node selector and
/// every `In` expression of the required node affinity.
fn pinned_regions(ed: &EdgeDeployment) -> Vec<(String, Vec<String>)> {
    let template = &ed.spec.template;
    let mut pins = vec![];
    if let Some(region) = template.node_selector.get(REGION_LABEL) {
        pins.push((
            format!("spec.template.nodeSelector[{REGION_LABEL}]"),
            vec![region.clone()],
        ));
    }
    let terms = template
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    for (i, term) in terms.iter().enumerate() {
        for (j, e) in term.match_expressions.iter().flatten().enumerate() {
            if e.key == REGION_LABEL && e.operator == "In" {
                pins.push((
                    format!("spec.template.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{i}].matchExpressions[{j}]"),
                    e.values.clone().unwrap_or_default(),
                ));
            }
        }
    }
    pins
}

/// What `ed` breaks of `resolved`. Rules the operator carries out itself (authentication,
/// audit, retention, and signing and encryption of new builds) break only through what
/// exists: an artifact already built unsigned or in the clear.
pub fn check(resolved: &Resolved, ed: &EdgeDeployment) -> Vec<Finding> {
    let rules = &resolved.rules;
    let mut found = vec![];
    let mut push = |rule: &'static str, field: String, what: String| {
        let message = format!("{field}: {what} {}", resolved.origin(rule));
        found.push(Finding {
            rule,
            field,
            message,
        });
    };

    let uri = &ed.spec.model.source.uri;
    if !rules.allowed_model_sources.is_empty() {
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        };
        let allowed = rules
            .allowed_model_sources
            .iter()
            .any(|pattern| glob::Pattern::new(pattern).is_ok_and(|p| p.matches_with(uri, options)));
        if !allowed {
            push(
                "allowedModelSources",
                "spec.model.source.uri".into(),
                format!("{uri:?} matches none of {:?}", rules.allowed_model_sources),
            );
        }
    }

    if rules.allowed_regions.is_empty() {
        if let Some(regulation) = resolved.region_pinning {
            let name = serde_json::to_value(regulation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            push(
                "allowedRegions",
                format!(
                    "ComplianceProfile {} spec.rules.allowedRegions",
                    resolved.profile
                ),
                format!(
                    "{name} requires data residency: the profile must list the regions the runtime may run in"
                ),
            );
        }
    } else {
        for (field, values) in pinned_regions(ed) {
            let outside: Vec<&String> = values
                .iter()
                .filter(|v| !rules.allowed_regions.contains(v))
                .collect();
            if !outside.is_empty() {
                push(
                    "allowedRegions",
                    field,
                    format!(
                        "region {outside:?} is outside the allowed regions {:?}",
                        rules.allowed_regions
                    ),
                );
            }
        }
    }

    if let Some(max) = rules.max_quality_loss {
        let asked = ed.spec.optimization.max_quality_loss;
        if asked > max {
            push(
                "maxQualityLoss",
                "spec.optimization.maxQualityLoss".into(),
                format!("{asked} allows more quality loss than {max}"),
            );
        }
    }

    if let Some(artifact) = ed.status.as_ref().and_then(|s| s.artifact.as_ref()) {
        if let Some(max) = rules.max_quality_loss
            && artifact.quality_loss > max
        {
            push(
                "maxQualityLoss",
                "status.artifact.qualityLoss".into(),
                format!(
                    "the built artifact lost {:.4} of quality, more than {max}",
                    artifact.quality_loss
                ),
            );
        }
        if rules.require_signed_artifacts == Some(true) && !artifact.signed {
            push(
                "requireSignedArtifacts",
                "status.artifact.signed".into(),
                format!(
                    "artifact {} is not signed; it will not be promoted",
                    artifact.digest
                ),
            );
        }
        if rules.require_encryption_at_rest == Some(true) && !artifact.encrypted {
            push(
                "requireEncryptionAtRest",
                "status.artifact.encrypted".into(),
                format!(
                    "artifact {} is stored unencrypted; it will not be promoted",
                    artifact.digest
                ),
            );
        }
    }
    found
}

/// The profiles that select an EdgeDeployment, with their findings on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Profiles selecting it, by name.
    pub profiles: Vec<String>,
    /// (profile, its enforcement, finding).
    pub findings: Vec<(String, Enforcement, Finding)>,
    /// The strictest rules of every selecting profile, for the workload to carry out.
    pub rules: ComplianceRules,
}

impl Verdict {
    /// Messages of the findings under `enforcement`, each naming its profile.
    pub fn messages(&self, enforcement: Enforcement) -> Vec<String> {
        self.findings
            .iter()
            .filter(|(_, e, _)| *e == enforcement)
            .map(|(_, _, f)| f.message.clone())
            .collect()
    }
}

/// Every profile's judgement of `ed`. Profiles with an invalid spec select nothing (their
/// own status says why).
pub fn judge<'a>(
    profiles: impl IntoIterator<Item = &'a ComplianceProfile>,
    ed: &EdgeDeployment,
    namespaces: &NamespaceLabels,
) -> Verdict {
    let mut verdict = Verdict::default();
    for profile in profiles {
        let Ok(selection) = Selection::new(profile) else {
            continue;
        };
        if profile.spec.validate().is_err() || !selection.selects(ed, namespaces) {
            continue;
        }
        let resolved = Resolved::new(profile);
        verdict.profiles.push(resolved.profile.clone());
        let before = verdict.rules.allowed_regions.clone();
        verdict.rules = strictest(&verdict.rules, &resolved.rules);
        if verdict.rules.allowed_regions == [NO_COMMON_REGION] && before != [NO_COMMON_REGION] {
            let message = format!(
                "allowedRegions: ComplianceProfile {} allows {:?}, the profiles before it {:?}: no region in common, so the runtime cannot be scheduled",
                resolved.profile, resolved.rules.allowed_regions, before
            );
            verdict.findings.push((
                resolved.profile.clone(),
                resolved.enforcement,
                Finding {
                    rule: "allowedRegions",
                    field: "allowedRegions".into(),
                    message,
                },
            ));
        }
        for finding in check(&resolved, ed) {
            verdict
                .findings
                .push((resolved.profile.clone(), resolved.enforcement, finding));
        }
    }
    verdict
}

/// The Compliant condition of `ed`, or None when no profile selects it and it never had one.
pub fn compliant_condition(
    ed: &EdgeDeployment,
    verdict: &Verdict,
    now: Timestamp,
) -> Option<Condition> {
    let generation = ed.metadata.generation;
    let existing = ed
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, COMPLIANT));
    let c = |status, reason: &str, message: String| {
        cond(COMPLIANT, status, reason, message, generation, now)
    };
    if verdict.profiles.is_empty() {
        return existing.map(|_| {
            c(
                ConditionStatus::True,
                "NotSelected",
                "no ComplianceProfile selects this EdgeDeployment".into(),
            )
        });
    }
    let names = verdict.profiles.join(", ");
    let enforced = verdict.messages(Enforcement::Enforce);
    let all: Vec<String> = verdict
        .findings
        .iter()
        .map(|(_, _, f)| f.message.clone())
        .collect();
    Some(if !enforced.is_empty() {
        c(
            ConditionStatus::False,
            ENFORCED_VIOLATION,
            format!("not promoted until fixed: {}", enforced.join("; ")),
        )
    } else if !all.is_empty() {
        c(
            ConditionStatus::False,
            UNENFORCED_VIOLATION,
            format!("recorded (Warn/Audit), not blocking: {}", all.join("; ")),
        )
    } else {
        c(
            ConditionStatus::True,
            "RulesMet",
            format!("meets every rule of ComplianceProfile {names}"),
        )
    })
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
            status.compliant = None;
            status.violations.clear();
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
            let resolved = Resolved::new(profile);
            let mut matched = 0usize;
            let mut compliant = 0usize;
            let mut violations = vec![];
            for ed in deployments
                .into_iter()
                .filter(|ed| selection.selects(ed, namespaces))
            {
                matched += 1;
                let findings = check(&resolved, ed);
                if findings.is_empty() {
                    compliant += 1;
                }
                let deployment =
                    format!("{}/{}", ed.namespace().unwrap_or_default(), ed.name_any());
                violations.extend(findings.into_iter().map(|f| Violation {
                    deployment: deployment.clone(),
                    rule: f.rule.into(),
                    message: f.message,
                }));
            }
            violations.sort_by(|a, b| (&a.deployment, &a.rule).cmp(&(&b.deployment, &b.rule)));
            violations.truncate(MAX_VIOLATIONS);
            status.violations = violations;
            status.matched = Some(i32::try_from(matched).unwrap_or(i32::MAX));
            status.compliant = Some(i32::try_from(compliant).unwrap_or(i32::MAX));
            let noun = if matched == 1 {
                "EdgeDeployment"
            } else {
                "EdgeDeployments"
            };
            cond(
                READY,
                ConditionStatus::True,
                "Selected",
                format!("selects {matched} {noun}, {compliant} compliant"),
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
        assert_eq!(ready.message, "selects 1 EdgeDeployment, 1 compliant");

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

    fn built(mut ed: EdgeDeployment, signed: bool, encrypted: bool, loss: f64) -> EdgeDeployment {
        ed.status = Some(
            serde_json::from_value(serde_json::json!({"artifact": {
                "digest": "sha256:abc", "sizeBytes": 1, "originalSizeBytes": 2, "quantization": "Q8_0",
                "sparsity": 0.0, "qualityLoss": loss, "signed": signed, "encrypted": encrypted}}))
            .unwrap(),
        );
        ed
    }

    fn named(name: &str, spec: serde_json::Value) -> ComplianceProfile {
        let mut p = profile(spec);
        p.metadata.name = Some(name.into());
        p
    }

    fn rules_of(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.rule).collect()
    }

    #[test]
    fn each_regulation_pack_asks_for_its_rules() {
        use Regulation::*;
        /// (signed, encrypted, authentication, audit) flags.
        type Flags = [Option<bool>; 4];
        /// regulation, flags, retention days, max quality loss, region pinning.
        type Row = (Regulation, Flags, Option<u32>, Option<f64>, bool);
        let table: [Row; 7] = [
            // (signed, encrypted, authentication, audit), retention, quality, region pinning
            (
                Gdpr,
                [None, Some(true), Some(true), Some(true)],
                Some(365),
                None,
                true,
            ),
            (
                Hipaa,
                [Some(true), Some(true), Some(true), Some(true)],
                None,
                None,
                false,
            ),
            (
                Ferpa,
                [None, Some(true), Some(true), Some(true)],
                None,
                None,
                false,
            ),
            (
                Coppa,
                [None, Some(true), Some(true), None],
                Some(365),
                None,
                false,
            ),
            (
                Mdr,
                [Some(true), Some(true), None, Some(true)],
                None,
                Some(0.01),
                false,
            ),
            (
                Soc2,
                [Some(true), None, Some(true), Some(true)],
                None,
                None,
                false,
            ),
            (
                Iso27001,
                [Some(true), Some(true), Some(true), Some(true)],
                None,
                None,
                false,
            ),
        ];
        for (regulation, flags, retention, quality, pinning) in table {
            let p = pack(regulation);
            let r = &p.rules;
            assert_eq!(
                [
                    r.require_signed_artifacts,
                    r.require_encryption_at_rest,
                    r.require_authentication,
                    r.audit_logging
                ],
                flags,
                "{regulation:?}"
            );
            assert_eq!(r.retention_days, retention, "{regulation:?}");
            assert_eq!(r.max_quality_loss, quality, "{regulation:?}");
            assert_eq!(p.region_pinning, pinning, "{regulation:?}");
            // Every rule the pack sets has its clause, and no clause names an unset rule.
            let set: Vec<&str> = [
                (
                    "requireSignedArtifacts",
                    r.require_signed_artifacts.is_some(),
                ),
                (
                    "requireEncryptionAtRest",
                    r.require_encryption_at_rest.is_some(),
                ),
                ("requireAuthentication", r.require_authentication.is_some()),
                ("auditLogging", r.audit_logging.is_some()),
                ("retentionDays", r.retention_days.is_some()),
                ("maxQualityLoss", r.max_quality_loss.is_some()),
                ("allowedRegions", p.region_pinning),
            ]
            .into_iter()
            .filter_map(|(rule, on)| on.then_some(rule))
            .collect();
            let mut cited: Vec<&str> = p.basis.iter().map(|(rule, _)| *rule).collect();
            cited.sort();
            let mut set = set;
            set.sort();
            assert_eq!(cited, set, "{regulation:?}");
        }
    }

    #[test]
    fn hipaa_refuses_an_unsigned_or_clear_artifact_naming_the_clause() {
        let hipaa = Resolved::new(&named("phi", serde_json::json!({"regulations": ["HIPAA"]})));
        let unbuilt = ed("ml", "a", &[]);
        assert_eq!(
            check(&hipaa, &unbuilt),
            vec![],
            "nothing built, nothing to refuse yet"
        );
        let clear = built(ed("ml", "a", &[]), false, false, 0.001);
        let found = check(&hipaa, &clear);
        assert_eq!(
            rules_of(&found),
            ["requireSignedArtifacts", "requireEncryptionAtRest"]
        );
        assert_eq!(
            found[0].message,
            "status.artifact.signed: artifact sha256:abc is not signed; it will not be promoted \
             (requireSignedArtifacts of ComplianceProfile phi: HIPAA §164.312(c)(1))"
        );
        assert_eq!(
            check(&hipaa, &built(ed("ml", "a", &[]), true, true, 0.001)),
            vec![]
        );
    }

    #[test]
    fn gdpr_pins_regions_and_asks_the_profile_for_them() {
        let without = Resolved::new(&named("eu", serde_json::json!({"regulations": ["GDPR"]})));
        let found = check(&without, &ed("ml", "a", &[]));
        assert_eq!(rules_of(&found), ["allowedRegions"]);
        assert!(
            found[0].message.contains("GDPR requires data residency"),
            "{}",
            found[0].message
        );
        assert!(
            found[0]
                .field
                .contains("ComplianceProfile eu spec.rules.allowedRegions")
        );

        let with = Resolved::new(&named(
            "eu",
            serde_json::json!({
            "regulations": ["GDPR"], "rules": {"allowedRegions": ["eu-west-1", "eu-central-1"]}}),
        ));
        assert_eq!(
            check(&with, &ed("ml", "a", &[])),
            vec![],
            "unpinned: the operator pins it"
        );
        let mut us = ed("ml", "a", &[]);
        us.spec
            .template
            .node_selector
            .insert(REGION_LABEL.into(), "us-east-1".into());
        let found = check(&with, &us);
        assert_eq!(
            found[0].field,
            "spec.template.nodeSelector[topology.kubernetes.io/region]"
        );
        assert!(
            found[0].message.contains("GDPR Ch. V, Art. 44"),
            "{}",
            found[0].message
        );
        let mut affinity = ed("ml", "a", &[]);
        affinity.spec.template.affinity = Some(serde_json::from_value(serde_json::json!({
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": REGION_LABEL, "operator": "In", "values": ["eu-west-1", "us-west-2"]}]}]}}}))
        .unwrap());
        let found = check(&with, &affinity);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].message.contains("[\"us-west-2\"]"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn ferpa_coppa_soc2_iso_ask_nothing_of_the_spec_that_the_operator_cannot_do() {
        // Authentication, audit and retention are carried out by the operator; a fresh
        // EdgeDeployment breaks none of these packs.
        for regulation in ["FERPA", "COPPA", "SOC2", "ISO27001"] {
            let r = Resolved::new(&named(
                "p",
                serde_json::json!({"regulations": [regulation]}),
            ));
            assert_eq!(check(&r, &ed("ml", "a", &[])), vec![], "{regulation}");
        }
        // SOC 2 and ISO 27001 need signed builds, FERPA and COPPA encrypted ones.
        let clear_unsigned = built(ed("ml", "a", &[]), false, false, 0.0);
        for (regulation, rules) in [
            ("FERPA", vec!["requireEncryptionAtRest"]),
            ("COPPA", vec!["requireEncryptionAtRest"]),
            ("SOC2", vec!["requireSignedArtifacts"]),
            (
                "ISO27001",
                vec!["requireSignedArtifacts", "requireEncryptionAtRest"],
            ),
        ] {
            let r = Resolved::new(&named(
                "p",
                serde_json::json!({"regulations": [regulation]}),
            ));
            assert_eq!(rules_of(&check(&r, &clear_unsigned)), rules, "{regulation}");
        }
    }

    #[test]
    fn mdr_bounds_quality_loss_asked_and_measured() {
        let mdr = Resolved::new(&named("med", serde_json::json!({"regulations": ["MDR"]})));
        let default_loss = ed("ml", "a", &[]);
        let found = check(&mdr, &default_loss);
        assert_eq!(found[0].field, "spec.optimization.maxQualityLoss");
        assert!(
            found[0]
                .message
                .contains("0.02 allows more quality loss than 0.01")
        );
        let mut strict = built(ed("ml", "a", &[]), true, true, 0.03);
        strict.spec.optimization.max_quality_loss = 0.005;
        assert_eq!(rules_of(&check(&mdr, &strict)), ["maxQualityLoss"]);
        assert_eq!(check(&mdr, &strict)[0].field, "status.artifact.qualityLoss");
    }

    #[test]
    fn allowed_sources_are_globs_over_the_whole_uri() {
        let r = Resolved::new(&named(
            "src",
            serde_json::json!({
            "rules": {"allowedModelSources": ["s3://approved-models/*", "https://huggingface.co/sentence-transformers/*"]}}),
        ));
        let mut e = ed("ml", "a", &[]);
        for (uri, ok) in [
            ("s3://approved-models/minilm/2.1.0/", true),
            (
                "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
                true,
            ),
            ("s3://approved-models-evil/x/", false),
            ("s3://random-bucket/approved-models/x", false),
        ] {
            e.spec.model.source.uri = uri.into();
            assert_eq!(check(&r, &e).is_empty(), ok, "{uri}");
        }
        assert_eq!(
            check(&r, &e)[0].message,
            "spec.model.source.uri: \"s3://random-bucket/approved-models/x\" matches none of \
             [\"s3://approved-models/*\", \"https://huggingface.co/sentence-transformers/*\"] \
             (allowedModelSources of ComplianceProfile src)"
        );
    }

    #[test]
    fn profiles_combine_to_the_strictest_rule() {
        let a = ComplianceRules {
            allowed_regions: vec!["eu-west-1".into(), "eu-central-1".into()],
            retention_days: Some(90),
            max_quality_loss: Some(0.02),
            require_authentication: Some(false),
            ..ComplianceRules::default()
        };
        let b = ComplianceRules {
            allowed_regions: vec!["eu-central-1".into(), "eu-north-1".into()],
            retention_days: Some(30),
            max_quality_loss: Some(0.05),
            require_authentication: Some(true),
            audit_logging: Some(true),
            ..ComplianceRules::default()
        };
        let both = strictest(&a, &b);
        assert_eq!(both.allowed_regions, ["eu-central-1"]);
        assert_eq!(both.retention_days, Some(30));
        assert_eq!(both.max_quality_loss, Some(0.02));
        assert_eq!(both.require_authentication, Some(true));
        assert_eq!(both.audit_logging, Some(true));
        assert_eq!(
            strictest(&both, &ComplianceRules::default()),
            both,
            "nothing loosens"
        );

        // A pack on top of explicit rules: the explicit lower retention stays.
        let gdpr = Resolved::new(&named(
            "eu",
            serde_json::json!({"regulations": ["GDPR", "HIPAA"],
            "rules": {"retentionDays": 30, "allowedRegions": ["eu-west-1"]}}),
        ));
        assert_eq!(gdpr.rules.retention_days, Some(30));
        assert_eq!(
            gdpr.rules.require_signed_artifacts,
            Some(true),
            "from HIPAA"
        );
        assert_eq!(
            gdpr.basis["requireEncryptionAtRest"],
            "GDPR Art. 32(1)(a), HIPAA §164.312(a)(2)(iv)"
        );

        // Two profiles on one deployment: each one's findings, and the workload gets both.
        let eds = ed("ml", "a", &[("data-class", "personal")]);
        let p1 = named(
            "residency",
            serde_json::json!({"rules": {"allowedRegions": ["eu-west-1"]}}),
        );
        let p2 = named(
            "audit",
            serde_json::json!({"enforcement": "Warn", "regulations": ["SOC2"],
            "rules": {"maxQualityLoss": 0.01}}),
        );
        let verdict = judge([&p1, &p2], &eds, &NamespaceLabels::new());
        assert_eq!(verdict.profiles, ["residency", "audit"]);
        assert_eq!(verdict.rules.allowed_regions, ["eu-west-1"]);
        assert_eq!(verdict.rules.require_signed_artifacts, Some(true));
        assert_eq!(verdict.messages(Enforcement::Enforce), Vec::<String>::new());
        assert_eq!(verdict.messages(Enforcement::Warn).len(), 1);

        // Two Enforce profiles with no region in common: a finding, and nowhere to run.
        let p3 = named(
            "us-only",
            serde_json::json!({"rules": {"allowedRegions": ["us-east-1"]}}),
        );
        let verdict = judge([&p1, &p3], &eds, &NamespaceLabels::new());
        assert_eq!(verdict.rules.allowed_regions, [NO_COMMON_REGION]);
        let enforced = verdict.messages(Enforcement::Enforce);
        assert_eq!(enforced.len(), 1);
        assert!(enforced[0].contains("no region in common"), "{enforced:?}");
    }

    #[test]
    fn the_compliant_condition_blocks_only_for_enforce() {
        let enforce = named(
            "strict",
            serde_json::json!({"rules": {"maxQualityLoss": 0.01}}),
        );
        let warn = named(
            "soft",
            serde_json::json!({"enforcement": "Warn", "rules": {"maxQualityLoss": 0.01}}),
        );
        let e = ed("ml", "a", &[]);
        let ns = NamespaceLabels::new();
        let c = compliant_condition(&e, &judge([&enforce], &e, &ns), now()).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, ENFORCED_VIOLATION)
        );
        assert!(
            c.message
                .starts_with("not promoted until fixed: spec.optimization.maxQualityLoss")
        );
        let c = compliant_condition(&e, &judge([&warn], &e, &ns), now()).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, UNENFORCED_VIOLATION)
        );
        let mut fixed = e.clone();
        fixed.spec.optimization.max_quality_loss = 0.01;
        let c = compliant_condition(&fixed, &judge([&enforce, &warn], &fixed, &ns), now()).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, "RulesMet")
        );
        assert_eq!(
            c.message,
            "meets every rule of ComplianceProfile strict, soft"
        );
        // Never selected: no condition; selected once, then not: True, saying so.
        assert_eq!(compliant_condition(&e, &Verdict::default(), now()), None);
        let mut was = e.clone();
        was.status = Some(Default::default());
        was.status.as_mut().unwrap().conditions.push(c);
        let c = compliant_condition(&was, &Verdict::default(), now()).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, "NotSelected")
        );
    }

    #[test]
    fn profile_status_counts_compliant_deployments_and_lists_violations() {
        let p = named(
            "src",
            serde_json::json!({"rules": {"allowedModelSources": ["s3://m/*"]}}),
        );
        let mut bad = ed("ml", "b", &[]);
        bad.spec.model.source.uri = "s3://other/".into();
        let eds = [ed("ml", "a", &[]), bad];
        let e = evaluate(&p, &eds, &NamespaceLabels::new(), now());
        assert_eq!((e.status.matched, e.status.compliant), (Some(2), Some(1)));
        assert_eq!(e.status.violations.len(), 1);
        assert_eq!(e.status.violations[0].deployment, "ml/b");
        assert_eq!(e.status.violations[0].rule, "allowedModelSources");
        let ready = condition::find(&e.status.conditions, READY).unwrap();
        assert_eq!(ready.message, "selects 2 EdgeDeployments, 1 compliant");
    }
}
