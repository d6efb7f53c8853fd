//! Pure: whether a target with `minReplicas: 0` may go to zero. Only the gateway in front of
//! it sees every request — the ones answered, in flight, and held while it wakes — so only
//! the gateway's traffic can say the target was idle: zero is reachable after `idleWindow`
//! in which every scrape of every gateway pod showed no new request, none in flight and none
//! held. A scrape that fails, or a gateway pod not seen before (its counters may have missed
//! requests), restarts the window.

use std::collections::BTreeMap;
use std::time::Duration;

use super::hpa::Seconds;
use crate::controller::edge_deployment::analysis::PodSnapshot;

/// What the controller remembers of the gateway's traffic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quiet {
    /// The last time activity was seen (or could not be ruled out); None before the first look.
    pub since: Option<Seconds>,
    /// Each gateway pod's answered requests at the last look.
    pub requests: BTreeMap<String, f64>,
    /// Why the last look could not rule activity out (the gateway did not answer).
    pub unreadable: bool,
}

/// Folds this interval's scrape of the gateway pods (None or empty: no gateway pod answered)
/// into what was remembered.
pub fn observe(quiet: &Quiet, gateways: Option<&[PodSnapshot]>, at: Seconds) -> Quiet {
    // No gateway pod is no evidence either way.
    let Some(gateways) = gateways.filter(|g| !g.is_empty()) else {
        return Quiet {
            since: Some(at),
            requests: BTreeMap::new(),
            unreadable: true,
        };
    };
    let requests: BTreeMap<String, f64> = gateways
        .iter()
        .map(|g| (g.pod.clone(), g.snapshot.requests))
        .collect();
    let busy = gateways.iter().any(|g| {
        let s = &g.snapshot;
        s.held > 0.0
            || s.gauges.inflight.unwrap_or(0.0) > 0.0
            || quiet.requests.get(&g.pod) != Some(&s.requests)
    });
    Quiet {
        since: match quiet.since {
            Some(since) if !busy => Some(since),
            _ => Some(at),
        },
        requests,
        unreadable: false,
    }
}

/// Whether the target may go to zero now.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// `minReplicas` is above zero: the question does not arise.
    NotAsked,
    /// `minReplicas: 0`, but nothing holds a request while the target is at zero.
    NeedsGateway,
    /// Activity within the window (or a gateway that could not be read): held at one.
    Active { unreadable: bool },
    /// No request for the whole window.
    Idle,
}

/// The verdict for a policy with `min_replicas`, whose target routes through the gateway or
/// not, after `quiet`.
pub fn verdict(
    min_replicas: i32,
    gateway: bool,
    window: Duration,
    quiet: &Quiet,
    at: Seconds,
) -> Verdict {
    if min_replicas > 0 {
        return Verdict::NotAsked;
    }
    if !gateway {
        return Verdict::NeedsGateway;
    }
    match quiet.since {
        Some(since) if !quiet.unreadable && at - since >= window.as_secs() as Seconds => {
            Verdict::Idle
        }
        _ => Verdict::Active {
            unreadable: quiet.unreadable,
        },
    }
}

