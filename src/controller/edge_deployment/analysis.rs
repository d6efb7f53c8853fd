//! Pure analysis of a revision over one interval: from two scrapes of its runtime pods, each
//! pod's counter deltas summed, the error rate, latency quantiles (as Prometheus'
//! `histogram_quantile` computes them from bucket deltas) and the cognitive load, and from
//! the gateway pods' scrapes the agreement of the candidate's answers with stable's; then the
//! spec's checks, absolute and relative to the stable revision, into a rollout measurement.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::edge_deployment::{
    AnalysisBaseline, AnalysisMetric, AnalysisSpec, AnalysisStatus, Bucket, Counters, MetricCheck,
    PodCounters,
};

use super::rollout::Measurement;

/// Counters of one pod (or, summed, of several) at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// `kasmina_requests_total`, all codes.
    pub requests: f64,
    /// `kasmina_requests_total` with a 5xx code.
    pub errors: f64,
    /// `kasmina_request_duration_seconds_bucket`: (upper bound in seconds, cumulative count),
    /// ascending, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
    /// `kasmina_cognitive_load`, averaged over the pods.
    pub load: f64,
    /// The runtime's gauges as one pod exported them (the autoscaler reads these per pod;
    /// None when the pod does not export the metric).
    pub gauges: Gauges,
    /// A gateway's `kasmina_gateway_output_agreement` sum and count for the candidate.
    pub agreement_sum: f64,
    pub agreement_count: f64,
    /// A gateway's requests held while a revision wakes (`kasmina_gateway_held_requests`).
    pub held: f64,
}

/// The load gauges of DESIGN §4, as one pod exported them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Gauges {
    pub inflight: Option<f64>,
    pub queue: Option<f64>,
    pub capacity: Option<f64>,
    pub load: Option<f64>,
}

/// One runtime pod's scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSnapshot {
    pub pod: String,
    /// The pod's `status.startTime`: a pod absent from the interval's baseline counts from zero
    /// only if it started after it.
    pub started: Option<Timestamp>,
    pub snapshot: Snapshot,
}

/// Pods kept in a baseline per revision (the schema's bound); a pod past it is left out of the
/// next interval, as a pod that did not answer is.
pub const MAX_BASELINE_PODS: usize = 64;
/// Gateway pods kept in a baseline (the schema's bound: the gateway runs at most 16 replicas).
pub const MAX_BASELINE_GATEWAYS: usize = 16;

/// What one interval measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub requests: f64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub load: f64,
    /// Mean agreement of the answers compared in the interval; None: none was.
    pub agreement: Option<f64>,
}

impl Window {
    /// The metric's value; None when the interval did not measure it.
    pub fn value(&self, metric: AnalysisMetric) -> Option<f64> {
        match metric {
            AnalysisMetric::ErrorRate => Some(self.error_rate),
            AnalysisMetric::LatencyP50Ms => Some(self.p50_ms),
            AnalysisMetric::LatencyP95Ms => Some(self.p95_ms),
            AnalysisMetric::LatencyP99Ms => Some(self.p99_ms),
            AnalysisMetric::CognitiveLoad => Some(self.load),
            AnalysisMetric::OutputAgreement => self.agreement,
        }
    }
}

/// One analysis step's scrapes, each None when no pod answered.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scrapes<'a> {
    pub candidate: Option<&'a [PodSnapshot]>,
    pub stable: Option<&'a [PodSnapshot]>,
    /// The gateway pods (their agreement counters for the candidate).
    pub gateways: Option<&'a [PodSnapshot]>,
}

/// The interval between two snapshots; None without requests in it (nothing to judge).
/// A counter that went down (a pod restarted) counts from zero, as Prometheus' `rate` does.
pub fn window(before: &Snapshot, after: &Snapshot) -> Option<Window> {
    window_of(&delta(before, after), after.load)
}

