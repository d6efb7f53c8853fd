//! I/O glue: observe the EdgeDeployment and its children, ask `plan`, apply what changed with
//! server-side apply under one field manager, write status only when it changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::analysis;
use super::build;
use super::cleanup;
use super::names::{self, NAME_LABEL};
use super::observed::Observed;
use super::plan::{self, own_status};
use super::scrape;
use super::security::{self, Keys, Needs};
use super::watch::{self, ChildCaches};
use super::workload::Settings;
use crate::api::EdgeDeployment;
use crate::controller::context::{Context, FIELD_MANAGER, Notice};
use crate::controller::scaffold::{self, Audited, ErrorKind};
use crate::controller::status::apply_status;
use crate::controller::{audit, cache};

pub const CONTROLLER: &str = "edgedeployment";

/// How long one runtime pod may take to answer a metrics scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the EdgeDeployment controller shares across reconciles.
pub struct EdgeContext {
    pub base: Arc<Context>,
    pub settings: Settings,
    pub http: reqwest::Client,
    /// The runtime pods' metrics port (tests point it at a local server).
    pub metrics_port: u16,
    /// Every EdgeDeployment's Jobs, Deployments and Services, kept current by watches.
    pub children: ChildCaches,
}

impl EdgeContext {
    pub fn new(base: Arc<Context>, settings: Settings, children: ChildCaches) -> Self {
        Self {
            base,
            settings,
            http: crate::controller::http::client(),
            metrics_port: names::RUNTIME_PORT as u16,
            children,
        }
    }
}

/// Errors of the EdgeDeployment controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("EdgeDeployment {name} has no namespace")]
    MissingNamespace { name: String },
    #[error("{verb} {what} in namespace {namespace}: {source}")]
    Api {
        verb: &'static str,
        what: String,
        namespace: String,
        #[source]
        source: kube::Error,
    },
}

impl ErrorKind for Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::MissingNamespace { .. } => "missing_namespace",
            Error::Api { verb, .. } => verb,
        }
    }
}

impl Error {
    /// The condition reason of a failure only a user can end: the server refused a write for
    /// RBAC, a quota, an admission policy or a field it will not take, so retrying alone
    /// changes nothing. None for what passes by itself (timeouts, conflicts, 5xx).
    pub fn needs_user(&self) -> Option<&'static str> {
        let Error::Api {
            source: kube::Error::Api(status),
            ..
        } = self
        else {
            return None;
        };
        match status.code {
            403 if status.message.contains("exceeded quota") => Some("QuotaExceeded"),
            403 => Some("Forbidden"),
            400 | 422 => Some("Refused"),
            _ => None,
        }
    }
}

fn api_error(
    verb: &'static str,
    what: impl Into<String>,
    namespace: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    let namespace = namespace.to_owned();
    move |source| Error::Api {
        verb,
        what,
        namespace,
        source,
    }
}

async fn apply<K>(api: &Api<K>, object: &K, ns: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_error("apply", format!("{} {name}", K::kind(&())), ns))?;
    Ok(())
}

async fn delete<K>(api: &Api<K>, name: &str, ns: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(api_error("delete", format!("{} {name}", K::kind(&())), ns)(
            e,
        )),
    }
}

/// The termination message of a finished build Job's pod (the builder's summary or error).
async fn build_message(pods: &Api<Pod>, job: &str, ns: &str) -> Result<Option<String>, Error> {
    let list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .map_err(api_error("list", format!("pods of Job {job}"), ns))?;
    // The newest attempt's message wins.
    let mut messages: Vec<(Option<String>, String)> = list
        .items
        .iter()
        .filter_map(|p| {
            let statuses = p.status.as_ref()?.container_statuses.as_ref()?;
            let terminated = statuses
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.clone())?;
            let at = terminated.finished_at.as_ref().map(|t| t.0.to_string());
            Some((at, terminated.message?))
        })
        .collect();
    messages.sort();
    Ok(messages.pop().map(|(_, m)| m))
}

