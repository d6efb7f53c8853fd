//! What the observed runtime Deployments say: whether a revision is fully rolled out, the
//! replica counts, and the canary weight traffic actually sees.

use std::collections::BTreeSet;

use kube::ResourceExt;

use super::gateway::gateway_name;
use super::names::{REVISION_LABEL, deployment_name};
use super::observed::Observed;
use super::replicas::{kasmina_gateway, replica_ratio};
use super::rollout::State;
use crate::api::edge_deployment::EdgeDeployment;

pub fn deployment_ready(ed: &EdgeDeployment, seen: &Observed, rev: &str, want: i32) -> bool {
    rolled_out(seen, &deployment_name(ed, rev), want)
}

/// Whether the gateway (`trafficRouting.gateway`) runs its replicas: callers reach the
/// revisions through it, so the EdgeDeployment is not Ready before it is. True without one.
pub fn gateway_ready(ed: &EdgeDeployment, seen: &Observed) -> bool {
    kasmina_gateway(&ed.spec).is_none_or(|g| rolled_out(seen, &gateway_name(ed), g.replicas))
}

fn rolled_out(seen: &Observed, name: &str, want: i32) -> bool {
    seen.deployments.iter().any(|d| {
        let spec_replicas = d.spec.replicas.unwrap_or(1);
        let Some(st) = d.status.as_ref() else {
            return false;
        };
        d.name_any() == name
            && spec_replicas == want
            && st.observed_generation >= d.metadata.generation
            && st.updated_replicas.unwrap_or(0) >= want
            && st.available_replicas.unwrap_or(0) >= want
    })
}

pub fn counts(seen: &Observed, live: &BTreeSet<String>) -> (i32, i32) {
    seen.deployments
        .iter()
        .filter(|d| {
            d.labels()
                .get(REVISION_LABEL)
                .is_some_and(|r| live.contains(r))
        })
        .filter_map(|d| d.status.as_ref())
        .fold((0, 0), |(r, ready), s| {
            (
                r + s.replicas.unwrap_or(0),
                ready + s.ready_replicas.unwrap_or(0),
            )
        })
}

pub fn ready_of(ed: &EdgeDeployment, seen: &Observed, rev: &str) -> i32 {
    let name = deployment_name(ed, rev);
    seen.deployments
        .iter()
        .find(|d| d.name_any() == name)
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0)
}

/// The canary weight traffic actually sees: for `replicaRatio` the share of ready pods,
/// otherwise the weight the router was given.
pub fn achieved_weight(ed: &EdgeDeployment, seen: &Observed, s: &State, candidate: &str) -> i32 {
    if !replica_ratio(&ed.spec) {
        return i32::from(s.weight);
    }
    let c = ready_of(ed, seen, candidate);
    let st = s.stable.as_deref().map_or(0, |r| ready_of(ed, seen, r));
    if c + st == 0 {
        return 0;
    }
    ((100 * c) as f64 / (c + st) as f64).round() as i32
}
