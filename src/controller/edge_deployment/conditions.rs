//! The phase and this controller's four conditions (ArtifactReady, AnalysisPassing,
//! Progressing, Ready) from the build, the rollout decision and the observed replicas.

use k8s_openapi::jiff::Timestamp;

use super::build::Build;
use super::rollout::{self, Decision, State};
use crate::api::condition::{self, Condition, ConditionStatus};
use crate::api::edge_deployment::{EdgeDeploymentStatus, Phase};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const ARTIFACT_READY: &str = "ArtifactReady";
pub const ANALYSIS_PASSING: &str = "AnalysisPassing";
/// The conditions this controller owns (server-side apply keeps the others' entries).
pub const OWN_CONDITIONS: [&str; 4] = [READY, PROGRESSING, ARTIFACT_READY, ANALYSIS_PASSING];

/// The phase `kubectl get` shows.
pub fn phase(build: &Build, decided: rollout::Phase, stable_ready: bool) -> Phase {
    let artifact_ready = matches!(build, Build::Ready(_));
    match (build, decided) {
        (Build::Failed(_) | Build::NoNodes, _) => Phase::Failed,
        (_, rollout::Phase::Pending) if !artifact_ready => Phase::Building,
        (_, rollout::Phase::Pending) => Phase::Progressing,
        (_, rollout::Phase::Progressing) if !artifact_ready => Phase::Building,
        (_, rollout::Phase::Progressing) => Phase::Progressing,
        (_, rollout::Phase::Paused) => Phase::Paused,
        (_, rollout::Phase::Healthy) if stable_ready => Phase::Healthy,
        (_, rollout::Phase::Healthy) => Phase::Degraded,
        (_, rollout::Phase::RolledBack) => Phase::RolledBack,
    }
}

/// What the conditions are written from.
pub struct Facts<'a> {
    pub build: &'a Build,
    pub target: &'a str,
    pub job_name: &'a str,
    pub phase: Phase,
    pub decision: &'a Decision,
    pub next: &'a State,
    /// The conditions before this reconcile.
    pub before: &'a [Condition],
    /// Whether the spec asks for analysis.
    pub analysed: bool,
    pub replicas: i32,
    pub ready: i32,
    pub generation: Option<i64>,
    pub now: Timestamp,
}

