//! Pure: from an EdgeDeployment, what the reconciler observed and the time — the children to
//! apply or delete, the status to write and the Events worth publishing. No I/O here, so every
//! decision is table-tested; the rollout itself is `rollout::decide`.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::Value;

use super::analysis;
use super::rollout::{self, Command, Measurement, Outcome, Seconds, State, Strategy};
use super::security::{self, Security};
use super::traffic;
use super::workload::{self, REVISION_LABEL, Settings};
use crate::api::condition::{self, Condition, ConditionStatus};
use crate::api::edge_deployment::{
    AnalysisStatus, ArtifactStatus, DeviceProfile, EdgeDeployment, EdgeDeploymentSpec,
    EdgeDeploymentStatus, GatewayApiRouting, Phase, RevisionRecord, RolloutOutcome, RolloutRecord,
    RolloutState, StrategyType,
};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;
use crate::runtime::REFUSED_EXIT_CODE;

pub use super::workload::NAME_LABEL;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const ARTIFACT_READY: &str = "ArtifactReady";
pub const ANALYSIS_PASSING: &str = "AnalysisPassing";
/// Owned by the ComplianceProfile controller; read here, never written.
pub use crate::controller::compliance_profile::rules::COMPLIANT;
use crate::controller::compliance_profile::rules::ENFORCED_VIOLATION;
/// The conditions this controller owns (server-side apply keeps the others' entries).
const OWN_CONDITIONS: [&str; 4] = [READY, PROGRESSING, ARTIFACT_READY, ANALYSIS_PASSING];

/// Annotations a user (or `kubectl kasmina`) sets to act on a rollout; consumed and removed.
pub const COMMANDS: [(&str, Command); 5] = [
    ("kasmina.dev/abort", Command::Abort),
    ("kasmina.dev/retry", Command::Retry),
    ("kasmina.dev/pause", Command::Pause),
    ("kasmina.dev/resume", Command::Resume),
    ("kasmina.dev/promote", Command::Promote),
];

/// The revision a spec asks for: a stable hash of what changes the artifact or the pods
/// (model, optimization, template, and the keys a signed or encrypted artifact is made with).
/// Replicas, strategy and pause do not start a new revision.
pub fn revision(spec: &EdgeDeploymentSpec, security: &Security) -> String {
    // Field order of these structs is fixed and maps are BTreeMaps, so the JSON is canonical.
    let mut canonical =
        serde_json::to_vec(&(&spec.model, &spec.optimization, &spec.template)).unwrap_or_default();
    // Appended only when present, so revisions without keys keep their names across upgrades.
    if let Some(identity) = security::artifact_identity(security.needs, security.keys.as_ref()) {
        canonical.extend(serde_json::to_vec(&identity).unwrap_or_default());
    }
    format!("{:016x}", fnv1a64(&canonical))
}

/// FNV-1a: tiny, stable across platforms and releases, and plenty for naming revisions.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the reconciler read before planning.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The runtime Deployments it owns.
    pub deployments: Vec<Deployment>,
    /// The Services it owns.
    pub services: Vec<Service>,
    /// The build Jobs it owns.
    pub jobs: Vec<Job>,
    /// The termination message of the target's build pod, once the Job ended.
    pub build_message: Option<String>,
    /// For `profile: auto`: the device the smallest selected node amounts to (None when the
    /// nodes were not listed or none matched).
    pub auto_profile: Option<DeviceProfile>,
    /// A fresh analysis step of the candidate (the measurement and the status to keep).
    pub analysis: Option<(Option<Measurement>, AnalysisStatus)>,
    /// The HTTPRoute named by `gatewayAPI.httpRoute`, when that router is used.
    pub route: Option<Value>,
    /// Regions the ComplianceProfiles selecting it allow (empty: no pin).
    pub allowed_regions: Vec<String>,
    /// What the profiles ask of artifacts and runtime, and the keys Secret.
    pub security: Security,
    /// Why the keys the profiles call for could not be read or made.
    pub keys_error: Option<String>,
    /// Why the candidate's runtime refused its artifact, if one of its pods did.
    pub candidate_refused: Option<String>,
    /// The profiles' `retentionDays`: older revisions and their artifacts are deleted.
    pub retention_days: Option<u32>,
}

/// What the reconciler should apply, delete, write and say.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub status: EdgeDeploymentStatus,
    pub notices: Vec<Notice>,
    /// Children whose live copy is missing or differs (by content hash).
    pub jobs: Vec<Job>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub delete_jobs: Vec<String>,
    pub delete_deployments: Vec<String>,
    pub delete_services: Vec<String>,
    /// The HTTPRoute with this EdgeDeployment's backend weights changed, to replace under its
    /// resourceVersion: (route name, route).
    pub route_update: Option<(String, Value)>,
    /// Command annotation to remove from the object.
    pub consume: Option<String>,
    pub requeue: Duration,
}

impl Plan {
    /// Whether the plan writes anything to the cluster besides status and Events.
    pub fn changes_children(&self) -> bool {
        !(self.jobs.is_empty()
            && self.deployments.is_empty()
            && self.services.is_empty()
            && self.delete_jobs.is_empty()
            && self.delete_deployments.is_empty()
            && self.delete_services.is_empty()
            && self.route_update.is_none()
            && self.consume.is_none())
    }
}

/// The status with only this controller's conditions: what it applies and compares.
pub fn own_status(status: &EdgeDeploymentStatus) -> EdgeDeploymentStatus {
    let mut s = status.clone();
    s.conditions
        .retain(|c| OWN_CONDITIONS.contains(&c.type_.as_str()));
    s
}

