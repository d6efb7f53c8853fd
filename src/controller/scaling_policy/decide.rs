//! Pure: from a ScalingPolicy, its target, this interval's readings, what the controller
//! remembers and the time — the replicas to set, the status and the Events.
//!
//! The pipeline is HPA's, with Kasmina's extensions marked:
//! per-metric proposals (tolerance; missing and unready pods) → the largest wins (no scale-down
//! while a metric fails) → *predictive* raise from the demand's trend → stabilization windows →
//! *cooldowns* → rate policies → min/max; and *fallback* replicas after repeated failed
//! collections. Proposals count traffic-taking pods and are turned back into
//! `spec.replicas`, so a running canary keeps its weight as both revisions scale.

use std::collections::VecDeque;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::collect::{Previous, Reading};
use super::forecast;
use super::hpa::{self, Rate, Recommendation, ScaleEvent, Seconds, Select};
use super::idle::{self, Quiet, Verdict};
use crate::api::condition::{self, Condition, ConditionStatus};
use crate::api::scaling_policy::{
    MetricSpec, MetricType, MetricValue, RatePolicyType, ScaleRecord, ScalingRules, SelectPolicy,
};
use crate::api::{EdgeDeployment, ScalingPolicy, ScalingPolicySpec, ScalingPolicyStatus};
use crate::controller::context::Notice;
use crate::controller::edge_deployment::replicas::{kasmina_gateway, traffic_pods};
use crate::controller::status::condition as cond;

pub const ABLE_TO_SCALE: &str = "AbleToScale";
pub const SCALING_ACTIVE: &str = "ScalingActive";
pub const SCALING_LIMITED: &str = "ScalingLimited";
/// ScalingLimited's reason when `minReplicas: 0` cannot be honoured: a Warning Event too.
pub const ZERO_NEEDS_GATEWAY: &str = "ZeroNeedsGateway";

/// Decisions kept in `status.history`.
pub const HISTORY_LIMIT: usize = 20;
/// Demand samples the forecast looks at (10 minutes at the default 5 s interval).
const FORECAST_SAMPLES: usize = 120;

/// Kasmina's defaults where `behavior` is silent. The cognitive load measures demand directly
/// (offered over served when shedding), so scale-up may go to it in one step — up to 10× per
/// 15 s, where HPA's default doubles to stay safe on CPU's indirect signal — with no cooldown:
/// unready pods count as idle, so a second look while pods start cannot run away. Scale-down
/// takes the highest recommendation of the last `DEFAULT_DOWN_WINDOW` seconds, then waits a
/// cooldown, which keeps a noisy load from flapping.
pub const DEFAULT_UP_WINDOW: Seconds = 0;
pub const DEFAULT_DOWN_WINDOW: Seconds = 60;
pub const DEFAULT_UP_COOLDOWN: Seconds = 0;
pub const DEFAULT_DOWN_COOLDOWN: Seconds = 60;

/// Scale-up rate without `policies`: +4 pods or +900 % per 15 s, whichever is more.
pub fn default_up_rates() -> Vec<Rate> {
    vec![
        Rate::Pods {
            value: 4,
            period: 15,
        },
        Rate::Percent {
            value: 900,
            period: 15,
        },
    ]
}

/// What the controller remembers between intervals, as HPA keeps its recommendations in
/// memory. Losing it on restart only makes the next decisions more cautious.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// Recommendations within the stabilization windows.
    pub recommendations: VecDeque<Recommendation>,
    /// Demand in replicas, for the forecast.
    pub demand: VecDeque<(Seconds, f64)>,
    /// Consecutive collections where no metric could be read.
    pub failures: u32,
    /// Each pod's scrape at the last interval (rates and latency over the interval).
    pub previous: Previous,
    /// When metrics were last collected, and for which generation of the spec.
    pub collected_at: Option<Seconds>,
    pub generation: Option<i64>,
    /// The gateway's traffic, for going to zero.
    pub quiet: Quiet,
}

/// What the reconciler should write, set and say.
#[derive(Debug, PartialEq)]
pub struct Decision {
    pub status: ScalingPolicyStatus,
    pub notices: Vec<Notice>,
    /// New `spec.replicas` for the target's scale subresource.
    pub scale: Option<i32>,
    pub memory: Memory,
}

/// One metric's proposal.
struct Proposal {
    replicas: i32,
    /// Unrounded replicas the measured load needs (the forecast's input).
    demand: f64,
    /// "cognitive load 0.93 > 0.70".
    why: String,
}

