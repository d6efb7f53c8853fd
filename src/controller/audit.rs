//! Audit records: who did what to which object, and what Kasmina decided. One JSON line each
//! on the `kasmina::audit` log target, so a log pipeline can keep them apart from the rest.
//! Each audited decision is also an Event on the object (admission: see the webhook).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use kube::ResourceExt;

use super::compliance_profile::rules::Verdict;
use super::context::Notice;
use crate::api::EdgeDeployment;

/// One audited decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// `admission`, `build`, `promotion`, `rollback`, `scale`, `retention`.
    pub action: &'static str,
    /// The user or service account behind it; `kasmina (<pod>)` for the operator's own.
    pub who: String,
    /// For the operator's decisions: what set it off — the field manager of the latest spec
    /// change (`kubectl-client-side-apply`, `argocd-controller`), or the ScalingPolicy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    /// `CREATE EdgeDeployment ml/sentiment`, `EdgeDeployment ml/sentiment`.
    pub what: String,
    /// `allowed`, `denied`, `warned`, `started`, `promoted`, `aborted`, `scaled`, …
    pub decision: &'static str,
    /// Why, one entry per rule or check.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// The profiles that asked for the record.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
}

impl AuditRecord {
    /// The JSON line.
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Writes the record to the audit log target.
    pub fn emit(&self) {
        tracing::info!(target: "kasmina::audit", "{}", self.line());
    }
}

/// The audited action and decision behind an Event reason; None for reasons not audited.
pub fn action_of(reason: &str) -> Option<(&'static str, &'static str)> {
    Some(match reason {
        "BuildStarted" => ("build", "started"),
        "ArtifactBuilt" => ("build", "succeeded"),
        "BuildFailed" => ("build", "failed"),
        "Promoted" => ("promotion", "promoted"),
        "RolledBack" => ("rollback", "rolled back"),
        "RolloutAborted" | "ArtifactRefused" => ("rollback", "aborted"),
        "SuccessfulRescale" => ("scale", "scaled"),
        "RetentionExpired" | "RevisionsTrimmed" | "ArtifactsDeleted" => ("retention", "deleted"),
        "DeletingArtifacts" => ("retention", "started"),
        "ArtifactsNotDeleted" => ("retention", "failed"),
        _ => return None,
    })
}

/// Who and why, for the operator's decisions on one object.
pub struct Actor<'a> {
    pub who: &'a str,
    pub on_behalf_of: Option<String>,
    pub what: String,
    pub profiles: &'a [String],
}

/// The audit records of the audited decisions among `notices`.
pub fn records(notices: &[Notice], actor: &Actor) -> Vec<AuditRecord> {
    notices
        .iter()
        .filter_map(|n| {
            let (action, decision) = action_of(&n.reason)?;
            Some(AuditRecord {
                action,
                who: actor.who.to_owned(),
                on_behalf_of: actor.on_behalf_of.clone(),
                what: actor.what.clone(),
                decision,
                reasons: vec![n.message.clone()],
                profiles: actor.profiles.to_vec(),
            })
        })
        .collect()
}

/// Emits the audit records of the audited decisions among `notices` about `ed`, made by
/// `who` on behalf of `on_behalf_of`, when a profile selecting it (`verdict`) asks for them.
pub fn emit_for(
    who: &str,
    on_behalf_of: Option<String>,
    ed: &EdgeDeployment,
    verdict: &Verdict,
    notices: &[Notice],
) {
    if verdict.rules.audit_logging != Some(true) {
        return;
    }
    let actor = Actor {
        who,
        on_behalf_of,
        what: format!(
            "EdgeDeployment {}/{}",
            ed.namespace().unwrap_or_default(),
            ed.name_any()
        ),
        profiles: &verdict.profiles,
    };
    for record in records(notices, &actor) {
        record.emit();
    }
}

/// The field manager of the latest change to `spec` (from managedFields), if recorded.
pub fn spec_manager(meta: &ObjectMeta) -> Option<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.subresource.is_none()
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.get("f:spec").is_some())
        })
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
        .and_then(|m| m.manager.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_artifact_deletion_is_audited() {
        for (reason, decision) in [
            ("RetentionExpired", "deleted"),
            ("RevisionsTrimmed", "deleted"),
            ("DeletingArtifacts", "started"),
            ("ArtifactsDeleted", "deleted"),
            ("ArtifactsNotDeleted", "failed"),
        ] {
            assert_eq!(action_of(reason), Some(("retention", decision)), "{reason}");
        }
    }

    #[test]
    fn decisions_become_records_naming_who_and_what() {
        let meta: ObjectMeta = serde_json::from_value(serde_json::json!({"managedFields": [
            {"manager": "kubectl-client-side-apply", "operation": "Update", "time": "2027-01-15T07:00:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:model": {}}}},
            {"manager": "argocd-controller", "operation": "Apply", "time": "2027-01-15T08:00:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:model": {"f:version": {}}}}},
            {"manager": "kasmina", "operation": "Apply", "time": "2027-01-15T09:00:00Z", "subresource": "status",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}},
            {"manager": "kubectl-annotate", "operation": "Update", "time": "2027-01-15T10:00:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]}))
        .unwrap();
        let profiles = vec!["phi".to_owned()];
        let actor = Actor {
            who: "kasmina (kasmina-0)",
            on_behalf_of: spec_manager(&meta),
            what: "EdgeDeployment ml/sentiment".into(),
            profiles: &profiles,
        };
        let notices = [
            Notice::normal("NewRevision", "Plan", "revision r2"),
            Notice::normal("BuildStarted", "Build", "building revision r2"),
            Notice::warning("ArtifactRefused", "Rollout", "the runtime refused …"),
        ];
        let lines: Vec<String> = records(&notices, &actor)
            .iter()
            .map(AuditRecord::line)
            .collect();
        assert_eq!(
            lines,
            [
                r#"{"action":"build","who":"kasmina (kasmina-0)","onBehalfOf":"argocd-controller","what":"EdgeDeployment ml/sentiment","decision":"started","reasons":["building revision r2"],"profiles":["phi"]}"#,
                r#"{"action":"rollback","who":"kasmina (kasmina-0)","onBehalfOf":"argocd-controller","what":"EdgeDeployment ml/sentiment","decision":"aborted","reasons":["the runtime refused …"],"profiles":["phi"]}"#,
            ]
        );
        assert_eq!(spec_manager(&ObjectMeta::default()), None);
    }
}