/// Reads the keys Secret of `ed` and makes the keys `needs` calls for that it lacks. A failure
/// is reported in status (with the remedy) rather than failing the reconcile: it needs a
/// person, not a retry. Returns the keys and what was made.
async fn keys(
    client: &kube::Client,
    ed: &EdgeDeployment,
    ns: &str,
    needs: Needs,
) -> Result<(Option<Keys>, Vec<String>), String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = security::secret_name(ed);
    let denied = |verb: &str, e: kube::Error| {
        let hint = match &e {
            kube::Error::Api(s) if s.code == 403 => format!(
                "; the operator needs Secret access in namespace {ns} (Helm value keys.namespaces)"
            ),
            _ => String::new(),
        };
        format!("{verb} Secret {ns}/{name}: {e}{hint}")
    };
    let live = secrets
        .get_opt(&name)
        .await
        .map_err(|e| denied("reading", e))?;
    let data = live
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default();
    let mut made = vec![];
    let data = match security::complete(&name, &data, needs).map_err(|e| e.to_string())? {
        Some(completed) => {
            made = completed
                .keys()
                .filter(|k| !data.contains_key(*k))
                .cloned()
                .collect();
            let owned = live.as_ref().is_none_or(|s| {
                s.owner_references()
                    .iter()
                    .any(|o| ed.uid().as_ref() == Some(&o.uid))
            });
            let secret = security::key_secret(ed, completed.clone(), owned);
            secrets
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await
                .map_err(|e| denied("writing", e))?;
            completed
        }
        None if live.is_none() => return Ok((None, made)),
        None => data,
    };
    let keys = Keys::read(&name, &data).map_err(|e| e.to_string())?;
    Ok((Some(keys), made))
}

/// Replaces the route as read with only this EdgeDeployment's weights changed. The body keeps
/// the resourceVersion it was read at, so an edit made since conflicts (409) and the next
/// reconcile starts from the new route; managedFields are left out, so the server keeps them.
async fn replace_route(
    routes: &Api<DynamicObject>,
    name: &str,
    updated: &Value,
) -> Result<(), kube::Error> {
    let mut route: DynamicObject =
        serde_json::from_value(updated.clone()).map_err(kube::Error::SerdeError)?;
    route.metadata.managed_fields = None;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    routes.replace(name, &params, &route).await?;
    Ok(())
}

fn route_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ))
}

/// The APIs of an EdgeDeployment's children, in its namespace.
struct Children<'a> {
    jobs: &'a Api<Job>,
    deployments: &'a Api<Deployment>,
    services: &'a Api<Service>,
    routes: &'a Api<DynamicObject>,
    accounts: &'a Api<ServiceAccount>,
    bindings: &'a Api<RoleBinding>,
    ns: &'a str,
}

impl Children<'_> {
    /// Applies and deletes what the plan says, in order; the first refusal stops it.
    async fn apply(&self, plan: &plan::Plan) -> Result<(), Error> {
        for job in &plan.jobs {
            apply(self.jobs, job, self.ns).await?;
        }
        if let Some((account, binding)) = &plan.gateway_access {
            apply(self.accounts, account, self.ns).await?;
            apply(self.bindings, binding, self.ns).await?;
        }
        for d in &plan.deployments {
            apply(self.deployments, d, self.ns).await?;
        }
        for s in &plan.services {
            apply(self.services, s, self.ns).await?;
        }
        if let Some((route, updated)) = &plan.route_update {
            replace_route(self.routes, route, updated)
                .await
                .map_err(api_error("update", format!("HTTPRoute {route}"), self.ns))?;
        }
        for d in &plan.delete_deployments {
            delete(self.deployments, d, self.ns).await?;
        }
        for s in &plan.delete_services {
            delete(self.services, s, self.ns).await?;
        }
        for j in &plan.delete_jobs {
            delete(self.jobs, j, self.ns).await?;
        }
        if let Some(name) = &plan.delete_gateway_access {
            delete(self.bindings, name, self.ns).await?;
            delete(self.accounts, name, self.ns).await?;
        }
        Ok(())
    }
}