/// `status` (the plan's, or what it was) with `Ready=False` for a write the API server refused
/// and only a user can unblock (RBAC, a quota, an admission policy): the next reconcile that
/// succeeds plans Ready afresh.
pub fn refused(
    status: &EdgeDeploymentStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> EdgeDeploymentStatus {
    let mut s = own_status(status);
    let ready = cond(
        READY,
        ConditionStatus::False,
        reason,
        message,
        generation,
        now,
    );
    condition::upsert(&mut s.conditions, ready);
    s
}

/// The pending command: its annotation key, the command, and its `verb@value` token.
pub fn command(ed: &EdgeDeployment) -> Option<(String, Command, String)> {
    let annotations = ed.metadata.annotations.as_ref()?;
    COMMANDS.iter().find_map(|(key, command)| {
        let value = annotations.get(*key)?;
        let verb = key.trim_start_matches("kasmina.dev/");
        Some(((*key).to_owned(), *command, format!("{verb}@{value}")))
    })
}

/// The build state of the target revision's artifact.
enum Build {
    Ready(ArtifactStatus),
    Running,
    Failed(String),
    /// No Job yet; it is created now (for this profile).
    Start(Option<DeviceProfile>),
    /// `profile: auto` found no node to plan for.
    NoNodes,
}

/// Decides everything for `ed` at `now`.
pub fn plan(ed: &EdgeDeployment, seen: &Observed, settings: &Settings, now: Timestamp) -> Plan {
    let generation = ed.metadata.generation;
    let current = ed.status.clone().unwrap_or_default();
    let mut status = own_status(&current);
    status.observed_generation = generation;
    status.selector = Some(workload::runtime_selector(&ed.name_any(), None));
    let mut plan = Plan {
        requeue: Duration::from_secs(300),
        ..Plan::default()
    };

    // Nothing is touched while the spec is invalid or the keys are missing: what runs keeps
    // running until that is fixed.
    let refused = settings.host_source_refusal(&ed.spec.model.source.uri);
    let halt = match (ed.validate(), refused, &seen.keys_error) {
        (Err(errors), _, _) => Some(("InvalidSpec", "Validate", format!("invalid spec: {errors}"))),
        (Ok(()), Some(why), _) => Some(("SourceNotAllowed", "Validate", why)),
        (Ok(()), None, Some(error)) => Some(("KeysUnavailable", "Keys", error.clone())),
        (Ok(()), None, None) => None,
    };
    if let Some((reason, action, message)) = halt {
        status.phase = Some(Phase::Failed);
        let ready = cond(
            READY,
            ConditionStatus::False,
            reason,
            &message,
            generation,
            now,
        );
        if condition::upsert(&mut status.conditions, ready) {
            plan.notices.push(Notice::warning(reason, action, &message));
        }
        condition::upsert(
            &mut status.conditions,
            cond(
                PROGRESSING,
                ConditionStatus::False,
                reason,
                message,
                generation,
                now,
            ),
        );
        status.replicas.get_or_insert(0);
        status.ready_replicas.get_or_insert(0);
        plan.status = status;
        if seen.keys_error.is_some() {
            // Access to the Secret may be granted any time; a spec change wakes it anyway.
            plan.requeue = Duration::from_secs(60);
        }
        return plan;
    }

    let target = revision(&ed.spec, &seen.security);
    if current.target_revision.as_deref() != Some(target.as_str()) {
        plan.notices.push(Notice::normal(
            "NewRevision",
            "Plan",
            format!(
                "revision {target} for model {} {}",
                ed.spec.model.name, ed.spec.model.version
            ),
        ));
    }
    status.target_revision = Some(target.clone());

    // 1. The artifact of the target revision.
    let job_name = workload::job_name(ed, &target);
    let live_job = seen.jobs.iter().find(|j| j.name_any() == job_name);
    let build = build_state(ed, &current, &target, live_job, seen);
    let artifact_ready = matches!(build, Build::Ready(_));
    match &build {
        Build::Ready(artifact) => {
            if !current.revisions.iter().any(|r| r.name == target) {
                plan.notices.push(Notice::normal(
                    "ArtifactBuilt",
                    "Build",
                    format!(
                        "revision {target}: {} ({} → {} bytes, {}, quality loss {:.4})",
                        artifact.digest,
                        artifact.original_size_bytes,
                        artifact.size_bytes,
                        artifact.quantization,
                        artifact.quality_loss
                    ),
                ));
                status.revisions.retain(|r| r.name != target);
                status.revisions.insert(
                    0,
                    RevisionRecord {
                        name: target.clone(),
                        model_version: ed.spec.model.version.clone(),
                        artifact: artifact.clone(),
                        built_at: Some(Time(now)),
                    },
                );
            }
            status.artifact = Some(artifact.clone());
        }
        Build::Start(profile) => {
            let job = workload::build_job(settings, ed, &target, profile.as_ref(), &seen.security);
            plan.notices.push(Notice::normal(
                "BuildStarted",
                "Build",
                format!("building revision {target} in Job {job_name}"),
            ));
            plan.jobs.push(job);
        }
        Build::Running | Build::Failed(_) | Build::NoNodes => {}
    }

    // 2. The rollout decision.
    let strategy = Strategy::from_spec(&ed.spec.strategy);
    let rollout_before = current.rollout.clone().unwrap_or_default();
    let state = to_state(&rollout_before);
    let now_s: Seconds = now.as_second();
    let pending_command = command(ed);
    let fresh_command = pending_command
        .as_ref()
        .filter(|(_, _, token)| rollout_before.last_command.as_deref() != Some(token.as_str()))
        .map(|(_, c, _)| *c);
    if let Some((key, _, _)) = &pending_command {
        plan.consume = Some(key.clone());
    }
    // Only an Enforce profile's violation blocks; Warn and Audit ones are recorded.
    let compliant = condition::find(&current.conditions, COMPLIANT)
        .is_none_or(|c| c.status != ConditionStatus::False || c.reason != ENFORCED_VIOLATION);
    let measurement = seen.analysis.as_ref().and_then(|(m, _)| m.clone());
    let candidate_ready = state
        .candidate
        .as_deref()
        .is_some_and(|c| deployment_ready(ed, seen, c, replicas_for(ed, &state, c)));
    let observed = rollout::Observed {
        now: now_s,
        target: target.clone(),
        artifact_ready,
        candidate_ready,
        compliant,
        refused: seen.candidate_refused.clone(),
        spec_paused: ed.spec.paused,
        measurement,
        command: fresh_command,
    };
    let decision = rollout::decide(&strategy, &state, &observed);
    let next = decision.state.clone();
    if fresh_command == Some(Command::Retry)
        && let (Build::Failed(_), Some(job)) = (&build, live_job)
    {
        plan.delete_jobs.push(job.name_any());
    }

    // 3. The children the new state asks for.
    let live = live_revisions(&next, now_s);
    for rev in &live {
        let Some(record) = status.revisions.iter().find(|r| &r.name == rev) else {
            continue;
        };
        let desired = workload::runtime_deployment(
            settings,
            ed,
            rev,
            &record.artifact,
            replicas_for(ed, &next, rev),
            &seen.allowed_regions,
            &seen.security,
        );
        let name = desired.name_any();
        if !seen
            .deployments
            .iter()
            .any(|d| d.name_any() == name && workload::up_to_date(d, &desired))
        {
            plan.deployments.push(desired);
        }
    }
    for d in &seen.deployments {
        let rev = d.labels().get(REVISION_LABEL);
        if rev.is_none_or(|r| !live.contains(r)) && d.metadata.deletion_timestamp.is_none() {
            plan.delete_deployments.push(d.name_any());
        }
    }
    let services = desired_services(ed, &next);
    for desired in &services {
        if !seen
            .services
            .iter()
            .any(|s| s.name_any() == desired.name_any() && workload::up_to_date(s, desired))
        {
            plan.services.push(desired.clone());
        }
    }
    for s in &seen.services {
        if !services.iter().any(|d| d.name_any() == s.name_any()) {
            plan.delete_services.push(s.name_any());
        }
    }
    let mut route_problem = None;
    if let Some(routing) = gateway_route(&ed.spec) {
        let route_name = routing.http_route.clone();
        match &seen.route {
            Some(route) => match route_update(ed, routing, route, next.weight) {
                Ok(update) => plan.route_update = update.map(|r| (route_name, r)),
                Err(e) => route_problem = Some(("HTTPRouteRuleNotFound", e.to_string())),
            },
            None => {
                route_problem = Some((
                    "HTTPRouteNotFound",
                    format!(
                        "HTTPRoute {route_name} (spec.strategy.canary.trafficRouting.gatewayAPI.httpRoute) not found; traffic weights are not applied"
                    ),
                ))
            }
        }
    }

    // 4. Status.
    // Bounded history of built revisions; live ones are never forgotten.
    // A revision that leaves status takes its artifact with it: nothing else remembers it.
    let limit = ed.spec.revision_history_limit.max(1) as usize;
    let mut kept = 0;
    let (retained, trimmed): (Vec<RevisionRecord>, Vec<RevisionRecord>) =
        std::mem::take(&mut status.revisions)
            .into_iter()
            .partition(|r| {
                kept += 1;
                kept <= limit || live.contains(&r.name) || r.name == target
            });
    status.revisions = retained;
    let expired = match seen.retention_days {
        Some(days) => expire(&mut status, &live, &target, days, now),
        None => vec![],
    };
    if let Some((job, notices)) = artifact_deletion(
        ed,
        settings,
        &trimmed,
        &expired,
        seen.retention_days.unwrap_or_default(),
    ) {
        plan.notices.extend(notices);
        plan.jobs.push(job);
    }
    if let Some((_, analysis)) = &seen.analysis {
        status.analysis = Some(analysis.clone());
    }
    if next.candidate.is_none()
        && let Some(a) = status.analysis.as_mut()
    {
        // The last result stays visible after the rollout ends; the counters are not needed.
        a.baseline = None;
    }
    let mut rollout_after = from_state(&next, &rollout_before, now);
    if let Some((_, _, token)) = &pending_command {
        rollout_after.last_command = Some(token.clone());
    }
    status.rollout = Some(rollout_after);
    status.stable_revision = next.stable.clone();
    status.canary_revision = next.candidate.clone();
    status.current_step = match (&strategy.kind, &next.candidate) {
        (rollout::Kind::Canary { .. }, Some(_)) => Some(next.step as i32),
        _ => None,
    };
    let (replicas, ready) = counts(seen, &live);
    status.replicas = Some(replicas);
    status.ready_replicas = Some(ready);
    status.canary_weight = next
        .candidate
        .as_ref()
        .map(|c| achieved_weight(ed, seen, &next, c));
    if let Some(ended) = &decision.ended {
        status.history.insert(
            0,
            RolloutRecord {
                revision: ended.revision.clone(),
                outcome: match ended.outcome {
                    Outcome::Promoted => RolloutOutcome::Promoted,
                    Outcome::RolledBack => RolloutOutcome::RolledBack,
                    Outcome::Aborted => RolloutOutcome::Aborted,
                    Outcome::Superseded => RolloutOutcome::Superseded,
                },
                reason: ended.reason.clone(),
                started_at: rollout_before.started_at.clone().unwrap_or(Time(now)),
                finished_at: Some(Time(now)),
            },
        );
        status.history.truncate(10);
    }
    for n in &decision.notes {
        plan.notices.push(if n.warning {
            Notice::warning(n.reason, "Rollout", &n.message)
        } else {
            Notice::normal(n.reason, "Rollout", &n.message)
        });
    }

    let stable_ready = next
        .stable
        .as_deref()
        .is_some_and(|s| deployment_ready(ed, seen, s, replicas_for(ed, &next, s)));
    let phase = match (&build, decision.phase) {
        (Build::Failed(_) | Build::NoNodes, _) => Phase::Failed,
        (_, rollout::Phase::Pending) if !artifact_ready => Phase::Building,
        (_, rollout::Phase::Pending) => Phase::Progressing,
        (_, rollout::Phase::Progressing) if !artifact_ready => Phase::Building,
        (_, rollout::Phase::Progressing) => Phase::Progressing,
        (_, rollout::Phase::Paused) => Phase::Paused,
        (_, rollout::Phase::Healthy) if stable_ready => Phase::Healthy,
        (_, rollout::Phase::Healthy) => Phase::Degraded,
        (_, rollout::Phase::RolledBack) => Phase::RolledBack,
    };
    status.phase = Some(phase);

    // Conditions.
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
        plan.notices.push(Notice::warning(
            &artifact_cond.reason,
            "Build",
            &artifact_cond.message,
        ));
    }
    if let Some((reason, message)) = route_problem {
        plan.notices.push(Notice::warning(reason, "Route", message));
    }
    if ed.spec.strategy.analysis.is_some() {
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
                        condition::find(&current.conditions, ANALYSIS_PASSING)
                            .map(|c| c.message.clone())
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

    plan.requeue = requeue(
        ed,
        &strategy,
        &next,
        status.analysis.as_ref(),
        now,
        !plan.jobs.is_empty() || matches!(build, Build::Running),
    );
    plan.status = status;
    plan
}

fn build_state(
    ed: &EdgeDeployment,
    current: &EdgeDeploymentStatus,
    target: &str,
    job: Option<&Job>,
    seen: &Observed,
) -> Build {
    if let Some(r) = current.revisions.iter().find(|r| r.name == target) {
        return Build::Ready(r.artifact.clone());
    }
    let Some(job) = job else {
        return match (&ed.spec.optimization.profile, &seen.auto_profile) {
            (Some(p), _) | (None, Some(p)) => Build::Start(Some(p.clone())),
            (None, None) => Build::NoNodes,
        };
    };
    let js = job.status.as_ref();
    if js.and_then(|s| s.succeeded).unwrap_or(0) > 0 {
        return match seen.build_message.as_deref().map(parse_summary) {
            Some(Ok(a)) => Build::Ready(a),
            Some(Err(e)) => Build::Failed(format!(
                "the build succeeded but its summary is unreadable: {e}"
            )),
            None => Build::Running,
        };
    }
    let failed = js
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
    if failed {
        let message = seen
            .build_message
            .clone()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| "the build Job failed without a message; see its pod's logs".into());
        return Build::Failed(message.trim().to_owned());
    }
    Build::Running
}

