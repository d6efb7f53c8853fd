//! I/O glue: read the target, collect this interval's metrics, ask `decide`, set replicas
//! through the target's scale subresource, write status only when it changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::collect::{self, Collected, Reading};
use super::decide::{Memory, decide};
use super::idle;
use crate::api::scaling_policy::MetricType;
use crate::api::{EdgeDeployment, ScalingPolicy};
use crate::controller::context::{Context, FIELD_MANAGER};
use crate::controller::edge_deployment::analysis::PodSnapshot;
use crate::controller::edge_deployment::names::{
    COMPONENT_LABEL, GATEWAY_COMPONENT, NAME_LABEL, RUNTIME_PORT, runtime_selector,
};
use crate::controller::edge_deployment::replicas::{kasmina_gateway, traffic_revisions};
use crate::controller::edge_deployment::scrape;
use crate::controller::scaffold::{self, Audited, ErrorKind};
use crate::telemetry::error_chain;

pub const CONTROLLER: &str = "scalingpolicy";

/// What the ScalingPolicy controller shares between reconciles.
pub struct ScalingContext {
    pub base: Arc<Context>,
    pub http: reqwest::Client,
    /// The runtime pods' metrics port (tests point it at a local server).
    pub metrics_port: u16,
    /// Scrapes of one policy in flight at once.
    pub concurrency: usize,
    /// Bound on each scrape and Prometheus query.
    pub timeout: Duration,
    /// Hosts a Prometheus metric's `serverAddress` may name (exact, or `*.suffix`).
    pub prometheus_hosts: Vec<String>,
    /// Each policy's memory, by `namespace/name`.
    memory: Mutex<HashMap<String, Memory>>,
}

impl ScalingContext {
    pub fn new(base: Arc<Context>) -> Self {
        Self {
            base,
            http: crate::controller::http::client(),
            metrics_port: RUNTIME_PORT as u16,
            concurrency: 32,
            timeout: Duration::from_secs(2),
            prometheus_hosts: Vec::new(),
            memory: Mutex::default(),
        }
    }

    /// Allows Prometheus queries to these hosts (exact names, or `*.suffix`).
    pub fn with_prometheus_hosts(mut self, hosts: Vec<String>) -> Self {
        self.prometheus_hosts = hosts;
        self
    }