/// Decides for `policy`, given its target (`None` when it does not exist), this interval's
/// readings (one per `spec.metrics` entry) and the memory of earlier intervals.
pub fn decide(
    policy: &ScalingPolicy,
    target: Option<&EdgeDeployment>,
    readings: &[Reading],
    memory: &Memory,
    now: Timestamp,
) -> Decision {
    let spec = &policy.spec;
    let generation = policy.metadata.generation;
    let mut status = policy.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut memory = memory.clone();
    let at = now.as_second();
    let c = |type_: &str, s: ConditionStatus, reason: &str, message: String| {
        cond(type_, s, reason, message, generation, now)
    };
    let mut out = Outcome::default();

    let ed = match (spec.validate(), target) {
        (Err(errors), _) => Err(("InvalidSpec", format!("invalid spec: {errors}"))),
        (Ok(()), None) => {
            status.current_replicas = None;
            let message = format!(
                "EdgeDeployment {:?} not found in namespace {:?}",
                spec.target_ref.name,
                policy.namespace().unwrap_or_default()
            );
            Err(("TargetNotFound", message))
        }
        (Ok(()), Some(ed)) => Ok(ed),
    };
    // Nothing can be scaled: both conditions say why, and replicas stay where they are.
    let ed = match ed {
        Ok(ed) => ed,
        Err((reason, message)) => {
            let message = format!("{message}; replicas are left as they are");
            out.able = Some(c(
                ABLE_TO_SCALE,
                ConditionStatus::False,
                reason,
                message.clone(),
            ));
            out.active = Some(c(SCALING_ACTIVE, ConditionStatus::False, reason, message));
            return out.finish(status, memory);
        }
    };
    let current = ed.spec.replicas;
    status.current_replicas = Some(current);
    let external = spec
        .metrics
        .iter()
        .any(|m| m.type_ == MetricType::Prometheus);
    let gateway = kasmina_gateway(&ed.spec).is_some();
    let zero = idle::verdict(
        spec.min_replicas,
        gateway,
        spec.idle_window().as_std(),
        &memory.quiet,
        at,
    );
    if current == 0 && !external {
        let message = if gateway {
            // Woken, the idle window starts again: the waking request is activity.
            memory.quiet = idle::woken(&memory.quiet, at);
            "the target has 0 replicas: the gateway wakes it at the next request, and autoscaling goes on from 1".to_owned()
        } else {
            "the target has 0 replicas: autoscaling is off until it is scaled up (a Prometheus metric can scale it from zero)".to_owned()
        };
        out.able = Some(c(
            ABLE_TO_SCALE,
            ConditionStatus::True,
            "ReadyForNewScale",
            "the target can be scaled".into(),
        ));
        out.active = Some(c(
            SCALING_ACTIVE,
            ConditionStatus::False,
            "ScalingDisabled",
            message,
        ));
        return out.finish(status, memory);
    }

    if zero == Verdict::Idle && current > 0 {
        return to_zero(out, status, memory, current, spec.idle_window(), &c, now);
    }
    // Below one only when idle (above), at zero already, or when a Prometheus metric can wake
    // a target without the gateway, as KEDA's scalers do.
    let floor = match zero {
        Verdict::NotAsked => spec.min_replicas,
        _ if current == 0 => 0,
        Verdict::NeedsGateway if external => 0,
        _ => 1,
    };

    // Proposals count traffic-taking pods; `replicas` turns pods back into spec.replicas.
    let pods_now = traffic_pods(ed, current);
    let replicas = |pods: f64| replicas_for_pods(ed, current, pods_now, pods, spec.max_replicas);
    let tolerance = spec.behavior.tolerance.unwrap_or(hpa::DEFAULT_TOLERANCE);

    let mut proposals = vec![];
    let mut failed = vec![];
    let mut idle = vec![];
    status.current_metrics.clear();
    for (i, (metric, reading)) in spec.metrics.iter().zip(readings).enumerate() {
        let proposal = match reading {
            Reading::Failed(message) => {
                failed.push(format!("spec.metrics[{i}] ({:?}): {message}", metric.type_));
                continue;
            }
            Reading::Idle(message) => {
                idle.push(format!("spec.metrics[{i}] ({:?}): {message}", metric.type_));
                continue;
            }
            Reading::PerPod { samples, target } => {
                hpa::per_pod_proposal(pods_now, samples, *target, tolerance).map(|pods| {
                    let demand: f64 = samples
                        .iter()
                        .filter_map(hpa::PodSample::ready)
                        .map(|v| v / target)
                        .sum();
                    (pods, demand)
                })
            }
            Reading::Ratio {
                value,
                target,
                ready,
            } => {
                let ratio = value / target;
                let pods = if (ratio - 1.0).abs() <= tolerance {
                    pods_now
                } else {
                    (ratio * f64::from(*ready)).ceil() as i32
                };
                Some((pods, ratio * f64::from(*ready)))
            }
            Reading::Total { value, target } => {
                let demand = value / target;
                let within =
                    pods_now > 0 && (demand / f64::from(pods_now) - 1.0).abs() <= tolerance;
                Some((
                    if within {
                        pods_now
                    } else {
                        demand.ceil() as i32
                    },
                    demand,
                ))
            }
        };
        let (Some((pods, demand)), Some(value), Some(target)) =
            (proposal, reading.value(), reading.target())
        else {
            failed.push(format!(
                "spec.metrics[{i}] ({:?}): no ready pod has a value",
                metric.type_
            ));
            continue;
        };
        let proposed = if pods == pods_now {
            current
        } else {
            replicas(f64::from(pods))
        };
        status.current_metrics.push(MetricValue {
            type_: metric.type_,
            value: round(value),
            target,
            proposed_replicas: Some(proposed),
        });
        let cmp = match proposed.cmp(&current) {
            std::cmp::Ordering::Greater => ">",
            std::cmp::Ordering::Less => "<",
            std::cmp::Ordering::Equal => "≈",
        };
        proposals.push(Proposal {
            replicas: proposed,
            demand: demand_replicas(current, pods_now, demand),
            why: describe(metric, value, target, cmp),
        });
        if metric.type_ == MetricType::CognitiveLoad {
            status.cognitive_load = Some(round(value));
        }
    }

    let fallback_replicas = |memory: &Memory| {
        spec.fallback
            .as_ref()
            .filter(|f| memory.failures >= f.failure_threshold.max(1) as u32)
            .map(|f| f.replicas)
    };

    // The recommendation before stabilization, and why.
    let (recommended, why) = if proposals.is_empty() {
        if failed.is_empty() {
            memory.failures = 0;
            let message = format!(
                "nothing to measure: {}; replicas are left as they are",
                idle.join("; ")
            );
            out.active = Some(c(SCALING_ACTIVE, ConditionStatus::True, "Idle", message));
            out.able = Some(ready_for_new_scale(&c));
            out.limited = Some(within_range(&c));
            status.desired_replicas = Some(current);
            return out.finish(status, memory);
        }
        memory.failures += 1;
        let message = failed.join("; ");
        match fallback_replicas(&memory) {
            Some(replicas) => {
                let reason = format!(
                    "fallback after {} failed collections ({message})",
                    memory.failures
                );
                out.active = Some(c(
                    SCALING_ACTIVE,
                    ConditionStatus::False,
                    "Fallback",
                    format!("holding fallback.replicas {replicas}: {message}"),
                ));
                out.able = Some(ready_for_new_scale(&c));
                let to = replicas.clamp(spec.min_replicas, spec.max_replicas);
                out.limited = Some(within_range(&c));
                status.desired_replicas = Some(to);
                if to == current {
                    return out.finish(status, memory);
                }
                return out.scale(status, memory, current, to, &reason, now);
            }
            None => {
                out.active = Some(c(
                    SCALING_ACTIVE,
                    ConditionStatus::False,
                    "FailedGetMetrics",
                    format!("{message}; replicas are left as they are"),
                ));
                out.able = Some(ready_for_new_scale(&c));
                out.limited = Some(within_range(&c));
                status.desired_replicas = Some(current);
                return out.finish(status, memory);
            }
        }
    } else {
        memory.failures = 0;
        let mut best = proposals
            .iter()
            .max_by_key(|p| p.replicas)
            .map(|p| (p.replicas, p.why.clone()))
            .unwrap_or((current, String::new()));
        if !failed.is_empty() && best.0 < current {
            // As HPA: with a metric unreadable, it might be the one that needs the replicas.
            best = (
                current,
                format!("{} (no scale-down while a metric fails)", best.1),
            );
        }
        let message = if failed.is_empty() {
            "the replica count is computed from the metrics".to_owned()
        } else {
            format!(
                "scaling on the metrics that could be read; {}",
                failed.join("; ")
            )
        };
        let reason = if failed.is_empty() {
            "ValidMetricFound"
        } else {
            "SomeMetricsFailed"
        };
        out.active = Some(c(SCALING_ACTIVE, ConditionStatus::True, reason, message));
        best
    };

    // Predictive: the trend of the demand may raise the recommendation, never lower it.
    let (recommended, why) = match &spec.predictive {
        Some(p) if p.enabled => {
            let demand = proposals.iter().map(|p| p.demand).fold(0.0, f64::max);
            memory.demand.push_back((at, demand));
            while memory.demand.len() > FORECAST_SAMPLES {
                memory.demand.pop_front();
            }
            let samples: Vec<(Seconds, f64)> = memory.demand.iter().copied().collect();
            let horizon = f64::from(p.horizon_seconds);
            // Only a trend under way counts — the last four samples rise, by more than the
            // tolerance in all — and the forecast is capped at twice the demand now: a step
            // that has levelled off, or noise, must not keep raising replicas.
            let recent = &samples[samples.len().saturating_sub(4)..];
            let rising = recent.len() == 4
                && recent.windows(2).all(|w| w[1].1 > w[0].1)
                && recent[3].1 - recent[0].1 > tolerance * recent[3].1;
            let forecast = forecast::holt(&samples, forecast::ALPHA, forecast::BETA, horizon)
                .filter(|_| rising)
                .map(|f| f.min(2.0 * demand));
            match forecast {
                Some(f)
                    if f > 0.0
                        && hpa::proposal(current, f / f64::from(current.max(1)), tolerance)
                            > recommended.max(current) =>
                {
                    (
                        f.ceil() as i32,
                        format!(
                            "forecast: {f:.1} replicas needed in {}s (now {demand:.1})",
                            p.horizon_seconds
                        ),
                    )
                }
                _ => (recommended, why),
            }
        }
        _ => (recommended, why),
    };

    // Stabilization windows over the recommendations.
    let (up, down) = (rules(spec, true), rules(spec, false));
    memory.recommendations.push_back(Recommendation {
        at,
        replicas: recommended,
    });
    let keep = up.window.max(down.window);
    while memory
        .recommendations
        .front()
        .is_some_and(|r| r.at <= at - keep && r.at != at)
    {
        memory.recommendations.pop_front();
    }
    let stabilized = hpa::stabilize(current, &memory.recommendations, at, up.window, down.window);
    out.able = Some(if stabilized != recommended && stabilized != current {
        let (direction, window) = if recommended > stabilized {
            ("ScaleUpStabilized", up.window)
        } else {
            ("ScaleDownStabilized", down.window)
        };
        c(
            ABLE_TO_SCALE,
            ConditionStatus::True,
            direction,
            format!(
                "recommended {recommended}; the stabilization window of {window}s holds {stabilized}"
            ),
        )
    } else if stabilized == current && recommended < current {
        c(
            ABLE_TO_SCALE,
            ConditionStatus::True,
            "ScaleDownStabilized",
            format!(
                "recommended {recommended}; the stabilization window of {}s holds {current}",
                down.window
            ),
        )
    } else {
        ready_for_new_scale(&c)
    });

    // Cooldowns, then rate policies, from the decisions recorded in status.
    let events: Vec<ScaleEvent> = status
        .history
        .iter()
        .map(|h| ScaleEvent {
            at: h.time.0.as_second(),
            change: h.to - h.from,
        })
        .collect();
    let scaling_up = stabilized > current;
    let rules_now = if scaling_up { &up } else { &down };
    let last_same_direction = events
        .iter()
        .filter(|e| (e.change > 0) == scaling_up && e.change != 0)
        .map(|e| e.at)
        .max();
    if stabilized != current
        && let Some(last) = last_same_direction
        && at - last < rules_now.cooldown
    {
        let (reason, verb) = if scaling_up {
            ("BackoffUp", "up")
        } else {
            ("BackoffDown", "down")
        };
        out.able = Some(c(
            ABLE_TO_SCALE,
            ConditionStatus::False,
            reason,
            format!(
                "recommended {stabilized}; scaled {verb} {}s ago, cooldown is {}s",
                at - last,
                rules_now.cooldown
            ),
        ));
        out.limited = Some(within_range(&c));
        status.desired_replicas = Some(current);
        return out.finish(status, memory);
    }
    let limited = hpa::rate_limit(
        current,
        stabilized,
        &events,
        at,
        (&up.rates, up.select),
        (&down.rates, down.select),
    );
    let to = limited.clamp(floor, spec.max_replicas);
    let (limit_reason, limit_message) = if to != limited {
        if to == spec.max_replicas {
            (
                "TooManyReplicas",
                format!(
                    "{limited} recommended; held at maxReplicas {}",
                    spec.max_replicas
                ),
            )
        } else if to > spec.min_replicas {
            held_above_zero(&zero, limited, spec)
        } else {
            (
                "TooFewReplicas",
                format!(
                    "{limited} recommended; held at minReplicas {}",
                    spec.min_replicas
                ),
            )
        }
    } else if limited != stabilized {
        let direction = if scaling_up {
            "ScaleUpLimit"
        } else {
            "ScaleDownLimit"
        };
        (
            direction,
            format!(
                "{stabilized} recommended; the {} policies allow {limited} now",
                if scaling_up { "scaleUp" } else { "scaleDown" }
            ),
        )
    } else {
        ("", String::new())
    };
    out.limited = Some(if limit_reason.is_empty() {
        within_range(&c)
    } else {
        c(
            SCALING_LIMITED,
            ConditionStatus::True,
            limit_reason,
            limit_message,
        )
    });
    status.desired_replicas = Some(to);
    if to == current {
        return out.finish(status, memory);
    }
    let note = match limit_reason {
        "" => why.clone(),
        "TooManyReplicas" => format!("{why}, at maxReplicas"),
        "TooFewReplicas" | ZERO_NEEDS_GATEWAY | IDLE_WINDOW => format!("{why}, at minReplicas"),
        _ => format!("{why}, rate-limited"),
    };
    out.scale(status, memory, current, to, &note, now)
}

