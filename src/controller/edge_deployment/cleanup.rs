//! Deleting an EdgeDeployment deletes its artifacts. A finalizer holds the object until a Job
//! (the image's `delete-artifacts`, with the store's credentials, in the object's namespace)
//! deleted the artifact of every revision in `status.revisions`; then the finalizer goes and
//! the object with it. Pure: what to do next, from the object and the cleanup Job as read.

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;

use super::workload::{self, Settings};
use crate::api::EdgeDeployment;
use crate::controller::context::Notice;

/// Held on every EdgeDeployment until its artifacts are deleted.
pub const FINALIZER: &str = "kasmina.dev/artifacts";

/// What the reconciler does about deletion.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// A live object without the finalizer: add it, then reconcile as usual.
    Hold,
    /// A live object that already holds it: reconcile as usual.
    Live,
    /// Being deleted and not ours to hold (the finalizer is gone already): nothing.
    Gone,
    /// Create the cleanup Job and look again.
    Start(Box<Job>, Notice),
    /// The cleanup Job is running: look again.
    Wait,
    /// Done, or given up on (said in the notice): remove the finalizer.
    Release(Notice),
}

/// The cleanup Job's name: one per object (its uid), so a recreated namesake gets its own.
pub fn job_name(ed: &EdgeDeployment) -> String {
    let uid = ed.uid().unwrap_or_default();
    format!("{}-cleanup-{}", ed.name_any(), &uid[..uid.len().min(8)])
}

/// The artifacts an EdgeDeployment's revisions recorded.
pub fn artifact_uris(ed: &EdgeDeployment, settings: &Settings) -> Vec<String> {
    let mut uris: Vec<String> = ed
        .status
        .iter()
        .flat_map(|s| &s.revisions)
        .map(|r| workload::built_artifact_uri(settings, ed, &r.name, &r.artifact))
        .collect();
    uris.sort();
    uris.dedup();
    uris
}

pub fn step(ed: &EdgeDeployment, settings: &Settings, job: Option<&Job>) -> Step {
    let held = ed.finalizers().iter().any(|f| f == FINALIZER);
    if ed.metadata.deletion_timestamp.is_none() {
        return if held { Step::Live } else { Step::Hold };
    }
    if !held {
        return Step::Gone;
    }
    let uris = artifact_uris(ed, settings);
    if uris.is_empty() {
        return Step::Release(Notice::normal(
            "ArtifactsDeleted",
            "Cleanup",
            "no artifact was built; nothing to delete",
        ));
    }
    let Some(job) = job else {
        let job = workload::cleanup_job(settings, ed, job_name(ed), &uris);
        let notice = Notice::normal(
            "DeletingArtifacts",
            "Cleanup",
            format!(
                "deleting the artifacts of {} revisions ({}) with Job {}",
                uris.len(),
                uris.join(", "),
                job.name_any()
            ),
        );
        return Step::Start(Box::new(job), notice);
    };
    let status = job.status.as_ref();
    let ended = |type_: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
    };
    if ended("Complete") || status.and_then(|s| s.succeeded).unwrap_or(0) > 0 {
        Step::Release(Notice::normal(
            "ArtifactsDeleted",
            "Cleanup",
            format!("deleted the artifacts {}", uris.join(", ")),
        ))
    } else if ended("Failed") {
        Step::Release(abandoned(
            &uris,
            &format!("Job {} failed (its pod's log says why)", job.name_any()),
        ))
    } else {
        Step::Wait
    }
}

/// Deletion is never blocked for ever: what could not be deleted is said (and audited) and
/// the object goes.
pub fn abandoned(uris: &[String], why: &str) -> Notice {
    Notice::warning(
        "ArtifactsNotDeleted",
        "Cleanup",
        format!("{why}; artifacts left in the store: {}", uris.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn settings() -> Settings {
        Settings {
            image: "kasmina:0.1.0".into(),
            artifact_store: "s3://artifacts".into(),
            artifact_store_secret: Some("store".into()),
            host_paths: vec![],
            gateway_cluster_role: "kasmina-gateway".into(),
        }
    }

    fn ed(finalizer: bool, deleting: bool, revisions: &[&str]) -> EdgeDeployment {
        let mut ed: EdgeDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
            "metadata": {"name": "m", "namespace": "ml", "uid": "0123456789abcdef"},
            "spec": {"model": {"name": "m", "version": "1", "source": {"uri": "s3://models/m"},
                               "architecture": "bert"},
                     "optimization": {"profile": {"memoryMiB": 256}}},
            "status": {"revisions": revisions.iter().map(|r| serde_json::json!({
                "name": r, "modelVersion": "1",
                "artifact": {"digest": "sha256:x", "sizeBytes": 1, "originalSizeBytes": 1,
                             "quantization": "q8_0", "sparsity": 0.0, "qualityLoss": 0.0}
            })).collect::<Vec<_>>()}
        }))
        .unwrap();
        if finalizer {
            ed.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            ed.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        }
        ed
    }

    fn job_with(condition: &str) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: condition.into(),
                    status: "True".into(),
                    ..JobCondition::default()
                }]),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn a_live_object_is_held_once() {
        assert_eq!(
            step(&ed(false, false, &["r1"]), &settings(), None),
            Step::Hold
        );
        assert_eq!(
            step(&ed(true, false, &["r1"]), &settings(), None),
            Step::Live
        );
        assert_eq!(
            step(&ed(false, true, &["r1"]), &settings(), None),
            Step::Gone
        );
    }

    #[test]
    fn deleting_runs_one_job_for_every_recorded_artifact_then_releases() {
        let deleting = ed(true, true, &["r1", "r2"]);
        let Step::Start(job, notice) = step(&deleting, &settings(), None) else {
            panic!("a cleanup Job first")
        };
        assert_eq!(job.name_any(), "m-cleanup-01234567");
        assert!(
            job.metadata.owner_references.is_none(),
            "not owned: a foreground deletion would collect it before it ran"
        );
        let args = job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap();
        assert_eq!(
            args,
            [
                "delete-artifacts",
                "s3://artifacts/ml/m/r1/",
                "s3://artifacts/ml/m/r2/"
            ]
        );
        assert!(notice.message.contains("m-cleanup-01234567"));
        let running = Job::default();
        assert_eq!(step(&deleting, &settings(), Some(&running)), Step::Wait);
        let Step::Release(done) = step(&deleting, &settings(), Some(&job_with("Complete"))) else {
            panic!("released once the Job completed")
        };
        assert!(!done.warning);
        let Step::Release(failed) = step(&deleting, &settings(), Some(&job_with("Failed"))) else {
            panic!("a failed Job does not hold the object for ever")
        };
        assert!(failed.warning && failed.message.contains("s3://artifacts/ml/m/r2/"));
        // Nothing built: nothing to wait for.
        assert!(matches!(
            step(&ed(true, true, &[]), &settings(), None),
            Step::Release(_)
        ));
    }
}