    fn recall(&self, key: &str) -> Memory {
        self.memory
            .lock()
            .map(|m| m.get(key).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn remember(&self, key: String, memory: Option<Memory>) {
        if let Ok(mut m) = self.memory.lock() {
            match memory {
                Some(memory) => m.insert(key, memory),
                None => m.remove(&key),
            };
        }
    }
}

/// Errors of the ScalingPolicy controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ScalingPolicy {name} has no namespace")]
    MissingNamespace { name: String },
    #[error("reading target EdgeDeployment {namespace}/{name}: {source}")]
    ReadTarget {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing the pods of EdgeDeployment {namespace}/{name}: {source}")]
    ListPods {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("scaling EdgeDeployment {namespace}/{name} to {replicas}: {source}")]
    Scale {
        namespace: String,
        name: String,
        replicas: i32,
        #[source]
        source: kube::Error,
    },
    #[error("writing status of ScalingPolicy {namespace}/{name}: {source}")]
    WriteStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ErrorKind for Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::MissingNamespace { .. } => "missing_namespace",
            Error::ReadTarget { .. } => "read_target",
            Error::ListPods { .. } => "list_pods",
            Error::Scale { .. } => "scale",
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

pub async fn reconcile(
    policy: Arc<ScalingPolicy>,
    ctx: Arc<ScalingContext>,
) -> Result<Action, Error> {
    let base = &ctx.base;
    let name = policy.name_any();
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::MissingNamespace { name: name.clone() })?;
    let key = format!("{namespace}/{name}");
    if policy.metadata.deletion_timestamp.is_some() {
        ctx.remember(key, None);
        return Ok(Action::await_change());
    }

    let targets: Api<EdgeDeployment> = Api::namespaced(base.client.clone(), &namespace);
    let target_name = &policy.spec.target_ref.name;
    let target = targets
        .get_opt(target_name)
        .await
        .map_err(|source| Error::ReadTarget {
            namespace: namespace.clone(),
            name: target_name.clone(),
            source,
        })?;

    let now = base.clock.now();
    let at = now.as_second();
    let mut memory = ctx.recall(&key);
    let interval = policy.spec.scrape_interval.as_std().as_secs().max(1) as i64;
    let valid = policy.spec.validate().is_ok();
    // The target's status moves at every rollout step and wakes this policy: collect once per
    // interval all the same, unless the spec changed.
    if let (true, Some(_), Some(last)) = (valid, &target, memory.collected_at)
        && memory.generation == policy.metadata.generation
        && at - last < interval
    {
        return Ok(Action::requeue(Duration::from_secs(
            (interval - (at - last)) as u64,
        )));
    }

    let readings = match (&target, valid) {
        (Some(ed), true) => {
            let (readings, previous) = collect(&ctx, &policy, ed, &memory).await?;
            memory.previous = previous;
            readings
        }
        _ => vec![],
    };
    // Going to zero is judged on the gateway's traffic.
    if let (Some(ed), true) = (&target, valid)
        && policy.spec.min_replicas == 0
        && kasmina_gateway(&ed.spec).is_some()
    {
        let gateways = gateway_traffic(&ctx, ed).await?;
        memory.quiet = idle::observe(&memory.quiet, gateways.as_deref(), at);
    }
    memory.collected_at = Some(at);
    memory.generation = policy.metadata.generation;

    let decision = decide(&policy, target.as_ref(), &readings, &memory, now);

    if let Some(replicas) = decision.scale {
        targets
            .patch_scale(
                target_name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
            )
            .await
            .map_err(|source| Error::Scale {
                namespace: namespace.clone(),
                name: target_name.clone(),
                replicas,
                source,
            })?;
        let from = decision.status.current_replicas.unwrap_or(replicas);
        base.metrics.scaled(&namespace, &name, replicas > from);
    }
    if let Some(desired) = decision.status.desired_replicas {
        base.metrics.desired_replicas(&namespace, &name, desired);
    }
    let api: Api<ScalingPolicy> = Api::namespaced(base.client.clone(), &namespace);
    scaffold::write_status(&api, &name, policy.status.as_ref(), &decision.status)
        .await
        .map_err(|source| Error::WriteStatus {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    // A scale is audited when a ComplianceProfile selecting the target asks for it.
    let audited = match (&target, decision.scale) {
        (Some(ed), Some(_)) => Some(Audited {
            ed,
            on_behalf_of: Some(format!("ScalingPolicy {key}")),
        }),
        _ => None,
    };
    scaffold::announce(base, policy.as_ref(), &decision.notices, audited).await;
    ctx.remember(key, Some(decision.memory));
    Ok(Action::requeue(Duration::from_secs(interval as u64)))
}

/// The traffic of the target's gateway pods (on the metrics port, where the runtime has its
/// own); None when no gateway pod is ready or none answered.
async fn gateway_traffic(
    ctx: &ScalingContext,
    ed: &EdgeDeployment,
) -> Result<Option<Vec<PodSnapshot>>, Error> {
    let selector = format!(
        "{NAME_LABEL}={},{COMPONENT_LABEL}={GATEWAY_COMPONENT}",
        ed.name_any()
    );
    let pods = list_pods(ctx, ed, &selector).await?;
    let traffic = scrape::Reading::Traffic;
    Ok(scrape::pods(&ctx.http, &pods, ctx.metrics_port, ctx.timeout, &traffic).await)
}

/// The pods of the target matching `selector`.
async fn list_pods(
    ctx: &ScalingContext,
    ed: &EdgeDeployment,
    selector: &str,
) -> Result<Vec<Pod>, Error> {
    let namespace = ed.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &namespace);
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::ListPods {
            namespace,
            name: ed.name_any(),
            source,
        })?;
    Ok(list.items)
}

/// This interval's readings: the traffic-taking pods scraped, resource metrics and Prometheus
/// queries as the metrics ask.
async fn collect(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    ed: &EdgeDeployment,
    memory: &Memory,
) -> Result<(Vec<Reading>, collect::Previous), Error> {
    let metrics = &policy.spec.metrics;
    let namespace = ed.namespace().unwrap_or_default();
    let selector = runtime_selector(&ed.name_any(), None);
    let wants = |types: &[MetricType]| metrics.iter().any(|m| types.contains(&m.type_));
    let mut collected = Collected::default();

    if wants(&[
        MetricType::CognitiveLoad,
        MetricType::QueueDepth,
        MetricType::Latency,
        MetricType::Cpu,
        MetricType::Memory,
    ]) {
        let pods = list_pods(ctx, ed, &selector).await?;
        let targets = collect::targets(&pods, &traffic_revisions(ed), ctx.metrics_port);
        let mut scraped =
            collect::scrape_pods(&ctx.http, &targets, ctx.concurrency, ctx.timeout).await;
        collected.pods = targets
            .into_iter()
            .filter_map(|t| {
                let s = scraped.remove(&t.name)?;
                Some((t.name.clone(), (t, s)))
            })
            .collect();
    }
    if wants(&[MetricType::Cpu, MetricType::Memory]) {
        collected.usage = Some(
            collect::resource_usage(&ctx.base.client, &namespace, &selector)
                .await
                .map_err(|e| error_chain(&e)),
        );
    }
    let queries = metrics.iter().enumerate().filter_map(|(i, m)| {
        let (Some(server), Some(query)) = (&m.server_address, &m.query) else {
            return None;
        };
        Some(async move {
            let value =
                collect::prometheus(&ctx.http, server, &ctx.prometheus_hosts, query, ctx.timeout)
                    .await
                    .map_err(|e| error_chain(&e));
            (i, value)
        })
    });
    collected.external = join_all(queries)
        .await
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    Ok(collect::readings(metrics, &collected, &memory.previous))
}

impl AsRef<Context> for ScalingContext {
    fn as_ref(&self) -> &Context {
        &self.base
    }
}