/// Conditions and notices gathered on the way.
#[derive(Default)]
struct Outcome {
    able: Option<Condition>,
    active: Option<Condition>,
    limited: Option<Condition>,
    notices: Vec<Notice>,
    scale: Option<i32>,
}

impl Outcome {
    fn finish(mut self, mut status: ScalingPolicyStatus, memory: Memory) -> Decision {
        for c in [self.able, self.active, self.limited].into_iter().flatten() {
            let warn =
                (!c.is_true() && c.reason != "ScalingDisabled" && !c.reason.starts_with("Backoff"))
                    || c.reason == ZERO_NEEDS_GATEWAY;
            let limited = c.type_ == SCALING_LIMITED && c.reason != ZERO_NEEDS_GATEWAY;
            let said = self.notices.iter().any(|n| n.reason == c.reason);
            if condition::upsert(&mut status.conditions, c.clone()) && warn && !limited && !said {
                self.notices
                    .push(Notice::warning(&c.reason, "Resolve", c.message));
            }
        }
        Decision {
            status,
            notices: self.notices,
            scale: self.scale,
            memory,
        }
    }

    fn scale(
        mut self,
        mut status: ScalingPolicyStatus,
        memory: Memory,
        from: i32,
        to: i32,
        why: &str,
        now: Timestamp,
    ) -> Decision {
        let reason = format!("{why}: {from} → {to}");
        status.history.insert(
            0,
            ScaleRecord {
                time: Time(now),
                from,
                to,
                reason: reason.clone(),
            },
        );
        status.history.truncate(HISTORY_LIMIT);
        status.last_scale_time = Some(Time(now));
        self.notices
            .push(Notice::normal("SuccessfulRescale", "Scale", reason));
        self.scale = Some(to);
        self.finish(status, memory)
    }
}

