//! The target revision's artifact: already built (in status), building, failed (with the
//! builder's message), or to start, and for which device.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::names;
use super::observed::Observed;
use super::workload::{self, Settings};
use crate::api::edge_deployment::{
    ArtifactStatus, DeviceProfile, EdgeDeployment, EdgeDeploymentSpec, EdgeDeploymentStatus,
    RevisionRecord,
};
use crate::api::quantity::parse as quantity;
use crate::controller::context::Notice;
use crate::runtime::REFUSED_EXIT_CODE;

/// The build state of the target revision's artifact.
pub enum Build {
    Ready(ArtifactStatus),
    Running,
    Failed(String),
    /// No Job yet; it is created now (for this profile).
    Start(Option<DeviceProfile>),
    /// `profile: auto` found no node to plan for.
    NoNodes,
}

/// The target revision's build: its artifact recorded in `status` once built, or its Job
/// added to `jobs` when none runs yet; the Events to publish added to `notices`.
pub fn step(
    ed: &EdgeDeployment,
    seen: &Observed,
    settings: &Settings,
    target: &str,
    status: &mut EdgeDeploymentStatus,
    (notices, jobs): (&mut Vec<Notice>, &mut Vec<Job>),
    now: Timestamp,
) -> Build {
    let current = ed.status.clone().unwrap_or_default();
    let job_name = names::job_name(ed, target);
    let live_job = seen.jobs.iter().find(|j| j.name_any() == job_name);
    let build = build_state(ed, &current, target, live_job, seen);
    match &build {
        Build::Ready(artifact) => {
            if !current.revisions.iter().any(|r| r.name == target) {
                notices.push(Notice::normal(
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
                        name: target.to_owned(),
                        model_version: ed.spec.model.version.clone(),
                        artifact: artifact.clone(),
                        built_at: Some(Time(now)),
                    },
                );
            }
            status.artifact = Some(artifact.clone());
        }
        Build::Start(profile) => {
            let job = workload::build_job(settings, ed, target, profile.as_ref(), &seen.security);
            notices.push(Notice::normal(
                "BuildStarted",
                "Build",
                format!("building revision {target} in Job {job_name}"),
            ));
            jobs.push(job);
        }
        Build::Running | Build::Failed(_) | Build::NoNodes => {}
    }
    build
}

pub fn build_state(
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
