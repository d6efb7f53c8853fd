//! The gateway's metrics (docs/gateway.md lists them): per revision its requests by status
//! code, latency, retries, upstream failures, requests in flight and ready pods; the canary
//! weight in force; the requests mirrored to the canary and how far its answers agree; the
//! requests held while a revision wakes from zero, and the wakes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub revision: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub revision: String,
    /// connect | timeout | closed
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The canary revision.
    pub revision: String,
    /// compared | incomparable | failed | skipped
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakeLabels {
    pub revision: String,
    /// scaled | already | failed
    pub outcome: &'static str,
}

/// The values of the labels with a fixed set, for dropping a revision's series.
const UPSTREAM_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "closed"];
const MIRROR_OUTCOMES: [&str; 4] = ["compared", "incomparable", "failed", "skipped"];
const WAKE_OUTCOMES: [&str; 3] = ["scaled", "already", "failed"];

/// The revisions a table routes to: those with ready pods, and stable and canary even with
/// none (a stable at zero replicas holds its requests).
fn routed(table: &super::routes::Table) -> std::collections::BTreeSet<&str> {
    let split = [&table.split.stable, &table.split.canary];
    table
        .revisions
        .keys()
        .map(String::as_str)
        .chain(split.into_iter().flatten().map(String::as_str))
        .collect()
}

/// Agreement buckets: fine near 1, where quantized models differ.
const AGREEMENT_BUCKETS: [f64; 11] = [
    0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9999, 1.0,
];