/// ScalingLimited's reason while a target that may go to zero is held at one.
const IDLE_WINDOW: &str = "IdleWindow";

/// Why a `minReplicas: 0` target is held at one replica.
fn held_above_zero(
    zero: &Verdict,
    limited: i32,
    spec: &ScalingPolicySpec,
) -> (&'static str, String) {
    let window = spec.idle_window();
    match zero {
        Verdict::NeedsGateway => (
            ZERO_NEEDS_GATEWAY,
            format!(
                "{limited} recommended; held at 1: spec.minReplicas 0 needs the target's \
                 spec.strategy.canary.trafficRouting.gateway, which holds requests while it \
                 wakes (or a Prometheus metric to wake it)"
            ),
        ),
        Verdict::Active { unreadable: true } => (
            IDLE_WINDOW,
            format!(
                "{limited} recommended; held at 1: the gateway's metrics could not be read, so \
                 the target is not known to be idle"
            ),
        ),
        _ => (
            IDLE_WINDOW,
            format!(
                "{limited} recommended; held at 1 until the gateway has seen no request for \
                 spec.idleWindow ({window})"
            ),
        ),
    }
}

/// The idle window has passed: to zero at once (the window is the stabilization), with a
/// fresh memory for when the gateway wakes the target.
fn to_zero(
    mut out: Outcome,
    mut status: ScalingPolicyStatus,
    mut memory: Memory,
    current: i32,
    window: crate::api::duration::Duration,
    c: &impl Fn(&str, ConditionStatus, &str, String) -> Condition,
    now: Timestamp,
) -> Decision {
    let why = format!("no request through the gateway for {window}");
    memory.recommendations.clear();
    memory.demand.clear();
    out.able = Some(ready_for_new_scale(c));
    out.active = Some(c(
        SCALING_ACTIVE,
        ConditionStatus::True,
        IDLE_WINDOW,
        format!("{why}: the gateway wakes the target at the next request"),
    ));
    out.limited = Some(within_range(c));
    status.current_metrics.clear();
    status.cognitive_load = None;
    status.desired_replicas = Some(0);
    out.scale(status, memory, current, 0, &why, now)
}

fn ready_for_new_scale(c: &impl Fn(&str, ConditionStatus, &str, String) -> Condition) -> Condition {
    c(
        ABLE_TO_SCALE,
        ConditionStatus::True,
        "ReadyForNewScale",
        "the target can be scaled".into(),
    )
}

fn within_range(c: &impl Fn(&str, ConditionStatus, &str, String) -> Condition) -> Condition {
    c(
        SCALING_LIMITED,
        ConditionStatus::False,
        "DesiredWithinRange",
        "the desired count is within the acceptable range".into(),
    )
}

/// One direction's rules with Kasmina's defaults filled in.
struct Rules {
    window: Seconds,
    cooldown: Seconds,
    select: Select,
    rates: Vec<Rate>,
}

fn rules(spec: &ScalingPolicySpec, up: bool) -> Rules {
    let given: Option<&ScalingRules> = if up {
        spec.behavior.scale_up.as_ref()
    } else {
        spec.behavior.scale_down.as_ref()
    };
    let default = ScalingRules::default();
    let r = given.unwrap_or(&default);
    let rates = if r.policies.is_empty() {
        if up {
            default_up_rates()
        } else {
            hpa::default_down()
        }
    } else {
        r.policies
            .iter()
            .map(|p| {
                let period = Seconds::from(p.period_seconds);
                match p.type_ {
                    RatePolicyType::Pods => Rate::Pods {
                        value: p.value,
                        period,
                    },
                    RatePolicyType::Percent => Rate::Percent {
                        value: p.value,
                        period,
                    },
                }
            })
            .collect()
    };
    Rules {
        window: r.stabilization_window_seconds.map_or(
            if up {
                DEFAULT_UP_WINDOW
            } else {
                DEFAULT_DOWN_WINDOW
            },
            Seconds::from,
        ),
        cooldown: r.cooldown_seconds.map_or(
            if up {
                DEFAULT_UP_COOLDOWN
            } else {
                DEFAULT_DOWN_COOLDOWN
            },
            Seconds::from,
        ),
        select: match r.select_policy {
            Some(SelectPolicy::Min) => Select::Min,
            Some(SelectPolicy::Disabled) => Select::Disabled,
            Some(SelectPolicy::Max) | None => Select::Max,
        },
        rates,
    }
}