/// Upserts the four conditions into `status`, in a fixed order; a build that fails (or finds
/// no node) is said once as a Warning.
pub fn write(status: &mut EdgeDeploymentStatus, facts: &Facts, notices: &mut Vec<Notice>) {
    let Facts {
        build,
        target,
        job_name,
        phase,
        decision,
        next,
        before,
        analysed,
        replicas,
        ready,
        generation,
        now,
    } = *facts;
    let g = generation;
    let artifact_cond = match &build {
        Build::Ready(a) => cond(
            ARTIFACT_READY,
            ConditionStatus::True,
            "Built",
            format!(
                "revision {target}: {} at {}",
                a.digest,
                a.uri.as_deref().unwrap_or("?")
            ),
            g,
            now,
        ),
        Build::Running | Build::Start(_) => cond(
            ARTIFACT_READY,
            ConditionStatus::False,
            "Building",
            format!("building revision {target} in Job {job_name}"),
            g,
            now,
        ),
        Build::Failed(message) => cond(
            ARTIFACT_READY,
            ConditionStatus::False,
            "BuildFailed",
            format!("Job {job_name}: {message}"),
            g,
            now,
        ),
        Build::NoNodes => cond(
            ARTIFACT_READY,
            ConditionStatus::False,
            "NoMatchingNodes",
            "optimization.profile is auto, but no node matches spec.template.nodeSelector; set \
             spec.optimization.profile or fix the selector",
            g,
            now,
        ),
    };
    let reason_before =
        condition::find(&status.conditions, ARTIFACT_READY).map(|c| c.reason.clone());
    condition::upsert(&mut status.conditions, artifact_cond.clone());
    if reason_before.as_deref() != Some(artifact_cond.reason.as_str())
        && matches!(build, Build::Failed(_) | Build::NoNodes)
    {
        notices.push(Notice::warning(
            &artifact_cond.reason,
            "Build",
            &artifact_cond.message,
        ));
    }
    if analysed {
        let a = status.analysis.as_ref();
        let (s, reason, message) = match (decision.phase, a.and_then(|a| a.last_result.as_deref()))
        {
            (rollout::Phase::RolledBack, _) => (
                ConditionStatus::False,
                "RolledBack",
                decision
                    .ended
                    .as_ref()
                    .map(|e| e.reason.clone())
                    .or_else(|| {
                        condition::find(before, ANALYSIS_PASSING).map(|c| c.message.clone())
                    })
                    .unwrap_or_default(),
            ),
            (_, Some("Passed")) => (
                ConditionStatus::True,
                "Passed",
                a.map(|a| a.message.clone()).unwrap_or_default(),
            ),
            (_, Some("Failed")) => (
                ConditionStatus::False,
                "Failed",
                a.map(|a| a.message.clone()).unwrap_or_default(),
            ),
            _ if next.candidate.is_none() => (
                ConditionStatus::True,
                "NoRollout",
                "no rollout in progress".into(),
            ),
            _ => (
                ConditionStatus::Unknown,
                "Measuring",
                a.map(|a| a.message.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "waiting for the first interval".into()),
            ),
        };
        condition::upsert(
            &mut status.conditions,
            cond(ANALYSIS_PASSING, s, reason, message, g, now),
        );
    } else {
        status.conditions.retain(|c| c.type_ != ANALYSIS_PASSING);
    }
    let (p_status, p_reason, p_message) = match (phase, &decision.waiting) {
        (Phase::Failed, _) => (
            ConditionStatus::False,
            artifact_cond.reason.as_str(),
            artifact_cond.message.clone(),
        ),
        (Phase::RolledBack, _) => (
            ConditionStatus::False,
            "RolledBack",
            status
                .history
                .first()
                .map(|h| format!("revision {}: {}", h.revision, h.reason))
                .unwrap_or_default(),
        ),
        (Phase::Paused, why) => (
            ConditionStatus::Unknown,
            "Paused",
            why.clone().unwrap_or_else(|| "paused".into()),
        ),
        (Phase::Healthy | Phase::Degraded, _) => (
            ConditionStatus::True,
            "RolloutComplete",
            format!(
                "revision {} serves all traffic",
                next.stable.as_deref().unwrap_or("?")
            ),
        ),
        (_, why) => (
            ConditionStatus::True,
            "RolloutInProgress",
            match (&next.candidate, why) {
                (Some(c), Some(why)) => format!("revision {c}: {why}"),
                (Some(c), None) => format!("revision {c}: step {}", next.step),
                (None, Some(why)) => why.clone(),
                (None, None) => format!("revision {target}: building the artifact"),
            },
        ),
    };
    condition::upsert(
        &mut status.conditions,
        cond(PROGRESSING, p_status, p_reason, p_message, g, now),
    );
    let ready = match phase {
        Phase::Healthy => cond(
            READY,
            ConditionStatus::True,
            "Healthy",
            format!("revision {target} is serving with {ready}/{replicas} replicas ready"),
            g,
            now,
        ),
        Phase::Degraded => cond(
            READY,
            ConditionStatus::False,
            "Degraded",
            format!("{ready}/{replicas} replicas ready"),
            g,
            now,
        ),
        Phase::RolledBack => cond(
            READY,
            ConditionStatus::False,
            "RolledBack",
            format!(
                "revision {target} was rolled back; revision {} serves",
                next.stable.as_deref().unwrap_or("?")
            ),
            g,
            now,
        ),
        Phase::Failed => cond(
            READY,
            ConditionStatus::False,
            &artifact_cond.reason,
            artifact_cond.message.clone(),
            g,
            now,
        ),
        Phase::Pending | Phase::Building => cond(
            READY,
            ConditionStatus::False,
            "AwaitingArtifact",
            format!("revision {target}: waiting for its artifact build"),
            g,
            now,
        ),
        Phase::Progressing | Phase::Paused => cond(
            READY,
            ConditionStatus::False,
            "RolloutInProgress",
            format!("revision {target} is rolling out"),
            g,
            now,
        ),
    };
    condition::upsert(&mut status.conditions, ready);
    let order = |c: &Condition| {
        OWN_CONDITIONS
            .iter()
            .position(|t| *t == c.type_)
            .unwrap_or(99)
    };
    status.conditions.sort_by_key(order);
}
