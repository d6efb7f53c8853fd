//! Cognitive-load accounting: how much work the replica holds against what it can hold, the
//! figure the ScalingPolicy controller scales on (DESIGN §4), plus the runtime's metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Time constant of the load's exponential smoothing: long enough to hide one batch's
/// arrival, short enough that a 5 s scrape sees a surge within one interval.
pub const SMOOTHING: Duration = Duration::from_secs(2);

/// A time-weighted exponential moving average of a piecewise-constant signal: exact however
/// irregular the updates, so the figure does not depend on how often requests arrive.
#[derive(Clone, Copy, Debug)]
pub struct Smoothed {
    value: f64,
    current: f64,
    at: Instant,
    tau: Duration,
}

impl Smoothed {
    pub fn new(at: Instant, tau: Duration) -> Self {
        Self {
            value: 0.0,
            current: 0.0,
            at,
            tau,
        }
    }

    /// The average at `now`, the signal having held `current` since the last change.
    pub fn value_at(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        let keep = (-dt / self.tau.as_secs_f64().max(1e-9)).exp();
        self.current + (self.value - self.current) * keep
    }

    /// The signal changes to `current` at `now`.
    pub fn set(&mut self, current: f64, now: Instant) {
        self.value = self.value_at(now);
        self.current = current;
        self.at = now.max(self.at);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    pub model: String,
    pub version: String,
    pub revision: String,
    pub digest: String,
    pub quantization: String,
    /// The int8 matrix kernel serving (see `model::q8::Kernel`).
    pub kernel: String,
}

/// The runtime's metrics contract (DESIGN §4) and the counts behind it.
pub struct Load {
    model: String,
    /// Workers × the batch size they run; the exported gauge is the only copy.
    capacity: Gauge,
    queued: AtomicI64,
    inflight: AtomicI64,
    smoothed: Mutex<Smoothed>,
    /// Seconds of compute per item (f64 bits), an exponential average over batches.
    item_seconds: AtomicU64,
    inflight_gauge: Gauge,
    queue_gauge: Gauge,
    load_gauge: Gauge<f64, std::sync::atomic::AtomicU64>,
    duration: Family<OutcomeLabels, Histogram>,
    requests: Family<CodeLabels, Counter>,
}

impl Load {
    /// Registers every metric; `capacity` is workers × max batch.
    pub fn new(registry: &mut Registry, info: InfoLabels, capacity: usize, now: Instant) -> Self {
        let capacity_gauge: Gauge = Gauge::default();
        capacity_gauge.set(capacity.max(1) as i64);
        let model_info = Family::<InfoLabels, Gauge>::default();
        model_info.get_or_create(&info).set(1);
        let load = Self {
            model: info.model.clone(),
            capacity: capacity_gauge,
            queued: AtomicI64::new(0),
            inflight: AtomicI64::new(0),
            smoothed: Mutex::new(Smoothed::new(now, SMOOTHING)),
            item_seconds: std::sync::atomic::AtomicU64::new(0),
            inflight_gauge: Gauge::default(),
            queue_gauge: Gauge::default(),
            load_gauge: Gauge::default(),
            duration: Family::new_with_constructor(|| {
                // 1 ms … ~4 s: an edge encoder answers in milliseconds; the tail matters.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.001, 2.0, 13,
                ))
            }),
            requests: Family::default(),
        };
        registry.register(
            "kasmina_inflight_requests",
            "Requests being computed now",
            load.inflight_gauge.clone(),
        );
        registry.register(
            "kasmina_queue_depth",
            "Requests admitted and waiting for a batch slot",
            load.queue_gauge.clone(),
        );
        registry.register(
            "kasmina_capacity",
            "Work the replica can compute at once: workers x the batch size it runs",
            load.capacity.clone(),
        );
        registry.register(
            "kasmina_cognitive_load",
            "(in-flight + queued) / capacity, smoothed; above 1 means overloaded",
            load.load_gauge.clone(),
        );
        registry.register(
            "kasmina_request_duration_seconds",
            "Inference request duration by model and outcome",
            load.duration.clone(),
        );
        registry.register(
            "kasmina_requests",
            "Inference requests by model and HTTP status code",
            load.requests.clone(),
        );
        registry.register(
            "kasmina_model_info",
            "The served model: name, version, revision, artifact digest and quantization",
            model_info,
        );
        load
    }

    /// A request was admitted and waits for a batch.
    pub fn enqueued(&self, now: Instant) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.changed(now);
    }

    /// `n` waiting requests left the queue: `started` of them are being computed, the rest
    /// were abandoned by their callers.
    pub fn dequeued(&self, n: usize, started: usize, now: Instant) {
        self.queued.fetch_sub(n as i64, Ordering::SeqCst);
        self.inflight.fetch_add(started as i64, Ordering::SeqCst);
        self.changed(now);
    }

    /// `n` computed requests are done.
    pub fn finished(&self, n: usize, now: Instant) {
        self.inflight.fetch_sub(n as i64, Ordering::SeqCst);
        self.changed(now);
    }

    /// A batch of `items` took `took` to compute.
    pub fn observe_batch(&self, items: usize, took: Duration) {
        if items == 0 {
            return;
        }
        smooth(&self.item_seconds, took.as_secs_f64() / items as f64);
    }

    /// How long a request arriving now would wait for a worker: nothing while one is idle;
    /// otherwise until the work ahead of it has drained through all the workers. Counting
    /// every held request as a worker's worth of waiting would shed while workers idle.
    pub fn expected_wait(&self, workers: usize) -> Duration {
        let per_item = f64::from_bits(self.item_seconds.load(Ordering::Relaxed));
        let workers = workers.max(1) as i64;
        let ahead = (self.queued() + self.inflight() - workers + 1).max(0) as f64;
        Duration::from_secs_f64(ahead * per_item / workers as f64)
    }

    /// The work the replica computes at once changed (the batcher stopped or resumed
    /// batching): the load is measured against what it really holds.
    pub fn set_capacity(&self, capacity: usize, now: Instant) {
        self.capacity.set(capacity.max(1) as i64);
        self.changed(now);
    }

    /// (in-flight + queued) / capacity, unsmoothed.
    pub fn instant_load(&self) -> f64 {
        let held = self.queued.load(Ordering::SeqCst) + self.inflight.load(Ordering::SeqCst);
        held.max(0) as f64 / self.capacity.get().max(1) as f64
    }

    /// (in-flight + queued, capacity): what the `kasmina-load` response header reports.
    pub fn held_of_capacity(&self) -> (i64, i64) {
        let held = self.queued.load(Ordering::SeqCst) + self.inflight.load(Ordering::SeqCst);
        (held.max(0), self.capacity.get().max(1))
    }

    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn inflight(&self) -> i64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Brings the smoothed gauge up to `now`; called before every scrape.
    pub fn refresh(&self, now: Instant) -> f64 {
        let value = self.smoothed().value_at(now);
        self.load_gauge.set(value);
        value
    }

    /// Records one finished inference request.
    pub fn record(&self, status: u16, outcome: &str, seconds: f64) {
        self.requests
            .get_or_create(&CodeLabels {
                model: self.model.clone(),
                code: status.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&OutcomeLabels {
                model: self.model.clone(),
                outcome: outcome.into(),
            })
            .observe(seconds);
    }

    /// The average, whatever a panicking holder left: it is plain numbers, always usable.
    fn smoothed(&self) -> std::sync::MutexGuard<'_, Smoothed> {
        self.smoothed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self, now: Instant) {
        let queued = self.queued.load(Ordering::SeqCst).max(0);
        let inflight = self.inflight.load(Ordering::SeqCst).max(0);
        self.queue_gauge.set(queued);
        self.inflight_gauge.set(inflight);
        let current = self.instant_load();
        let mut smoothed = self.smoothed();
        smoothed.set(current, now);
        self.load_gauge.set(smoothed.value_at(now));
    }
}