/// The interval since `baseline` (read at `since`) of a revision's pods: each pod's counters
/// are differenced against its own baseline and the differences summed. A pod absent from the
/// baseline counts from zero if it started since, and is left out otherwise (its baseline was
/// not read: judging its lifetime totals as one interval would be wrong); a pod absent now
/// (scaled away, not answering) is simply not in the sum. The load is the answering pods' mean.
pub fn interval(
    baseline: &[PodCounters],
    since: Timestamp,
    after: &[PodSnapshot],
) -> Option<Window> {
    let mut total = Snapshot::default();
    let mut counted = false;
    for p in after {
        let Some(before) = before_of(baseline, since, p) else {
            continue;
        };
        let d = delta(&before, &p.snapshot);
        total.requests += d.requests;
        total.errors += d.errors;
        for (le, count) in d.buckets {
            add_bucket(&mut total.buckets, le, count);
        }
        counted = true;
    }
    if !counted {
        return None;
    }
    let load = after.iter().map(|p| p.snapshot.load).sum::<f64>() / after.len() as f64;
    window_of(&total, load)
}

/// What `p` counted at the baseline: its own counters there, zero if it started since, None
/// if it ran then but is not in the baseline (its lifetime totals are not one interval).
fn before_of(baseline: &[PodCounters], since: Timestamp, p: &PodSnapshot) -> Option<Snapshot> {
    match baseline.iter().find(|b| b.pod == p.pod) {
        Some(b) => Some(Snapshot::from_counters(&b.counters)),
        None if p.started.is_some_and(|at| at >= since) => Some(Snapshot::default()),
        None => None,
    }
}

/// Adds `count` to the bucket with bound `le`, keeping the buckets ascending by bound.
pub fn add_bucket(buckets: &mut Vec<(f64, f64)>, le: f64, count: f64) {
    match buckets.binary_search_by(|(l, _)| l.total_cmp(&le)) {
        Ok(i) => buckets[i].1 += count,
        Err(i) => buckets.insert(i, (le, count)),
    }
}

/// The mean agreement over the interval since `baseline` of the gateway pods' comparisons,
/// each pod differenced against its own baseline as `interval` does; None without any.
pub fn agreement(baseline: &[PodCounters], since: Timestamp, after: &[PodSnapshot]) -> Option<f64> {
    let (mut sum, mut count) = (0.0, 0.0);
    for p in after {
        let Some(before) = before_of(baseline, since, p) else {
            continue;
        };
        let now = &p.snapshot;
        // A count that went down restarted: all of it is new (sum and count reset together).
        if now.agreement_count < before.agreement_count {
            sum += now.agreement_sum;
            count += now.agreement_count;
        } else {
            sum += now.agreement_sum - before.agreement_sum;
            count += now.agreement_count - before.agreement_count;
        }
    }
    (count > 0.0).then(|| (sum / count).clamp(0.0, 1.0))
}

/// What one pod served between two of its scrapes.
fn delta(before: &Snapshot, after: &Snapshot) -> Snapshot {
    // A counter that went down restarted: all of it is new.
    let reset = after.requests < before.requests;
    let d = |a: f64, b: f64| if reset || b < a { b } else { b - a };
    Snapshot {
        requests: d(before.requests, after.requests),
        errors: d(before.errors, after.errors),
        buckets: after
            .buckets
            .iter()
            .map(|&(le, count)| {
                let prior = before
                    .buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, c)| *c);
                (le, d(prior, count))
            })
            .collect(),
        ..Snapshot::default()
    }
}

fn window_of(delta: &Snapshot, load: f64) -> Option<Window> {
    let requests = delta.requests;
    if requests <= 0.0 {
        return None;
    }
    let errors = delta.errors.min(requests);
    let q = |p| quantile(p, &delta.buckets) * 1e3;
    Some(Window {
        requests,
        error_rate: errors / requests,
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        load,
        agreement: None,
    })
}

/// `histogram_quantile`: linear interpolation inside the bucket holding the rank; a rank in
/// the `+Inf` bucket answers the largest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let (lo_bound, lo_count) = lower;
            let inside = count - lo_count;
            if inside <= 0.0 {
                return le;
            }
            return lo_bound + (le - lo_bound) * (rank - lo_count) / inside;
        }
        lower = (le, count);
    }
    lower.0
}

