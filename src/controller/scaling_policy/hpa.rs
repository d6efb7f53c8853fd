//! Pure: the Horizontal Pod Autoscaler's replica algorithm, as Kubernetes documents it, for the
//! ScalingPolicy decision to build on — per-metric proposals with the tolerance band and HPA's
//! handling of missing and unready pods, per-direction stabilization windows, and `behavior`
//! rate policies over the scale events of each period.
//!
//! Reference: <https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/>
//! ("Algorithm details", "Configurable scaling behavior").

use std::collections::VecDeque;

/// Seconds since the epoch.
pub type Seconds = i64;

/// HPA's default tolerance: no scaling while the ratio is within 10 % of 1.
pub const DEFAULT_TOLERANCE: f64 = 0.1;

/// One pod's reading of a per-pod metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PodSample {
    /// A ready pod with a value.
    Ready(f64),
    /// A ready pod the collector could not read.
    Missing,
    /// A pod not ready yet (starting): its value is not trusted.
    Unready,
}

impl PodSample {
    /// The value of a ready pod; None for the pods whose value is not trusted or not read.
    pub fn ready(&self) -> Option<f64> {
        match self {
            PodSample::Ready(v) => Some(*v),
            _ => None,
        }
    }
}

/// `ceil(current × ratio)`, or `current` inside the tolerance band.
pub fn proposal(current: i32, ratio: f64, tolerance: f64) -> i32 {
    if !ratio.is_finite() || (ratio - 1.0).abs() <= tolerance {
        return current;
    }
    (f64::from(current) * ratio).ceil() as i32
}

/// The replica proposal for a per-pod metric with target `target` (average per pod), with
/// HPA's conservative handling of the pods it could not read: when scaling up, missing and
/// unready pods count as 0 (they may be the ones to take the load); when scaling down, missing
/// pods count as exactly at target (unready ones are ignored). If the adjusted ratio reverses
/// the direction or falls inside the tolerance, the replicas stay. None when no pod has a value.
pub fn per_pod_proposal(
    current: i32,
    samples: &[PodSample],
    target: f64,
    tolerance: f64,
) -> Option<i32> {
    let ready: Vec<f64> = samples.iter().filter_map(PodSample::ready).collect();
    if ready.is_empty() || target <= 0.0 {
        return None;
    }
    let missing = samples.iter().filter(|s| **s == PodSample::Missing).count();
    let unready = samples.iter().filter(|s| **s == PodSample::Unready).count();
    let sum: f64 = ready.iter().sum();
    let ratio = sum / ready.len() as f64 / target;
    if missing == 0 && unready == 0 {
        if (ratio - 1.0).abs() <= tolerance {
            return Some(current);
        }
        return Some((ready.len() as f64 * ratio).ceil() as i32);
    }
    let up = ratio > 1.0;
    let (sum, count) = if up {
        (sum, ready.len() + missing + unready)
    } else {
        (sum + target * missing as f64, ready.len() + missing)
    };
    let adjusted = sum / count as f64 / target;
    if (up && adjusted < 1.0) || (!up && adjusted > 1.0) || (adjusted - 1.0).abs() <= tolerance {
        return Some(current);
    }
    let replicas = (count as f64 * adjusted).ceil() as i32;
    // A proposal against its own direction keeps the replicas (HPA's last guard).
    if (adjusted < 1.0 && replicas > current) || (adjusted > 1.0 && replicas < current) {
        return Some(current);
    }
    Some(replicas)
}

/// A recommendation kept for the stabilization windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recommendation {
    pub at: Seconds,
    pub replicas: i32,
}