pub struct Metrics {
    pub requests: Family<CodeLabels, Counter>,
    pub duration: Family<RevisionLabels, Histogram>,
    pub retries: Family<RevisionLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub inflight: Family<RevisionLabels, Gauge>,
    pub ready_pods: Family<RevisionLabels, Gauge>,
    pub canary_weight: Gauge,
    pub mirrored: Family<MirrorLabels, Counter>,
    pub agreement: Family<RevisionLabels, Histogram>,
    pub held: Family<RevisionLabels, Gauge>,
    pub wakes: Family<WakeLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 0.25 ms … ~4 s: the gateway's own cost is a fraction of a millisecond.
                Histogram::new(exponential_buckets(0.00025, 2.0, 15))
            }),
            retries: Family::default(),
            upstream_errors: Family::default(),
            inflight: Family::default(),
            ready_pods: Family::default(),
            canary_weight: Gauge::default(),
            mirrored: Family::default(),
            agreement: Family::new_with_constructor(|| {
                Histogram::new(AGREEMENT_BUCKETS.iter().copied())
            }),
            held: Family::default(),
            wakes: Family::default(),
        };
        registry.register(
            "kasmina_gateway_requests",
            "Requests the gateway answered, by revision and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "kasmina_gateway_request_duration_seconds",
            "Time from a request's arrival to its answer's headers, by revision",
            metrics.duration.clone(),
        );
        registry.register(
            "kasmina_gateway_retries",
            "Requests sent again to another pod after a failed attempt",
            metrics.retries.clone(),
        );
        registry.register(
            "kasmina_gateway_upstream_errors",
            "Attempts that got no answer from a pod, by kind (connect, timeout, closed)",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            "kasmina_gateway_inflight_requests",
            "Requests the gateway holds now, by revision",
            metrics.inflight.clone(),
        );
        registry.register(
            "kasmina_gateway_ready_pods",
            "Ready pods the gateway routes to, by revision",
            metrics.ready_pods.clone(),
        );
        registry.register(
            "kasmina_gateway_canary_weight",
            "Percent of requests the gateway sends to the canary revision",
            metrics.canary_weight.clone(),
        );
        registry.register(
            "kasmina_gateway_mirrored",
            "Requests answered by stable and sampled to mirror to the canary, by canary \
             revision and outcome (compared, incomparable, failed, skipped)",
            metrics.mirrored.clone(),
        );
        registry.register(
            "kasmina_gateway_output_agreement",
            "Agreement (0-1, 1: the same) of each mirrored answer of the canary revision with \
             stable's: the lowest cosine of its embeddings, or 1 - the largest relative \
             difference of other FP32 outputs",
            metrics.agreement.clone(),
        );
        registry.register(
            "kasmina_gateway_held_requests",
            "Requests waiting for a ready pod of a revision woken from zero replicas",
            metrics.held.clone(),
        );
        registry.register(
            "kasmina_gateway_wakes",
            "Wakes of a revision with no ready pod through the EdgeDeployment's scale \
             subresource, by outcome (scaled: 0 to 1; already: replicas were set; failed)",
            metrics.wakes.clone(),
        );
        metrics
    }

    pub fn held(&self, revision: &str) -> Gauge {
        self.held.get_or_create(&Self::revision(revision)).clone()
    }

    pub fn woke(&self, revision: &str, outcome: &'static str) {
        self.wakes
            .get_or_create(&WakeLabels {
                revision: revision.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn mirrored(&self, canary: &str, outcome: &'static str) {
        self.mirrored
            .get_or_create(&MirrorLabels {
                revision: canary.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn agreed(&self, canary: &str, agreement: f64) {
        self.agreement
            .get_or_create(&Self::revision(canary))
            .observe(agreement);
    }

    /// Drops every series of `revision` (a rollout's old stable, an aborted canary), so that a
    /// gateway living through many rollouts exports the revisions it routes, not every one it
    /// has known. An answer still on its way re-creates its series once.
    fn forget(&self, revision: &str) {
        let labels = Self::revision(revision);
        self.duration.remove(&labels);
        self.retries.remove(&labels);
        self.inflight.remove(&labels);
        self.ready_pods.remove(&labels);
        self.agreement.remove(&labels);
        self.held.remove(&labels);
        let revision = revision.to_owned();
        // Status codes are whatever the pods answered: every one there can be.
        for code in 100..600u16 {
            self.requests.remove(&CodeLabels {
                revision: revision.clone(),
                code: code.to_string(),
            });
        }
        for kind in UPSTREAM_ERROR_KINDS {
            self.upstream_errors.remove(&ErrorLabels {
                revision: revision.clone(),
                kind: kind.to_owned(),
            });
        }
        for outcome in MIRROR_OUTCOMES {
            self.mirrored.remove(&MirrorLabels {
                revision: revision.clone(),
                outcome,
            });
        }
        for outcome in WAKE_OUTCOMES {
            self.wakes.remove(&WakeLabels {
                revision: revision.clone(),
                outcome,
            });
        }
    }

    fn revision(revision: &str) -> RevisionLabels {
        RevisionLabels {
            revision: revision.to_owned(),
        }
    }

    pub fn answered(&self, revision: &str, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&CodeLabels {
                revision: revision.to_owned(),
                code: code.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&Self::revision(revision))
            .observe(seconds);
    }

    pub fn retried(&self, revision: &str) {
        self.retries.get_or_create(&Self::revision(revision)).inc();
    }

    pub fn upstream_error(&self, revision: &str, kind: &str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                revision: revision.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn inflight(&self, revision: &str) -> Gauge {
        self.inflight
            .get_or_create(&Self::revision(revision))
            .clone()
    }

    /// The table changed: ready pods per revision, revisions gone drop their gauge, and a
    /// revision the gateway no longer routes to at all drops every series.
    pub fn routes(&self, table: &super::routes::Table, previous: &super::routes::Table) {
        for revision in previous.revisions.keys() {
            if !table.revisions.contains_key(revision) {
                self.ready_pods.remove(&Self::revision(revision));
            }
        }
        let now = routed(table);
        for revision in routed(previous).difference(&now) {
            self.forget(revision);
        }
        for (revision, pods) in &table.revisions {
            self.ready_pods
                .get_or_create(&Self::revision(revision))
                .set(pods.len() as i64);
        }
        self.canary_weight.set(if table.split.canary.is_some() {
            i64::from(table.split.weight)
        } else {
            0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::routes::{Split, Table};
    use super::*;

    fn table(stable: &str, canary: Option<&str>) -> Table {
        Table {
            split: Split {
                stable: Some(stable.into()),
                canary: canary.map(Into::into),
                weight: 10,
                mirror: 0,
            },
            revisions: Default::default(),
        }
    }

    fn exported(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn a_revision_no_longer_routed_drops_its_series_and_one_at_zero_keeps_them() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        for revision in ["old", "new"] {
            m.answered(revision, 200, 0.01);
            m.answered(revision, 503, 0.01);
            m.retried(revision);
            m.upstream_error(revision, "connect");
            m.inflight(revision).set(1);
            m.held(revision).set(1);
            m.woke(revision, "scaled");
            m.mirrored(revision, "compared");
            m.agreed(revision, 0.99);
        }
        let before = table("old", Some("new"));
        // Promoted: "new" is stable, with no ready pod (at zero), "old" is gone.
        m.routes(&table("new", None), &before);
        let text = exported(&registry);
        assert!(!text.contains("revision=\"old\""), "{text}");
        for metric in [
            "kasmina_gateway_requests_total",
            "kasmina_gateway_held_requests",
            "kasmina_gateway_wakes_total",
            "kasmina_gateway_output_agreement_count",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(metric) && l.contains("revision=\"new\"")),
                "{metric}: {text}"
            );
        }
    }
}
