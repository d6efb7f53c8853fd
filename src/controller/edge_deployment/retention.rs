//! Which built revisions status keeps (the history limit, `retentionDays`) and the Job that
//! deletes the artifacts of those it lets go: nothing else remembers them.

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::workload::{self, Settings};
use crate::api::edge_deployment::{EdgeDeployment, EdgeDeploymentStatus, RevisionRecord};
use crate::controller::context::Notice;

/// Trims `status.revisions` to the history limit and the retention (never a live revision or
/// the target); the deletion Job of what went, and its Events.
pub fn step(
    ed: &EdgeDeployment,
    settings: &Settings,
    status: &mut EdgeDeploymentStatus,
    live: &BTreeSet<String>,
    target: &str,
    retention_days: Option<u32>,
    now: Timestamp,
) -> Option<(Job, Vec<Notice>)> {
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
    let expired = match retention_days {
        Some(days) => expire(status, live, target, days, now),
        None => vec![],
    };
    artifact_deletion(
        ed,
        settings,
        &trimmed,
        &expired,
        retention_days.unwrap_or_default(),
    )
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