/// HPA's stabilization: a scale-down goes no lower than the highest recommendation of the
/// down window; a scale-up no higher than the lowest of the up window. `history` must already
/// hold the current recommendation.
pub fn stabilize(
    current: i32,
    history: &VecDeque<Recommendation>,
    now: Seconds,
    up_window: Seconds,
    down_window: Seconds,
) -> i32 {
    let within = |w: Seconds| {
        history
            .iter()
            .filter(move |r| r.at > now - w || r.at == now)
    };
    let up_limit = within(up_window)
        .map(|r| r.replicas)
        .min()
        .unwrap_or(current);
    let down_limit = within(down_window)
        .map(|r| r.replicas)
        .max()
        .unwrap_or(current);
    // Up: the lowest recent recommendation (never below current); down: the highest.
    let mut stable = current;
    if up_limit > current {
        stable = up_limit;
    }
    if down_limit < current {
        stable = down_limit;
    }
    stable
}

/// A change of replicas, for rate policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleEvent {
    pub at: Seconds,
    /// Replicas added (positive) or removed (negative).
    pub change: i32,
}

/// A `behavior` rate policy: at most `value` pods or percent per `period` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Pods { value: i32, period: Seconds },
    Percent { value: i32, period: Seconds },
}

impl Rate {
    fn period(&self) -> Seconds {
        match self {
            Rate::Pods { period, .. } | Rate::Percent { period, .. } => *period,
        }
    }
}

/// How the policies of one direction combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// The policy allowing the largest change (HPA's default).
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// HPA's defaults: up by max(4 pods, 100 %) per 15 s; down by 100 % per 15 s.
pub fn default_up() -> Vec<Rate> {
    vec![
        Rate::Pods {
            value: 4,
            period: 15,
        },
        Rate::Percent {
            value: 100,
            period: 15,
        },
    ]
}

pub fn default_down() -> Vec<Rate> {
    vec![Rate::Percent {
        value: 100,
        period: 15,
    }]
}

fn changed_in(events: &[ScaleEvent], now: Seconds, period: Seconds, up: bool) -> i32 {
    events
        .iter()
        .filter(|e| e.at > now - period && (e.change > 0) == up)
        .map(|e| e.change.abs())
        .sum()
}

