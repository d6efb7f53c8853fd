//! The rollout state machine's `State` as persisted in status (`RolloutState`, with
//! timestamps), and back: a restarted controller resumes where status says.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::rollout::{Seconds, State};
use crate::api::edge_deployment::RolloutState;

pub fn to_state(r: &RolloutState) -> State {
    State {
        stable: r.stable.clone(),
        candidate: r.candidate.clone(),
        step: r.step,
        step_started_at: r.step_started_at.as_ref().map_or(0, |t| t.0.as_second()),
        weight: r.weight.min(100),
        passed: r.passed,
        failed: r.failed,
        previous: r.previous.clone(),
        scale_down_at: r.scale_down_at.as_ref().map(|t| t.0.as_second()),
        aborted: r.aborted.clone(),
        paused: r.paused,
    }
}

pub fn time(s: Seconds) -> Option<Time> {
    Timestamp::from_second(s).ok().map(Time)
}

pub fn from_state(s: &State, before: &RolloutState, now: Timestamp) -> RolloutState {
    let started_at = match (&s.candidate, &before.candidate) {
        (Some(c), Some(b)) if c == b => before.started_at.clone(),
        (Some(_), _) => Some(Time(now)),
        (None, _) => None,
    };
    RolloutState {
        stable: s.stable.clone(),
        candidate: s.candidate.clone(),
        step: s.step,
        step_started_at: s.candidate.as_ref().and_then(|_| time(s.step_started_at)),
        weight: s.weight,
        passed: s.passed,
        failed: s.failed,
        previous: s.previous.clone(),
        scale_down_at: s.scale_down_at.and_then(time),
        aborted: s.aborted.clone(),
        paused: s.paused,
        last_command: before.last_command.clone(),
        started_at,
    }
}