/// A target woken from zero starts a new window: the request that woke it is activity even
/// before the gateway answers it.
pub fn woken(quiet: &Quiet, at: Seconds) -> Quiet {
    Quiet {
        since: Some(at),
        ..quiet.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::edge_deployment::analysis::Snapshot;

    const WINDOW: Duration = Duration::from_secs(30);

    fn gateway(pod: &str, requests: f64, inflight: f64, held: f64) -> PodSnapshot {
        let mut snapshot = Snapshot {
            requests,
            held,
            ..Snapshot::default()
        };
        snapshot.gauges.inflight = Some(inflight);
        PodSnapshot {
            pod: pod.into(),
            started: None,
            snapshot,
        }
    }

    /// Observes `looks` at 10 s intervals from t = 0; returns the verdict at the last one.
    fn after(looks: &[Option<Vec<PodSnapshot>>]) -> Verdict {
        let mut quiet = Quiet::default();
        let mut at = 0;
        for (i, look) in looks.iter().enumerate() {
            at = 10 * i as Seconds;
            quiet = observe(&quiet, look.as_deref(), at);
        }
        verdict(0, true, WINDOW, &quiet, at)
    }

    #[test]
    fn zero_after_a_whole_window_without_a_request() {
        let same = Some(vec![gateway("g1", 7.0, 0.0, 0.0)]);
        // t = 0 is the first look (activity cannot be ruled out); 30 s later, idle.
        let looks = vec![same.clone(); 4];
        assert_eq!(after(&looks), Verdict::Idle);
        let active = Verdict::Active { unreadable: false };
        assert_eq!(after(&looks[..3]), active, "20 s is not the window");
    }

    #[test]
    fn a_request_answered_in_flight_or_held_restarts_the_window() {
        let quiet = Some(vec![gateway("g1", 7.0, 0.0, 0.0)]);
        let active = Verdict::Active { unreadable: false };
        for busy in [
            gateway("g1", 8.0, 0.0, 0.0),
            gateway("g1", 7.0, 1.0, 0.0),
            gateway("g1", 7.0, 0.0, 1.0),
        ] {
            let mut looks = vec![quiet.clone(); 4];
            looks[2] = Some(vec![busy.clone()]);
            assert_eq!(after(&looks), active, "{busy:?}");
        }
        // One answered request at t = 10, then the same count: idle a window after it.
        let answered = Some(vec![gateway("g1", 8.0, 0.0, 0.0)]);
        let mut looks = vec![quiet, answered.clone(), answered.clone(), answered.clone()];
        assert_eq!(after(&looks), active);
        looks.push(answered);
        assert_eq!(after(&looks), Verdict::Idle);
    }

    #[test]
    fn an_unreadable_gateway_or_a_new_gateway_pod_is_never_idle() {
        let quiet = Some(vec![gateway("g1", 7.0, 0.0, 0.0)]);
        let mut looks = vec![quiet.clone(); 6];
        looks[3] = None;
        assert_eq!(after(&looks), Verdict::Active { unreadable: false });
        looks[5] = None;
        assert_eq!(after(&looks), Verdict::Active { unreadable: true });
        looks[5] = Some(vec![]);
        assert_eq!(after(&looks), Verdict::Active { unreadable: true });

        // A second gateway pod appears with its own count: its past is unknown.
        let mut looks = vec![quiet.clone(); 6];
        looks[4] = Some(vec![
            gateway("g1", 7.0, 0.0, 0.0),
            gateway("g2", 0.0, 0.0, 0.0),
        ]);
        looks[5] = looks[4].clone();
        assert_eq!(after(&looks), Verdict::Active { unreadable: false });
        // A gateway pod going away is not activity.
        let two = looks[4].clone();
        let looks = vec![two.clone(), two, quiet.clone(), quiet.clone(), quiet];
        assert_eq!(after(&looks), Verdict::Idle);
    }

    #[test]
    fn zero_needs_the_gateway_and_a_minimum_of_zero() {
        let quiet = Quiet {
            since: Some(0),
            ..Quiet::default()
        };
        assert_eq!(verdict(1, true, WINDOW, &quiet, 100), Verdict::NotAsked);
        assert_eq!(
            verdict(0, false, WINDOW, &quiet, 100),
            Verdict::NeedsGateway
        );
        assert_eq!(verdict(0, true, WINDOW, &quiet, 100), Verdict::Idle);
        let woke = woken(&quiet, 100);
        assert_eq!(
            verdict(0, true, WINDOW, &woke, 129),
            Verdict::Active { unreadable: false }
        );
        assert_eq!(verdict(0, true, WINDOW, &woke, 130), Verdict::Idle);
    }
}
