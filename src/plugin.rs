//! `kubectl kasmina`: the imperative verbs (as annotations the controller consumes, so GitOps
//! never sees a spec change) and `status`, drawn as Argo Rollouts' plugin draws a rollout.

use std::fmt::Write;

use k8s_openapi::api::apps::v1::Deployment;

use crate::api::condition::ConditionStatus;
use crate::api::edge_deployment::{CanaryStep, EdgeDeployment, StrategyType};
use crate::controller::edge_deployment::names::REVISION_LABEL;

/// The merge patch that asks the controller for `verb`; `token` makes each request distinct
/// (the controller acts on a given token once).
pub fn command_patch(verb: &str, token: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {format!("kasmina.dev/{verb}"): token}}})
}

fn short(rev: &str) -> &str {
    &rev[..rev.len().min(8)]
}

fn mark(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "✔",
        ConditionStatus::False => "✖",
        ConditionStatus::Unknown => "…",
    }
}

/// Draws an EdgeDeployment's rollout: revisions, weights, steps, analysis, conditions, history.
pub fn render(ed: &EdgeDeployment, deployments: &[Deployment]) -> String {
    let mut out = String::new();
    let status = ed.status.clone().unwrap_or_default();
    let rollout = status.rollout.clone().unwrap_or_default();
    let name = ed.metadata.name.clone().unwrap_or_default();
    let phase = status
        .phase
        .map_or("Unknown".to_owned(), |p| format!("{p:?}"));
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let _ = writeln!(out, "Name:            {name}");
    let _ = writeln!(
        out,
        "Namespace:       {}",
        ed.metadata.namespace.as_deref().unwrap_or("")
    );
    let _ = writeln!(out, "Status:          {phase}  {progressing}");
    let _ = writeln!(
        out,
        "Model:           {} {} ({:?})",
        ed.spec.model.name, ed.spec.model.version, ed.spec.model.architecture
    );
    let _ = writeln!(out, "Strategy:        {:?}", ed.spec.strategy.type_);
    if let Some(step) = status.current_step {
        let total = ed
            .spec
            .strategy
            .canary
            .as_ref()
            .map_or(0, |c| c.steps.len());
        let _ = writeln!(out, "  Step:          {step}/{total}");
        let _ = writeln!(out, "  SetWeight:     {}", rollout.weight);
        let _ = writeln!(
            out,
            "  ActualWeight:  {}",
            status.canary_weight.unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "Replicas:        desired {}, current {}, ready {}",
        ed.spec.replicas,
        status.replicas.unwrap_or_default(),
        status.ready_replicas.unwrap_or_default()
    );

    let _ = writeln!(
        out,
        "\nREVISION  ROLE      VERSION       DIGEST                  REPLICAS"
    );
    let mut roles: Vec<(&str, String)> = vec![];
    if let Some(s) = &rollout.stable {
        roles.push(("stable", s.clone()));
    }
    if let Some(c) = &rollout.candidate {
        roles.push((
            if ed.spec.strategy.type_ == StrategyType::BlueGreen {
                "preview"
            } else {
                "canary"
            },
            c.clone(),
        ));
    }
    if let Some(p) = &rollout.previous {
        roles.push(("previous", p.clone()));
    }
    if let Some(a) = &rollout.aborted {
        roles.push(("aborted", a.clone()));
    }
    for (role, rev) in &roles {
        let record = status.revisions.iter().find(|r| &r.name == rev);
        let (ready, want) = deployments
            .iter()
            .find(|d| {
                d.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(REVISION_LABEL))
                    == Some(rev)
            })
            .map_or((0, 0), |d| {
                (
                    d.status
                        .as_ref()
                        .and_then(|s| s.ready_replicas)
                        .unwrap_or(0),
                    d.spec.replicas.unwrap_or(0),
                )
            });
        let digest = record.map_or("-".to_owned(), |r| {
            r.artifact.digest.chars().take(22).collect::<String>()
        });
        let _ = writeln!(
            out,
            "{:<9} {:<9} {:<13} {:<23} {ready}/{want}",
            short(rev),
            role,
            record.map_or("-", |r| r.model_version.as_str()),
            digest
        );
    }

    if let Some(canary) = &ed.spec.strategy.canary {
        let _ = writeln!(out, "\nSTEPS");
        let current = status.current_step.map(|s| s as usize);
        for (i, step) in canary.steps.iter().enumerate() {
            let m = match current {
                Some(c) if i < c => "✔",
                Some(c) if i == c => "▶",
                _ => " ",
            };
            let what = match step {
                CanaryStep::SetWeight(w) => format!("setWeight {w}"),
                CanaryStep::Pause(p) => match p.duration {
                    Some(d) => format!("pause {d}"),
                    None => "pause (until promoted)".into(),
                },
                CanaryStep::Analysis(a) => format!("analysis ×{}", a.iterations.unwrap_or(1)),
            };
            let _ = writeln!(out, "  {m} {i}  {what}");
        }
    }

    if let Some(a) = &status.analysis {
        let _ = writeln!(
            out,
            "\nANALYSIS  revision {}: {} — {}  (failed {})",
            short(&a.revision),
            a.last_result.as_deref().unwrap_or("pending"),
            a.message,
            rollout.failed
        );
        for (k, v) in &a.values {
            let _ = writeln!(out, "  {k:<14} {v}");
        }
    }

    let _ = writeln!(out, "\nCONDITIONS");
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "  {} {:<16} {:<18} {}",
            mark(c.status),
            c.type_,
            c.reason,
            c.message
        );
    }
    if !status.history.is_empty() {
        let _ = writeln!(out, "\nHISTORY");
        for h in &status.history {
            let _ = writeln!(
                out,
                "  {} {:<9} {:<11?} {}",
                h.finished_at
                    .as_ref()
                    .map_or("-".to_owned(), |t| t.0.to_string()),
                short(&h.revision),
                h.outcome,
                h.reason
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_revisions_steps_and_analysis() {
        let ed: EdgeDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
            "metadata": {"name": "sentiment", "namespace": "ml"},
            "spec": {"model": {"name": "minilm", "version": "2.0.0", "source": {"uri": "s3://m/"}, "architecture": "bert"},
                     "replicas": 3,
                     "strategy": {"type": "Canary", "canary": {"steps": [{"setWeight": 20}, {"pause": {}}, {"analysis": {"iterations": 2}}]},
                                  "analysis": {"checks": [{"metric": "errorRate", "max": 0.05}]}}},
            "status": {"phase": "Paused", "currentStep": 1, "canaryWeight": 33, "replicas": 3, "readyReplicas": 3,
                       "rollout": {"stable": "aaaaaaaa11111111", "candidate": "bbbbbbbb22222222", "step": 1, "weight": 20},
                       "revisions": [{"name": "bbbbbbbb22222222", "modelVersion": "2.0.0", "artifact": {"digest": "sha256:two", "sizeBytes": 1, "originalSizeBytes": 2, "quantization": "q8_0", "qualityLoss": 0.0}}],
                       "analysis": {"revision": "bbbbbbbb22222222", "lastResult": "Passed", "message": "120 requests", "values": {"errorRate": 0.0}},
                       "conditions": [{"type": "Progressing", "status": "Unknown", "reason": "Paused", "message": "waiting for promote", "lastTransitionTime": "2027-01-15T08:00:00Z"}]}
        }))
        .unwrap();
        let text = render(&ed, &[]);
        assert!(
            text.contains("Status:          Paused  waiting for promote"),
            "{text}"
        );
        assert!(text.contains("ActualWeight:  33"));
        assert!(text.contains("aaaaaaaa  stable"));
        assert!(text.contains("bbbbbbbb  canary    2.0.0         sha256:two"));
        assert!(text.contains("✔ 0  setWeight 20") && text.contains("▶ 1  pause (until promoted)"));
        assert!(text.contains("ANALYSIS  revision bbbbbbbb: Passed — 120 requests"));
        assert_eq!(
            command_patch("promote", "t"),
            serde_json::json!({"metadata": {"annotations": {"kasmina.dev/promote": "t"}}})
        );
    }
}