pub async fn reconcile(ed: Arc<EdgeDeployment>, ctx: Arc<EdgeContext>) -> Result<Action, Error> {
    let base = &ctx.base;
    let name = ed.name_any();
    let ns = ed
        .namespace()
        .ok_or_else(|| Error::MissingNamespace { name: name.clone() })?;
    let client = base.client.clone();
    let now = base.clock.now();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &route_resource());
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), &ns);
    let status = ed.status.clone().unwrap_or_default();

    let cached = &ctx.children;

    // Deletion first: a deleted object's artifacts go before it does.
    let cleanup_job = match ed.metadata.deletion_timestamp {
        Some(_) => cache::get(&cached.jobs, &ns, &cleanup::job_name(&ed)),
        None => None,
    };
    match cleanup::step(&ed, &ctx.settings, cleanup_job.as_deref()) {
        cleanup::Step::Live => {}
        cleanup::Step::Hold => hold(&eds, &ed).await.map_err(api_error(
            "add_finalizer",
            format!("EdgeDeployment {name}"),
            &ns,
        ))?,
        step => return clean_up(&ctx, &ed, &eds, &jobs, step).await,
    }

    // Observe, from the caches.
    let uid = ed.uid().unwrap_or_default();
    let label = (NAME_LABEL, name.as_str());
    let mut seen = Observed {
        deployments: cache::controlled(&cached.deployments, &ns, label, &uid),
        services: cache::controlled(&cached.services, &ns, label, &uid),
        jobs: cache::controlled(&cached.jobs, &ns, label, &uid),
        ..Observed::default()
    };
    let verdict = base.policies.verdict(&ed);
    let rules = &verdict.rules;
    seen.allowed_regions = rules.allowed_regions.clone();
    seen.retention_days = rules.retention_days;
    seen.security.needs = Needs::from_rules(rules);
    // Keys are read when the rules call for them, or to serve a revision built with them.
    let built_with_keys = status
        .revisions
        .iter()
        .any(|r| r.artifact.signed || r.artifact.encrypted);
    if seen.security.needs.any() || built_with_keys {
        match keys(&client, &ed, &ns, seen.security.needs).await {
            Ok((found, made)) => {
                seen.security.keys = found;
                if !made.is_empty() {
                    let note = Notice::normal(
                        "KeysCreated",
                        "Keys",
                        format!(
                            "Secret {}: made {}",
                            security::secret_name(&ed),
                            made.join(", ")
                        ),
                    );
                    scaffold::announce(base, ed.as_ref(), &[note], None).await;
                }
            }
            Err(error) => seen.keys_error = Some(error),
        }
    }
    if ed.validate().is_ok() {
        let target = plan::revision(&ed.spec, &seen.security);
        if !status.revisions.iter().any(|r| r.name == target) {
            let job_name = names::job_name(&ed, &target);
            match seen.jobs.iter().find(|j| j.name_any() == job_name) {
                Some(job) => {
                    let finished = job.status.as_ref().is_some_and(|s| {
                        s.succeeded.unwrap_or(0) > 0
                            || s.conditions
                                .iter()
                                .flatten()
                                .any(|c| c.type_ == "Failed" && c.status == "True")
                    });
                    if finished {
                        seen.build_message = build_message(&pods, &job_name, &ns).await?;
                    }
                }
                None if ed.spec.optimization.profile.is_none() => {
                    let nodes: Api<Node> = Api::all(client.clone());
                    let list = nodes
                        .list(&ListParams::default())
                        .await
                        .map_err(api_error("list", "nodes", &ns))?;
                    seen.auto_profile = build::smallest_node_profile(&ed.spec, &list.items);
                }
                None => {}
            }
        }
        let rollout = status.rollout.clone().unwrap_or_default();
        // The candidate's pods tell whether its runtime refused the artifact.
        let mut candidate_pods = vec![];
        if let Some(candidate) = rollout.candidate.as_deref() {
            candidate_pods = watch::revision_pods(&cached.pods, &ns, &name, candidate);
            seen.candidate_refused = build::refusal(&candidate_pods);
        }
        if let Some(candidate) = rollout.candidate.as_deref()
            && let Some(spec) = ed.spec.strategy.analysis.as_ref()
            && analysis::due(Some(spec), status.analysis.as_ref(), candidate, now)
        {
            let stable_pods = rollout
                .stable
                .as_deref()
                .map(|rev| watch::revision_pods(&cached.pods, &ns, &name, rev));
            // The gateway pods hold the agreement of the candidate's answers with stable's.
            let gateway_pods = analysis::compares_outputs(spec)
                .then(|| watch::gateway_pods(&cached.pods, &ns, &name));
            let agreement = scrape::Reading::Agreement {
                revision: candidate.to_owned(),
            };
            let runtime = scrape::Reading::Runtime;
            let (http, port) = (&ctx.http, ctx.metrics_port);
            let candidate_scrape =
                scrape::pods(http, &candidate_pods, port, SCRAPE_TIMEOUT, &runtime).await;
            let stable_scrape = match &stable_pods {
                Some(pods) => scrape::pods(http, pods, port, SCRAPE_TIMEOUT, &runtime).await,
                None => None,
            };
            let gateway_port = names::RUNTIME_PORT as u16;
            let gateway_scrape = match &gateway_pods {
                Some(pods) => {
                    scrape::pods(http, pods, gateway_port, SCRAPE_TIMEOUT, &agreement).await
                }
                None => None,
            };
            let scrapes = analysis::Scrapes {
                candidate: candidate_scrape.as_deref(),
                stable: stable_scrape.as_deref(),
                gateways: gateway_scrape.as_deref(),
            };
            seen.analysis = Some(analysis::measure(
                spec,
                candidate,
                status.analysis.as_ref(),
                scrapes,
                now,
            ));
        }
        if let Some(route) = ed
            .spec
            .strategy
            .canary
            .as_ref()
            .and_then(|c| c.traffic_routing.gateway_api.as_ref())
        {
            seen.route = routes
                .get_opt(&route.http_route)
                .await
                .map_err(api_error(
                    "get",
                    format!("HTTPRoute {}", route.http_route),
                    &ns,
                ))?
                .and_then(|r| serde_json::to_value(r).ok());
        }
    }

    // Decide.
    let plan = plan::plan(&ed, &seen, &ctx.settings, now);

    // Apply: the artifact and workloads first, then traffic, then status.
    let children = Children {
        jobs: &jobs,
        deployments: &deployments,
        services: &services,
        routes: &routes,
        accounts: &Api::namespaced(client.clone(), &ns),
        bindings: &Api::namespaced(client.clone(), &ns),
        ns: &ns,
    };
    if let Err(error) = children.apply(&plan).await {
        if let Some(reason) = error.needs_user() {
            // Said where `kubectl get` and `kubectl wait` look, not only in the log.
            let message = error.to_string();
            let failed = plan::refused(&plan.status, reason, &message, ed.metadata.generation, now);
            if own_status(&status) != failed {
                if let Err(e) = apply_status(&eds, &name, &failed).await {
                    tracing::warn!(error = %e, "could not write the refusal to status");
                }
                let refused = Notice::warning(reason, "Reconcile", message);
                scaffold::announce(base, ed.as_ref(), &[refused], None).await;
            }
        }
        return Err(error);
    }
    scaffold::write_status(&eds, &name, Some(&own_status(&status)), &plan.status)
        .await
        .map_err(api_error(
            "write_status",
            format!("EdgeDeployment {name}"),
            &ns,
        ))?;
    // Consumed only after its effect is in status: a failure here repeats nothing, because
    // status remembers the command's token.
    if let Some(key) = &plan.consume {
        let patch = serde_json::json!({"metadata": {"annotations": {key: null}}});
        eds.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error(
                "consume_annotation",
                format!("EdgeDeployment {name}"),
                &ns,
            ))?;
    }
    scaffold::announce(base, ed.as_ref(), &plan.notices, Some(audited(&ed))).await;
    Ok(Action::requeue(plan.requeue))
}

