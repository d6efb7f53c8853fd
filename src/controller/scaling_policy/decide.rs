//! Pure: from a ScalingPolicy, its target as observed and the time, the status the policy
//! should have and the Events worth publishing.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::condition::{self, ConditionStatus};
use crate::api::{EdgeDeployment, ScalingPolicy, ScalingPolicyStatus};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;

pub const ABLE_TO_SCALE: &str = "AbleToScale";
pub const SCALING_ACTIVE: &str = "ScalingActive";

/// What the reconciler should write and say.
#[derive(Debug, PartialEq)]
pub struct Decision {
    pub status: ScalingPolicyStatus,
    pub notices: Vec<Notice>,
}

/// Decides the status of `policy` given its target (`None` when it does not exist).
pub fn decide(policy: &ScalingPolicy, target: Option<&EdgeDeployment>, now: Timestamp) -> Decision {
    let generation = policy.metadata.generation;
    let mut status = policy.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let target_name = &policy.spec.target_ref.name;
    let namespace = policy.namespace().unwrap_or_default();

    let (able, active) = match (policy.spec.validate(), target) {
        (Err(errors), _) => {
            let message = format!("invalid spec: {errors}; replicas are left as they are");
            (
                cond(
                    ABLE_TO_SCALE,
                    ConditionStatus::False,
                    "InvalidSpec",
                    &message,
                    generation,
                    now,
                ),
                cond(
                    SCALING_ACTIVE,
                    ConditionStatus::False,
                    "InvalidSpec",
                    message,
                    generation,
                    now,
                ),
            )
        }
        (Ok(()), None) => {
            status.current_replicas = None;
            let message = format!(
                "EdgeDeployment {target_name:?} not found in namespace {namespace:?}; replicas are left as they are"
            );
            (
                cond(
                    ABLE_TO_SCALE,
                    ConditionStatus::False,
                    "TargetNotFound",
                    &message,
                    generation,
                    now,
                ),
                cond(
                    SCALING_ACTIVE,
                    ConditionStatus::False,
                    "TargetNotFound",
                    message,
                    generation,
                    now,
                ),
            )
        }
        (Ok(()), Some(ed)) => {
            status.current_replicas = Some(
                ed.status
                    .as_ref()
                    .and_then(|s| s.replicas)
                    .unwrap_or(ed.spec.replicas),
            );
            (
                cond(
                    ABLE_TO_SCALE,
                    ConditionStatus::True,
                    "TargetFound",
                    format!("scales EdgeDeployment {target_name:?} through its scale subresource"),
                    generation,
                    now,
                ),
                cond(
                    SCALING_ACTIVE,
                    ConditionStatus::Unknown,
                    "AwaitingMetrics",
                    "no metrics collected from the runtime pods yet",
                    generation,
                    now,
                ),
            )
        }
    };

    let mut notices = vec![];
    if condition::upsert(&mut status.conditions, able.clone()) && !able.is_true() {
        notices.push(Notice::warning(&able.reason, "Resolve", able.message));
    }
    condition::upsert(&mut status.conditions, active);
    Decision { status, notices }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScalingPolicySpec;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn policy(min: i32, max: i32) -> ScalingPolicy {
        let spec: ScalingPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRef": {"kind": "EdgeDeployment", "name": "sentiment"},
            "minReplicas": min, "maxReplicas": max,
            "metrics": [{"type": "CognitiveLoad", "target": 0.7}],
        }))
        .unwrap();
        let mut sp = ScalingPolicy::new("sentiment", spec);
        sp.metadata.namespace = Some("ml".into());
        sp.metadata.generation = Some(2);
        sp
    }

    fn target(replicas: i32) -> EdgeDeployment {
        let spec = serde_json::from_value(serde_json::json!({
            "model": {"name": "minilm", "version": "1", "source": {"uri": "s3://m/"}, "architecture": "bert"},
            "replicas": replicas,
        }))
        .unwrap();
        EdgeDeployment::new("sentiment", spec)
    }

    fn reason(d: &Decision, type_: &str) -> (ConditionStatus, String) {
        let c = condition::find(&d.status.conditions, type_).unwrap();
        (c.status, c.reason.clone())
    }

    #[test]
    fn missing_target_is_reported_once() {
        let mut sp = policy(1, 5);
        let d = decide(&sp, None, now());
        assert_eq!(
            reason(&d, ABLE_TO_SCALE),
            (ConditionStatus::False, "TargetNotFound".into())
        );
        let message = &condition::find(&d.status.conditions, ABLE_TO_SCALE)
            .unwrap()
            .message;
        assert!(
            message.contains("\"sentiment\"") && message.contains("\"ml\""),
            "{message}"
        );
        assert_eq!(d.notices.len(), 1);
        sp.status = Some(d.status);
        assert!(decide(&sp, None, now()).notices.is_empty());
    }

    #[test]
    fn found_target_reports_its_replicas() {
        let d = decide(&policy(1, 5), Some(&target(3)), now());
        assert_eq!(
            reason(&d, ABLE_TO_SCALE),
            (ConditionStatus::True, "TargetFound".into())
        );
        assert_eq!(
            reason(&d, SCALING_ACTIVE),
            (ConditionStatus::Unknown, "AwaitingMetrics".into())
        );
        assert_eq!(d.status.current_replicas, Some(3));
        assert_eq!(d.status.observed_generation, Some(2));
        assert!(d.notices.is_empty());
    }

    #[test]
    fn min_above_max_is_invalid() {
        let d = decide(&policy(6, 5), Some(&target(3)), now());
        let c = condition::find(&d.status.conditions, ABLE_TO_SCALE).unwrap();
        assert_eq!(c.reason, "InvalidSpec");
        assert!(
            c.message
                .contains("spec.minReplicas: 6 is greater than spec.maxReplicas 5"),
            "{}",
            c.message
        );
    }
}