/// `retentionDays`: revisions built longer ago than that (never a live one or the target)
/// leave status and are returned; rollout history older than that goes too.
fn expire(
    status: &mut EdgeDeploymentStatus,
    live: &BTreeSet<String>,
    target: &str,
    days: u32,
    now: Timestamp,
) -> Vec<RevisionRecord> {
    let cutoff = now.as_second() - i64::from(days) * 86_400;
    let old = |t: &Option<Time>| t.as_ref().is_some_and(|t| t.0.as_second() < cutoff);
    let (expired, kept): (Vec<RevisionRecord>, Vec<RevisionRecord>) =
        std::mem::take(&mut status.revisions)
            .into_iter()
            .partition(|r| old(&r.built_at) && !live.contains(&r.name) && r.name != target);
    status.revisions = kept;
    status.history.retain(|h| !old(&h.finished_at));
    expired
}

/// The Job that deletes the artifacts of revisions trimmed by the history limit and expired
/// by `retentionDays`, and an Event for each reason; None when no revision left.
fn artifact_deletion(
    ed: &EdgeDeployment,
    settings: &Settings,
    trimmed: &[RevisionRecord],
    expired: &[RevisionRecord],
    days: u32,
) -> Option<(Job, Vec<Notice>)> {
    if trimmed.is_empty() && expired.is_empty() {
        return None;
    }
    let uris: Vec<String> = trimmed
        .iter()
        .chain(expired)
        .map(|r| workload::built_artifact_uri(settings, ed, &r.name, &r.artifact))
        .collect();
    let job = workload::retention_job(settings, ed, &uris);
    let reasons = [
        (
            trimmed,
            "RevisionsTrimmed",
            format!(
                "past revisionHistoryLimit {}",
                ed.spec.revision_history_limit
            ),
        ),
        (
            expired,
            "RetentionExpired",
            format!("older than {days} days"),
        ),
    ];
    let notices = reasons
        .into_iter()
        .filter(|(records, ..)| !records.is_empty())
        .map(|(records, reason, why)| {
            let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
            Notice::normal(
                reason,
                "Retention",
                format!(
                    "revisions {} are {why}: removed, their artifacts deleted by Job {}",
                    names.join(", "),
                    job.name_any()
                ),
            )
        })
        .collect();
    Some((job, notices))
}

/// Why a revision's runtime refused its artifact: a container that exited with the runtime's
/// refusal code, with its termination message (the runtime's last log line). None when no pod
/// did — a crash for another reason may heal and is left to the Deployment's restarts.
pub fn refusal(pods: &[Pod]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        statuses.iter().find_map(|c| {
            let refused = [c.state.as_ref(), c.last_state.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|s| s.terminated.as_ref())
                .find(|t| t.exit_code == i32::from(REFUSED_EXIT_CODE))?;
            let message = refused
                .message
                .as_deref()
                .and_then(|m| m.trim().lines().last())
                .map(|m| m.trim().trim_start_matches("error: ").to_owned())
                .unwrap_or_else(|| format!("exit code {REFUSED_EXIT_CODE}"));
            Some(format!("pod {}: {message}", pod.name_any()))
        })
    })
}

/// The builder's termination message (its JSON summary) as the artifact status.
pub fn parse_summary(message: &str) -> Result<ArtifactStatus, serde_json::Error> {
    let s: crate::artifact::manifest::Summary = serde_json::from_str(message.trim())?;
    Ok(ArtifactStatus {
        digest: s.digest,
        uri: Some(s.uri),
        size_bytes: s.size_bytes as i64,
        original_size_bytes: s.original_size_bytes as i64,
        quantization: s.quantization,
        sparsity: s.sparsity,
        quality_loss: s.quality_loss,
        signed: s.signed,
        encrypted: s.encrypted,
    })
}

fn to_state(r: &RolloutState) -> State {
    State {
        stable: r.stable.clone(),
        candidate: r.candidate.clone(),
        step: r.step,
        step_started_at: r.step_started_at.as_ref().map_or(0, |t| t.0.as_second()),
        weight: r.weight.min(100),
        passed: r.passed,
        failed: r.failed,
        previous: r.previous.clone(),
        scale_down_at: r.scale_down_at.as_ref().map(|t| t.0.as_second()),
        aborted: r.aborted.clone(),
        paused: r.paused,
    }
}

fn time(s: Seconds) -> Option<Time> {
    Timestamp::from_second(s).ok().map(Time)
}

