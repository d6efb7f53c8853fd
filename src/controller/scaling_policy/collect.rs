//! What a ScalingPolicy measures each scrape interval. I/O: the runtime pods' `/metrics`
//! (scraped concurrently under a bound, each with a timeout), CPU and memory from
//! `metrics.k8s.io`, and Prometheus queries. Pure: each metric's reading as the decision
//! consumes it, with unready and unreachable pods marked as the HPA marks them.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;

use super::hpa::PodSample;
use crate::api::quantity::parse as quantity;
use crate::api::scaling_policy::{MetricSpec, MetricType};
use crate::controller::edge_deployment::analysis::{Snapshot, quantile};
use crate::controller::edge_deployment::names::REVISION_LABEL;
use crate::controller::edge_deployment::scrape;
use crate::telemetry::error_chain;

/// Errors of the collector's API and Prometheus reads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metrics.k8s.io is not served by this cluster (install metrics-server)")]
    ResourceMetricsUnavailable,
    #[error("reading metrics.k8s.io pods in {namespace}: {source}")]
    ResourceMetrics {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("Prometheus at {server}: {source}")]
    PrometheusHttp {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    // The answer's body is never repeated: status is readable by whoever may read the policy,
    // and the server is whatever the spec names.
    #[error("Prometheus at {server}: HTTP {status}")]
    PrometheusStatus { server: String, status: u16 },
    #[error("Prometheus at {server}: {source}")]
    PrometheusBody {
        server: String,
        #[source]
        source: crate::controller::http::ReadError,
    },
    #[error(
        "Prometheus at {server}: the host {host:?} is not one the operator may query (the chart's \
         value `prometheusHosts` lists them)"
    )]
    PrometheusHostNotAllowed { server: String, host: String },
    #[error("Prometheus at {server}: query {query:?}: {message}")]
    PrometheusResult {
        server: String,
        query: String,
        message: String,
    },
}

/// A traffic-taking pod of the target, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct PodTarget {
    pub name: String,
    /// The metrics URL of a ready pod; None while it is not ready (starting or draining).
    pub url: Option<String>,
    /// Summed container requests, for utilization: CPU in cores and memory in bytes.
    pub cpu_request: Option<f64>,
    pub memory_request: Option<f64>,
}

