//! Reads the runtime pods' `/metrics` (Prometheus text, parsed by `prometheus-parse`) into the
//! counters analysis needs, per pod, and the gateway pods' into their agreement counters.
//! Scrapes run at most `MAX_CONCURRENT_SCRAPES` at once, each with a timeout; a pod that does
//! not answer is left out, as Prometheus leaves out a failed target.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::analysis::{PodSnapshot, Snapshot, add_bucket};
use super::watch::routable;

/// Scrapes of one revision in flight at once: a revision of hundreds of pods neither opens
/// hundreds of connections from the operator nor waits on them one by one.
pub const MAX_CONCURRENT_SCRAPES: usize = 16;

/// Errors reading one pod's metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GET {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: {source}")]
    Body {
        url: String,
        #[source]
        source: crate::controller::http::ReadError,
    },
    #[error("parsing the metrics of {url}: {source}")]
    Parse {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Http { .. } => "scrape_http",
            Error::Status { .. } => "scrape_status",
            Error::Body { .. } => "scrape_body",
            Error::Parse { .. } => "scrape_parse",
        }
    }
}

/// The runtime's counters in one exposition, summed over models and labels.
pub fn parse(text: &str) -> std::io::Result<Snapshot> {
    use prometheus_parse::{Scrape, Value};
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    let mut snap = Snapshot::default();
    for sample in &scrape.samples {
        let scalar = match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            _ => None,
        };
        match (sample.metric.as_str(), &sample.value, scalar) {
            ("kasmina_requests_total", _, Some(v)) => {
                snap.requests += v;
                if sample
                    .labels
                    .get("code")
                    .is_some_and(|c| c.starts_with('5'))
                {
                    snap.errors += v;
                }
            }
            ("kasmina_cognitive_load", _, Some(v)) => {
                snap.load += v;
                add(&mut snap.gauges.load, v);
            }
            ("kasmina_inflight_requests", _, Some(v)) => add(&mut snap.gauges.inflight, v),
            ("kasmina_queue_depth", _, Some(v)) => add(&mut snap.gauges.queue, v),
            ("kasmina_capacity", _, Some(v)) => add(&mut snap.gauges.capacity, v),
            ("kasmina_request_duration_seconds", Value::Histogram(buckets), _) => {
                for b in buckets {
                    add_bucket(&mut snap.buckets, b.less_than, b.count);
                }
            }
            _ => {}
        }
    }
    Ok(snap)
}

/// A gateway's agreement counters for the candidate `revision` (the sum and count of its
/// `kasmina_gateway_output_agreement` histogram), in one exposition.
pub fn parse_agreement(text: &str, revision: &str) -> std::io::Result<Snapshot> {
    let mut snap = Snapshot::default();
    each_scalar(text, |sample, v| {
        if sample.labels.get("revision") != Some(revision) {
            return;
        }
        match sample.metric.as_str() {
            "kasmina_gateway_output_agreement_sum" => snap.agreement_sum += v,
            "kasmina_gateway_output_agreement_count" => snap.agreement_count += v,
            _ => {}
        }
    })?;
    Ok(snap)
}

/// A gateway's traffic, all revisions summed: its answered requests
/// (`kasmina_gateway_requests_total`, as `requests`), those in flight (`gauges.inflight`) and
/// those held while a revision wakes (`held`). The autoscaler reads it to tell an idle target.
pub fn parse_traffic(text: &str) -> std::io::Result<Snapshot> {
    let mut snap = Snapshot::default();
    each_scalar(text, |sample, v| match sample.metric.as_str() {
        "kasmina_gateway_requests_total" => snap.requests += v,
        "kasmina_gateway_inflight_requests" => add(&mut snap.gauges.inflight, v),
        "kasmina_gateway_held_requests" => snap.held += v,
        _ => {}
    })?;
    Ok(snap)
}

/// Calls `f` with each counter, gauge or untyped sample of one exposition, and its value.
fn each_scalar(
    text: &str,
    mut f: impl FnMut(&prometheus_parse::Sample, f64),
) -> std::io::Result<()> {
    use prometheus_parse::{Scrape, Value};
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    for sample in &scrape.samples {
        if let Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) = sample.value {
            f(sample, v);
        }
    }
    Ok(())
}

/// Adds `v` to a gauge that may not have been seen yet.
fn add(gauge: &mut Option<f64>, v: f64) {
    *gauge = Some(gauge.unwrap_or(0.0) + v);
}

/// Sums snapshots of several pods; the cognitive load is averaged.
pub fn sum(snapshots: &[Snapshot]) -> Option<Snapshot> {
    if snapshots.is_empty() {
        return None;
    }
    let mut total = Snapshot::default();
    for s in snapshots {
        total.requests += s.requests;
        total.errors += s.errors;
        total.load += s.load / snapshots.len() as f64;
        for &(le, count) in &s.buckets {
            add_bucket(&mut total.buckets, le, count);
        }
    }
    Some(total)
}

/// How one exposition is read: a runtime's counters, a gateway's agreement for one revision,
/// or a gateway's traffic.
#[derive(Clone, Debug)]
pub enum Reading {
    Runtime,
    Agreement { revision: String },
    Traffic,
}

impl Reading {
    fn parse(&self, text: &str) -> std::io::Result<Snapshot> {
        match self {
            Reading::Runtime => parse(text),
            Reading::Agreement { revision } => parse_agreement(text, revision),
            Reading::Traffic => parse_traffic(text),
        }
    }
}