/// Adds the artifacts finalizer, under the resourceVersion read: a concurrent change of the
/// finalizers conflicts instead of being overwritten.
async fn hold(eds: &Api<EdgeDeployment>, ed: &EdgeDeployment) -> Result<(), kube::Error> {
    let mut finalizers = ed.finalizers().to_vec();
    finalizers.push(cleanup::FINALIZER.to_owned());
    set_finalizers(eds, ed, &finalizers).await
}

/// Writes the object's finalizers under the resourceVersion read.
async fn set_finalizers(
    eds: &Api<EdgeDeployment>,
    ed: &EdgeDeployment,
    finalizers: &[String],
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers, "resourceVersion": ed.resource_version()}});
    eds.patch(
        &ed.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// An EdgeDeployment being deleted: run the cleanup Job, then let the object go.
async fn clean_up(
    ctx: &EdgeContext,
    ed: &EdgeDeployment,
    eds: &Api<EdgeDeployment>,
    jobs: &Api<Job>,
    step: cleanup::Step,
) -> Result<Action, Error> {
    // The cleanup Job's changes wake us (its label maps it here); this is a safety net.
    const LOOK_AGAIN: Duration = Duration::from_secs(30);
    let name = ed.name_any();
    let ns = ed.namespace().unwrap_or_default();
    let notice = match step {
        cleanup::Step::Live | cleanup::Step::Hold | cleanup::Step::Gone => {
            return Ok(Action::await_change());
        }
        cleanup::Step::Wait => return Ok(Action::requeue(LOOK_AGAIN)),
        cleanup::Step::Start(job, notice) => match apply(jobs, job.as_ref(), &ns).await {
            Ok(()) => {
                announce(ctx, ed, &notice).await;
                return Ok(Action::requeue(LOOK_AGAIN));
            }
            // A namespace being deleted takes no new Job: say what stays, and let go.
            Err(Error::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 403 && status.message.contains("being terminated") => {
                cleanup::abandoned(
                    &cleanup::artifact_uris(ed, &ctx.settings),
                    &format!("namespace {ns} is being deleted, so no cleanup Job can run"),
                )
            }
            Err(e) => return Err(e),
        },
        cleanup::Step::Release(notice) => notice,
    };
    announce(ctx, ed, &notice).await;
    let finalizers: Vec<String> = ed
        .finalizers()
        .iter()
        .filter(|f| *f != cleanup::FINALIZER)
        .cloned()
        .collect();
    set_finalizers(eds, ed, &finalizers)
        .await
        .map_err(api_error(
            "remove_finalizer",
            format!("EdgeDeployment {name}"),
            &ns,
        ))?;
    Ok(Action::await_change())
}

/// Publishes a cleanup notice, audited when a profile asks for audit records.
async fn announce(ctx: &EdgeContext, ed: &EdgeDeployment, notice: &Notice) {
    scaffold::announce(
        &ctx.base,
        ed,
        std::slice::from_ref(notice),
        Some(audited(ed)),
    )
    .await;
}

/// The operator's decisions on `ed` are made on behalf of whoever changed its spec last.
fn audited(ed: &EdgeDeployment) -> Audited<'_> {
    Audited {
        ed,
        on_behalf_of: audit::spec_manager(&ed.metadata),
    }
}

impl AsRef<Context> for EdgeContext {
    fn as_ref(&self) -> &Context {
        &self.base
    }
}
