//! Replica arithmetic: how many pods each revision runs in a rollout state, and which take
//! user traffic. The EdgeDeployment plan and the autoscaler both count with it.

use std::collections::BTreeSet;

use super::rollout::{Seconds, State};
use super::rollout_status::to_state;
use super::traffic;
use crate::api::edge_deployment::{
    EdgeDeployment, EdgeDeploymentSpec, GatewayApiRouting, GatewayRouting, StrategyType,
    TrafficRouting,
};

/// A canary's traffic routing (None for the other strategies).
fn canary_routing(spec: &EdgeDeploymentSpec) -> Option<&TrafficRouting> {
    if spec.strategy.type_ != StrategyType::Canary {
        return None;
    }
    Some(&spec.strategy.canary.as_ref()?.traffic_routing)
}

pub fn gateway_route(spec: &EdgeDeploymentSpec) -> Option<&GatewayApiRouting> {
    canary_routing(spec)?.gateway_api.as_ref()
}

/// `trafficRouting.gateway`: Kasmina's gateway splits and balances.
pub fn kasmina_gateway(spec: &EdgeDeploymentSpec) -> Option<&GatewayRouting> {
    canary_routing(spec)?.gateway.as_ref()
}

pub fn replica_ratio(spec: &EdgeDeploymentSpec) -> bool {
    spec.strategy.type_ == StrategyType::Canary
        && gateway_route(spec).is_none()
        && kasmina_gateway(spec).is_none()
}

/// Replicas of `rev`'s Deployment in state `s`.
pub fn replicas_for(ed: &EdgeDeployment, s: &State, rev: &str) -> i32 {
    replicas_at(&ed.spec, s, rev, ed.spec.replicas)
}

/// Replicas of `rev`'s Deployment in state `s` were `spec.replicas` set to `n`.
pub fn replicas_at(spec: &EdgeDeploymentSpec, s: &State, rev: &str, n: i32) -> i32 {
    let is_candidate = s.candidate.as_deref() == Some(rev);
    let is_stable = s.stable.as_deref() == Some(rev);
    if spec.strategy.type_ == StrategyType::Canary {
        if replica_ratio(spec) {
            let split = traffic::replica_ratio(n, i32::from(s.weight));
            return match (is_candidate, is_stable, s.candidate.is_some()) {
                (true, _, _) => split.canary,
                (_, true, true) => split.stable,
                (_, true, false) => n,
                // The old stable would take traffic back through the shared Service.
                _ => 0,
            };
        }
        return match (is_candidate, is_stable) {
            (true, _) => ((n * i32::from(s.weight)) as f64 / 100.0).ceil().max(1.0) as i32,
            (_, true) => n,
            _ => 0,
        };
    }
    // Rolling and blue-green: every live revision runs at full size (instant switch and
    // instant rollback).
    n
}

/// The revisions whose pods take user traffic now: the stable one, and the candidate unless
/// it is a blue-green preview (which only sees analysis traffic). The autoscaler reads these.
pub fn traffic_revisions(ed: &EdgeDeployment) -> Vec<String> {
    let Some(r) = ed.status.as_ref().and_then(|s| s.rollout.as_ref()) else {
        return vec![];
    };
    let preview = ed.spec.strategy.type_ == StrategyType::BlueGreen;
    let candidate = r.candidate.clone().filter(|_| !preview);
    r.stable.iter().cloned().chain(candidate).collect()
}

/// Pods taking traffic were `spec.replicas` set to `n`: with a canary running, both revisions
/// scale together and keep the canary's weight.
pub fn traffic_pods(ed: &EdgeDeployment, n: i32) -> i32 {
    let state = ed
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_ref())
        .map(to_state)
        .unwrap_or_default();
    let revisions = traffic_revisions(ed);
    if revisions.is_empty() {
        return n;
    }
    revisions
        .iter()
        .map(|rev| replicas_at(&ed.spec, &state, rev, n))
        .sum()
}

/// Revisions that keep a Deployment: stable, candidate, and the previous stable until its
/// scale-down time.
pub fn live_revisions(s: &State, now: Seconds) -> BTreeSet<String> {
    let previous = s
        .previous
        .clone()
        .filter(|_| s.scale_down_at.is_some_and(|at| now < at));
    [s.stable.clone(), s.candidate.clone(), previous]
        .into_iter()
        .flatten()
        .collect()
}
