//! The routing table the proxy reads: each revision's ready pods with their load counters, and
//! the split between the stable and the canary revision. A new table is built on every change
//! of the watched objects; pods that stay keep their counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a load a runtime reported counts: after that only the gateway's own outstanding
/// requests do, so a pod that was busy once is not avoided forever.
pub const REPORT_FRESH_FOR: Duration = Duration::from_millis(500);

/// How fast a pod's latency estimate forgets: a pod that was slow once is tried again after a
/// few seconds without answers rather than avoided for good.
pub const LATENCY_DECAY: Duration = Duration::from_secs(2);

/// Weight of a new answer in the latency estimate (when it is not a new peak).
const LATENCY_ALPHA: f64 = 0.3;

/// One ready runtime pod.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    pub load: PodLoad,
}

impl Pod {
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addr,
            load: PodLoad::default(),
        }
    }
}

/// What the balancer knows of a pod's load: this gateway's requests on it, and the work the
/// runtime last said it held (the `kasmina-load` header: every caller's requests) against
/// its capacity.
#[derive(Debug, Default)]
pub struct PodLoad {
    outstanding: AtomicU32,
    reported: AtomicU32,
    capacity: AtomicU32,
    /// Microseconds since `epoch()` when `reported` was set; 0: never.
    reported_at: AtomicU64,
    /// Peak EWMA of the service time — an answer's time to headers, less the turns it waited
    /// (`served`) — in µs (f64 bits), as linkerd and Finagle weigh a power-of-two choice: a
    /// rise counts at once, a fall gradually.
    latency: AtomicU64,
    /// Microseconds since `epoch()` of the last answer; 0: none yet.
    answered_at: AtomicU64,
}

/// The gateway's own clock origin for report ages (an Instant cannot sit in an atomic).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn micros_since_epoch(now: Instant) -> u64 {
    now.saturating_duration_since(epoch()).as_micros() as u64 + 1
}

/// Counts one request outstanding on a pod until dropped.
pub struct Outstanding<'a>(&'a PodLoad);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PodLoad {
    pub fn start(&self) -> Outstanding<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(self)
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Records a `kasmina-load` header (`<held>/<capacity>`); a malformed one is ignored.
    pub fn report(&self, header: &str, now: Instant) {
        let Some((held, capacity)) = header.split_once('/') else {
            return;
        };
        let (Ok(held), Ok(capacity)) = (held.trim().parse(), capacity.trim().parse::<u32>()) else {
            return;
        };
        self.reported.store(held, Ordering::Relaxed);
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
        self.reported_at
            .store(micros_since_epoch(now), Ordering::Relaxed);
    }

    /// Records the time an attempt took that got no answer (it counts whole).
    pub fn answered(&self, took: Duration, now: Instant) {
        self.served(took, 1, now);
    }

    /// Records the time one answer took, sent when the pod held `work` requests (this one
    /// included): the estimate is of the service time, so a request that waited turns behind
    /// others counts `capacity / work` of its time.
    pub fn served(&self, took: Duration, work: u64, now: Instant) {
        let capacity = u64::from(self.capacity.load(Ordering::Relaxed).max(1));
        let share = (capacity as f64 / work.max(1) as f64).min(1.0);
        let sample = took.as_secs_f64() * 1e6 * share;
        let current = self.latency_us(now);
        let next = if current == 0.0 || sample > current {
            sample
        } else {
            current + LATENCY_ALPHA * (sample - current)
        };
        self.latency.store(next.to_bits(), Ordering::Relaxed);
        self.answered_at
            .store(micros_since_epoch(now), Ordering::Relaxed);
    }

    /// Whether the runtime ever reported its load (so its capacity is known).
    pub fn reported(&self) -> bool {
        self.reported_at.load(Ordering::Relaxed) != 0
    }

    /// The latency estimate in µs, decayed by the time since the last answer; 0: no answer
    /// yet.
    pub fn latency_us(&self, now: Instant) -> f64 {
        let at = self.answered_at.load(Ordering::Relaxed);
        if at == 0 {
            return 0.0;
        }
        let idle = micros_since_epoch(now).saturating_sub(at) as f64;
        let decay = (-idle / LATENCY_DECAY.as_micros() as f64).exp();
        f64::from_bits(self.latency.load(Ordering::Relaxed)) * decay
    }

