//! Pure: from an EdgeDeployment, what the reconciler observed and the time — the children to
//! apply or delete, the status to write and the Events worth publishing. No I/O here, so every
//! decision is table-tested; the rollout itself is `rollout::decide`.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::Value;

use super::analysis;
use super::build::{self, Build};
use super::desired;
use super::readiness::{achieved_weight, counts, deployment_ready, gateway_ready};
use super::replicas::{live_revisions, replicas_for};
use super::retention;
use super::rollout::{self, Command, Outcome, Seconds, State, Strategy};
use super::rollout_status::{from_state, to_state};
use super::security::{self, Security};
use super::workload::Settings;
use crate::api::condition::{self, ConditionStatus};
use crate::api::edge_deployment::{
    AnalysisStatus, EdgeDeployment, EdgeDeploymentSpec, EdgeDeploymentStatus, Phase,
    RolloutOutcome, RolloutRecord, RolloutState,
};
use crate::controller::context::Notice;
use crate::controller::status::condition as cond;

use super::names::{self, fnv1a64};
use super::observed::Observed;

use super::conditions::{self, OWN_CONDITIONS};
use super::conditions::{PROGRESSING, READY};
/// Owned by the ComplianceProfile controller; read here, never written.
use crate::controller::compliance_profile::rules::COMPLIANT;
use crate::controller::compliance_profile::rules::ENFORCED_VIOLATION;

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
    /// The gateway's ServiceAccount and RoleBinding to apply, and the name of those to delete.
    pub gateway_access: Option<(ServiceAccount, RoleBinding)>,
    pub delete_gateway_access: Option<String>,
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
            && self.gateway_access.is_none()
            && self.delete_gateway_access.is_none()
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

/// The plan while the spec is invalid, its source not allowed or its keys missing: Failed,
/// said once, and nothing touched (what runs keeps running until it is fixed). None otherwise.
fn halt(
    ed: &EdgeDeployment,
    seen: &Observed,
    settings: &Settings,
    mut status: EdgeDeploymentStatus,
    now: Timestamp,
) -> Option<Plan> {
    let generation = ed.metadata.generation;
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
    let (reason, action, message) = halt?;
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
    Some(plan)
}

/// The rollout state machine's next step, from what was observed of the candidate.
#[allow(clippy::too_many_arguments)]
fn decide(
    ed: &EdgeDeployment,
    seen: &Observed,
    current: &EdgeDeploymentStatus,
    strategy: &Strategy,
    target: &str,
    artifact_ready: bool,
    fresh_command: Option<Command>,
    now_s: Seconds,
) -> rollout::Decision {
    let state = to_state(&current.rollout.clone().unwrap_or_default());
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
        target: target.to_owned(),
        artifact_ready,
        candidate_ready,
        compliant,
        refused: seen.candidate_refused.clone(),
        spec_paused: ed.spec.paused,
        measurement,
        command: fresh_command,
    };
    rollout::decide(strategy, &state, &observed)
}

/// The rollout as status records it: the state machine's state, the revisions and step it
/// names, the last analysis, and the history of ended rollouts; `command` is the rollout
/// before this step and the token of the command it acted on.
fn record_rollout(
    status: &mut EdgeDeploymentStatus,
    seen: &Observed,
    strategy: &Strategy,
    decision: &rollout::Decision,
    command: (&RolloutState, Option<String>),
    now: Timestamp,
) {
    let (rollout_before, command_token) = command;
    let next = &decision.state;
    if let Some((_, analysis)) = &seen.analysis {
        status.analysis = Some(analysis.clone());
    }
    if next.candidate.is_none()
        && let Some(a) = status.analysis.as_mut()
    {
        // The last result stays visible after the rollout ends; the counters are not needed.
        a.baseline = None;
    }
    let mut rollout_after = from_state(next, rollout_before, now);
    if let Some(token) = command_token {
        rollout_after.last_command = Some(token);
    }
    status.rollout = Some(rollout_after);
    status.stable_revision = next.stable.clone();
    status.canary_revision = next.candidate.clone();
    status.current_step = match (&strategy.kind, &next.candidate) {
        (rollout::Kind::Canary { .. }, Some(_)) => Some(next.step as i32),
        _ => None,
    };
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
}

