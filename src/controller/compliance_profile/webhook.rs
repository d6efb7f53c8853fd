//! The validating admission webhook: what the schema cannot say (semantic validation of all
//! three kinds) and the ComplianceProfiles' rules for EdgeDeployments. `review` is pure; the
//! server around it (TLS, certificates) is in `serve`.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, Status};

use super::rules::{NamespaceLabels, judge};
use crate::api::compliance_profile::Enforcement;
use crate::api::{ComplianceProfile, EdgeDeployment, ScalingPolicy};
use crate::controller::audit::AuditRecord;
use crate::controller::context::Notice;
use crate::manifests::check;

/// A body that is not an AdmissionReview with a request: answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an AdmissionReview: {0}")]
    Malformed(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// The answer to one review, and the audit record when a profile asks for one (with the
/// object its Event is about).
#[derive(Clone, Debug)]
pub struct Reviewed {
    pub review: AdmissionReview<DynamicObject>,
    pub audit: Option<(AuditRecord, ObjectReference)>,
}

/// The Event of an audited admission decision (a Warning unless it was allowed).
pub fn audit_event(record: &AuditRecord) -> Notice {
    let mut message = format!("{}: {} {}", record.who, record.what, record.decision);
    if !record.reasons.is_empty() {
        message = format!("{message}: {}", record.reasons.join("; "));
    }
    match record.decision {
        "denied" => Notice::warning("AdmissionDenied", "Admission", message),
        "warned" => Notice::warning("AdmissionWarned", "Admission", message),
        _ => Notice::normal("AdmissionAllowed", "Admission", message),
    }
}

/// The object under review, for its Event (an object being created has no uid yet).
fn regarding(request: &AdmissionRequest<DynamicObject>) -> ObjectReference {
    let kind = &request.kind;
    ObjectReference {
        api_version: Some(format!("{}/{}", kind.group, kind.version)),
        kind: Some(kind.kind.clone()),
        name: Some(request.name.clone()),
        namespace: request.namespace.clone(),
        uid: request.object.as_ref().and_then(|o| o.metadata.uid.clone()),
        ..ObjectReference::default()
    }
}

/// What the profiles' rules are judged against: the watch caches, once they have synced.
#[derive(Clone, Copy, Debug)]
pub enum Caches<'a> {
    Synced {
        profiles: &'a [&'a ComplianceProfile],
        namespaces: &'a NamespaceLabels,
    },
    /// Just after a start: an empty cache would allow what an Enforce profile denies.
    Unsynced,
}

/// Reviews one AdmissionReview body against the cached profiles and namespace labels.
pub fn review(
    body: &[u8],
    profiles: &[&ComplianceProfile],
    namespaces: &NamespaceLabels,
) -> Result<Reviewed, Error> {
    review_with(
        body,
        Caches::Synced {
            profiles,
            namespaces,
        },
    )
}

/// Reviews one AdmissionReview body; with unsynced caches an EdgeDeployment whose spec is
/// judged is refused (503, retry) rather than admitted unchecked.
pub fn review_with(body: &[u8], caches: Caches<'_>) -> Result<Reviewed, Error> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| Error::NoRequest)?;
    let (response, audit) = decide(&request, caches);
    Ok(Reviewed {
        review: response.into_review(),
        // A dry run changes nothing, so it is not audited (the webhook declares sideEffects:
        // None, and the audit Event would be one).
        audit: audit
            .filter(|_| !request.dry_run)
            .map(|record| (record, regarding(&request))),
    })
}

fn deny(
    response: AdmissionResponse,
    code: u16,
    reason: &str,
    message: String,
) -> AdmissionResponse {
    let mut response = response.deny(&message);
    response.result = Status::failure(&message, reason).with_code(code);
    response
}