/// The smallest `spec.replicas` whose traffic-taking pods reach `pods` (with a canary, both
/// revisions count). Above `max`, the proportional figure, so min/max can report the limit.
fn replicas_for_pods(ed: &EdgeDeployment, current: i32, pods_now: i32, pods: f64, max: i32) -> i32 {
    if let Some(n) = (0..=max).find(|&n| f64::from(traffic_pods(ed, n)) >= pods) {
        return n;
    }
    let per_replica = if current > 0 && pods_now > 0 {
        f64::from(pods_now) / f64::from(current)
    } else {
        1.0
    };
    (pods / per_replica).ceil() as i32
}

/// Demand in `spec.replicas` units (unrounded), for the forecast.
fn demand_replicas(current: i32, pods_now: i32, pods: f64) -> f64 {
    if current > 0 && pods_now > 0 {
        pods * f64::from(current) / f64::from(pods_now)
    } else {
        pods
    }
}

fn describe(metric: &MetricSpec, value: f64, target: f64, cmp: &str) -> String {
    match metric.type_ {
        MetricType::CognitiveLoad => format!("cognitive load {value:.2} {cmp} {target:.2}"),
        MetricType::QueueDepth => format!("queue depth {value:.1} {cmp} {target:.1} per replica"),
        MetricType::Latency => format!(
            "p{} latency {value:.0} ms {cmp} {target:.0} ms",
            metric.percentile.unwrap_or(95.0)
        ),
        MetricType::Cpu => format!("CPU {value:.0}% {cmp} {target:.0}% of requests"),
        MetricType::Memory => format!("memory {value:.0}% {cmp} {target:.0}% of requests"),
        MetricType::Prometheus => format!("Prometheus query {value:.3} {cmp} {target} per replica"),
    }
}