/// Judges the candidate's window against the checks (and the stable revision's window for
/// relative limits). Without candidate traffic the interval is inconclusive, and so it is when
/// a check's metric was not measured (no answers compared) and no other check failed; a
/// relative check without stable traffic is skipped (its absolute limit, if any, still applies).
pub fn judge(
    checks: &[MetricCheck],
    candidate: Option<&Window>,
    stable: Option<&Window>,
) -> Measurement {
    let Some(c) = candidate else {
        return Measurement::Inconclusive;
    };
    let mut failures = vec![];
    let mut unmeasured = false;
    for check in checks {
        let Some(value) = c.value(check.metric) else {
            unmeasured = true;
            continue;
        };
        // The check as the spec names it, so the reason points at what to change.
        let name = metric_key(check.metric);
        if let Some(max) = check.max
            && value > max
        {
            failures.push(format!("{name} {} > max {}", fmt(value), fmt(max)));
        }
        if let Some(min) = check.min
            && value < min
        {
            failures.push(format!("{name} {} < min {}", fmt(value), fmt(min)));
        }
        if let (Some(factor), Some(base)) = (
            check.max_relative_to_stable,
            stable.and_then(|s| s.value(check.metric)),
        ) {
            // A zero baseline (no errors on stable) would make any candidate error fail; the
            // absolute limit is the right tool there.
            if base > 0.0 && value > base * factor {
                failures.push(format!(
                    "{name} {} > maxRelativeToStable {factor} × stable {}",
                    fmt(value),
                    fmt(base)
                ));
            }
        }
    }
    if !failures.is_empty() {
        Measurement::Fail(failures.join("; "))
    } else if unmeasured {
        Measurement::Inconclusive
    } else {
        Measurement::Pass
    }
}

impl Snapshot {
    /// The counters kept in status as the next interval's baseline.
    pub fn counters(&self) -> Counters {
        Counters {
            requests: self.requests,
            errors: self.errors,
            buckets: self
                .buckets
                .iter()
                .map(|&(le, count)| Bucket {
                    le: if le.is_infinite() {
                        "+Inf".into()
                    } else {
                        le.to_string()
                    },
                    count,
                })
                .collect(),
            agreement_sum: self.agreement_sum,
            agreement_count: self.agreement_count,
        }
    }

    pub fn from_counters(c: &Counters) -> Self {
        Self {
            requests: c.requests,
            errors: c.errors,
            buckets: c
                .buckets
                .iter()
                .filter_map(|b| {
                    let le = if b.le == "+Inf" {
                        f64::INFINITY
                    } else {
                        b.le.parse().ok()?
                    };
                    Some((le, b.count))
                })
                .collect(),
            agreement_sum: c.agreement_sum,
            agreement_count: c.agreement_count,
            ..Self::default()
        }
    }
}

fn counters_of(pods: &[PodSnapshot]) -> Vec<PodCounters> {
    pods.iter()
        .take(MAX_BASELINE_PODS)
        .map(|p| PodCounters {
            pod: p.pod.clone(),
            counters: p.snapshot.counters(),
        })
        .collect()
}

/// Whether the checks judge the candidate's answers (so the gateway pods are scraped too).
pub fn compares_outputs(spec: &AnalysisSpec) -> bool {
    spec.checks
        .iter()
        .any(|c| c.metric == AnalysisMetric::OutputAgreement)
}

/// Whether the candidate is due a scrape: no baseline for it yet, or an interval has passed.
pub fn due(
    spec: Option<&AnalysisSpec>,
    prior: Option<&AnalysisStatus>,
    candidate: &str,
    now: Timestamp,
) -> bool {
    let Some(spec) = spec else { return false };
    match prior
        .filter(|p| p.revision == candidate)
        .and_then(|p| p.baseline.as_ref())
    {
        None => true,
        Some(b) => now.as_second() >= b.at.0.as_second() + spec.interval.as_std().as_secs() as i64,
    }
}