/// Whether an update changes nothing that is judged: the spec and the labels (which select
/// profiles) are as before, or the object is being deleted. Annotations, finalizers and owner
/// references stay writable on a violating object (the operator's consumed commands,
/// `kubectl kasmina abort`, a finalizer's removal).
fn judged_unchanged(request: &AdmissionRequest<DynamicObject>) -> bool {
    if request.operation != Operation::Update {
        return false;
    }
    let (Some(new), Some(old)) = (&request.object, &request.old_object) else {
        return false;
    };
    if new.metadata.deletion_timestamp.is_some() {
        return true;
    }
    new.data.get("spec") == old.data.get("spec") && new.metadata.labels == old.metadata.labels
}

fn decide(
    request: &AdmissionRequest<DynamicObject>,
    caches: Caches<'_>,
) -> (AdmissionResponse, Option<AuditRecord>) {
    let response = AdmissionResponse::from(request);
    let kind = request.kind.kind.as_str();
    // Deletes and subresources (status, scale) carry nothing to judge, nor do updates of
    // metadata alone.
    if matches!(request.operation, Operation::Delete | Operation::Connect)
        || request.sub_resource.is_some()
        || judged_unchanged(request)
    {
        return (response, None);
    }
    let what = match &request.namespace {
        Some(ns) => format!("{kind} {ns}/{}", request.name),
        None => format!("{kind} {}", request.name),
    };
    let Some(object) = &request.object else {
        let message = format!("{what}: the review carries no object");
        return (deny(response, 400, "BadRequest", message), None);
    };
    let mut doc = match serde_json::to_value(object) {
        Ok(doc) => doc,
        Err(e) => {
            return (
                deny(response, 400, "BadRequest", format!("{what}: {e}")),
                None,
            );
        }
    };
    // On create the name may be generated and the namespace comes from the request.
    if let (Some(ns), Some(meta)) = (&request.namespace, doc.get_mut("metadata"))
        && meta.get("namespace").is_none()
    {
        meta["namespace"] = ns.clone().into();
    }
    // The decoded EdgeDeployment is kept for the profiles' rules.
    let mut decoded = None;
    let problems = match kind {
        "EdgeDeployment" => check::<EdgeDeployment>(doc, |o| {
            decoded = Some(o.clone());
            o.validate()
        }),
        "ScalingPolicy" => check::<ScalingPolicy>(doc, |o| o.spec.validate()),
        "ComplianceProfile" => check::<ComplianceProfile>(doc, |o| o.spec.validate()),
        other => vec![format!("kind: {other} is not a Kasmina kind")],
    };
    if !problems.is_empty() {
        let message = format!("{what} is invalid: {}", problems.join("; "));
        return (deny(response, 422, "Invalid", message), None);
    }
    let Some(ed) = decoded else {
        return (response, None);
    };
    let Caches::Synced {
        profiles,
        namespaces,
    } = caches
    else {
        let message = format!(
            "{what}: kasmina's admission webhook has not read the ComplianceProfiles and \
             Namespaces yet (it just started); try again in a few seconds"
        );
        return (deny(response, 503, "ServiceUnavailable", message), None);
    };
    let verdict = judge(profiles.iter().copied(), &ed, namespaces);
    let enforced = verdict.messages(Enforcement::Enforce);
    let warned = verdict.messages(Enforcement::Warn);
    let audited = verdict.messages(Enforcement::Audit);
    let (response, decision) = if !enforced.is_empty() {
        let message = format!(
            "{what} violates ComplianceProfile rules: {}",
            enforced.join("; ")
        );
        (deny(response, 403, "Forbidden", message), "denied")
    } else if !warned.is_empty() {
        let mut response = response;
        response.warnings = Some(warned.clone());
        (response, "warned")
    } else {
        (response, "allowed")
    };
    let mut response = response;
    for (i, message) in audited.iter().enumerate() {
        response
            .audit_annotations
            .insert(format!("violation-{i}"), message.clone());
    }
    let audit = (verdict.rules.audit_logging == Some(true)).then(|| AuditRecord {
        action: "admission",
        who: request.user_info.username.clone().unwrap_or_default(),
        on_behalf_of: None,
        what: format!(
            "{} {what}",
            format!("{:?}", request.operation).to_uppercase()
        ),
        decision,
        reasons: enforced.into_iter().chain(warned).chain(audited).collect(),
        profiles: verdict.profiles.clone(),
    });
    (response, audit)
}
