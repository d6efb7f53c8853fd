//! Audit records: who did what to which object, and what Kasmina decided. One JSON line each
//! on the `kasmina::audit` log target, so a log pipeline can keep them apart from the rest.

use serde::Serialize;

/// One audited decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// `admission`, `build`, `promotion`, `rollback`, `scale`.
    pub action: &'static str,
    /// The user or service account behind it (`system:serviceaccount:…` for the operator).
    pub who: String,
    /// `EdgeDeployment ml/sentiment`.
    pub what: String,
    /// `allowed`, `denied`, `warned`, …
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