/// Limits `desired` by the rate policies of its direction, counting the scale events already
/// made in each policy's period (as HPA does: the limit is relative to the replicas at the
/// start of the period).
pub fn rate_limit(
    current: i32,
    desired: i32,
    events: &[ScaleEvent],
    now: Seconds,
    up: (&[Rate], Select),
    down: (&[Rate], Select),
) -> i32 {
    if desired > current {
        let (rates, select) = up;
        if select == Select::Disabled {
            return current;
        }
        let limits = rates.iter().map(|r| {
            let start = current - changed_in(events, now, r.period(), true);
            match r {
                Rate::Pods { value, .. } => start + value,
                Rate::Percent { value, .. } => {
                    (f64::from(start) * (1.0 + f64::from(*value) / 100.0)).ceil() as i32
                }
            }
        });
        let limit = match select {
            Select::Min => limits.min(),
            _ => limits.max(),
        };
        limit.map_or(desired, |l| desired.min(l.max(current)))
    } else if desired < current {
        let (rates, select) = down;
        if select == Select::Disabled {
            return current;
        }
        let limits = rates.iter().map(|r| {
            let start = current + changed_in(events, now, r.period(), false);
            match r {
                Rate::Pods { value, .. } => start - value,
                Rate::Percent { value, .. } => {
                    (f64::from(start) * (1.0 - f64::from(*value) / 100.0)) as i32
                }
            }
        });
        let limit = match select {
            Select::Min => limits.max(),
            _ => limits.min(),
        };
        limit.map_or(desired, |l| desired.max(l.min(current)))
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tolerance_band_holds_replicas() {
        // Documented example: 200m current vs 100m target doubles; 1.05 does nothing.
        assert_eq!(proposal(3, 2.0, DEFAULT_TOLERANCE), 6);
        assert_eq!(proposal(3, 1.05, DEFAULT_TOLERANCE), 3);
        assert_eq!(proposal(3, 0.95, DEFAULT_TOLERANCE), 3);
        assert_eq!(proposal(4, 0.5, DEFAULT_TOLERANCE), 2);
        assert_eq!(proposal(3, 1.11, DEFAULT_TOLERANCE), 4, "ceil");
    }

    #[test]
    fn missing_pods_are_conservative_in_both_directions() {
        use PodSample::*;
        // Scale up: the missing pod counts as 0, which damps the step.
        let up = per_pod_proposal(4, &[Ready(2.0), Ready(2.0), Ready(2.0), Missing], 1.0, 0.1);
        assert_eq!(up, Some(6), "(2+2+2+0)/4 = 1.5 over 4 pods");
        // Scale down: the missing pod counts as at target, which damps the step.
        let down = per_pod_proposal(4, &[Ready(0.2), Ready(0.2), Ready(0.2), Missing], 1.0, 0.1);
        assert_eq!(down, Some(2), "(0.6+1)/4 = 0.4 over 4 pods");
        // An adjustment that reverses the direction keeps the replicas.
        let held = per_pod_proposal(4, &[Ready(1.2), Unready, Unready, Unready], 1.0, 0.1);
        assert_eq!(
            held,
            Some(4),
            "1.2/4 < 1: no scale up on one busy pod of four"
        );
        // Unready pods are ignored when scaling down.
        let down = per_pod_proposal(3, &[Ready(0.3), Ready(0.3), Unready], 1.0, 0.1);
        assert_eq!(down, Some(1));
        assert_eq!(per_pod_proposal(3, &[Missing, Unready], 1.0, 0.1), None);
    }

    #[test]
    fn stabilization_takes_the_safest_recent_recommendation() {
        let history: VecDeque<Recommendation> = [(0, 10), (100, 4), (200, 6), (290, 3)]
            .into_iter()
            .map(|(at, replicas)| Recommendation { at, replicas })
            .collect();
        // Down window 300 s at t=290: the highest of the window is 10 → stay at 10.
        assert_eq!(stabilize(10, &history, 290, 0, 300), 10);
        // At t=350 the 10 left the window: the highest is 6.
        assert_eq!(stabilize(10, &history, 350, 0, 300), 6);
        // Up with a 0 s window follows the current recommendation at once.
        let up: VecDeque<Recommendation> = [Recommendation {
            at: 400,
            replicas: 12,
        }]
        .into();
        assert_eq!(stabilize(6, &up, 400, 0, 300), 12);
        // Up with a 60 s window: the lowest of the window.
        let up: VecDeque<Recommendation> = [(350, 8), (400, 12)]
            .into_iter()
            .map(|(at, replicas)| Recommendation { at, replicas })
            .collect();
        assert_eq!(stabilize(6, &up, 400, 60, 300), 8);
    }

    #[test]
    fn rate_policies_limit_each_period() {
        let (up, down) = (default_up(), default_down());
        let limit = |current, desired, events: &[ScaleEvent]| {
            rate_limit(
                current,
                desired,
                events,
                100,
                (&up, Select::Max),
                (&down, Select::Max),
            )
        };
        // Up from 2: max(2+4, 2×2) = 6.
        assert_eq!(limit(2, 20, &[]), 6);
        // Up from 10: max(14, 20) = 20.
        assert_eq!(limit(10, 50, &[]), 20);
        // Already +4 in this period from 2 (now 6): the period started at 2 → limit 6.
        assert_eq!(limit(6, 20, &[ScaleEvent { at: 95, change: 4 }]), 6);
        // Down by 100 % per period: anything goes (to the floor the caller applies).
        assert_eq!(limit(10, 1, &[]), 1);
        // Min selects the smallest change; Disabled none.
        let slow = [
            Rate::Pods {
                value: 1,
                period: 60,
            },
            Rate::Percent {
                value: 50,
                period: 60,
            },
        ];
        assert_eq!(
            rate_limit(10, 2, &[], 0, (&up, Select::Max), (&slow, Select::Min)),
            9
        );
        assert_eq!(
            rate_limit(10, 2, &[], 0, (&up, Select::Max), (&slow, Select::Max)),
            5
        );
        assert_eq!(
            rate_limit(10, 2, &[], 0, (&up, Select::Max), (&slow, Select::Disabled)),
            10
        );
    }
}
