//! The children a rollout state asks for: a runtime Deployment per live revision, the
//! Services, the HTTPRoute's weights; and those to delete. Only what differs from the live
//! copy (by content hash) is returned to apply.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::ResourceExt;
use serde_json::Value;

use super::gateway::{self, GATEWAY_COMPONENT};
use super::names::{self, COMPONENT_LABEL, REVISION_LABEL};
use super::observed::Observed;
use super::replicas::{gateway_route, kasmina_gateway, replica_ratio, replicas_for};
use super::rollout::State;
use super::traffic;
use super::workload::{self, Settings};
use crate::api::edge_deployment::{
    EdgeDeployment, GatewayApiRouting, RevisionRecord, StrategyType,
};

/// What to apply and delete.
#[derive(Debug, Default)]
pub struct Desired {
    pub deployments: Vec<Deployment>,
    pub delete_deployments: Vec<String>,
    pub services: Vec<Service>,
    pub delete_services: Vec<String>,
    /// (route name, route with this EdgeDeployment's weights), when they differ.
    pub route_update: Option<(String, Value)>,
    /// Why the weights could not be put on the route: (Event reason, message).
    pub route_problem: Option<(&'static str, String)>,
    /// The gateway's ServiceAccount and RoleBinding, applied with its Deployment (before it,
    /// so its pods start with their permissions).
    pub gateway_access: Option<(ServiceAccount, RoleBinding)>,
    /// The gateway is no longer asked for: the name of its ServiceAccount and RoleBinding.
    pub delete_gateway_access: Option<String>,
}

/// The children of `ed` in rollout state `next`, with `live` the revisions that keep pods.
pub fn children(
    ed: &EdgeDeployment,
    seen: &Observed,
    settings: &Settings,
    revisions: &[RevisionRecord],
    next: &State,
    live: &BTreeSet<String>,
) -> Desired {
    let mut out = Desired::default();
    for rev in live {
        let Some(record) = revisions.iter().find(|r| &r.name == rev) else {
            continue;
        };
        let desired = workload::runtime_deployment(
            settings,
            ed,
            rev,
            &record.artifact,
            replicas_for(ed, next, rev),
            &seen.allowed_regions,
            &seen.security,
        );
        let name = desired.name_any();
        if !seen
            .deployments
            .iter()
            .any(|d| d.name_any() == name && workload::up_to_date(d, &desired))
        {
            out.deployments.push(desired);
        }
    }
    let wants_gateway = kasmina_gateway(&ed.spec);
    if let Some(routing) = wants_gateway {
        let desired = gateway::deployment(settings, ed, routing, &seen.allowed_regions);
        if !seen
            .deployments
            .iter()
            .any(|d| d.name_any() == desired.name_any() && workload::up_to_date(d, &desired))
        {
            out.gateway_access = Some(gateway::access(settings, ed));
            out.deployments.push(desired);
        }
    }
    for d in &seen.deployments {
        if d.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if d.labels().get(COMPONENT_LABEL).map(String::as_str) == Some(GATEWAY_COMPONENT) {
            if wants_gateway.is_none() {
                out.delete_deployments.push(d.name_any());
                out.delete_gateway_access = Some(gateway::gateway_name(ed));
            }
            continue;
        }
        let rev = d.labels().get(REVISION_LABEL);
        if rev.is_none_or(|r| !live.contains(r)) {
            out.delete_deployments.push(d.name_any());
        }
    }
    let services = desired_services(ed, next);
    for desired in &services {
        if !seen
            .services
            .iter()
            .any(|s| s.name_any() == desired.name_any() && workload::up_to_date(s, desired))
        {
            out.services.push(desired.clone());
        }
    }
    for s in &seen.services {
        if !services.iter().any(|d| d.name_any() == s.name_any()) {
            out.delete_services.push(s.name_any());
        }
    }
    if let Some(routing) = gateway_route(&ed.spec) {
        let route_name = routing.http_route.clone();
        match &seen.route {
            Some(route) => match route_update(ed, routing, route, next.weight) {
                Ok(update) => out.route_update = update.map(|r| (route_name, r)),
                Err(e) => out.route_problem = Some(("HTTPRouteRuleNotFound", e.to_string())),
            },
            None => {
                out.route_problem = Some((
                    "HTTPRouteNotFound",
                    format!(
                        "HTTPRoute {route_name} (spec.strategy.canary.trafficRouting.gatewayAPI.httpRoute) not found; traffic weights are not applied"
                    ),
                ))
            }
        }
    }
    out
}

fn desired_services(ed: &EdgeDeployment, s: &State) -> Vec<Service> {
    let name = ed.name_any();
    let serving = s.stable.as_deref().or(s.candidate.as_deref());
    let newest = s.candidate.as_deref().or(s.stable.as_deref());
    let front = if kasmina_gateway(&ed.spec).is_some() {
        gateway::service(ed)
    } else if replica_ratio(&ed.spec) {
        workload::service(ed, name.clone(), None)
    } else {
        workload::service(ed, name.clone(), serving)
    };
    let mut out = vec![front];
    match ed.spec.strategy.type_ {
        StrategyType::BlueGreen => {
            out.push(workload::service(ed, format!("{name}-preview"), newest))
        }
        StrategyType::Canary => out.push(workload::service(ed, format!("{name}-canary"), newest)),
        StrategyType::Rolling => {}
    }
    out
}

/// The HTTPRoute with this EdgeDeployment's stable/canary weights, or None when it has them.
fn route_update(
    ed: &EdgeDeployment,
    routing: &GatewayApiRouting,
    route: &Value,
    weight: u8,
) -> Result<Option<Value>, traffic::RouteError> {
    let name = ed.name_any();
    let canary = format!("{name}-canary");
    let target = traffic::RouteTarget {
        rule: routing.rule.as_deref(),
        stable_service: &name,
        canary_service: &canary,
        port: names::SERVICE_PORT,
    };
    traffic::route_update(route, target, i32::from(weight))
}