/// Decides everything for `ed` at `now`.
pub fn plan(ed: &EdgeDeployment, seen: &Observed, settings: &Settings, now: Timestamp) -> Plan {
    let generation = ed.metadata.generation;
    let current = ed.status.clone().unwrap_or_default();
    let mut status = own_status(&current);
    status.observed_generation = generation;
    status.selector = Some(names::runtime_selector(&ed.name_any(), None));
    let mut plan = Plan {
        requeue: Duration::from_secs(300),
        ..Plan::default()
    };

    if let Some(halted) = halt(ed, seen, settings, status.clone(), now) {
        return halted;
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

    // 1. Build: the artifact of the target revision.
    let job_name = names::job_name(ed, &target);
    let live_job = seen.jobs.iter().find(|j| j.name_any() == job_name);
    let build = build::step(
        ed,
        seen,
        settings,
        &target,
        &mut status,
        (&mut plan.notices, &mut plan.jobs),
        now,
    );
    let artifact_ready = matches!(build, Build::Ready(_));

    // 2. Rollout: the state machine's step, and the command it acts on.
    let strategy = Strategy::from_spec(&ed.spec.strategy);
    let rollout_before = current.rollout.clone().unwrap_or_default();
    let now_s: Seconds = now.as_second();
    let pending_command = command(ed);
    let fresh_command = pending_command
        .as_ref()
        .filter(|(_, _, token)| rollout_before.last_command.as_deref() != Some(token.as_str()))
        .map(|(_, c, _)| *c);
    if let Some((key, _, _)) = &pending_command {
        plan.consume = Some(key.clone());
    }
    let decision = decide(
        ed,
        seen,
        &current,
        &strategy,
        &target,
        artifact_ready,
        fresh_command,
        now_s,
    );
    let next = decision.state.clone();
    if fresh_command == Some(Command::Retry)
        && let (Build::Failed(_), Some(job)) = (&build, live_job)
    {
        plan.delete_jobs.push(job.name_any());
    }

    // 3. Children: what the new state asks the cluster to hold.
    let live = live_revisions(&next, now_s);
    let desired = desired::children(ed, seen, settings, &status.revisions, &next, &live);
    plan.deployments = desired.deployments;
    plan.delete_deployments = desired.delete_deployments;
    plan.services = desired.services;
    plan.delete_services = desired.delete_services;
    plan.route_update = desired.route_update;
    plan.gateway_access = desired.gateway_access;
    plan.delete_gateway_access = desired.delete_gateway_access;
    let route_problem = desired.route_problem;

    // 4. Status: retention, the rollout as recorded, counts, phase and conditions.
    if let Some((job, notices)) = retention::step(
        ed,
        settings,
        &mut status,
        &live,
        &target,
        seen.retention_days,
        now,
    ) {
        plan.notices.extend(notices);
        plan.jobs.push(job);
    }
    let (replicas, ready) = counts(seen, &live);
    let token = pending_command.as_ref().map(|(_, _, token)| token.clone());
    record_rollout(
        &mut status,
        seen,
        &strategy,
        &decision,
        (&rollout_before, token),
        now,
    );
    status.replicas = Some(replicas);
    status.ready_replicas = Some(ready);
    status.canary_weight = next
        .candidate
        .as_ref()
        .map(|c| achieved_weight(ed, seen, &next, c));
    plan.notices.extend(decision.notes.iter().map(|n| {
        if n.warning {
            Notice::warning(n.reason, "Rollout", &n.message)
        } else {
            Notice::normal(n.reason, "Rollout", &n.message)
        }
    }));

    let stable_ready = next
        .stable
        .as_deref()
        .is_some_and(|s| deployment_ready(ed, seen, s, replicas_for(ed, &next, s)))
        && gateway_ready(ed, seen);
    let phase = conditions::phase(&build, decision.phase, stable_ready);
    status.phase = Some(phase);
    let facts = conditions::Facts {
        build: &build,
        target: &target,
        job_name: &job_name,
        phase,
        decision: &decision,
        next: &next,
        before: &current.conditions,
        analysed: ed.spec.strategy.analysis.is_some(),
        replicas,
        ready,
        generation,
        now,
    };
    conditions::write(&mut status, &facts, &mut plan.notices);
    if let Some((reason, message)) = route_problem {
        plan.notices.push(Notice::warning(reason, "Route", message));
    }

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::edge_deployment::*;
    use crate::api::quantity::parse as quantity;
    use crate::controller::edge_deployment::build::smallest_node_profile;
    use crate::controller::edge_deployment::conditions::{ANALYSIS_PASSING, ARTIFACT_READY};
    use crate::controller::edge_deployment::names::REVISION_LABEL;
    use crate::controller::edge_deployment::rollout::Measurement;
    use k8s_openapi::api::core::v1::Node;

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
            gateway_cluster_role: "kasmina-gateway".into(),
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
        // The delay runs to the whole second past it (the clock is whole seconds).
        assert_eq!(plan.requeue, Duration::from_secs(61));
        w.now += 60;
        w.converge();
        assert_eq!(w.replicas().len(), 2, "blue still kept at 60 s");
        w.now += 1;
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
    fn kasmina_gateway_routing_runs_a_gateway_the_service_points_at_with_exact_weights() {
        let mut ed = sample();
        canary_spec(&mut ed);
        ed.spec.strategy.canary.as_mut().unwrap().traffic_routing =
            serde_json::from_value(serde_json::json!({"gateway": {}})).unwrap();
        let mut w = World::new(ed);
        let mut access = w.reconcile().gateway_access;
        w.finish_build(true, SUMMARY);
        for _ in 0..20 {
            w.settle();
            let before = w.writes;
            let plan = w.reconcile();
            access = access.or(plan.gateway_access);
            if w.writes == before {
                break;
            }
        }
        let (account, binding) = access.expect("the gateway's ServiceAccount and RoleBinding");
        assert_eq!(account.name_any(), "sentiment-gateway");
        assert_eq!(binding.role_ref.name, "kasmina-gateway");
        assert_eq!(w.selector("sentiment")[names::COMPONENT_LABEL], "gateway");
        assert!(
            w.replicas().contains(&("sentiment-gateway".to_owned(), 1)),
            "{:?}",
            w.replicas()
        );
        assert_eq!(w.status().phase, Some(Phase::Healthy));
        // Not Ready while the gateway has no available pod: callers reach pods through it.
        let gateway = w
            .seen
            .deployments
            .iter_mut()
            .find(|d| d.name_any() == "sentiment-gateway")
            .unwrap();
        gateway.status.as_mut().unwrap().available_replicas = Some(0);
        w.reconcile();
        assert_ne!(w.status().phase, Some(Phase::Healthy));
        w.converge();
        // A new version at 20 %: the weight is the gateway's; the canary runs its share of pods
        // and the gateway is neither redeployed nor deleted.
        w.build_version("2.2.0");
        w.converge();
        assert_eq!(w.status().canary_weight, Some(20));
        let rollout = w.status().rollout.clone().unwrap();
        assert_eq!(rollout.weight, 20);
        assert!(w.replicas().iter().any(|(n, _)| n == "sentiment-gateway"));
        // Routing by replica ratio again: the gateway and its access go.
        w.ed.spec.strategy.canary.as_mut().unwrap().traffic_routing = Default::default();
        let plan = w.reconcile();
        assert!(
            plan.delete_deployments
                .contains(&"sentiment-gateway".to_owned())
        );
        assert_eq!(
            plan.delete_gateway_access.as_deref(),
            Some("sentiment-gateway")
        );
        assert_ne!(
            w.selector("sentiment")
                .get(names::COMPONENT_LABEL)
                .map(String::as_str),
            Some("gateway")
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