/// The outcome label of a status code.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "success",
        401 | 403 => "unauthorized",
        503 => "shed",
        504 => "timeout",
        400..=499 => "client_error",
        _ => "error",
    }
}

/// Moves an f64 figure stored as bits a fifth of the way to `sample`; the first sample
/// (the slot still 0) sets it.
pub(super) fn smooth(slot: &AtomicU64, sample: f64) {
    let old = f64::from_bits(slot.load(Ordering::Relaxed));
    let new = if old == 0.0 {
        sample
    } else {
        old + (sample - old) * 0.2
    };
    slot.store(new.to_bits(), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> InfoLabels {
        InfoLabels {
            model: "m".into(),
            version: "1".into(),
            revision: "r".into(),
            digest: "sha256:x".into(),
            quantization: "q8_0".into(),
            kernel: "avx2".into(),
        }
    }

    #[test]
    fn smoothing_is_time_weighted() {
        let t0 = Instant::now();
        let mut s = Smoothed::new(t0, Duration::from_secs(2));
        s.set(1.0, t0);
        // After one time constant the average has covered 1 − 1/e of the step.
        let v = s.value_at(t0 + Duration::from_secs(2));
        assert!((v - (1.0 - (-1.0f64).exp())).abs() < 1e-9, "{v}");
        // Many tiny updates with the same value give the same figure as one.
        let mut many = Smoothed::new(t0, Duration::from_secs(2));
        for i in 0..=200 {
            many.set(1.0, t0 + Duration::from_millis(10 * i));
        }
        assert!((many.value_at(t0 + Duration::from_secs(2)) - v).abs() < 1e-9);
        // Long after the load is gone it decays to zero.
        s.set(0.0, t0 + Duration::from_secs(2));
        assert!(s.value_at(t0 + Duration::from_secs(60)) < 1e-6);
    }

    #[test]
    fn a_request_waits_only_once_every_worker_is_busy() {
        let mut registry = Registry::default();
        let t0 = Instant::now();
        let load = Load::new(&mut registry, info(), 16, t0);
        load.observe_batch(1, Duration::from_millis(10));
        let wait_ms = |workers| load.expected_wait(workers).as_secs_f64() * 1000.0;
        load.enqueued(t0);
        load.dequeued(1, 1, t0);
        assert_eq!(wait_ms(2), 0.0, "one of two workers is idle");
        load.enqueued(t0);
        load.dequeued(1, 1, t0);
        // Both busy: the first to free up takes it, half an item's time on average of two.
        assert_eq!(wait_ms(2), 5.0);
        for _ in 0..4 {
            load.enqueued(t0);
        }
        // Four queued ahead drain through two workers too: 20 ms more.
        assert_eq!(wait_ms(2), 25.0);
        assert_eq!(wait_ms(1), 60.0);
    }

    #[test]
    fn load_counts_queued_and_inflight_against_capacity() {
        let mut registry = Registry::default();
        let t0 = Instant::now();
        let load = Load::new(&mut registry, info(), 4, t0);
        for _ in 0..6 {
            load.enqueued(t0);
        }
        assert_eq!(load.instant_load(), 1.5);
        load.dequeued(4, 3, t0);
        assert_eq!((load.queued(), load.inflight()), (2, 3));
        assert_eq!(load.instant_load(), 1.25);
        load.finished(3, t0);
        load.dequeued(2, 2, t0);
        load.finished(2, t0);
        assert_eq!(load.instant_load(), 0.0);
        // One request at a time on 2 workers: 3 held is 1.5 × capacity, not 0.75.
        load.set_capacity(2, t0);
        for _ in 0..3 {
            load.enqueued(t0);
        }
        assert_eq!(load.instant_load(), 1.5);
        load.dequeued(3, 3, t0);
        load.finished(3, t0);
        load.set_capacity(4, t0);
        // Smoothed: held 1.5 then 1.25 for no time, so the average is still 0 at t0…
        assert!(load.refresh(t0) < 1e-9);

        let mut text = String::new();
        load.record(200, outcome(200), 0.004);
        load.record(503, outcome(503), 0.0001);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for needle in [
            "kasmina_inflight_requests 0",
            "kasmina_queue_depth 0",
            "kasmina_capacity 4",
            "kasmina_cognitive_load",
            "kasmina_request_duration_seconds_bucket{",
            "outcome=\"shed\"",
            "kasmina_requests_total{model=\"m\",code=\"503\"} 1",
            "kasmina_model_info{model=\"m\",version=\"1\",revision=\"r\",digest=\"sha256:x\",quantization=\"q8_0\",kernel=\"avx2\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }

    #[test]
    fn smoothed_load_follows_a_sustained_surge() {
        let mut registry = Registry::default();
        let t0 = Instant::now();
        let load = Load::new(&mut registry, info(), 2, t0);
        for _ in 0..4 {
            load.enqueued(t0);
        }
        // 2.0 held for 10 s (five time constants): the smoothed load is within 1 % of it.
        let v = load.refresh(t0 + Duration::from_secs(10));
        assert!((v - 2.0).abs() < 0.02, "{v}");
    }
}
