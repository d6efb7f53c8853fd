//! I/O glue: read the cached EdgeDeployments, namespaces and profiles, ask `rules`, write the
//! profile's status and each EdgeDeployment's Compliant condition only when they changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};

use super::rules::{
    COMPLIANT, ENFORCED_VIOLATION, compliant_condition, evaluate, judge, namespace_labels,
};
use crate::api::{ComplianceProfile, EdgeDeployment, condition};
use crate::controller::cache::Synced;
use crate::controller::context::{Context, Notice};
use crate::controller::scaffold::{self, ErrorKind};

pub const CONTROLLER: &str = "complianceprofile";
/// The Compliant condition is applied under its own field manager, so server-side apply
/// keeps it beside the EdgeDeployment controller's conditions (a list map keyed by type).
pub const FIELD_MANAGER: &str = "kasmina-compliance";

/// The ComplianceProfile controller's view of the cluster, kept current by watches.
pub struct ComplianceContext {
    pub ctx: Arc<Context>,
    pub deployments: Store<EdgeDeployment>,
    /// The EdgeDeployment cache held a full list (the namespace cache did before the
    /// controllers started).
    pub synced: Synced,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub profiles: Store<ComplianceProfile>,
}

/// Errors of the ComplianceProfile controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the EdgeDeployment and Namespace caches never synced")]
    CacheNotReady,
    #[error("writing status of ComplianceProfile {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the Compliant condition of EdgeDeployment {namespace}/{name}: {source}")]
    WriteCondition {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl ErrorKind for Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::CacheNotReady => "cache_not_ready",
            Error::WriteStatus { .. } => "write_status",
            Error::WriteCondition { .. } => "write_condition",
            Error::Finalizer(e) => match &**e {
                FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e) => e.kind(),
                _ => "finalizer",
            },
        }
    }
}

/// Marks profiles so that deleting one re-evaluates what it governed: without it, the last
/// profile's Compliant=False would outlive it and block promotion for ever.
pub const FINALIZER: &str = "kasmina.dev/compliance";

pub async fn reconcile(
    profile: Arc<ComplianceProfile>,
    cc: Arc<ComplianceContext>,
) -> Result<Action, Error> {
    let ctx = &cc.ctx;
    // Counting against a half-filled cache would publish a wrong number.
    cc.synced.wait().await.map_err(|_| Error::CacheNotReady)?;
    let api: Api<ComplianceProfile> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, profile, |event| async {
        match event {
            FinalizerEvent::Apply(profile) => apply(&profile, &cc).await,
            FinalizerEvent::Cleanup(profile) => {
                update_deployments(&cc, Some(&profile.name_any()), None).await?;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(profile: &ComplianceProfile, cc: &ComplianceContext) -> Result<Action, Error> {
    let ctx = &cc.ctx;
    let namespaces = namespace_labels(&cc.namespaces.state());
    let deployments = cc.deployments.state();
    let evaluation = evaluate(
        profile,
        deployments.iter().map(AsRef::as_ref),
        &namespaces,
        ctx.clock.now(),
    );
    let name = profile.name_any();
    let api: Api<ComplianceProfile> = Api::all(ctx.client.clone());
    scaffold::write_status(&api, &name, profile.status.as_ref(), &evaluation.status)
        .await
        .map_err(|source| Error::WriteStatus { name, source })?;
    scaffold::announce(ctx, profile, &evaluation.notices, None).await;
    update_deployments(cc, None, Some(profile)).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Brings every EdgeDeployment's Compliant condition up to date. The condition depends on
/// every profile, so any profile's reconcile does it for all (writing only changes):
/// `gone` is a profile being deleted, `fresh` the newest copy of the one reconciled.
async fn update_deployments(
    cc: &ComplianceContext,
    gone: Option<&str>,
    fresh: Option<&ComplianceProfile>,
) -> Result<(), Error> {
    let ctx = &cc.ctx;
    let namespaces = namespace_labels(&cc.namespaces.state());
    let cached = cc.profiles.state();
    let fresh_name = fresh.map(ResourceExt::name_any);
    let profiles: Vec<&ComplianceProfile> = cached
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| {
            let name = p.name_any();
            Some(name.as_str()) != gone && Some(&name) != fresh_name.as_ref()
        })
        .chain(fresh)
        .collect();
    let now = ctx.clock.now();
    for ed in cc.deployments.state() {
        let verdict = judge(profiles.iter().copied(), &ed, &namespaces);
        let Some(new) = compliant_condition(&ed, &verdict, now) else {
            continue;
        };
        let mut conditions = ed
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let before = condition::find(&conditions, COMPLIANT).cloned();
        condition::upsert(&mut conditions, new);
        let Some(after) = condition::find(&conditions, COMPLIANT).cloned() else {
            continue;
        };
        if before.as_ref() == Some(&after) {
            continue;
        }
        write_condition(ctx, &ed, &after).await?;
        let transitioned = before
            .as_ref()
            .is_none_or(|b| b.status != after.status || b.reason != after.reason);
        if transitioned {
            let message = after.message.clone();
            let notice = match after.reason.as_str() {
                ENFORCED_VIOLATION => Notice::warning("ComplianceViolation", "Evaluate", message),
                "RulesMet" | "NotSelected" => Notice::normal("Compliant", "Evaluate", message),
                _ => Notice::warning("ComplianceViolationRecorded", "Evaluate", message),
            };
            scaffold::announce(ctx, ed.as_ref(), &[notice], None).await;
        }
    }
    Ok(())
}

async fn write_condition(
    ctx: &Context,
    ed: &EdgeDeployment,
    compliant: &condition::Condition,
) -> Result<(), Error> {
    let namespace = ed.namespace().unwrap_or_default();
    let api: Api<EdgeDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": EdgeDeployment::api_version(&()),
        "kind": EdgeDeployment::kind(&()),
        "status": {"conditions": [compliant]},
    });
    api.patch_status(
        &ed.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(|source| Error::WriteCondition {
        namespace,
        name: ed.name_any(),
        source,
    })?;
    Ok(())
}

impl AsRef<Context> for ComplianceContext {
    fn as_ref(&self) -> &Context {
        &self.ctx
    }
}