/// The pods of `revisions` that count for scaling: not terminating, not finished.
pub fn targets(pods: &[Pod], revisions: &[String], port: u16) -> Vec<PodTarget> {
    pods.iter()
        .filter(|p| {
            let revision = p.labels().get(REVISION_LABEL);
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            revision.is_some_and(|r| revisions.contains(r))
                && p.metadata.deletion_timestamp.is_none()
                && !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .map(|p| PodTarget {
            name: p.name_any(),
            url: scrape::endpoints(std::slice::from_ref(p), port)
                .into_iter()
                .next()
                .map(|e| e.url),
            cpu_request: request(p, "cpu"),
            memory_request: request(p, "memory"),
        })
        .collect()
}

fn request(pod: &Pod, resource: &str) -> Option<f64> {
    let containers = &pod.spec.as_ref()?.containers;
    let mut total = 0.0;
    for c in containers {
        let requests = c.resources.as_ref()?.requests.as_ref()?;
        total += quantity(&requests.get(resource)?.0)?;
    }
    (total > 0.0).then_some(total)
}

/// One pod's runtime metrics this interval.
#[derive(Clone, Debug, PartialEq)]
pub enum Scraped {
    Ok(Snapshot),
    /// Ready, but the scrape failed (the reason, for the condition).
    Failed(String),
    /// Not ready: not scraped, its value not trusted.
    Unready,
}

/// Scrapes every ready pod, at most `concurrency` at once, each bounded by `timeout`.
pub async fn scrape_pods(
    http: &reqwest::Client,
    pods: &[PodTarget],
    concurrency: usize,
    timeout: Duration,
) -> BTreeMap<String, Scraped> {
    // Owned items and a cloned client (an Arc) keep the futures free of borrowed lifetimes,
    // which the controller's `Send` bound needs.
    futures::stream::iter(pods.to_vec())
        .map(|pod| {
            let http = http.clone();
            async move {
                let scraped = match &pod.url {
                    None => Scraped::Unready,
                    Some(url) => {
                        match scrape::scrape(&http, url, timeout, &scrape::Reading::Runtime).await {
                            Ok(snapshot) => Scraped::Ok(snapshot),
                            Err(error) => Scraped::Failed(error_chain(&error)),
                        }
                    }
                };
                (pod.name, scraped)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// What `metrics.k8s.io` says a pod uses: CPU in cores, memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub cpu: f64,
    pub memory: f64,
}

/// CPU and memory of the pods matching `selector`, from the resource metrics API.
pub async fn resource_usage(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
) -> Result<BTreeMap<String, Usage>, Error> {
    let resource = ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: "PodMetrics".into(),
        plural: "pods".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let list = api
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| match source {
            kube::Error::Api(ref status) if status.code == 404 => Error::ResourceMetricsUnavailable,
            source => Error::ResourceMetrics {
                namespace: namespace.to_owned(),
                source,
            },
        })?;
    Ok(list
        .items
        .iter()
        .map(|m| (m.name_any(), pod_usage(&m.data)))
        .collect())
}

/// Sums the containers of one `PodMetrics` object.
pub fn pod_usage(data: &serde_json::Value) -> Usage {
    let mut usage = Usage::default();
    for c in data["containers"].as_array().into_iter().flatten() {
        let read = |r: &str| c["usage"][r].as_str().and_then(quantity).unwrap_or(0.0);
        usage.cpu += read("cpu");
        usage.memory += read("memory");
    }
    usage
}

#[derive(Deserialize)]
struct PromResponse {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<PromData>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum PromData {
    Vector(Vec<PromSample>),
    Scalar((f64, String)),
    // Told apart only to name them in the error.
    Matrix(#[allow(dead_code)] serde::de::IgnoredAny),
    String(#[allow(dead_code)] serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct PromSample {
    value: (f64, String),
}

/// One number from a PromQL instant query: a scalar, or a vector of exactly one series (as
/// KEDA's Prometheus scaler requires).
pub async fn prometheus(
    http: &reqwest::Client,
    server: &str,
    allowed_hosts: &[String],
    query: &str,
    timeout: Duration,
) -> Result<f64, Error> {
    let mut url = url::Url::parse(&format!("{}/api/v1/query", server.trim_end_matches('/')))
        .map_err(|e| Error::PrometheusResult {
            server: server.to_owned(),
            query: query.to_owned(),
            message: format!("bad serverAddress: {e}"),
        })?;
    let host = url.host_str().unwrap_or_default();
    if !crate::controller::http::host_allowed(host, allowed_hosts) {
        return Err(Error::PrometheusHostNotAllowed {
            server: server.to_owned(),
            host: host.to_owned(),
        });
    }
    url.query_pairs_mut().append_pair("query", query);
    let response = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|source| Error::PrometheusHttp {
            server: server.to_owned(),
            source: source.without_url(),
        })?;
    let status = response.status().as_u16();
    if status >= 300 && status != 400 && status != 422 {
        return Err(Error::PrometheusStatus {
            server: server.to_owned(),
            status,
        });
    }
    let body =
        crate::controller::http::read_bounded(response, crate::controller::http::MAX_BODY_BYTES)
            .await
            .map_err(|source| Error::PrometheusBody {
                server: server.to_owned(),
                source,
            })?;
    prometheus_value(&body).map_err(|message| Error::PrometheusResult {
        server: server.to_owned(),
        query: query.to_owned(),
        message,
    })
}

/// Pure: the number in a Prometheus HTTP API answer.
pub fn prometheus_value(body: &str) -> Result<f64, String> {
    let response: PromResponse = serde_json::from_str(body).map_err(|e| {
        // Where, not what: the answer's text is not repeated into status.
        format!(
            "not a Prometheus API answer (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    if response.status != "success" {
        return Err(response.error.unwrap_or_else(|| response.status.clone()));
    }
    let text = match response.data {
        Some(PromData::Scalar((_, v))) => v,
        Some(PromData::Vector(samples)) => match samples.as_slice() {
            [one] => one.value.1.clone(),
            [] => return Err("returned no series".into()),
            many => {
                return Err(format!(
                    "returned {} series; aggregate it to one (e.g. sum(...))",
                    many.len()
                ));
            }
        },
        Some(PromData::Matrix(_) | PromData::String(_)) | None => {
            return Err("did not return a scalar or an instant vector".into());
        }
    };
    let value: f64 = text
        .parse()
        .map_err(|_| format!("returned {text:?}, not a number"))?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(format!("returned {text}"))
    }
}

/// Everything collected for one policy in one interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Collected {
    /// Every traffic-taking pod, with its scrape.
    pub pods: BTreeMap<String, (PodTarget, Scraped)>,
    /// Resource metrics, when a Cpu or Memory metric asked for them.
    pub usage: Option<Result<BTreeMap<String, Usage>, String>>,
    /// Each Prometheus metric's value, by index in `spec.metrics`.
    pub external: BTreeMap<usize, Result<f64, String>>,
}

/// One metric's reading, as the decision consumes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// Per-pod values against a per-pod target (HPA's Pods and Resource metrics).
    PerPod {
        samples: Vec<PodSample>,
        target: f64,
    },
    /// One value for the whole target whose ratio to the target scales the ready pods
    /// (latency).
    Ratio { value: f64, target: f64, ready: i32 },
    /// A total against a per-replica target (KEDA's AverageValue): `ceil(value / target)`.
    Total { value: f64, target: f64 },
    /// Nothing to measure this interval: latency with no request since the last scrape.
    Idle(String),
    /// Could not be measured; the message says why.
    Failed(String),
}

impl Reading {
    /// The value shown in status: the mean over ready pods, or the single value.
    pub fn value(&self) -> Option<f64> {
        match self {
            Reading::PerPod { samples, .. } => {
                let ready: Vec<f64> = samples.iter().filter_map(PodSample::ready).collect();
                (!ready.is_empty()).then(|| ready.iter().sum::<f64>() / ready.len() as f64)
            }
            Reading::Ratio { value, .. } | Reading::Total { value, .. } => Some(*value),
            Reading::Idle(_) | Reading::Failed(_) => None,
        }
    }

    pub fn target(&self) -> Option<f64> {
        match self {
            Reading::PerPod { target, .. }
            | Reading::Ratio { target, .. }
            | Reading::Total { target, .. } => Some(*target),
            _ => None,
        }
    }
}

/// Each pod's scrape at the last interval: counters for rates and latency over the interval.
pub type Previous = BTreeMap<String, Snapshot>;

/// Pure: each metric's reading from what was collected, and the scrapes to remember.
pub fn readings(
    metrics: &[MetricSpec],
    collected: &Collected,
    previous: &Previous,
) -> (Vec<Reading>, Previous) {
    let readings = metrics
        .iter()
        .enumerate()
        .map(|(i, m)| reading(i, m, collected, previous))
        .collect();
    let remembered = collected
        .pods
        .iter()
        .filter_map(|(name, (_, s))| match s {
            Scraped::Ok(snap) => Some((name.clone(), snap.clone())),
            _ => None,
        })
        .collect();
    (readings, remembered)
}

fn reading(index: usize, metric: &MetricSpec, c: &Collected, previous: &Previous) -> Reading {
    use MetricType::*;
    match metric.type_ {
        CognitiveLoad => cognitive_load(c, metric.target, previous),
        QueueDepth => gauge(
            c,
            metric.target_per_replica,
            "kasmina_queue_depth",
            |_, snap| snap.gauges.queue,
        ),
        Latency => latency(metric, c, previous),
        Cpu | Memory => utilization(metric, c),
        Prometheus => match (c.external.get(&index), metric.target) {
            (Some(Ok(value)), Some(target)) => Reading::Total {
                value: *value,
                target,
            },
            (Some(Err(message)), _) => Reading::Failed(message.clone()),
            _ => Reading::Failed("the query was not run".into()),
        },
    }
}

fn gauge(
    c: &Collected,
    target: Option<f64>,
    name: &str,
    read: impl Fn(&str, &Snapshot) -> Option<f64>,
) -> Reading {
    let Some(target) = target else {
        return Reading::Failed("no target".into());
    };
    if c.pods.is_empty() {
        return Reading::Failed("no pod of the target's serving revisions exists".into());
    }
    let mut exported = false;
    let mut errors = vec![];
    let samples = c
        .pods
        .iter()
        .map(|(name, (_, scraped))| match scraped {
            Scraped::Ok(snap) => match read(name, snap) {
                Some(v) => {
                    exported = true;
                    PodSample::Ready(v)
                }
                None => PodSample::Missing,
            },
            Scraped::Failed(e) => {
                errors.push(e.clone());
                PodSample::Missing
            }
            Scraped::Unready => PodSample::Unready,
        })
        .collect::<Vec<_>>();
    if !exported {
        let answered = c.pods.values().any(|(_, s)| matches!(s, Scraped::Ok(_)));
        return Reading::Failed(if answered {
            format!("the runtime pods do not export {name}")
        } else if let Some(first) = errors.first() {
            format!("no pod could be scraped: {first}")
        } else {
            "no pod is ready".into()
        });
    }
    Reading::PerPod { samples, target }
}

fn latency(metric: &MetricSpec, c: &Collected, previous: &Previous) -> Reading {
    let Some(target) = metric.target_ms else {
        return Reading::Failed("no targetMs".into());
    };
    let percentile = metric.percentile.unwrap_or(95.0);
    let mut deltas = vec![];
    let mut ready = 0;
    for (name, (_, scraped)) in &c.pods {
        let Scraped::Ok(snap) = scraped else { continue };
        ready += 1;
        if snap.buckets.is_empty() {
            continue;
        }
        // A pod seen for the first time, or restarted (a counter went down), counts from zero.
        let delta = match previous.get(name).map(|p| &p.buckets) {
            Some(before) if !went_down(before, &snap.buckets) => snap
                .buckets
                .iter()
                .map(|&(le, n)| (le, n - count_at(before, le)))
                .collect(),
            _ => snap.buckets.clone(),
        };
        deltas.push(Snapshot {
            buckets: delta,
            ..Snapshot::default()
        });
    }
    if ready == 0 {
        return Reading::Failed("no pod is ready".into());
    }
    let Some(sum) = scrape::sum(&deltas) else {
        return Reading::Failed(
            "the runtime pods do not export kasmina_request_duration_seconds".into(),
        );
    };
    let requests = sum.buckets.last().map_or(0.0, |&(_, n)| n);
    if requests <= 0.0 {
        return Reading::Idle("no request since the last scrape".into());
    }
    Reading::Ratio {
        value: quantile(percentile / 100.0, &sum.buckets) * 1000.0,
        target,
        ready,
    }
}

/// Pure: when pods shed requests, the pods' worth of work they were offered over the interval:
/// all the requests offered, over the most any one pod served (a pod serving flat out shows
/// what one pod can do). Counts are `(offered, served)` per pod since the last scrape, so a pod
/// that became ready mid-interval adds only what it saw. None when no pod shed.
pub fn offered_pods(counts: &[(f64, f64)]) -> Option<f64> {
    let most = counts.iter().map(|&(_, served)| served).fold(0.0, f64::max);
    let shedding = counts.iter().any(|&(offered, served)| offered > served);
    (shedding && most > 0.0).then(|| counts.iter().map(|&(o, _)| o).sum::<f64>() / most)
}

/// The cognitive load of each pod. Up to 1 the runtime's gauge says it. Beyond, the gauge
/// saturates at the bound of the queue (a full queue reads the same whether 10 % or 10× too
/// much arrives), so: when pods shed, the load is the work they were offered against what one
/// pod serves (`offered_pods`), shared over the ready pods; a queue that grows without
/// shedding counts as at most double; a full queue that is draining counts as just full.
fn cognitive_load(c: &Collected, target: Option<f64>, previous: &Previous) -> Reading {
    let reading = gauge(c, target, "kasmina_cognitive_load", |_, snap| {
        snap.gauges.load
    });
    let Reading::PerPod {
        mut samples,
        target,
    } = reading
    else {
        return reading;
    };
    // Counts since the last scrape; a pod seen for the first time adds all it has counted
    // (it is new), unless nothing was seen before (a restarted controller: no rates yet).
    let seen_before = c.pods.keys().any(|name| previous.contains_key(name));
    let counts: Vec<(f64, f64)> = c
        .pods
        .iter()
        .filter_map(|(name, (_, scraped))| {
            let Scraped::Ok(now) = scraped else {
                return None;
            };
            let zero = Snapshot::default();
            let before = previous.get(name).or(seen_before.then_some(&zero))?;
            let offered = now.requests - before.requests;
            (offered >= 0.0).then_some((offered, offered - (now.errors - before.errors)))
        })
        .collect();
    let ready = samples
        .iter()
        .filter(|s| matches!(s, PodSample::Ready(_)))
        .count();
    let shed = offered_pods(&counts).map(|pods| pods / ready.max(1) as f64);
    for ((name, (_, scraped)), sample) in c.pods.iter().zip(&mut samples) {
        let (PodSample::Ready(v), Scraped::Ok(now)) = (sample, scraped) else {
            continue;
        };
        *v = match shed {
            Some(each) => each,
            None if *v > 1.0 => {
                let before = previous.get(name).and_then(|p| p.gauges.queue);
                let growing = match (before, now.gauges.queue) {
                    (Some(b), Some(q)) => q > b,
                    _ => true,
                };
                if growing { v.min(2.0) } else { 1.0 }
            }
            None => *v,
        };
    }
    Reading::PerPod { samples, target }
}

fn count_at(buckets: &[(f64, f64)], le: f64) -> f64 {
    buckets
        .iter()
        .find(|(l, _)| *l == le)
        .map_or(0.0, |&(_, n)| n)
}

fn went_down(before: &[(f64, f64)], now: &[(f64, f64)]) -> bool {
    now.iter().any(|&(le, n)| n < count_at(before, le))
}

fn utilization(metric: &MetricSpec, c: &Collected) -> Reading {
    let cpu = metric.type_ == MetricType::Cpu;
    let Some(target) = metric.utilization.map(f64::from) else {
        return Reading::Failed("no utilization".into());
    };
    let usage = match &c.usage {
        Some(Ok(usage)) => usage,
        Some(Err(message)) => return Reading::Failed(message.clone()),
        None => return Reading::Failed("resource metrics were not read".into()),
    };
    let resource = if cpu { "cpu" } else { "memory" };
    let mut samples = vec![];
    for (name, (pod, scraped)) in &c.pods {
        let Some(request) = (if cpu {
            pod.cpu_request
        } else {
            pod.memory_request
        }) else {
            return Reading::Failed(format!(
                "pod {name} has no {resource} request; utilization is a percentage of it"
            ));
        };
        samples.push(match (scraped, usage.get(name)) {
            (Scraped::Unready, _) => PodSample::Unready,
            (_, None) => PodSample::Missing,
            (_, Some(u)) => {
                let used = if cpu { u.cpu } else { u.memory };
                PodSample::Ready(100.0 * used / request)
            }
        });
    }
    if !samples.iter().any(|s| matches!(s, PodSample::Ready(_))) {
        return Reading::Failed(format!(
            "metrics.k8s.io has no {resource} usage for the pods"
        ));
    }
    Reading::PerPod { samples, target }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::edge_deployment::analysis::Gauges;

    fn metric(json: serde_json::Value) -> MetricSpec {
        serde_json::from_value(json).unwrap()
    }

    fn pod(name: &str) -> PodTarget {
        PodTarget {
            name: name.into(),
            url: Some(format!("http://{name}/metrics")),
            cpu_request: Some(0.5),
            memory_request: Some(256e6),
        }
    }

    fn ok(load: f64, buckets: &[(f64, f64)]) -> Scraped {
        Scraped::Ok(Snapshot {
            buckets: buckets.to_vec(),
            gauges: Gauges {
                load: Some(load),
                queue: Some(load * 4.0),
                ..Gauges::default()
            },
            ..Snapshot::default()
        })
    }

    fn collected(pods: Vec<(&str, Scraped)>) -> Collected {
        Collected {
            pods: pods
                .into_iter()
                .map(|(n, s)| (n.to_owned(), (pod(n), s)))
                .collect(),
            ..Collected::default()
        }
    }

    #[test]
    fn gauges_mark_unready_and_unreachable_pods_as_the_hpa_does() {
        let c = collected(vec![
            ("a", ok(0.9, &[])),
            ("b", Scraped::Failed("timeout".into())),
            ("c", Scraped::Unready),
        ]);
        let m = metric(serde_json::json!({"type": "CognitiveLoad", "target": 0.7}));
        let (r, _) = readings(&[m], &c, &Previous::default());
        assert_eq!(
            r[0],
            Reading::PerPod {
                samples: vec![
                    PodSample::Ready(0.9),
                    PodSample::Missing,
                    PodSample::Unready
                ],
                target: 0.7
            }
        );
        assert_eq!(r[0].value(), Some(0.9));
    }

    #[test]
    fn a_metric_the_pods_do_not_export_fails_with_its_name() {
        let mut snap = Snapshot::default();
        snap.gauges.load = Some(0.5);
        let c = collected(vec![("a", Scraped::Ok(snap))]);
        let m = metric(serde_json::json!({"type": "QueueDepth", "targetPerReplica": 4}));
        let (r, _) = readings(&[m], &c, &Previous::default());
        assert_eq!(
            r[0],
            Reading::Failed("the runtime pods do not export kasmina_queue_depth".into())
        );
        let none = collected(vec![("a", Scraped::Failed("GET …: refused".into()))]);
        let m = metric(serde_json::json!({"type": "CognitiveLoad", "target": 0.7}));
        let (r, _) = readings(&[m], &none, &Previous::default());
        assert_eq!(
            r[0],
            Reading::Failed("no pod could be scraped: GET …: refused".into())
        );
    }

    #[test]
    fn a_saturated_load_is_measured_by_what_was_offered() {
        let m = metric(serde_json::json!({"type": "CognitiveLoad", "target": 0.7}));
        let pod = |requests: f64, errors: f64, load: f64, queue: f64| {
            let mut snap = Snapshot {
                requests,
                errors,
                ..Snapshot::default()
            };
            snap.gauges.load = Some(load);
            snap.gauges.queue = Some(queue);
            Scraped::Ok(snap)
        };
        let before = collected(vec![
            ("a", pod(1000.0, 0.0, 9.0, 60.0)),
            ("b", pod(1000.0, 0.0, 9.0, 60.0)),
        ]);
        let (_, previous) = readings(std::slice::from_ref(&m), &before, &Previous::default());
        // Each pod was offered 1000 and served 250: 8 pods' worth over 2 pods → 4 each.
        let now = collected(vec![
            ("a", pod(2000.0, 750.0, 9.0, 64.0)),
            ("b", pod(2000.0, 750.0, 9.0, 64.0)),
        ]);
        let (r, _) = readings(std::slice::from_ref(&m), &now, &previous);
        assert_eq!(r[0].value(), Some(4.0));
        // No shedding: a growing queue counts as double at most, a draining one as full.
        let growing = collected(vec![
            ("a", pod(1100.0, 0.0, 9.0, 64.0)),
            ("b", pod(1100.0, 0.0, 9.0, 64.0)),
        ]);
        let (r, _) = readings(std::slice::from_ref(&m), &growing, &previous);
        assert_eq!(r[0].value(), Some(2.0));
        let draining = collected(vec![
            ("a", pod(1100.0, 0.0, 3.0, 20.0)),
            ("b", pod(1100.0, 0.0, 3.0, 20.0)),
        ]);
        let (r, _) = readings(&[m], &draining, &previous);
        assert_eq!(r[0].value(), Some(1.0));
        assert_eq!(offered_pods(&[(100.0, 100.0)]), None, "nothing shed");
    }

    #[test]
    fn latency_is_measured_over_the_interval_from_bucket_deltas() {
        let inf = f64::INFINITY;
        let m = metric(serde_json::json!({"type": "Latency", "percentile": 50, "targetMs": 100}));
        // First scrape: 100 requests, all under 10 ms, so far.
        let first = collected(vec![(
            "a",
            ok(0.5, &[(0.01, 100.0), (0.1, 100.0), (inf, 100.0)]),
        )]);
        let (r, remembered) = readings(std::slice::from_ref(&m), &first, &Previous::default());
        assert!(matches!(r[0], Reading::Ratio { value, .. } if value <= 10.0));
        // Next: 100 more, all between 10 and 100 ms — the old fast ones no longer count.
        let next = collected(vec![(
            "a",
            ok(0.5, &[(0.01, 100.0), (0.1, 200.0), (inf, 200.0)]),
        )]);
        let (r, remembered) = readings(std::slice::from_ref(&m), &next, &remembered);
        let Reading::Ratio { value, ready, .. } = r[0] else {
            panic!("{r:?}")
        };
        assert!((value - 55.0).abs() < 1e-9, "median of 10..100 ms: {value}");
        assert_eq!(ready, 1);
        // No request since: idle, not a failure.
        let (r, _) = readings(&[m], &next, &remembered);
        assert!(matches!(r[0], Reading::Idle(_)), "{r:?}");
    }

    #[test]
    fn utilization_needs_requests_and_the_resource_metrics_api() {
        let m = metric(serde_json::json!({"type": "Cpu", "utilization": 70}));
        let mut c = collected(vec![("a", ok(0.5, &[])), ("b", Scraped::Unready)]);
        c.usage = Some(Ok([(
            "a".to_owned(),
            Usage {
                cpu: 0.45,
                memory: 1e8,
            },
        )]
        .into()));
        let (r, _) = readings(std::slice::from_ref(&m), &c, &Previous::default());
        let Reading::PerPod { samples, .. } = &r[0] else {
            panic!("{r:?}")
        };
        assert!(matches!(samples[0], PodSample::Ready(v) if (v - 90.0).abs() < 1e-9));
        assert_eq!(samples[1], PodSample::Unready);
        c.usage = Some(Err(Error::ResourceMetricsUnavailable.to_string()));
        let (r, _) = readings(std::slice::from_ref(&m), &c, &Previous::default());
        assert!(matches!(&r[0], Reading::Failed(m) if m.contains("metrics-server")));
        c.pods.get_mut("a").unwrap().0.cpu_request = None;
        c.usage = Some(Ok(BTreeMap::new()));
        let (r, _) = readings(&[m], &c, &Previous::default());
        assert!(matches!(&r[0], Reading::Failed(m) if m.contains("pod a has no cpu request")));
    }

    #[test]
    fn prometheus_answers_become_one_number_or_a_clear_error() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.7e9,"42.5"]}]}}"#;
        assert_eq!(prometheus_value(vector), Ok(42.5));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1.7e9,"3"]}}"#;
        assert_eq!(prometheus_value(scalar), Ok(3.0));
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(prometheus_value(empty), Err("returned no series".into()));
        let two = r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#;
        assert!(prometheus_value(two).unwrap_err().contains("2 series"));
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        assert_eq!(prometheus_value(bad), Err("parse error at char 5".into()));
        assert!(prometheus_value("<html>").is_err());
        let nan = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#;
        assert!(prometheus_value(nan).is_err());
    }

    /// Found in review: `serverAddress` made the operator GET any URL and repeat 200 bytes of
    /// the answer into status, readable by whoever may read the policy.
    #[tokio::test]
    async fn prometheus_is_queried_only_on_listed_hosts_and_never_echoed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf).await;
                let body = "SECRET-TOKEN-abc123 internal admin page";
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let http = crate::controller::http::client();
        let server = format!("http://{addr}");
        let timeout = Duration::from_secs(2);
        let unlisted = prometheus(&http, &server, &[], "up", timeout).await;
        let message = error_chain(&unlisted.unwrap_err());
        assert!(
            message.contains("\"127.0.0.1\" is not one the operator may query")
                && message.contains("prometheusHosts"),
            "{message}"
        );
        let listed = prometheus(&http, &server, &["127.0.0.1".into()], "up", timeout).await;
        let message = error_chain(&listed.unwrap_err());
        assert!(message.contains("HTTP 500"), "{message}");
        assert!(
            !message.contains("SECRET"),
            "the body is not echoed: {message}"
        );
    }

    #[test]
    fn metrics_api_usage_sums_containers() {
        let data = serde_json::json!({"containers": [
            {"name": "runtime", "usage": {"cpu": "250000000n", "memory": "100Mi"}},
            {"name": "sidecar", "usage": {"cpu": "50m", "memory": "20Mi"}},
        ]});
        let u = pod_usage(&data);
        assert!(
            (u.cpu - 0.3).abs() < 1e-9 && u.memory == 120.0 * 1024.0 * 1024.0,
            "{u:?}"
        );
    }
}