fn from_state(s: &State, before: &RolloutState, now: Timestamp) -> RolloutState {
    let started_at = match (&s.candidate, &before.candidate) {
        (Some(c), Some(b)) if c == b => before.started_at.clone(),
        (Some(_), _) => Some(Time(now)),
        (None, _) => None,
    };
    RolloutState {
        stable: s.stable.clone(),
        candidate: s.candidate.clone(),
        step: s.step,
        step_started_at: s.candidate.as_ref().and_then(|_| time(s.step_started_at)),
        weight: s.weight,
        passed: s.passed,
        failed: s.failed,
        previous: s.previous.clone(),
        scale_down_at: s.scale_down_at.and_then(time),
        aborted: s.aborted.clone(),
        paused: s.paused,
        last_command: before.last_command.clone(),
        started_at,
    }
}

/// Revisions that keep a Deployment: stable, candidate, and the previous stable until its
/// scale-down time.
fn live_revisions(s: &State, now: Seconds) -> BTreeSet<String> {
    let previous = s
        .previous
        .clone()
        .filter(|_| s.scale_down_at.is_some_and(|at| now < at));
    [s.stable.clone(), s.candidate.clone(), previous]
        .into_iter()
        .flatten()
        .collect()
}

fn gateway_route(spec: &EdgeDeploymentSpec) -> Option<&GatewayApiRouting> {
    if spec.strategy.type_ != StrategyType::Canary {
        return None;
    }
    spec.strategy
        .canary
        .as_ref()?
        .traffic_routing
        .gateway_api
        .as_ref()
}

fn replica_ratio(spec: &EdgeDeploymentSpec) -> bool {
    spec.strategy.type_ == StrategyType::Canary && gateway_route(spec).is_none()
}

/// Replicas of `rev`'s Deployment in state `s`.
pub fn replicas_for(ed: &EdgeDeployment, s: &State, rev: &str) -> i32 {
    replicas_at(&ed.spec, s, rev, ed.spec.replicas)
}

/// Replicas of `rev`'s Deployment in state `s` were `spec.replicas` set to `n`.
fn replicas_at(spec: &EdgeDeploymentSpec, s: &State, rev: &str, n: i32) -> i32 {
    let is_candidate = s.candidate.as_deref() == Some(rev);
    let is_stable = s.stable.as_deref() == Some(rev);
    if spec.strategy.type_ == StrategyType::Canary {
        if replica_ratio(spec) {
            let split = traffic::replica_ratio(n, i32::from(s.weight));
            return match (is_candidate, is_stable, s.candidate.is_some()) {
                (true, _, _) => split.canary,
                (_, true, true) => split.stable,
                (_, true, false) => n,
                // The old stable would take traffic back through the shared Service.
                _ => 0,
            };
        }
        return match (is_candidate, is_stable) {
            (true, _) => ((n * i32::from(s.weight)) as f64 / 100.0).ceil().max(1.0) as i32,
            (_, true) => n,
            _ => 0,
        };
    }
    // Rolling and blue-green: every live revision runs at full size (instant switch and
    // instant rollback).
    n
}

/// The revisions whose pods take user traffic now: the stable one, and the candidate unless
/// it is a blue-green preview (which only sees analysis traffic). The autoscaler reads these.
pub fn traffic_revisions(ed: &EdgeDeployment) -> Vec<String> {
    let Some(r) = ed.status.as_ref().and_then(|s| s.rollout.as_ref()) else {
        return vec![];
    };
    let preview = ed.spec.strategy.type_ == StrategyType::BlueGreen;
    let candidate = r.candidate.clone().filter(|_| !preview);
    r.stable.iter().cloned().chain(candidate).collect()
}

/// Pods taking traffic were `spec.replicas` set to `n`: with a canary running, both revisions
/// scale together and keep the canary's weight.
pub fn traffic_pods(ed: &EdgeDeployment, n: i32) -> i32 {
    let state = ed
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_ref())
        .map(to_state)
        .unwrap_or_default();
    let revisions = traffic_revisions(ed);
    if revisions.is_empty() {
        return n;
    }
    revisions
        .iter()
        .map(|rev| replicas_at(&ed.spec, &state, rev, n))
        .sum()
}

fn deployment_ready(ed: &EdgeDeployment, seen: &Observed, rev: &str, want: i32) -> bool {
    let name = workload::deployment_name(ed, rev);
    seen.deployments.iter().any(|d| {
        let spec_replicas = d.spec.replicas.unwrap_or(1);
        let Some(st) = d.status.as_ref() else {
            return false;
        };
        d.name_any() == name
            && spec_replicas == want
            && st.observed_generation >= d.metadata.generation
            && st.updated_replicas.unwrap_or(0) >= want
            && st.available_replicas.unwrap_or(0) >= want
    })
}

fn counts(seen: &Observed, live: &BTreeSet<String>) -> (i32, i32) {
    seen.deployments
        .iter()
        .filter(|d| {
            d.labels()
                .get(REVISION_LABEL)
                .is_some_and(|r| live.contains(r))
        })
        .filter_map(|d| d.status.as_ref())
        .fold((0, 0), |(r, ready), s| {
            (
                r + s.replicas.unwrap_or(0),
                ready + s.ready_replicas.unwrap_or(0),
            )
        })
}

fn ready_of(ed: &EdgeDeployment, seen: &Observed, rev: &str) -> i32 {
    let name = workload::deployment_name(ed, rev);
    seen.deployments
        .iter()
        .find(|d| d.name_any() == name)
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0)
}

/// The canary weight traffic actually sees: for `replicaRatio` the share of ready pods,
/// otherwise the weight the router was given.
fn achieved_weight(ed: &EdgeDeployment, seen: &Observed, s: &State, candidate: &str) -> i32 {
    if !replica_ratio(&ed.spec) {
        return i32::from(s.weight);
    }
    let c = ready_of(ed, seen, candidate);
    let st = s.stable.as_deref().map_or(0, |r| ready_of(ed, seen, r));
    if c + st == 0 {
        return 0;
    }
    ((100 * c) as f64 / (c + st) as f64).round() as i32
}

fn desired_services(ed: &EdgeDeployment, s: &State) -> Vec<Service> {
    let name = ed.name_any();
    let serving = s.stable.as_deref().or(s.candidate.as_deref());
    let newest = s.candidate.as_deref().or(s.stable.as_deref());
    let mut out = vec![workload::service(
        ed,
        name.clone(),
        if replica_ratio(&ed.spec) {
            None
        } else {
            serving
        },
    )];
    match ed.spec.strategy.type_ {
        StrategyType::BlueGreen => {
            out.push(workload::service(ed, format!("{name}-preview"), newest))
        }
        StrategyType::Canary => out.push(workload::service(ed, format!("{name}-canary"), newest)),
        StrategyType::Rolling => {}
    }
    out
}

/// The HTTPRoute with this EdgeDeployment's stable/canary weights, or None when it has them.
fn route_update(
    ed: &EdgeDeployment,
    routing: &GatewayApiRouting,
    route: &Value,
    weight: u8,
) -> Result<Option<Value>, traffic::RouteError> {
    let name = ed.name_any();
    let canary = format!("{name}-canary");
    let target = traffic::RouteTarget {
        rule: routing.rule.as_deref(),
        stable_service: &name,
        canary_service: &canary,
        port: workload::SERVICE_PORT,
    };
    traffic::route_update(route, target, i32::from(weight))
}

fn requeue(
    ed: &EdgeDeployment,
    strategy: &Strategy,
    s: &State,
    analysis: Option<&AnalysisStatus>,
    now: Timestamp,
    building: bool,
) -> Duration {
    let now_s = now.as_second();
    let mut next: i64 = 300;
    if let Some(at) = s.scale_down_at {
        next = next.min((at - now_s).max(1));
    }
    if building {
        // Job changes wake the controller too; this is a safety net.
        next = next.min(30);
    }
    if s.candidate.is_some() {
        next = next.min(15);
        if let Some(spec) = &ed.spec.strategy.analysis {
            next = next.min(analysis::next_in(spec, analysis, now));
        }
        if let rollout::Kind::Canary { steps } = &strategy.kind
            && let Some(rollout::Step::Pause(Some(d))) = steps.get(s.step as usize)
        {
            next = next.min((s.step_started_at + d - now_s).max(1));
        }
    }
    Duration::from_secs(next.max(1) as u64)
}