/// Three decimals: enough for a person, and steady enough not to rewrite status on noise.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::edge_deployment::RolloutState;
    use crate::controller::edge_deployment::replicas::replicas_for;
    use hpa::PodSample;
    use serde_json::json;

    const T0: i64 = 1_800_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(T0 + s).unwrap()
    }

    fn policy(extra: serde_json::Value) -> ScalingPolicy {
        let mut spec = json!({
            "targetRef": {"kind": "EdgeDeployment", "name": "sentiment"},
            "minReplicas": 1, "maxReplicas": 20,
            "metrics": [{"type": "CognitiveLoad", "target": 0.7}],
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let mut sp = ScalingPolicy::new("sentiment", serde_json::from_value(spec).unwrap());
        sp.metadata.namespace = Some("ml".into());
        sp.metadata.generation = Some(2);
        sp
    }

    fn target(replicas: i32) -> EdgeDeployment {
        let spec = serde_json::from_value(json!({
            "model": {"name": "minilm", "version": "1", "source": {"uri": "s3://m/"}, "architecture": "bert"},
            "replicas": replicas,
        }))
        .unwrap();
        EdgeDeployment::new("sentiment", spec)
    }

    /// Every pod at `load`, `pods` of them.
    fn load(pods: usize, load: f64) -> Vec<Reading> {
        vec![Reading::PerPod {
            samples: vec![PodSample::Ready(load); pods],
            target: 0.7,
        }]
    }

    /// A policy, its target and the memory, stepped through time as the reconciler would.
    struct Loop {
        policy: ScalingPolicy,
        ed: EdgeDeployment,
        memory: Memory,
    }

    impl Loop {
        fn new(policy: ScalingPolicy, replicas: i32) -> Self {
            Self {
                policy,
                ed: target(replicas),
                memory: Memory::default(),
            }
        }

        fn step(&mut self, t: i64, readings: &[Reading]) -> Decision {
            let d = decide(&self.policy, Some(&self.ed), readings, &self.memory, at(t));
            self.policy.status = Some(d.status.clone());
            self.memory = d.memory.clone();
            if let Some(n) = d.scale {
                self.ed.spec.replicas = n;
            }
            d
        }

        /// All pods at a load such that the total demand is `demand` replicas' worth.
        fn demand(&mut self, t: i64, demand: f64) -> Decision {
            let n = self.ed.spec.replicas as usize;
            let per = demand * 0.7 / n as f64;
            self.step(t, &load(n, per))
        }

        fn condition(&self, type_: &str) -> (ConditionStatus, String) {
            let c =
                condition::find(&self.policy.status.as_ref().unwrap().conditions, type_).unwrap();
            (c.status, c.reason.clone())
        }
    }

    #[test]
    fn tolerance_band_then_a_readable_scale_up() {
        let mut l = Loop::new(policy(json!({})), 4);
        // 0.75 / 0.70 = 1.07: inside the 10 % band.
        let d = l.step(0, &load(4, 0.75));
        assert_eq!(d.scale, None);
        assert_eq!(d.status.desired_replicas, Some(4));
        assert_eq!(
            l.condition(SCALING_ACTIVE),
            (ConditionStatus::True, "ValidMetricFound".into())
        );
        let d = l.step(5, &load(4, 0.93));
        assert_eq!(d.scale, Some(6));
        let h = &d.status.history[0];
        assert_eq!(h.reason, "cognitive load 0.93 > 0.70: 4 → 6");
        assert_eq!((h.from, h.to), (4, 6));
        assert_eq!(d.status.last_scale_time, Some(Time(at(5))));
        assert_eq!(d.status.cognitive_load, Some(0.93));
        assert_eq!(d.status.current_metrics[0].proposed_replicas, Some(6));
        assert_eq!(d.notices.len(), 1);
        assert_eq!(d.notices[0].reason, "SuccessfulRescale");
    }

    #[test]
    fn the_largest_proposal_wins() {
        let p = policy(json!({"metrics": [
            {"type": "CognitiveLoad", "target": 0.7},
            {"type": "QueueDepth", "targetPerReplica": 4},
        ]}));
        let mut l = Loop::new(p, 4);
        let readings = vec![
            load(4, 0.9).remove(0), // 6
            Reading::PerPod {
                samples: vec![PodSample::Ready(8.0); 4],
                target: 4.0,
            }, // 8
        ];
        let d = l.step(0, &readings);
        assert_eq!(d.scale, Some(8));
        assert!(
            d.status.history[0]
                .reason
                .starts_with("queue depth 8.0 > 4.0 per replica"),
            "{}",
            d.status.history[0].reason
        );
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        // Kasmina's default window is 60 s.
        let mut l = Loop::new(policy(json!({})), 10);
        l.demand(0, 10.0);
        assert_eq!(l.demand(55, 3.0).scale, None);
        assert_eq!(l.demand(60, 3.0).scale, Some(3));
        // HPA's 300 s, declared.
        let hpa = json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}});
        let mut l = Loop::new(policy(hpa), 10);
        l.demand(0, 10.0);
        // Load drops to 3 replicas' worth: held by the 300 s window of recommendations.
        for t in (5..300).step_by(5) {
            let d = l.demand(t, 3.0);
            assert_eq!(d.scale, None, "t={t}");
        }
        assert_eq!(
            l.condition(ABLE_TO_SCALE),
            (ConditionStatus::True, "ScaleDownStabilized".into())
        );
        let d = l.demand(300, 3.0);
        assert_eq!(d.scale, Some(3), "the 10 left the window");
        assert!(d.status.history[0].reason.contains("< 0.70: 10 → 3"));
    }

    #[test]
    fn rate_policies_limit_a_surge() {
        // Kasmina's default goes to the measured demand in one step (up to 10×).
        let mut l = Loop::new(policy(json!({})), 2);
        assert_eq!(l.step(0, &load(2, 7.0)).scale, Some(20));
        // HPA's default behavior, declared: max(+4 pods, +100 %) per 15 s.
        let hpa = json!({"behavior": {"scaleUp": {"cooldownSeconds": 15, "policies": [
            {"type": "Pods", "value": 4, "periodSeconds": 15},
            {"type": "Percent", "value": 100, "periodSeconds": 15}]}}});
        let mut l = Loop::new(policy(hpa), 2);
        let d = l.step(0, &load(2, 7.0));
        assert_eq!(d.scale, Some(6));
        assert_eq!(
            l.condition(SCALING_LIMITED),
            (ConditionStatus::True, "ScaleUpLimit".into())
        );
        assert!(d.status.history[0].reason.ends_with("rate-limited: 2 → 6"));
        // Within the cooldown nothing moves; then the next period's limit: 12.
        let d = l.step(10, &load(6, 3.0));
        assert_eq!(d.scale, None);
        assert_eq!(
            l.condition(ABLE_TO_SCALE),
            (ConditionStatus::False, "BackoffUp".into())
        );
        let d = l.step(15, &load(6, 3.0));
        assert_eq!(d.scale, Some(12));
        // A declared policy: at most 1 pod per 60 s.
        let p = policy(
            json!({"behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}], "cooldownSeconds": 0}}}),
        );
        let mut l = Loop::new(p, 2);
        assert_eq!(l.step(0, &load(2, 7.0)).scale, Some(3));
        assert_eq!(l.step(30, &load(3, 7.0)).scale, None);
        assert_eq!(l.step(61, &load(3, 7.0)).scale, Some(4));
    }

    #[test]
    fn min_and_max_bound_the_result() {
        let mut l = Loop::new(
            policy(
                json!({"maxReplicas": 5, "behavior": {"scaleUp": {"policies": [{"type": "Percent", "value": 900, "periodSeconds": 15}]}}}),
            ),
            2,
        );
        assert_eq!(l.step(0, &load(2, 7.0)).scale, Some(5));
        assert_eq!(
            l.condition(SCALING_LIMITED),
            (ConditionStatus::True, "TooManyReplicas".into())
        );
        let p = policy(
            json!({"minReplicas": 3, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}),
        );
        let mut l = Loop::new(p, 6);
        assert_eq!(l.step(0, &load(6, 0.05)).scale, Some(3));
        assert_eq!(
            l.condition(SCALING_LIMITED),
            (ConditionStatus::True, "TooFewReplicas".into())
        );
    }

    #[test]
    fn missing_pods_and_failed_metrics_are_handled_as_hpa_does() {
        let p = policy(json!({"metrics": [
            {"type": "CognitiveLoad", "target": 0.7},
            {"type": "QueueDepth", "targetPerReplica": 4},
        ], "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}));
        let mut l = Loop::new(p, 4);
        // Load says 1 replica, but the queue depth cannot be read: no scale-down.
        let readings = vec![
            load(4, 0.1).remove(0),
            Reading::Failed("the runtime pods do not export kasmina_queue_depth".into()),
        ];
        let d = l.step(0, &readings);
        assert_eq!(d.scale, None);
        let active = condition::find(&d.status.conditions, SCALING_ACTIVE).unwrap();
        assert_eq!(active.reason, "SomeMetricsFailed");
        assert!(
            active.message.contains(
                "spec.metrics[1] (QueueDepth): the runtime pods do not export kasmina_queue_depth"
            ),
            "{}",
            active.message
        );
        // Scaling up still works with one metric.
        let readings = vec![load(4, 1.4).remove(0), Reading::Failed("timeout".into())];
        assert_eq!(l.step(5, &readings).scale, Some(8));
        // An unreachable pod counts as 0 when scaling up: (1.4 × 3 + 0) / 4 / 0.7 = 1.5 → 6.
        let mut l = Loop::new(policy(json!({})), 4);
        let samples = [
            PodSample::Ready(1.4),
            PodSample::Ready(1.4),
            PodSample::Ready(1.4),
            PodSample::Missing,
        ];
        let d = l.step(
            0,
            &[Reading::PerPod {
                samples: samples.to_vec(),
                target: 0.7,
            }],
        );
        assert_eq!(d.scale, Some(6));
    }

    #[test]
    fn failing_collections_hold_then_fall_back() {
        let p = policy(json!({"fallback": {"failureThreshold": 3, "replicas": 2}}));
        let mut l = Loop::new(p, 6);
        let failed = [Reading::Failed(
            "no pod could be scraped: connection refused".into(),
        )];
        for t in [0, 5] {
            let d = l.step(t, &failed);
            assert_eq!(d.scale, None, "replicas are left where they were");
            assert_eq!(
                l.condition(SCALING_ACTIVE),
                (ConditionStatus::False, "FailedGetMetrics".into())
            );
        }
        let d = l.step(10, &failed);
        assert_eq!(d.scale, Some(2));
        assert_eq!(
            l.condition(SCALING_ACTIVE),
            (ConditionStatus::False, "Fallback".into())
        );
        assert!(
            d.status.history[0]
                .reason
                .starts_with("fallback after 3 failed collections")
        );
        // Held there, without a new history entry, until metrics come back.
        assert_eq!(l.step(15, &failed).scale, None);
        assert_eq!(l.memory.failures, 4);
        l.step(20, &load(2, 0.7));
        assert_eq!(l.memory.failures, 0);
        assert_eq!(
            l.condition(SCALING_ACTIVE),
            (ConditionStatus::True, "ValidMetricFound".into())
        );
    }

    #[test]
    fn the_forecast_raises_ahead_of_a_ramp_and_never_lowers() {
        let ramp = |predictive: bool| {
            let extra = if predictive {
                json!({"predictive": {"enabled": true, "horizonSeconds": 30}})
            } else {
                json!({})
            };
            let mut extra = extra;
            extra["behavior"] = json!({"scaleDown": {"selectPolicy": "Disabled"}});
            let mut l = Loop::new(policy(extra), 10);
            // Demand grows by 0.1 replica per second from 8, below the 10 replicas running.
            let mut first_up = None;
            for t in (0..60).step_by(5) {
                let d = l.demand(t, 8.0 + 0.1 * t as f64);
                if d.scale.is_some() && first_up.is_none() {
                    first_up = Some((t, d.status.history[0].reason.clone()));
                }
            }
            first_up
        };
        let (reactive_at, _) = ramp(false).unwrap();
        let (predicted_at, reason) = ramp(true).unwrap();
        assert!(
            predicted_at < reactive_at,
            "{predicted_at} vs {reactive_at}"
        );
        assert!(reason.starts_with("forecast:"), "{reason}");

        // A falling trend forecasts less than now: the reactive decision stands (held by the
        // scale-down window, as without a forecast).
        let p = policy(json!({"predictive": {"enabled": true, "horizonSeconds": 60}}));
        let mut l = Loop::new(p, 10);
        for t in (0..60).step_by(5) {
            let d = l.demand(t, 10.0 - 0.1 * t as f64);
            assert_eq!(d.scale, None, "t={t}");
        }
    }

    #[test]
    fn a_running_canary_scales_with_its_weight() {
        let mut ed = target(4);
        ed.spec.strategy = serde_json::from_value(json!({"type": "Canary",
            "canary": {"steps": [{"setWeight": 25}], "trafficRouting": {"gatewayAPI": {"httpRoute": "sentiment"}}}}))
        .unwrap();
        let rollout = RolloutState {
            stable: Some("aaaa".into()),
            candidate: Some("bbbb".into()),
            weight: 25,
            ..RolloutState::default()
        };
        ed.status = Some(crate::api::EdgeDeploymentStatus {
            rollout: Some(rollout.clone()),
            ..Default::default()
        });
        // 4 stable + 1 canary pods, all at 1.4: 10 pods' worth of work.
        let mut l = Loop {
            policy: policy(json!({})),
            ed,
            memory: Memory::default(),
        };
        let d = l.step(0, &load(5, 1.4));
        assert_eq!(d.scale, Some(8), "8 stable + 2 canary = 10 pods");
        let state = |r: &RolloutState| crate::controller::edge_deployment::rollout::State {
            stable: r.stable.clone(),
            candidate: r.candidate.clone(),
            weight: r.weight,
            ..Default::default()
        };
        let s = state(&rollout);
        assert_eq!(
            (
                replicas_for(&l.ed, &s, "aaaa"),
                replicas_for(&l.ed, &s, "bbbb")
            ),
            (8, 2)
        );

        // With replica-ratio traffic the pods are the replicas: 4 pods at 1.4 → 8, split 6:2.
        let mut ed = target(4);
        ed.spec.strategy = serde_json::from_value(
            json!({"type": "Canary", "canary": {"steps": [{"setWeight": 25}]}}),
        )
        .unwrap();
        ed.status = Some(crate::api::EdgeDeploymentStatus {
            rollout: Some(rollout),
            ..Default::default()
        });
        let mut l = Loop {
            policy: policy(json!({})),
            ed,
            memory: Memory::default(),
        };
        assert_eq!(l.step(0, &load(4, 1.4)).scale, Some(8));
        assert_eq!(
            (
                replicas_for(&l.ed, &s, "aaaa"),
                replicas_for(&l.ed, &s, "bbbb")
            ),
            (6, 2)
        );
    }

    #[test]
    fn missing_target_is_reported_once_and_nothing_moves() {
        let mut sp = policy(json!({}));
        let d = decide(&sp, None, &[], &Memory::default(), at(0));
        assert_eq!(d.scale, None);
        let c = condition::find(&d.status.conditions, ABLE_TO_SCALE).unwrap();
        assert_eq!(c.reason, "TargetNotFound");
        assert!(
            c.message.contains("\"sentiment\"") && c.message.contains("\"ml\""),
            "{}",
            c.message
        );
        assert_eq!(
            d.notices.len(),
            1,
            "one Warning for both conditions' reason"
        );
        sp.status = Some(d.status);
        assert!(
            decide(&sp, None, &[], &Memory::default(), at(5))
                .notices
                .is_empty()
        );
    }

    #[test]
    fn min_above_max_is_invalid_and_nothing_moves() {
        let sp = policy(json!({"minReplicas": 6, "maxReplicas": 5}));
        let d = decide(
            &sp,
            Some(&target(3)),
            &load(3, 3.0),
            &Memory::default(),
            at(0),
        );
        assert_eq!(d.scale, None);
        let c = condition::find(&d.status.conditions, ABLE_TO_SCALE).unwrap();
        assert_eq!(c.reason, "InvalidSpec");
        assert!(
            c.message
                .contains("spec.minReplicas: 6 is greater than spec.maxReplicas 5"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_target_at_zero_is_left_alone_unless_an_external_metric_wakes_it() {
        let d = decide(
            &policy(json!({"minReplicas": 0})),
            Some(&target(0)),
            &[],
            &Memory::default(),
            at(0),
        );
        assert_eq!(d.scale, None);
        let c = condition::find(&d.status.conditions, SCALING_ACTIVE).unwrap();
        assert_eq!(c.reason, "ScalingDisabled");
        let p = policy(
            json!({"minReplicas": 0, "metrics": [{"type": "Prometheus", "query": "sum(rate(x[1m]))", "serverAddress": "http://prom:9090", "target": 10}]}),
        );
        let d = decide(
            &p,
            Some(&target(0)),
            &[Reading::Total {
                value: 25.0,
                target: 10.0,
            }],
            &Memory::default(),
            at(0),
        );
        assert_eq!(d.scale, Some(3));
    }

    fn behind_the_gateway(mut ed: EdgeDeployment) -> EdgeDeployment {
        ed.spec.strategy = serde_json::from_value(json!({"type": "Canary",
            "canary": {"steps": [{"setWeight": 50}], "trafficRouting": {"gateway": {}}}}))
        .unwrap();
        ed
    }

    /// The gateway's traffic as the reconciler folds it in: `requests` answered so far.
    fn gateway_saw(l: &mut Loop, t: i64, requests: f64) {
        let mut snapshot = crate::controller::edge_deployment::analysis::Snapshot {
            requests,
            ..Default::default()
        };
        snapshot.gauges.inflight = Some(0.0);
        let pods = [crate::controller::edge_deployment::analysis::PodSnapshot {
            pod: "g1".into(),
            started: None,
            snapshot,
        }];
        l.memory.quiet = idle::observe(&l.memory.quiet, Some(&pods), T0 + t);
    }

    #[test]
    fn to_zero_only_after_the_gateways_idle_window_and_back_from_one_when_woken() {
        let p = policy(json!({"minReplicas": 0, "idleWindow": "30s", "scrapeInterval": "5s"}));
        let mut l = Loop::new(p, 1);
        l.ed = behind_the_gateway(l.ed.clone());
        // Requests until t = 20, each interval; the load itself is idle throughout.
        for t in (0..=20).step_by(5) {
            gateway_saw(&mut l, t, t as f64);
            l.step(t, &load(l.ed.spec.replicas as usize, 0.0));
        }
        assert_eq!(l.ed.spec.replicas, 1, "an idle load holds one, not zero");
        let limited = condition::find(
            &l.policy.status.as_ref().unwrap().conditions,
            SCALING_LIMITED,
        )
        .unwrap();
        assert_eq!(limited.reason, IDLE_WINDOW);
        assert!(
            limited.message.contains("spec.idleWindow (30s)"),
            "{}",
            limited.message
        );
        // No request after t = 20: at zero when the window has passed, not before.
        for t in (25..50).step_by(5) {
            gateway_saw(&mut l, t, 20.0);
            let d = l.step(t, &load(1, 0.0));
            assert_eq!(d.scale, None, "t = {t}");
        }
        gateway_saw(&mut l, 50, 20.0);
        let d = l.step(50, &load(1, 0.0));
        assert_eq!(d.scale, Some(0));
        assert_eq!(
            d.status.history[0].reason,
            "no request through the gateway for 30s: 1 → 0"
        );
        assert_eq!(
            l.condition(SCALING_ACTIVE),
            (ConditionStatus::True, IDLE_WINDOW.into())
        );

        // At zero the policy waits; the gateway wakes the target to one at t = 80.
        gateway_saw(&mut l, 55, 20.0);
        let d = l.step(55, &[]);
        assert_eq!(d.scale, None);
        l.ed.spec.replicas = 1;
        // The waking request is answered by t = 85: a new window from there.
        for t in (85..115).step_by(5) {
            gateway_saw(&mut l, t, 21.0);
            let d = l.step(t, &load(1, 0.0));
            assert_eq!(
                d.scale, None,
                "t = {t}: woken, not put back to zero at once"
            );
        }
        gateway_saw(&mut l, 115, 21.0);
        assert_eq!(l.step(115, &load(1, 0.0)).scale, Some(0));
    }

    #[test]
    fn min_zero_without_the_gateway_holds_one_and_warns_once() {
        let p = policy(json!({"minReplicas": 0}));
        let mut l = Loop::new(p, 1);
        let d = l.step(0, &load(1, 0.0));
        assert_eq!(d.scale, None);
        let limited = condition::find(&d.status.conditions, SCALING_LIMITED).unwrap();
        assert_eq!(limited.reason, ZERO_NEEDS_GATEWAY);
        assert!(
            limited.message.contains("trafficRouting.gateway"),
            "{}",
            limited.message
        );
        let warned = |d: &Decision| {
            d.notices
                .iter()
                .filter(|n| n.reason == ZERO_NEEDS_GATEWAY)
                .count()
        };
        assert_eq!(warned(&d), 1);
        for t in [200, 400] {
            let d = l.step(t, &load(1, 0.0));
            assert_eq!(d.scale, None);
            assert_eq!(warned(&d), 0, "one Warning, not one per interval");
        }
        assert_eq!(l.ed.spec.replicas, 1);

        // With a Prometheus metric to wake it, zero is the user's call, as with KEDA.
        let p = policy(json!({"minReplicas": 0, "metrics": [{"type": "Prometheus",
            "query": "sum(rate(x[1m]))", "serverAddress": "http://prom:9090", "target": 10}]}));
        let mut l = Loop::new(p, 1);
        let idle = [Reading::Total {
            value: 0.0,
            target: 10.0,
        }];
        assert_eq!(l.step(0, &idle).scale, Some(0));
    }

    #[test]
    fn an_unreadable_gateway_keeps_one_replica() {
        let p = policy(json!({"minReplicas": 0, "idleWindow": "30s"}));
        let mut l = Loop::new(p, 1);
        l.ed = behind_the_gateway(l.ed.clone());
        for t in (0..200).step_by(5) {
            l.memory.quiet = idle::observe(&l.memory.quiet, None, T0 + t);
            assert_eq!(l.step(t, &load(1, 0.0)).scale, None);
        }
        let limited = condition::find(
            &l.policy.status.as_ref().unwrap().conditions,
            SCALING_LIMITED,
        )
        .unwrap();
        assert!(
            limited.message.contains("could not be read"),
            "{}",
            limited.message
        );
    }

    #[test]
    fn an_idle_window_shorter_than_two_scrapes_is_refused() {
        let p = policy(json!({"minReplicas": 0, "idleWindow": "8s", "scrapeInterval": "5s"}));
        let errors = p.spec.validate().unwrap_err().to_string();
        assert!(errors.contains("spec.idleWindow"), "{errors}");
    }
}