/// Scrapes one endpoint.
pub async fn scrape(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    reading: &Reading,
) -> Result<Snapshot, Error> {
    let response = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|source| Error::Http {
            url: url.to_owned(),
            source: source.without_url(),
        })?;
    if !response.status().is_success() {
        return Err(Error::Status {
            url: url.to_owned(),
            status: response.status().as_u16(),
        });
    }
    let body =
        crate::controller::http::read_bounded(response, crate::controller::http::MAX_BODY_BYTES)
            .await
            .map_err(|source| Error::Body {
                url: url.to_owned(),
                source,
            })?;
    reading.parse(&body).map_err(|source| Error::Parse {
        url: url.to_owned(),
        source,
    })
}

/// A ready runtime pod's metrics URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub pod: String,
    pub started: Option<k8s_openapi::jiff::Timestamp>,
    pub url: String,
}

/// The metrics endpoint of each pod that takes requests (`watch::routable`).
pub fn endpoints(pods: &[Pod], port: u16) -> Vec<Endpoint> {
    pods.iter()
        .filter_map(|p| {
            let ip = routable(p)?;
            Some(Endpoint {
                pod: p.name_any(),
                started: p.status.as_ref()?.start_time.as_ref().map(|t| t.0),
                url: format!("http://{}/metrics", std::net::SocketAddr::new(ip, port)),
            })
        })
        .collect()
}

/// Scrapes the metrics port of each of `pods` that takes requests; None when none answered.
pub async fn pods(
    http: &reqwest::Client,
    pods: &[Pod],
    port: u16,
    timeout: Duration,
    reading: &Reading,
) -> Option<Vec<PodSnapshot>> {
    revision(http, &endpoints(pods, port), timeout, reading).await
}

/// Scrapes every endpoint, at most `MAX_CONCURRENT_SCRAPES` at once; None when none answered.
pub async fn revision(
    http: &reqwest::Client,
    endpoints: &[Endpoint],
    timeout: Duration,
    reading: &Reading,
) -> Option<Vec<PodSnapshot>> {
    // Owned items and a cloned client (an Arc) keep the futures free of borrowed lifetimes,
    // which the controller's `Send` bound needs.
    let answered: Vec<PodSnapshot> = futures::stream::iter(endpoints.to_vec())
        .map(|e| {
            let http = http.clone();
            let reading = reading.clone();
            async move {
                match scrape(&http, &e.url, timeout, &reading).await {
                    Ok(snapshot) => Some(PodSnapshot {
                        pod: e.pod,
                        started: e.started,
                        snapshot,
                    }),
                    Err(error) => {
                        tracing::debug!(%error, "scrape failed");
                        None
                    }
                }
            }
        })
        .buffer_unordered(MAX_CONCURRENT_SCRAPES)
        .filter_map(|s| async move { s })
        .collect()
        .await;
    (!answered.is_empty()).then_some(answered)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP kasmina_requests Inference requests by model and HTTP status code.
# TYPE kasmina_requests counter
kasmina_requests_total{model="minilm",code="200"} 90
kasmina_requests_total{model="minilm",code="503"} 10
# TYPE kasmina_cognitive_load gauge
kasmina_cognitive_load 0.5
# TYPE kasmina_request_duration_seconds histogram
kasmina_request_duration_seconds_sum{model="minilm",outcome="ok"} 2.5
kasmina_request_duration_seconds_count{model="minilm",outcome="ok"} 90
kasmina_request_duration_seconds_bucket{le="0.01",model="minilm",outcome="ok"} 50
kasmina_request_duration_seconds_bucket{le="0.1",model="minilm",outcome="ok"} 90
kasmina_request_duration_seconds_bucket{le="+Inf",model="minilm",outcome="ok"} 90
kasmina_request_duration_seconds_bucket{le="0.01",model="minilm",outcome="error"} 10
kasmina_request_duration_seconds_bucket{le="0.1",model="minilm",outcome="error"} 10
kasmina_request_duration_seconds_bucket{le="+Inf",model="minilm",outcome="error"} 10
# EOF
"#;

    #[test]
    fn parses_the_runtime_exposition() {
        let s = parse(TEXT).unwrap();
        assert_eq!((s.requests, s.errors, s.load), (100.0, 10.0, 0.5));
        assert_eq!(s.gauges.load, Some(0.5));
        assert_eq!(s.gauges.queue, None, "not exported, not zero");
        assert_eq!(
            s.buckets,
            vec![(0.01, 60.0), (0.1, 100.0), (f64::INFINITY, 100.0)]
        );
    }

    #[test]
    fn sums_pods_and_averages_load() {
        let a = parse(TEXT).unwrap();
        let mut b = a.clone();
        b.load = 1.0;
        let s = sum(&[a, b]).unwrap();
        assert_eq!((s.requests, s.errors, s.load), (200.0, 20.0, 0.75));
        assert_eq!(s.buckets[2], (f64::INFINITY, 200.0));
        assert!(sum(&[]).is_none());
    }

    #[test]
    fn reads_a_gateways_traffic_from_what_the_gateway_exports() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::gateway::metrics::Metrics::new(&mut registry);
        metrics.answered("r1", 200, 0.01);
        metrics.answered("r1", 503, 0.01);
        metrics.answered("r2", 200, 0.01);
        metrics.inflight("r2").set(3);
        metrics.held("r1").set(2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();

        let s = parse_traffic(&text).unwrap();
        assert_eq!(
            (s.requests, s.gauges.inflight, s.held),
            (3.0, Some(3.0), 2.0)
        );
        let idle = parse_traffic("# EOF\n").unwrap();
        assert_eq!((idle.requests, idle.held), (0.0, 0.0));
    }
}