/// Parses a Kubernetes quantity into a plain number: bytes (`129e6`, `123Mi`, `1G`) or cores
/// (`1500m`, and the `n`anocores `metrics.k8s.io` reports).
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let factor = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        "Pi" => 1024.0_f64.powi(5),
        "P" => 1e15,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * factor)
}

/// `profile: auto`: the device the smallest node selected by the template amounts to (its
/// allocatable memory and CPUs).
pub fn smallest_node_profile(spec: &EdgeDeploymentSpec, nodes: &[Node]) -> Option<DeviceProfile> {
    nodes
        .iter()
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            spec.template
                .node_selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|n| {
            let alloc = n.status.as_ref()?.allocatable.as_ref()?;
            let memory = quantity(&alloc.get("memory")?.0)?;
            let cpu = alloc.get("cpu").and_then(|c| quantity(&c.0)).unwrap_or(1.0);
            Some(DeviceProfile {
                memory_mib: (memory / (1024.0 * 1024.0)) as u32,
                cpu_cores: (cpu.floor() as u32).max(1),
                accelerator: Default::default(),
            })
        })
        .min_by_key(|p| p.memory_mib)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::edge_deployment::*;

    pub(crate) fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    pub(crate) fn sample() -> EdgeDeployment {
        let spec: EdgeDeploymentSpec = serde_json::from_value(serde_json::json!({
            "model": {"name": "minilm", "version": "2.1.0",
                      "source": {"uri": "s3://models/minilm/2.1.0/"}, "architecture": "bert"},
            "optimization": {"profile": {"memoryMiB": 256}},
            "replicas": 3,
        }))
        .unwrap();
        let mut ed = EdgeDeployment::new("sentiment", spec);
        ed.metadata.namespace = Some("ml".into());
        ed.metadata.generation = Some(4);
        ed.metadata.uid = Some("ed-uid".into());
        ed
    }

    pub(crate) fn settings() -> Settings {
        Settings {
            image: "kasmina:0.1.0".into(),
            artifact_store: "s3://artifacts".into(),
            artifact_store_secret: None,
            host_paths: vec!["/models".into()],
        }
    }

    /// A tiny cluster: applies plans to its objects; Deployments become ready on `settle`.
    pub(crate) struct World {
        pub ed: EdgeDeployment,
        pub seen: Observed,
        pub now: i64,
        pub events: Vec<Notice>,
        pub writes: usize,
    }

    pub(crate) const SUMMARY: &str = r#"{"digest":"sha256:d1","uri":"s3://artifacts/ml/sentiment/r/","sizeBytes":22000000,"originalSizeBytes":90000000,"quantization":"q8_0","dtypeMix":{},"sparsity":0.0,"qualityLoss":0.001,"minCosine":0.999,"signed":false,"encrypted":false}"#;

    impl World {
        pub(crate) fn new(ed: EdgeDeployment) -> Self {
            Self {
                ed,
                seen: Observed::default(),
                now: 1_800_000_000,
                events: vec![],
                writes: 0,
            }
        }

        /// One reconcile: plan, then apply the plan to the world.
        pub(crate) fn reconcile(&mut self) -> Plan {
            let now = Timestamp::from_second(self.now).unwrap();
            let plan = plan(&self.ed, &self.seen, &settings(), now);
            self.seen.analysis = None;
            self.seen.build_message = None;
            if plan.changes_children() {
                self.writes += 1;
            }
            let current = self.ed.status.clone().unwrap_or_default();
            if own_status(&current) != plan.status {
                self.writes += 1;
                let mut status = plan.status.clone();
                // Keep the other controller's conditions, as server-side apply does.
                status.conditions.extend(
                    current
                        .conditions
                        .iter()
                        .filter(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()))
                        .cloned(),
                );
                self.ed.status = Some(status);
            }
            for j in &plan.jobs {
                self.seen.jobs.retain(|x| x.name_any() != j.name_any());
                self.seen.jobs.push(j.clone());
            }
            for d in &plan.deployments {
                self.seen
                    .deployments
                    .retain(|x| x.name_any() != d.name_any());
                self.seen.deployments.push(d.clone());
            }
            for s in &plan.services {
                self.seen.services.retain(|x| x.name_any() != s.name_any());
                self.seen.services.push(s.clone());
            }
            self.seen
                .deployments
                .retain(|d| !plan.delete_deployments.contains(&d.name_any()));
            self.seen
                .services
                .retain(|d| !plan.delete_services.contains(&d.name_any()));
            self.seen
                .jobs
                .retain(|d| !plan.delete_jobs.contains(&d.name_any()));
            if let Some((_, route)) = &plan.route_update {
                self.seen.route = Some(route.clone());
            }
            if let Some(key) = &plan.consume {
                self.ed.metadata.annotations.as_mut().unwrap().remove(key);
            }
            self.events.extend(plan.notices.iter().cloned());
            plan
        }

        /// The build Job of the target ends with `message`.
        pub(crate) fn finish_build(&mut self, ok: bool, message: &str) {
            let job = self.seen.jobs.last_mut().expect("a build Job");
            job.status = Some(serde_json::from_value(if ok {
                serde_json::json!({"succeeded": 1})
            } else {
                serde_json::json!({"failed": 2, "conditions": [{"type": "Failed", "status": "True"}]})
            }).unwrap());
            self.seen.build_message = Some(message.into());
        }

        /// Every Deployment becomes fully available.
        pub(crate) fn settle(&mut self) {
            for d in &mut self.seen.deployments {
                let n = d.spec.replicas.unwrap_or(1);
                d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
                    replicas: Some(n),
                    ready_replicas: Some(n),
                    available_replicas: Some(n),
                    updated_replicas: Some(n),
                    observed_generation: d.metadata.generation,
                    ..Default::default()
                });
            }
        }

        /// The selector of the Service named `name`.
        pub(crate) fn selector(&self, name: &str) -> std::collections::BTreeMap<String, String> {
            self.seen
                .services
                .iter()
                .find(|s| s.name_any() == name)
                .and_then(|s| s.spec.clone()?.selector)
                .unwrap_or_else(|| panic!("no Service {name} with a selector"))
        }

        pub(crate) fn replicas(&self) -> Vec<(String, i32)> {
            let mut v: Vec<_> = self
                .seen
                .deployments
                .iter()
                .map(|d| (d.name_any(), d.spec.replicas.unwrap_or(1)))
                .collect();
            v.sort();
            v
        }

        pub(crate) fn status(&self) -> &EdgeDeploymentStatus {
            self.ed.status.as_ref().unwrap()
        }

        pub(crate) fn cond(&self, type_: &str) -> (ConditionStatus, String, String) {
            let c = condition::find(&self.status().conditions, type_)
                .unwrap_or_else(|| panic!("no {type_}"));
            (c.status, c.reason.clone(), c.message.clone())
        }

        pub(crate) fn event(&self, reason: &str) -> Option<&Notice> {
            self.events.iter().find(|n| n.reason == reason)
        }

        /// Builds and settles the current target, reconciling until nothing changes.
        pub(crate) fn converge(&mut self) {
            for _ in 0..20 {
                self.settle();
                let before = self.writes;
                self.reconcile();
                if self.writes == before {
                    return;
                }
            }
            panic!("no steady state: {:#?}", self.status());
        }

        /// First revision built and serving.
        pub(crate) fn serving(ed: EdgeDeployment) -> Self {
            let mut w = World::new(ed);
            w.reconcile();
            w.finish_build(true, SUMMARY);
            w.converge();
            w
        }

        /// The spec moves to `version`; its build Job runs and succeeds with digest `d2`.
        fn build_version(&mut self, version: &str) {
            new_version(self, version);
            self.reconcile();
            self.finish_build(true, &SUMMARY.replace("sha256:d1", "sha256:d2"));
        }

        pub(crate) fn annotate(&mut self, key: &str, value: &str) {
            self.ed
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(key.into(), value.into());
        }
    }

    #[test]
    fn retention_deletes_old_revisions_and_their_artifacts_never_the_live_one() {
        let mut w = World::serving(sample());
        let first = w.status().stable_revision.clone().unwrap();
        w.build_version("2.0.0");
        w.converge();
        let second = w.status().stable_revision.clone().unwrap();
        assert_ne!(first, second);
        assert_eq!(w.status().revisions.len(), 2);
        assert!(w.status().revisions.iter().all(|r| r.built_at.is_some()));

        // 29 days on, a 30-day rule removes nothing.
        w.seen.retention_days = Some(30);
        w.now += 29 * 86_400;
        let plan = w.reconcile();
        assert!(plan.jobs.is_empty());
        assert_eq!(w.status().revisions.len(), 2);

        // 31 days on: the first revision goes with its artifact; the serving one stays even
        // though it is as old.
        w.now += 2 * 86_400;
        let plan = w.reconcile();
        let names: Vec<&str> = w
            .status()
            .revisions
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, [second.as_str()]);
        assert!(
            w.status().history.is_empty(),
            "rollout history past retention goes too"
        );
        assert_eq!(plan.jobs.len(), 1);
        let job = &plan.jobs[0];
        assert!(job.name_any().starts_with("sentiment-retention-"));
        let args = job_args(job);
        assert_eq!(args, ["delete-artifacts", "s3://artifacts/ml/sentiment/r/"]);
        let event = w.event("RetentionExpired").unwrap();
        assert!(event.message.contains(&first) && event.message.contains("30 days"));

        // Done once: the next reconcile plans no other Job.
        assert!(w.reconcile().jobs.is_empty());
    }

    /// The arguments of a Job's container.
    fn job_args(job: &Job) -> Vec<String> {
        job.spec.clone().unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
    }

    #[test]
    fn a_revision_trimmed_by_the_history_limit_takes_its_artifact_with_it() {
        let mut ed = sample();
        ed.spec.revision_history_limit = 1;
        let mut w = World::serving(ed);
        let first = w.status().stable_revision.clone().unwrap();
        w.build_version("2.0.0");
        let mut jobs = vec![];
        for _ in 0..20 {
            w.settle();
            let plan = w.reconcile();
            jobs.extend(
                plan.jobs
                    .into_iter()
                    .filter(|j| j.name_any().starts_with("sentiment-retention-")),
            );
            if w.status().revisions.len() == 1 {
                break;
            }
        }
        let names: Vec<&str> = w
            .status()
            .revisions
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_ne!(names, [first.as_str()], "the newer revision stays");
        assert_eq!(jobs.len(), 1, "the trimmed revision's artifact is deleted");
        let args = job_args(&jobs[0]);
        assert_eq!(args, ["delete-artifacts", "s3://artifacts/ml/sentiment/r/"]);
        let event = w.event("RevisionsTrimmed").unwrap();
        assert!(event.message.contains(&first) && event.message.contains("revisionHistoryLimit 1"));
        assert!(w.reconcile().jobs.is_empty(), "done once");
    }

    fn canary_spec(ed: &mut EdgeDeployment) {
        ed.spec.strategy = serde_json::from_value(serde_json::json!({
            "type": "Canary",
            "canary": {"steps": [{"setWeight": 20}, {"pause": {}}, {"analysis": {"iterations": 2}}, {"setWeight": 60}]},
            "analysis": {"interval": "30s", "failureLimit": 1,
                         "checks": [{"metric": "errorRate", "max": 0.05}]},
        }))
        .unwrap();
    }

    fn new_version(w: &mut World, version: &str) {
        w.ed.spec.model.version = version.into();
        w.ed.metadata.generation = w.ed.metadata.generation.map(|g| g + 1);
    }

    fn measured(w: &mut World, m: Measurement) {
        let rev = w
            .status()
            .rollout
            .as_ref()
            .unwrap()
            .candidate
            .clone()
            .unwrap();
        w.seen.analysis = Some((
            Some(m.clone()),
            AnalysisStatus {
                revision: rev,
                last_result: Some(match m {
                    Measurement::Pass => "Passed".into(),
                    Measurement::Fail(_) => "Failed".into(),
                    Measurement::Inconclusive => "Inconclusive".into(),
                }),
                ..Default::default()
            },
        ));
    }

    #[test]
    fn a_new_revision_starts_one_build_job_and_waits_for_it() {
        let mut w = World::new(sample());
        let plan = w.reconcile();
        assert_eq!(plan.jobs.len(), 1);
        assert_eq!(
            plan.jobs[0].name_any(),
            format!(
                "sentiment-build-{}",
                &revision(&w.ed.spec, &w.seen.security)[..8]
            )
        );
        assert_eq!(w.status().phase, Some(Phase::Building));
        assert_eq!(w.cond(ARTIFACT_READY).1, "Building");
        assert_eq!(w.cond(READY).0, ConditionStatus::False);
        assert!(w.event("BuildStarted").is_some() && w.event("NewRevision").is_some());
        // The Job exists now: no second one, and no write at all while it runs.
        let writes = w.writes;
        let again = w.reconcile();
        assert!(again.jobs.is_empty());
        assert_eq!(w.writes, writes, "a running build is quiet");
    }

    #[test]
    fn a_built_artifact_becomes_a_serving_deployment_and_services() {
        let mut w = World::new(sample());
        w.reconcile();
        w.finish_build(true, SUMMARY);
        let plan = w.reconcile();
        let rev = revision(&w.ed.spec, &w.seen.security);
        assert_eq!(w.status().artifact.as_ref().unwrap().digest, "sha256:d1");
        assert_eq!(w.status().revisions[0].name, rev);
        assert_eq!(w.cond(ARTIFACT_READY).0, ConditionStatus::True);
        assert_eq!(plan.deployments.len(), 1);
        let services: Vec<_> = w.seen.services.iter().map(|s| s.name_any()).collect();
        assert_eq!(services, ["sentiment"]);
        assert!(w.event("ArtifactBuilt").is_some());
        assert_eq!(w.status().phase, Some(Phase::Progressing));
        w.converge();
        assert_eq!(w.status().phase, Some(Phase::Healthy));
        assert_eq!(w.cond(READY).0, ConditionStatus::True);
        assert_eq!(w.status().stable_revision.as_deref(), Some(rev.as_str()));
        assert_eq!(
            (w.status().replicas, w.status().ready_replicas),
            (Some(3), Some(3))
        );
        assert_eq!(w.status().history[0].outcome, RolloutOutcome::Promoted);
    }

    #[test]
    fn steady_state_plans_nothing() {
        let mut w = World::serving(sample());
        let writes = w.writes;
        w.now += 3600;
        let plan = w.reconcile();
        assert!(!plan.changes_children(), "{plan:#?}");
        assert_eq!(w.writes, writes);
        assert_eq!(plan.requeue, Duration::from_secs(300));
    }

    #[test]
    fn a_failed_build_shows_the_builders_message_once() {
        let mut w = World::new(sample());
        w.reconcile();
        w.finish_build(
            false,
            "error: source s3://models/minilm/2.1.0/: access denied",
        );
        w.reconcile();
        let (s, reason, message) = w.cond(ARTIFACT_READY);
        assert_eq!(
            (s, reason.as_str()),
            (ConditionStatus::False, "BuildFailed")
        );
        assert!(message.contains("access denied"), "{message}");
        assert_eq!(w.status().phase, Some(Phase::Failed));
        assert!(w.event("BuildFailed").unwrap().warning);
        w.seen.build_message =
            Some("error: source s3://models/minilm/2.1.0/: access denied".into());
        let events = w.events.len();
        w.reconcile();
        assert_eq!(w.events.len(), events, "the warning is not repeated");
        // retry deletes the failed Job so the next reconcile builds again.
        w.annotate("kasmina.dev/retry", "1");
        w.seen.build_message = Some("error: access denied".into());
        let plan = w.reconcile();
        assert_eq!(plan.delete_jobs.len(), 1);
        assert_eq!(w.reconcile().jobs.len(), 1);
    }

    #[test]
    fn an_artifact_built_before_is_reused() {
        let mut w = World::serving(sample());
        let first = revision(&w.ed.spec, &w.seen.security);
        w.build_version("2.2.0");
        w.converge();
        // Back to the first version (a git revert): no build, the recorded artifact is used.
        new_version(&mut w, "2.1.0");
        assert_eq!(revision(&w.ed.spec, &w.seen.security), first);
        let plan = w.reconcile();
        assert!(plan.jobs.is_empty());
        assert_eq!(w.status().artifact.as_ref().unwrap().digest, "sha256:d1");
    }

    #[test]
    fn a_canary_moves_weight_step_by_step_and_is_promoted() {
        let mut ed = sample();
        canary_spec(&mut ed);
        let mut w = World::serving(ed);
        let stable = revision(&w.ed.spec, &w.seen.security);
        w.build_version("2.2.0");
        let candidate = revision(&w.ed.spec, &w.seen.security);
        w.converge();
        // setWeight 20 with 3 replicas: one canary pod, two stable.
        let s = w.status();
        assert_eq!(s.current_step, Some(1));
        assert_eq!(s.phase, Some(Phase::Paused));
        assert_eq!(
            s.canary_weight,
            Some(33),
            "one of three ready pods: the weight achieved"
        );
        let mut expected = vec![
            (format!("sentiment-{}", &stable[..8]), 2),
            (format!("sentiment-{}", &candidate[..8]), 1),
        ];
        expected.sort();
        assert_eq!(w.replicas(), expected);
        let svc: Vec<_> = w.seen.services.iter().map(|s| s.name_any()).collect();
        assert_eq!(svc, ["sentiment", "sentiment-canary"]);
        // The shared Service selects every revision (replica ratio), the canary one only the new.
        assert!(!w.selector("sentiment").contains_key(REVISION_LABEL));
        assert_eq!(w.selector("sentiment-canary")[REVISION_LABEL], candidate);
        // Promote the pause (the command is consumed once).
        w.annotate("kasmina.dev/promote", "t1");
        let plan = w.reconcile();
        assert_eq!(plan.consume.as_deref(), Some("kasmina.dev/promote"));
        assert_eq!(w.status().current_step, Some(2));
        // Two passing analyses, then setWeight 60, then full promotion.
        for _ in 0..2 {
            measured(&mut w, Measurement::Pass);
            w.reconcile();
        }
        assert_eq!(w.cond(ANALYSIS_PASSING).0, ConditionStatus::True);
        w.converge();
        assert_eq!(w.status().phase, Some(Phase::Healthy));
        assert_eq!(
            w.status().stable_revision.as_deref(),
            Some(candidate.as_str())
        );
        assert_eq!(
            w.replicas(),
            vec![(format!("sentiment-{}", &candidate[..8]), 3)]
        );
        assert_eq!(w.status().canary_weight, None);
    }

    #[test]
    fn failed_analysis_rolls_back_to_stable() {
        let mut ed = sample();
        canary_spec(&mut ed);
        let mut w = World::serving(ed);
        let stable = revision(&w.ed.spec, &w.seen.security);
        w.build_version("2.2.0");
        w.converge();
        w.annotate("kasmina.dev/promote", "t1");
        w.reconcile();
        measured(&mut w, Measurement::Fail("error rate 0.2 > 0.05".into()));
        w.reconcile();
        assert_eq!(
            w.status().phase,
            Some(Phase::Progressing),
            "one failure is tolerated"
        );
        measured(&mut w, Measurement::Fail("error rate 0.3 > 0.05".into()));
        let plan = w.reconcile();
        let s = w.status();
        assert_eq!(s.phase, Some(Phase::RolledBack));
        assert_eq!(plan.delete_deployments.len(), 1, "canary scaled away");
        assert_eq!(s.canary_revision, None);
        assert_eq!(s.stable_revision.as_deref(), Some(stable.as_str()));
        assert_eq!(s.history[0].outcome, RolloutOutcome::RolledBack);
        assert!(s.history[0].reason.contains("error rate 0.3"));
        assert_eq!(w.cond(READY).1, "RolledBack");
        assert_eq!(w.cond(ANALYSIS_PASSING).0, ConditionStatus::False);
        assert!(w.event("RolledBack").unwrap().warning);
        w.converge();
        assert_eq!(
            w.replicas(),
            vec![(format!("sentiment-{}", &stable[..8]), 3)]
        );
        assert_eq!(
            w.status().phase,
            Some(Phase::RolledBack),
            "not retried on its own"
        );
    }

    #[test]
    fn a_non_compliant_candidate_is_never_promoted() {
        let mut w = World::serving(sample());
        let stable = revision(&w.ed.spec, &w.seen.security);
        w.build_version("2.2.0");
        let status = w.ed.status.as_mut().unwrap();
        status.conditions.push(cond(
            COMPLIANT,
            ConditionStatus::False,
            "Violation",
            "unsigned",
            Some(5),
            now(),
        ));
        w.converge();
        assert_eq!(w.status().stable_revision.as_deref(), Some(stable.as_str()));
        assert!(
            w.cond(PROGRESSING).2.contains("not compliant"),
            "{:?}",
            w.cond(PROGRESSING)
        );
        assert!(
            condition::find(
                &plan(&w.ed, &w.seen, &settings(), now()).status.conditions,
                COMPLIANT
            )
            .is_none(),
            "the Compliant condition is never written by this controller"
        );

        // A Warn or Audit profile's violation is recorded, and the rollout goes on.
        let status = w.ed.status.as_mut().unwrap();
        status.conditions.retain(|c| c.type_ != COMPLIANT);
        status.conditions.push(cond(
            COMPLIANT,
            ConditionStatus::False,
            "ViolationNotEnforced",
            "unsigned",
            Some(5),
            now(),
        ));
        w.converge();
        assert_ne!(w.status().stable_revision.as_deref(), Some(stable.as_str()));
    }

    #[test]
    fn blue_green_previews_then_switches_and_keeps_the_old_revision_for_the_delay() {
        let mut ed = sample();
        ed.spec.strategy = serde_json::from_value(serde_json::json!({
            "type": "BlueGreen", "blueGreen": {"autoPromote": false, "scaleDownDelaySeconds": 60}}))
        .unwrap();
        let mut w = World::serving(ed);
        let blue = revision(&w.ed.spec, &w.seen.security);
        w.build_version("2.2.0");
        let green = revision(&w.ed.spec, &w.seen.security);
        w.converge();
        let sel = |w: &World, n: &str| w.selector(n)[REVISION_LABEL].clone();
        assert_eq!(sel(&w, "sentiment"), blue);
        assert_eq!(sel(&w, "sentiment-preview"), green);
        assert_eq!(w.status().phase, Some(Phase::Paused));
        w.annotate("kasmina.dev/promote", "now");
        w.reconcile();
        assert_eq!(sel(&w, "sentiment"), green, "instant switch");
        assert_eq!(w.replicas().len(), 2, "blue kept for the scale-down delay");
        let plan = w.reconcile();
        assert_eq!(plan.requeue, Duration::from_secs(60));
        w.now += 61;
        w.converge();
        assert_eq!(
            w.replicas(),
            vec![(format!("sentiment-{}", &green[..8]), 3)]
        );
    }

    #[test]
    fn gateway_routing_sets_the_route_weights() {
        let mut ed = sample();
        canary_spec(&mut ed);
        ed.spec.strategy.canary.as_mut().unwrap().traffic_routing =
            serde_json::from_value(serde_json::json!({"gatewayAPI": {"httpRoute": "sentiment"}}))
                .unwrap();
        let mut w = World::serving(ed);
        w.seen.route = Some(serde_json::json!({"metadata": {"name": "sentiment"},
            "spec": {"rules": [{"backendRefs": [{"name": "sentiment", "port": 80}]}]}}));
        let plan = w.reconcile();
        let (name, route) = plan.route_update.unwrap();
        assert_eq!(name, "sentiment");
        assert_eq!(
            route["spec"]["rules"][0]["backendRefs"],
            serde_json::json!([{"name": "sentiment", "port": 80, "weight": 100},
                {"name": "sentiment-canary", "port": 80, "weight": 0}])
        );
        // Once written, the next reconcile writes nothing.
        assert!(w.reconcile().route_update.is_none());
        w.build_version("2.2.0");
        w.converge();
        let route = w.seen.route.as_ref().unwrap();
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 20);
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["weight"], 80);
        assert!(w.reconcile().route_update.is_none());
        assert_eq!(w.status().canary_weight, Some(20));
        // Stable keeps all its replicas; the canary runs its share.
        assert_eq!(w.replicas().iter().map(|r| r.1).sum::<i32>(), 4);
        // A rule that is not there is said, and the route is left alone.
        w.ed.spec.strategy.canary.as_mut().unwrap().traffic_routing = serde_json::from_value(
            serde_json::json!({"gatewayAPI": {"httpRoute": "sentiment", "rule": "api"}}),
        )
        .unwrap();
        w.events.clear();
        let plan = w.reconcile();
        assert!(plan.route_update.is_none());
        assert!(
            w.events
                .iter()
                .any(|e| e.reason == "HTTPRouteRuleNotFound"
                    && e.message.contains("gatewayAPI.rule")),
            "{:?}",
            w.events
        );
    }

    #[test]
    fn a_restarted_controller_resumes_at_the_same_step() {
        let mut ed = sample();
        canary_spec(&mut ed);
        let mut w = World::serving(ed);
        w.build_version("2.2.0");
        w.converge();
        w.annotate("kasmina.dev/promote", "t1");
        w.reconcile();
        measured(&mut w, Measurement::Pass);
        w.reconcile();
        // Only what the API server holds survives a restart: status round-trips through JSON.
        let json = serde_json::to_string(&w.ed).unwrap();
        w.ed = serde_json::from_str(&json).unwrap();
        let writes = w.writes;
        let plan = w.reconcile();
        assert!(!plan.changes_children());
        assert_eq!(w.writes, writes);
        assert_eq!(w.status().current_step, Some(2));
        assert_eq!(w.status().rollout.as_ref().unwrap().passed, 1);
    }

    #[test]
    fn a_command_is_acted_on_once() {
        let mut ed = sample();
        canary_spec(&mut ed);
        let mut w = World::serving(ed);
        w.build_version("2.2.0");
        w.converge();
        w.annotate("kasmina.dev/promote", "t1");
        w.reconcile();
        assert_eq!(w.status().current_step, Some(2));
        // The annotation removal failed and it is seen again: not a second promotion.
        w.annotate("kasmina.dev/promote", "t1");
        let plan = w.reconcile();
        assert_eq!(plan.consume.as_deref(), Some("kasmina.dev/promote"));
        assert_eq!(w.status().current_step, Some(2));
    }

    #[test]
    fn auto_profile_without_nodes_says_so() {
        let mut ed = sample();
        ed.spec.optimization.profile = None;
        let mut w = World::new(ed);
        let plan = w.reconcile();
        assert!(plan.jobs.is_empty());
        assert_eq!(w.cond(ARTIFACT_READY).1, "NoMatchingNodes");
        w.seen.auto_profile = Some(DeviceProfile {
            memory_mib: 900,
            cpu_cores: 4,
            accelerator: Default::default(),
        });
        let plan = w.reconcile();
        let args = job_args(&plan.jobs[0]).join(" ");
        assert!(
            args.contains("--profile memoryMiB=900,cpuCores=4"),
            "{args}"
        );
    }

    #[test]
    fn invalid_spec_fails_with_the_field_named_once() {
        let mut ed = sample();
        ed.spec.strategy.type_ = StrategyType::Canary;
        ed.spec.strategy.canary = Some(CanaryStrategy {
            traffic_routing: TrafficRouting::default(),
            steps: vec![CanaryStep::SetWeight(50), CanaryStep::SetWeight(20)],
        });
        let mut w = World::new(ed);
        let plan = w.reconcile();
        assert!(!plan.changes_children());
        assert_eq!(w.status().phase, Some(Phase::Failed));
        let (_, reason, message) = w.cond(READY);
        assert_eq!(reason, "InvalidSpec");
        assert!(
            message.contains("spec.strategy.canary.steps[1].setWeight"),
            "{message}"
        );
        assert!(w.event("InvalidSpec").unwrap().warning);
        let events = w.events.len();
        w.reconcile();
        assert_eq!(w.events.len(), events, "not repeated every reconcile");
    }

    /// Found in review: a 50-character name gave a 68-character retention Job name, which the
    /// API server refused, as a warning every 15 s. Now the name is the failure, said once.
    #[test]
    fn a_name_too_long_for_its_children_fails_naming_the_field() {
        let mut ed = sample();
        let long = format!(
            "s{}",
            "e".repeat(crate::api::edge_deployment::MAX_NAME_LENGTH)
        );
        ed.metadata.name = Some(long);
        let mut w = World::new(ed);
        let plan = w.reconcile();
        assert!(!plan.changes_children());
        let (_, reason, message) = w.cond(READY);
        assert_eq!(reason, "InvalidSpec");
        assert!(message.contains("metadata.name"), "{message}");
        assert!(message.contains("at most 44"), "{message}");

        let mut ed = sample();
        ed.metadata.name = Some("s".repeat(44));
        let mut w = World::new(ed);
        w.reconcile();
        assert_ne!(w.cond(READY).1, "InvalidSpec", "44 characters fit");
        let mut ed = sample();
        ed.metadata.name = Some("v1.sentiment".into());
        let mut w = World::new(ed);
        w.reconcile();
        assert!(w.cond(READY).2.contains("no '.'"));
    }

    #[test]
    fn a_file_source_outside_the_allowed_folders_builds_nothing() {
        let mut ed = sample();
        ed.spec.model.source.uri = "file:///".into();
        let mut w = World::new(ed);
        let plan = w.reconcile();
        assert!(!plan.changes_children(), "no build pod mounts the node's /");
        assert_eq!(w.status().phase, Some(Phase::Failed));
        let (_, reason, message) = w.cond(READY);
        assert_eq!(reason, "SourceNotAllowed");
        assert!(message.contains("allowed: /models"), "{message}");
        assert!(w.event("SourceNotAllowed").unwrap().warning);
    }

    #[test]
    fn revision_is_stable_and_ignores_replicas_and_strategy() {
        let a = sample();
        let mut b = sample();
        b.spec.replicas = 10;
        b.spec.strategy.type_ = StrategyType::BlueGreen;
        assert_eq!(
            revision(&a.spec, &Security::default()),
            revision(&b.spec, &Security::default())
        );
        assert_eq!(revision(&a.spec, &Security::default()).len(), 16);
        b.spec.model.version = "2.2.0".into();
        assert_ne!(
            revision(&a.spec, &Security::default()),
            revision(&b.spec, &Security::default())
        );
    }

    #[test]
    fn memory_quantities_parse_in_every_unit() {
        assert_eq!(quantity("256Mi"), Some(268_435_456.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("8047460Ki"), Some(8_047_460.0 * 1024.0));
        assert_eq!(quantity("129e6"), Some(129e6));
        assert_eq!(quantity("1500m"), Some(1.5));
        assert!((quantity("250000000n").unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(quantity("12Qi"), None);
    }

    #[test]
    fn auto_profile_plans_for_the_smallest_selected_node() {
        let node = |name: &str, edge: bool, mem: &str, cpu: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": if edge {serde_json::json!({"tier": "edge"})} else {serde_json::json!({})}},
                "status": {"allocatable": {"memory": mem, "cpu": cpu}},
            }))
            .unwrap()
        };
        let nodes = [
            node("big", false, "64Gi", "16"),
            node("pi", true, "900Mi", "4"),
            node("jetson", true, "7Gi", "6"),
        ];
        let mut spec = sample().spec;
        spec.template
            .node_selector
            .insert("tier".into(), "edge".into());
        let p = smallest_node_profile(&spec, &nodes).unwrap();
        assert_eq!((p.memory_mib, p.cpu_cores), (900, 4));
        spec.template
            .node_selector
            .insert("tier".into(), "gpu".into());
        assert_eq!(smallest_node_profile(&spec, &nodes), None);
    }
}