    /// (work, capacity): the larger of this gateway's outstanding requests and a fresh report,
    /// against the capacity last reported (1 before any).
    pub fn work(&self, now: Instant) -> (u64, u64) {
        let outstanding = u64::from(self.outstanding());
        let capacity = u64::from(self.capacity.load(Ordering::Relaxed).max(1));
        let at = self.reported_at.load(Ordering::Relaxed);
        let fresh = at != 0
            && micros_since_epoch(now).saturating_sub(at) <= REPORT_FRESH_FOR.as_micros() as u64;
        let reported = if fresh {
            u64::from(self.reported.load(Ordering::Relaxed))
        } else {
            0
        };
        (outstanding.max(reported), capacity)
    }
}

/// The revision the rollout serves and the one it tries, with the candidate's percent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub stable: Option<String>,
    pub canary: Option<String>,
    /// Percent of requests for the canary (0–100).
    pub weight: u8,
    /// Percent of the requests answered by stable that are mirrored to the canary to compare
    /// the answers (0: none).
    pub mirror: u8,
}

/// Everything a request is routed by.
#[derive(Debug, Default)]
pub struct Table {
    pub split: Split,
    /// Ready pods by revision.
    pub revisions: BTreeMap<String, Vec<Arc<Pod>>>,
}

impl Table {
    /// The table for `split` and these ready pods (revision → (pod name, address)); a pod of
    /// this table that is still there keeps its counters, so in-flight accounting survives.
    pub fn next(&self, split: Split, pods: BTreeMap<String, Vec<(String, SocketAddr)>>) -> Table {
        let revisions = pods
            .into_iter()
            .map(|(revision, pods)| {
                let known = self.revisions.get(&revision);
                let pods = pods
                    .into_iter()
                    .map(|(name, addr)| {
                        known
                            .and_then(|k| k.iter().find(|p| p.name == name && p.addr == addr))
                            .cloned()
                            .unwrap_or_else(|| Arc::new(Pod::new(name, addr)))
                    })
                    .collect();
                (revision, pods)
            })
            .collect();
        Table { split, revisions }
    }

    /// Ready pods of `revision` (none if unknown).
    pub fn pods(&self, revision: &str) -> &[Arc<Pod>] {
        self.revisions.get(revision).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn a_pod_that_stays_keeps_its_counters_and_a_new_one_starts_at_zero() {
        let first = Table::default().next(
            Split::default(),
            BTreeMap::from([("r1".into(), vec![("a".into(), addr(1))])]),
        );
        let held = first.pods("r1")[0].load.start();
        let second = first.next(
            Split::default(),
            BTreeMap::from([(
                "r1".into(),
                vec![("a".into(), addr(1)), ("b".into(), addr(2))],
            )]),
        );
        assert_eq!(second.pods("r1")[0].load.outstanding(), 1);
        assert_eq!(second.pods("r1")[1].load.outstanding(), 0);
        drop(held);
        assert_eq!(second.pods("r1")[0].load.outstanding(), 0);
        // The same name at a new address is a new pod.
        let third = second.next(
            Split::default(),
            BTreeMap::from([("r1".into(), vec![("a".into(), addr(3))])]),
        );
        assert!(!Arc::ptr_eq(&third.pods("r1")[0], &second.pods("r1")[0]));
        assert!(third.pods("r2").is_empty());
    }

    #[test]
    fn latency_rises_at_once_falls_gradually_and_decays_while_idle() {
        let load = PodLoad::default();
        let now = Instant::now();
        assert_eq!(load.latency_us(now), 0.0);
        load.answered(Duration::from_millis(1), now);
        assert!((load.latency_us(now) - 1000.0).abs() < 1.0);
        load.answered(Duration::from_millis(10), now);
        assert!(
            (load.latency_us(now) - 10_000.0).abs() < 1.0,
            "a peak counts at once"
        );
        load.answered(Duration::from_millis(1), now);
        let after = load.latency_us(now);
        assert!(after < 10_000.0 && after > 5_000.0, "{after}");
        let later = load.latency_us(now + LATENCY_DECAY * 3);
        assert!(later < after / 10.0, "{later}");
    }

    #[test]
    fn a_report_counts_while_fresh_and_malformed_ones_are_ignored() {
        let load = PodLoad::default();
        let now = Instant::now();
        assert_eq!(load.work(now), (0, 1));
        load.report("6/8", now);
        assert_eq!(load.work(now), (6, 8));
        let _one = load.start();
        assert_eq!(load.work(now), (6, 8), "the report already holds ours");
        assert_eq!(load.work(now + REPORT_FRESH_FOR * 2), (1, 8));
        for bad in ["", "7", "x/8", "3/", "-1/4"] {
            load.report(bad, now);
            assert_eq!(load.work(now), (6, 8), "{bad:?}");
        }
        load.report("2/0", now);
        assert_eq!(load.work(now), (2, 1), "capacity is at least 1");
    }
}