/// Seconds until the candidate's next measurement.
pub fn next_in(spec: &AnalysisSpec, prior: Option<&AnalysisStatus>, now: Timestamp) -> i64 {
    let interval = spec.interval.as_std().as_secs() as i64;
    prior
        .and_then(|p| p.baseline.as_ref())
        .map_or(interval, |b| {
            (b.at.0.as_second() + interval - now.as_second()).clamp(1, interval)
        })
}

/// One analysis step: with a baseline for `candidate`, judges the interval since it and starts
/// the next one; without, only records the baseline (no measurement).
pub fn measure(
    spec: &AnalysisSpec,
    candidate_rev: &str,
    prior: Option<&AnalysisStatus>,
    scrapes: Scrapes<'_>,
    now: Timestamp,
) -> (Option<Measurement>, AnalysisStatus) {
    let Scrapes {
        candidate,
        stable,
        gateways,
    } = scrapes;
    let mut status = prior
        .filter(|p| p.revision == candidate_rev)
        .cloned()
        .unwrap_or_else(|| AnalysisStatus {
            revision: candidate_rev.to_owned(),
            ..AnalysisStatus::default()
        });
    // A baseline without pods (none answered, or written before baselines were per pod)
    // only starts the next interval.
    let baseline = status
        .baseline
        .take()
        .filter(|b| !b.candidate_pods.is_empty());
    status.baseline = candidate.map(|c| AnalysisBaseline {
        at: Time(now),
        candidate_pods: counters_of(c),
        stable_pods: stable.map(counters_of).unwrap_or_default(),
        gateway_pods: gateways
            .map(|g| {
                counters_of(g)
                    .into_iter()
                    .take(MAX_BASELINE_GATEWAYS)
                    .collect()
            })
            .unwrap_or_default(),
    });
    let Some(baseline) = baseline else {
        return (None, status);
    };
    let since = baseline.at.0;
    let windows = candidate.map(|c| {
        let mut cw = interval(&baseline.candidate_pods, since, c);
        if let Some(w) = cw.as_mut() {
            w.agreement = gateways.and_then(|g| agreement(&baseline.gateway_pods, since, g));
        }
        let sw = stable.and_then(|s| interval(&baseline.stable_pods, since, s));
        (cw, sw)
    });
    let (cw, sw) = windows.unwrap_or((None, None));
    let measurement = judge(&spec.checks, cw.as_ref(), sw.as_ref());
    status.last_result = Some(
        match measurement {
            Measurement::Pass => "Passed",
            Measurement::Fail(_) => "Failed",
            Measurement::Inconclusive => "Inconclusive",
        }
        .into(),
    );
    status.message = match (&measurement, &cw) {
        (Measurement::Fail(why), _) => why.clone(),
        (Measurement::Inconclusive, Some(w)) => format!(
            "{:.0} requests, but no answers were compared (outputAgreement needs requests \
             through the gateway while a canary takes traffic)",
            w.requests
        ),
        (_, Some(w)) => format!("{:.0} requests, all checks within limits", w.requests),
        (_, None) if candidate.is_none() => "no runtime pod of the candidate answered".into(),
        (_, None) => "no requests to the candidate in the interval".into(),
    };
    if let Some(w) = &cw {
        status.values = spec
            .checks
            .iter()
            .filter_map(|c| Some((metric_key(c.metric).to_owned(), round(w.value(c.metric)?))))
            .collect();
    }
    (Some(measurement), status)
}

