//! Pure: from an EdgeDeployment and the time, the status it should have and the Events worth
//! publishing. No I/O here, so every decision is table-tested.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::condition::{self, ConditionStatus};
use crate::api::edge_deployment::{
    EdgeDeployment, EdgeDeploymentSpec, EdgeDeploymentStatus, Phase,
};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;

/// Label on every runtime pod of an EdgeDeployment; the scale subresource selects on it.
pub const NAME_LABEL: &str = "kasmina.dev/edge-deployment";

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";

/// What the reconciler should write and say.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub status: EdgeDeploymentStatus,
    pub notices: Vec<Notice>,
}

/// The revision a spec asks for: a stable hash of what changes the artifact or the pods
/// (model, optimization, template). Replicas, strategy and pause do not start a new revision.
pub fn revision(spec: &EdgeDeploymentSpec) -> String {
    // Field order of these structs is fixed and maps are BTreeMaps, so the JSON is canonical.
    let canonical =
        serde_json::to_vec(&(&spec.model, &spec.optimization, &spec.template)).unwrap_or_default();
    format!("{:016x}", fnv1a64(&canonical))
}

/// FNV-1a: tiny, stable across platforms and releases, and plenty for naming revisions.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Decides the status of `ed` at `now`.
pub fn plan(ed: &EdgeDeployment, now: Timestamp) -> Plan {
    let generation = ed.metadata.generation;
    let current = ed.status.clone().unwrap_or_default();
    let mut status = current.clone();
    status.observed_generation = generation;
    status.selector = Some(format!("{NAME_LABEL}={}", ed.name_any()));
    status.replicas.get_or_insert(0);
    status.ready_replicas.get_or_insert(0);
    let mut notices = vec![];

    let (ready, progressing) = match ed.spec.validate() {
        Err(errors) => {
            status.phase = Some(Phase::Failed);
            let message = format!("invalid spec: {errors}");
            (
                cond(
                    READY,
                    ConditionStatus::False,
                    "InvalidSpec",
                    &message,
                    generation,
                    now,
                ),
                cond(
                    PROGRESSING,
                    ConditionStatus::False,
                    "InvalidSpec",
                    message,
                    generation,
                    now,
                ),
            )
        }
        Ok(()) => {
            let rev = revision(&ed.spec);
            if current.target_revision.as_deref() != Some(rev.as_str()) {
                notices.push(Notice::normal(
                    "NewRevision",
                    "Plan",
                    format!(
                        "revision {rev} for model {} {}",
                        ed.spec.model.name, ed.spec.model.version
                    ),
                ));
            }
            if status.stable_revision.is_none() {
                status.phase = Some(Phase::Pending);
            }
            let message = format!("revision {rev} accepted; waiting for its artifact build");
            status.target_revision = Some(rev);
            (
                cond(
                    READY,
                    ConditionStatus::False,
                    "AwaitingArtifact",
                    &message,
                    generation,
                    now,
                ),
                cond(
                    PROGRESSING,
                    ConditionStatus::True,
                    "NewRevision",
                    message,
                    generation,
                    now,
                ),
            )
        }
    };

    let ready_changed = condition::upsert(&mut status.conditions, ready.clone());
    condition::upsert(&mut status.conditions, progressing);
    if ready_changed && ready.reason == "InvalidSpec" {
        notices.push(Notice::warning("InvalidSpec", "Validate", ready.message));
    }
    Plan { status, notices }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::edge_deployment::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    pub(crate) fn sample() -> EdgeDeployment {
        let spec: EdgeDeploymentSpec = serde_json::from_value(serde_json::json!({
            "model": {"name": "minilm", "version": "2.1.0",
                      "source": {"uri": "s3://models/minilm/2.1.0/"}, "architecture": "bert"},
            "replicas": 3,
        }))
        .unwrap();
        let mut ed = EdgeDeployment::new("sentiment", spec);
        ed.metadata.namespace = Some("ml".into());
        ed.metadata.generation = Some(4);
        ed
    }

    #[test]
    fn revision_is_stable_and_ignores_replicas_and_strategy() {
        let a = sample();
        let mut b = sample();
        b.spec.replicas = 10;
        b.spec.strategy.type_ = StrategyType::BlueGreen;
        assert_eq!(revision(&a.spec), revision(&b.spec));
        assert_eq!(revision(&a.spec).len(), 16);
        b.spec.model.version = "2.2.0".into();
        assert_ne!(revision(&a.spec), revision(&b.spec));
    }

    #[test]
    fn valid_spec_is_pending_with_a_new_revision_event() {
        let plan = plan(&sample(), now());
        let s = &plan.status;
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(
            s.selector.as_deref(),
            Some("kasmina.dev/edge-deployment=sentiment")
        );
        let ready = condition::find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::False, "AwaitingArtifact")
        );
        assert_eq!(ready.observed_generation, Some(4));
        assert_eq!(plan.notices.len(), 1);
        assert_eq!(plan.notices[0].reason, "NewRevision");
    }

    #[test]
    fn steady_state_plans_the_same_status_and_no_events() {
        let mut ed = sample();
        let first = plan(&ed, now());
        ed.status = Some(first.status.clone());
        let later = Timestamp::from_second(1_800_000_600).unwrap();
        let second = plan(&ed, later);
        assert_eq!(
            second.status, first.status,
            "nothing changed, so nothing to write"
        );
        assert!(second.notices.is_empty());
    }

    #[test]
    fn invalid_spec_fails_with_the_field_named_once() {
        let mut ed = sample();
        ed.spec.strategy.type_ = StrategyType::Canary;
        ed.spec.strategy.canary = Some(CanaryStrategy {
            traffic_routing: TrafficRouting::default(),
            steps: vec![CanaryStep::SetWeight(50), CanaryStep::SetWeight(20)],
        });
        let first = plan(&ed, now());
        assert_eq!(first.status.phase, Some(Phase::Failed));
        let ready = condition::find(&first.status.conditions, READY).unwrap();
        assert_eq!(ready.reason, "InvalidSpec");
        assert!(
            ready
                .message
                .contains("spec.strategy.canary.steps[1].setWeight"),
            "{}",
            ready.message
        );
        assert!(
            first
                .notices
                .iter()
                .any(|n| n.warning && n.reason == "InvalidSpec")
        );
        ed.status = Some(first.status);
        assert!(
            plan(&ed, now()).notices.is_empty(),
            "the warning is not repeated every reconcile"
        );
    }
}