fn round(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

fn metric_key(m: AnalysisMetric) -> &'static str {
    match m {
        AnalysisMetric::ErrorRate => "errorRate",
        AnalysisMetric::LatencyP50Ms => "latencyP50Ms",
        AnalysisMetric::LatencyP95Ms => "latencyP95Ms",
        AnalysisMetric::LatencyP99Ms => "latencyP99Ms",
        AnalysisMetric::CognitiveLoad => "cognitiveLoad",
        AnalysisMetric::OutputAgreement => "outputAgreement",
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(requests: f64, errors: f64, buckets: &[(f64, f64)], load: f64) -> Snapshot {
        Snapshot {
            requests,
            errors,
            buckets: buckets.to_vec(),
            load,
            ..Snapshot::default()
        }
    }

    fn check(metric: AnalysisMetric, max: Option<f64>, rel: Option<f64>) -> MetricCheck {
        MetricCheck {
            metric,
            min: None,
            max,
            max_relative_to_stable: rel,
        }
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let b = [
            (0.01, 50.0),
            (0.02, 90.0),
            (0.04, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b) - 0.01).abs() < 1e-12);
        // Rank 70 lies halfway through the (0.01, 0.02] bucket.
        assert!((quantile(0.7, &b) - 0.015).abs() < 1e-12);
        assert!((quantile(0.99, &b) - 0.038).abs() < 1e-12);
        // In +Inf: the largest finite bound.
        let tail = [(0.01, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &tail), 0.01);
        assert_eq!(quantile(0.5, &[]), 0.0);
    }

    #[test]
    fn a_window_is_the_difference_of_two_scrapes() {
        let before = snap(
            100.0,
            1.0,
            &[(0.01, 90.0), (0.1, 100.0), (f64::INFINITY, 100.0)],
            0.2,
        );
        let after = snap(
            300.0,
            21.0,
            &[(0.01, 190.0), (0.1, 300.0), (f64::INFINITY, 300.0)],
            0.7,
        );
        let w = window(&before, &after).unwrap();
        assert_eq!(w.requests, 200.0);
        assert!((w.error_rate - 0.1).abs() < 1e-12);
        // 100 of 200 under 10 ms: the median is at the bucket edge.
        assert!((w.p50_ms - 10.0).abs() < 1e-9, "{}", w.p50_ms);
        assert_eq!(w.load, 0.7);
        assert_eq!(
            window(&after, &after),
            None,
            "no requests, nothing to judge"
        );
        // A restarted pod resets its counters: counted from zero.
        let restarted = snap(50.0, 0.0, &[(0.01, 50.0), (f64::INFINITY, 50.0)], 0.1);
        assert_eq!(window(&after, &restarted).unwrap().requests, 50.0);
    }

    fn pod(name: &str, started: i64, s: Snapshot) -> PodSnapshot {
        PodSnapshot {
            pod: name.into(),
            started: Some(Timestamp::from_second(started).unwrap()),
            snapshot: s,
        }
    }

    fn base(pods: &[PodSnapshot]) -> Vec<PodCounters> {
        counters_of(pods)
    }

    #[test]
    fn an_interval_sums_each_pods_own_deltas() {
        let buckets = |n: f64| [(0.01, n), (f64::INFINITY, n)];
        let at = 1_000;
        let since = Timestamp::from_second(at).unwrap();
        let a0 = pod("a", 0, snap(1000.0, 0.0, &buckets(1000.0), 0.2));
        let b0 = pod("b", 0, snap(5000.0, 0.0, &buckets(5000.0), 0.2));
        let baseline = base(&[a0.clone(), b0.clone()]);
        // b does not answer this scrape: a's 10 requests (1 failed) are the interval, and b's
        // lifetime is not mistaken for a reset of the sum.
        let a1 = pod("a", 0, snap(1010.0, 1.0, &buckets(1010.0), 0.4));
        let w = interval(&baseline, since, std::slice::from_ref(&a1)).unwrap();
        assert_eq!(w.requests, 10.0);
        assert!((w.error_rate - 0.1).abs() < 1e-12);
        // A sum over pods would have seen 1010 < 6000 and judged 1010 requests.
        let summed = window(
            &Snapshot {
                requests: 6000.0,
                ..Snapshot::default()
            },
            &a1.snapshot,
        )
        .unwrap();
        assert_eq!(summed.requests, 1010.0, "the defect per-pod deltas remove");
        // A pod that restarted counts from zero; one that started since the baseline too.
        let b1 = pod("b", 0, snap(20.0, 20.0, &buckets(20.0), 0.6));
        let c1 = pod("c", at + 5, snap(30.0, 0.0, &buckets(30.0), 0.2));
        let w = interval(&baseline, since, &[a1.clone(), b1, c1]).unwrap();
        assert_eq!(w.requests, 60.0);
        assert!((w.error_rate - 21.0 / 60.0).abs() < 1e-12);
        assert!((w.load - 0.4).abs() < 1e-12, "mean of the answering pods");
        // A pod that was running but missing from the baseline is left out this interval.
        let late = pod("d", 0, snap(9000.0, 9000.0, &buckets(9000.0), 1.0));
        let w = interval(&baseline, since, &[a1, late]).unwrap();
        assert_eq!((w.requests, w.error_rate), (10.0, 0.1));
        assert_eq!(interval(&baseline, since, &[]), None);
    }

    #[test]
    fn a_baseline_without_pods_only_starts_the_next_interval() {
        let spec: AnalysisSpec = serde_json::from_value(serde_json::json!({
            "interval": "1m", "checks": [{"metric": "errorRate", "max": 0.05}]}))
        .unwrap();
        let now = Timestamp::from_second(2_000).unwrap();
        // As written by a release with summed baselines: the pods are unknown.
        let old: AnalysisStatus = serde_json::from_value(serde_json::json!({
            "revision": "r1", "baseline": {"at": "1970-01-01T00:16:40Z",
            "candidate": {"requests": 0.0, "errors": 0.0, "buckets": []}}}))
        .unwrap();
        let sick = [pod("a", 0, snap(100.0, 100.0, &[], 0.1))];
        let scrapes = Scrapes {
            candidate: Some(&sick),
            ..Scrapes::default()
        };
        let (m, status) = measure(&spec, "r1", Some(&old), scrapes, now);
        assert_eq!(m, None, "lifetime totals are not judged");
        assert_eq!(status.baseline.unwrap().candidate_pods.len(), 1);
    }

    #[test]
    fn checks_fail_on_absolute_and_relative_limits() {
        let w = |err, p99| Window {
            requests: 100.0,
            error_rate: err,
            p50_ms: 5.0,
            p95_ms: 10.0,
            p99_ms: p99,
            load: 0.5,
            agreement: None,
        };
        let checks = vec![
            check(AnalysisMetric::ErrorRate, Some(0.05), None),
            check(AnalysisMetric::LatencyP99Ms, Some(200.0), Some(1.5)),
        ];
        assert_eq!(
            judge(&checks, Some(&w(0.01, 40.0)), Some(&w(0.0, 30.0))),
            Measurement::Pass
        );
        let Measurement::Fail(why) = judge(&checks, Some(&w(0.2, 50.0)), Some(&w(0.0, 30.0)))
        else {
            panic!("should fail")
        };
        assert!(why.contains("errorRate 0.200 > max 0.050"), "{why}");
        assert!(
            why.contains("latencyP99Ms 50 > maxRelativeToStable 1.5 × stable 30"),
            "{why}"
        );
        assert_eq!(judge(&checks, None, None), Measurement::Inconclusive);
        // No stable traffic: only the absolute limit applies.
        assert_eq!(judge(&checks, Some(&w(0.0, 90.0)), None), Measurement::Pass);
        let cognitive = [check(AnalysisMetric::CognitiveLoad, Some(0.4), None)];
        assert!(matches!(
            judge(&cognitive, Some(&w(0.0, 1.0)), None),
            Measurement::Fail(_)
        ));
    }

    fn gateway(name: &str, sum: f64, count: f64) -> PodSnapshot {
        pod(
            name,
            0,
            Snapshot {
                agreement_sum: sum,
                agreement_count: count,
                ..Snapshot::default()
            },
        )
    }

    #[test]
    fn agreement_is_the_mean_of_the_intervals_comparisons_over_gateway_pods() {
        let since = Timestamp::from_second(1_000).unwrap();
        let baseline = base(&[gateway("g1", 90.0, 100.0), gateway("g2", 9.5, 10.0)]);
        // g1 compared 10 more answers at 0.9; g2 compared none.
        let after = [gateway("g1", 99.0, 110.0), gateway("g2", 9.5, 10.0)];
        let got = agreement(&baseline, since, &after).unwrap();
        assert!((got - 0.9).abs() < 1e-12, "{got}");
        // g2 restarted and compared 4 answers at 1.0: counted from zero.
        let restarted = [gateway("g1", 99.0, 110.0), gateway("g2", 4.0, 4.0)];
        let got = agreement(&baseline, since, &restarted).unwrap();
        assert!((got - 13.0 / 14.0).abs() < 1e-12, "{got}");
        assert_eq!(
            agreement(&baseline, since, &after[1..]),
            None,
            "nothing new"
        );
        // A gateway that was running but missing from the baseline waits an interval.
        assert_eq!(agreement(&[], since, &after[..1]), None);
    }

    #[test]
    fn output_agreement_fails_under_min_and_is_inconclusive_unmeasured() {
        let w = |agreement| Window {
            requests: 100.0,
            error_rate: 0.0,
            p50_ms: 5.0,
            p95_ms: 10.0,
            p99_ms: 20.0,
            load: 0.5,
            agreement,
        };
        let checks = vec![
            check(AnalysisMetric::ErrorRate, Some(0.05), None),
            MetricCheck {
                min: Some(0.995),
                ..check(AnalysisMetric::OutputAgreement, None, None)
            },
        ];
        assert_eq!(
            judge(&checks, Some(&w(Some(0.999))), None),
            Measurement::Pass
        );
        let Measurement::Fail(why) = judge(&checks, Some(&w(Some(0.93))), None) else {
            panic!("a Q4_0-like agreement should fail")
        };
        assert_eq!(why, "outputAgreement 0.930 < min 0.995");
        // Nothing compared: not a pass, unless another check already failed.
        assert_eq!(
            judge(&checks, Some(&w(None)), None),
            Measurement::Inconclusive
        );
        let mut sick = w(None);
        sick.error_rate = 0.5;
        assert!(matches!(
            judge(&checks, Some(&sick), None),
            Measurement::Fail(_)
        ));
    }

    #[test]
    fn a_measurement_reads_the_gateways_agreement_for_the_candidate() {
        let spec: AnalysisSpec = serde_json::from_value(serde_json::json!({
            "interval": "10s", "checks": [{"metric": "outputAgreement", "min": 0.995}]}))
        .unwrap();
        let t = |s| Timestamp::from_second(s).unwrap();
        let buckets = |n: f64| [(0.01, n), (f64::INFINITY, n)];
        let canary = |n| [pod("c", 0, snap(n, 0.0, &buckets(n), 0.1))];
        let scrapes = |c: &'static [PodSnapshot], g: &'static [PodSnapshot]| Scrapes {
            candidate: Some(c),
            stable: None,
            gateways: Some(g),
        };
        let c0: &'static [PodSnapshot] = Box::leak(Box::new(canary(10.0)));
        let g0: &'static [PodSnapshot] = Box::leak(Box::new([gateway("g", 0.0, 0.0)]));
        let (m, status) = measure(&spec, "r2", None, scrapes(c0, g0), t(1_000));
        assert_eq!(m, None, "the first scrape is the baseline");
        let c1: &'static [PodSnapshot] = Box::leak(Box::new(canary(60.0)));
        let g1: &'static [PodSnapshot] = Box::leak(Box::new([gateway("g", 9.0, 10.0)]));
        let (m, status) = measure(&spec, "r2", Some(&status), scrapes(c1, g1), t(1_010));
        assert_eq!(
            m,
            Some(Measurement::Fail(
                "outputAgreement 0.900 < min 0.995".into()
            ))
        );
        assert_eq!(status.values.get("outputAgreement"), Some(&0.9));
        assert_eq!(status.baseline.as_ref().unwrap().gateway_pods.len(), 1);
        // No comparisons in the next interval: inconclusive, and said why.
        let c2: &'static [PodSnapshot] = Box::leak(Box::new(canary(90.0)));
        let (m, status) = measure(&spec, "r2", Some(&status), scrapes(c2, g1), t(1_020));
        assert_eq!(m, Some(Measurement::Inconclusive));
        assert!(
            status.message.contains("no answers were compared"),
            "{}",
            status.message
        );
    }
}
