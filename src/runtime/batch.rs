//! Dynamic batching: admitted requests wait in one bounded queue; a collector takes up to
//! `max_batch` items (or whatever arrived within `max_batch_delay`) as soon as a worker is
//! free, runs them as one forward pass on a bounded pool of worker threads, and routes each
//! caller its own rows. Requests whose callers gave up (timeout, disconnect) are skipped.
//!
//! Batching adapts to what it measures ([`Costs`]). While batches cost clearly less per item
//! than single requests (candle's F32 GEMM), a batch takes its share of the work in the
//! replica and waits up to `max_batch_delay` to fill it. Once they do not (the int8 Q8_0
//! kernel: a batch saves about 13 % per item), batching would only tie callers' latencies
//! together, so the workers take one request at a time and never wait.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::load::Load;
use super::protocol::Items;
use crate::model::cores::Cores;

/// A model the batcher can run: one output row per input item, in order.
pub trait Engine: Send + Sync + 'static {
    fn infer(&self, items: &Items) -> Result<Vec<Vec<f32>>, String>;
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Items per forward pass; 1 turns batching off.
    pub max_batch: usize,
    /// How long the first request of a batch waits for company.
    pub max_delay: Duration,
    /// Requests admitted beyond what the workers hold; the queue never grows past this.
    pub max_queue: usize,
    /// Forward passes at once, each on its own thread.
    pub workers: usize,
    /// Shed a request when the work ahead of it would keep it waiting longer than this
    /// (estimated from the measured time per item); `None` sheds only on a full queue.
    /// This keeps the latency of admitted requests bounded under overload.
    pub max_queue_delay: Option<Duration>,
}

impl BatchConfig {
    /// Work the replica can hold at once: workers × max batch.
    pub fn capacity(&self) -> usize {
        self.workers.max(1) * self.max_batch.max(1)
    }

    /// Work the replica computes at once: the full capacity while batching pays, one item
    /// per worker once it does not. The cognitive load is measured against this, so a
    /// replica running one request per worker reports its queue as overload.
    pub fn working_capacity(&self, batching_pays: bool) -> usize {
        if batching_pays {
            self.capacity()
        } else {
            self.workers.max(1)
        }
    }

    /// Requests admitted at once: the queue plus what the workers hold.
    pub fn admitted(&self) -> usize {
        self.max_queue + self.capacity()
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error("the request queue is full")]
    Full,
    #[error("the wait would exceed the queue delay limit")]
    TooSlow,
    #[error("the runtime is shutting down")]
    Closed,
    #[error("inference failed: {0}")]
    Failed(String),
}

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, BatchError>>;

struct Job {
    items: Items,
    reply: Reply,
}

/// The handle requests are submitted through; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    load: Arc<Load>,
    max_queue_delay: Option<Duration>,
    workers: usize,
}

impl Batcher {
    /// Starts the collector; it ends once every `Batcher` clone is dropped and the last
    /// batch has finished.
    pub fn start(
        engine: Arc<dyn Engine>,
        config: BatchConfig,
        load: Arc<Load>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.admitted().max(1));
        let collector = tokio::spawn(collect(rx, engine, config, load.clone()));
        let batcher = Self {
            tx,
            load,
            max_queue_delay: config.max_queue_delay,
            workers: config.workers.max(1),
        };
        (batcher, collector)
    }

    /// Queues `items` and waits for their rows. Never blocks on a full queue: it answers
    /// `Full` at once, so the caller can shed the request.
    pub async fn infer(&self, items: Items) -> Result<Vec<Vec<f32>>, BatchError> {
        if let Some(limit) = self.max_queue_delay
            && self.load.expected_wait(self.workers) > limit
        {
            return Err(BatchError::TooSlow);
        }
        let (reply, rx) = oneshot::channel();
        self.load.enqueued(Instant::now());
        if let Err(e) = self.tx.try_send(Job { items, reply }) {
            self.load.dequeued(1, 0, Instant::now());
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => BatchError::Full,
                mpsc::error::TrySendError::Closed(_) => BatchError::Closed,
            });
        }
        rx.await.map_err(|_| BatchError::Closed)?
    }
}

async fn collect(
    mut rx: mpsc::Receiver<Job>,
    engine: Arc<dyn Engine>,
    config: BatchConfig,
    load: Arc<Load>,
) {
    let workers = Arc::new(Semaphore::new(config.workers.max(1)));
    let cores = Cores::new(config.workers);
    let max_batch = config.max_batch.max(1);
    let costs = Arc::new(Costs::default());
    let mut carry: Option<Job> = None;
    let mut batching = true;
    loop {
        // A batch forms only once a worker can take it, so a busy replica batches fuller.
        let Ok(permit) = workers.clone().acquire_owned().await else {
            break;
        };
        let first = match carry.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let pays = costs.batching_pays();
        if pays != batching {
            batching = pays;
            load.set_capacity(config.working_capacity(pays), Instant::now());
        }
        let (limit, wait) = plan(
            max_batch,
            1 + rx.len(),
            usize::try_from(load.inflight()).unwrap_or(0),
            workers.available_permits() + 1,
            config.workers.max(1),
            pays,
        );
        let mut size = first.items.len();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while size < limit {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) if wait && !config.max_delay.is_zero() => {
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(_) => None,
            };
            let Some(job) = next else { break };
            if size + job.items.len() > max_batch {
                carry = Some(job);
                break;
            }
            size += job.items.len();
            jobs.push(job);
        }
        let taken = jobs.len();
        jobs.retain(|job| !job.reply.is_closed());
        load.dequeued(taken, jobs.len(), Instant::now());
        if jobs.is_empty() {
            continue;
        }
        let engine = engine.clone();
        let load = load.clone();
        let costs = costs.clone();
        cores.run(move || {
            run(engine.as_ref(), jobs, &load, &costs);
            drop(permit);
        });
    }
    // Wait for the batches still running before reporting the queue drained.
    let _ = workers.acquire_many(config.workers.max(1) as u32).await;
}

/// The next batch: how many items it may take, and whether it waits up to the batch delay
/// for them. `waiting` requests are queued (the first included), `running` are being
/// computed by the other workers, out of `workers`; `idle` workers are free (this one
/// included).
///
/// When batching pays, the batch takes its share of all the work in the replica, running
/// included: taking the whole queue would leave it to one core while another frees up
/// moments later, and the last in that batch waits for every item ahead of it. When it does
/// not pay, one request at a time: whichever worker frees first takes the next, which is
/// the shortest wait for everyone.
fn plan(
    max_batch: usize,
    waiting: usize,
    running: usize,
    idle: usize,
    workers: usize,
    batching_pays: bool,
) -> (usize, bool) {
    if !batching_pays {
        return (1, false);
    }
    let limit = if workers <= 1 {
        max_batch.max(1)
    } else {
        share(max_batch, waiting + running, workers)
    };
    // Wait for company only while every other worker is busy: an idle one would take it.
    (limit, idle <= 1)
}

/// An equal share of `waiting` among `among` workers, within 1..=max_batch.
fn share(max_batch: usize, waiting: usize, among: usize) -> usize {
    waiting.div_ceil(among.max(1)).clamp(1, max_batch.max(1))
}

/// Measured seconds per item of single-item batches and of larger ones, smoothed as the
/// load's figure is.
#[derive(Debug, Default)]
struct Costs {
    single: AtomicU64,
    batched: AtomicU64,
}

impl Costs {
    fn observe(&self, items: usize, took: Duration) {
        if items == 0 {
            return;
        }
        let slot = if items == 1 {
            &self.single
        } else {
            &self.batched
        };
        super::load::smooth(slot, took.as_secs_f64() / items as f64);
    }

    /// Whether batches cost at least a fifth less per item than single requests; assumed
    /// until both have been measured. A smaller saving does not pay for what a batch costs
    /// its callers: each waits for every item in it (on the int8 kernel batches save about
    /// 13 %, and 8 clients saw p99 42–46 ms batching against 36–39 ms one at a time).
    fn batching_pays(&self) -> bool {
        let single = f64::from_bits(self.single.load(Ordering::Relaxed));
        let batched = f64::from_bits(self.batched.load(Ordering::Relaxed));
        single == 0.0 || batched == 0.0 || batched < 0.8 * single
    }
}

/// Runs one batch and answers every caller, whatever happens inside the model.
fn run(engine: &dyn Engine, jobs: Vec<Job>, load: &Load, costs: &Costs) {
    let counts: Vec<usize> = jobs.iter().map(|j| j.items.len()).collect();
    let (merged, replies) = merge(jobs);
    let expected = merged.as_ref().map_or(0, Items::len);
    let started = Instant::now();
    let result = match merged {
        Some(items) => match std::panic::catch_unwind(AssertUnwindSafe(|| engine.infer(&items))) {
            Ok(Ok(rows)) if rows.len() == expected => Ok(rows),
            Ok(Ok(rows)) => Err(BatchError::Failed(format!(
                "the model returned {} rows for {expected} inputs",
                rows.len()
            ))),
            Ok(Err(message)) => Err(BatchError::Failed(message)),
            Err(_) => Err(BatchError::Failed("the model panicked".into())),
        },
        None => Err(BatchError::Failed(
            "a batch mixed text and tensor inputs".into(),
        )),
    };
    let now = Instant::now();
    if result.is_ok() {
        load.observe_batch(expected, now - started);
        costs.observe(expected, now - started);
    }
    load.finished(replies.len(), now);
    match result {
        Ok(rows) => {
            let mut rows = rows.into_iter();
            for (reply, n) in replies.into_iter().zip(counts) {
                let mine: Vec<Vec<f32>> = rows.by_ref().take(n).collect();
                let _ = reply.send(Ok(mine));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Concatenates the jobs' items into one batch; `None` if the kinds differ.
fn merge(jobs: Vec<Job>) -> (Option<Items>, Vec<Reply>) {
    let mut texts: Vec<String> = vec![];
    let mut rows: Vec<Vec<f32>> = vec![];
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job.items {
            Items::Texts(t) => texts.extend(t),
            Items::Rows(r) => rows.extend(r),
        }
        replies.push(job.reply);
    }
    let merged = match (texts.is_empty(), rows.is_empty()) {
        (_, true) => Some(Items::Texts(texts)),
        (true, false) => Some(Items::Rows(rows)),
        (false, false) => None,
    };
    (merged, replies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::load::InfoLabels;
    use prometheus_client::registry::Registry;
    use std::sync::Mutex;

    /// Echoes each text's length and records the batch sizes it saw.
    struct Echo {
        batches: Mutex<Vec<usize>>,
    }

    impl Engine for Echo {
        fn infer(&self, items: &Items) -> Result<Vec<Vec<f32>>, String> {
            let Items::Texts(texts) = items else {
                return Err("texts only".into());
            };
            self.batches.lock().unwrap().push(texts.len());
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        }
    }

    struct Panics;

    impl Engine for Panics {
        fn infer(&self, _: &Items) -> Result<Vec<Vec<f32>>, String> {
            panic!("boom")
        }
    }

    fn load(capacity: usize) -> Arc<Load> {
        let info = InfoLabels {
            model: "m".into(),
            version: "1".into(),
            revision: String::new(),
            digest: String::new(),
            quantization: String::new(),
            kernel: String::new(),
        };
        Arc::new(Load::new(
            &mut Registry::default(),
            info,
            capacity,
            Instant::now(),
        ))
    }

    fn config(max_batch: usize, max_delay: Duration) -> BatchConfig {
        BatchConfig {
            max_batch,
            max_delay,
            max_queue: 256,
            workers: 1,
            max_queue_delay: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_rows_under_concurrency() {
        let engine = Arc::new(Echo {
            batches: Mutex::new(vec![]),
        });
        let cfg = config(8, Duration::from_millis(20));
        let load = load(cfg.capacity());
        let (batcher, collector) = Batcher::start(engine.clone(), cfg, load.clone());
        let calls: Vec<_> = (0..64)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move {
                    let text = "x".repeat(i + 1);
                    let texts = vec![text.clone(), format!("{text}yy")];
                    (i, b.infer(Items::Texts(texts)).await)
                })
            })
            .collect();
        for call in calls {
            let (i, rows) = call.await.unwrap();
            assert_eq!(
                rows.unwrap(),
                vec![vec![(i + 1) as f32], vec![(i + 3) as f32]],
                "caller {i}"
            );
        }
        drop(batcher);
        collector.await.unwrap();
        let batches = engine.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 128);
        assert!(batches.iter().all(|b| *b <= 8), "{batches:?}");
        assert!(
            batches.len() < 64,
            "64 concurrent callers should share batches: {batches:?}"
        );
        assert_eq!((load.queued(), load.inflight()), (0, 0));
    }

    #[test]
    fn batches_wait_for_company_only_while_batching_pays() {
        // plan(max_batch, waiting, running, idle, workers, pays)
        // Batching pays, the other worker busy with 4: a share of the 5, waiting to fill it.
        assert_eq!(plan(8, 1, 4, 1, 2, true), (3, true));
        // Two free and eight queued: four each, at once.
        assert_eq!(plan(8, 8, 0, 2, 2, true), (4, false));
        assert_eq!(
            plan(8, 1, 0, 2, 2, true),
            (1, false),
            "nobody else queued: run at once"
        );
        assert_eq!(
            plan(8, 30, 8, 1, 2, true),
            (8, true),
            "never past max_batch"
        );
        // A lone worker shares with nobody: a full batch.
        assert_eq!(plan(8, 1, 0, 1, 1, true), (8, true));
        // Batching does not pay: one at a time, never waiting.
        assert_eq!(plan(8, 1, 4, 1, 2, false), (1, false));
        assert_eq!(plan(8, 30, 8, 1, 2, false), (1, false));
        assert_eq!(plan(1, 8, 0, 2, 2, true), (1, false));
    }

    #[test]
    fn the_load_counts_one_item_per_worker_once_batching_stops() {
        let cfg = BatchConfig {
            workers: 2,
            ..config(8, Duration::from_millis(2))
        };
        assert_eq!(cfg.working_capacity(true), 16);
        assert_eq!(cfg.working_capacity(false), 2);
        assert_eq!(config(1, Duration::ZERO).working_capacity(true), 1);
    }

    #[test]
    fn batching_pays_until_batches_measure_no_cheaper_per_item() {
        let costs = Costs::default();
        assert!(costs.batching_pays(), "unmeasured: assumed");
        costs.observe(1, Duration::from_millis(10));
        assert!(costs.batching_pays(), "batches not yet measured");
        // GEMM-like: 4 items in 20 ms, 5 ms each.
        costs.observe(4, Duration::from_millis(20));
        assert!(costs.batching_pays());
        // int8-like: batches of 4 settle at 11 ms per item.
        for _ in 0..40 {
            costs.observe(4, Duration::from_millis(44));
        }
        assert!(!costs.batching_pays());
        // A saving under a fifth does not pay either: 8.5 ms per item against 10.
        for _ in 0..40 {
            costs.observe(4, Duration::from_millis(34));
        }
        assert!(!costs.batching_pays());
        // And back, once batches get cheaper again.
        for _ in 0..40 {
            costs.observe(4, Duration::from_millis(16));
        }
        assert!(costs.batching_pays());
    }

    /// Echo that holds every batch until `open`, so the test sees how batches formed while
    /// no worker had finished.
    struct Gated {
        open: std::sync::atomic::AtomicBool,
        echo: Echo,
    }

    impl Engine for Gated {
        fn infer(&self, items: &Items) -> Result<Vec<Vec<f32>>, String> {
            while !self.open.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            self.echo.infer(items)
        }
    }

    #[tokio::test]
    async fn a_queue_is_split_among_idle_workers_not_taken_by_the_first() {
        let engine = Arc::new(Gated {
            open: false.into(),
            echo: Echo {
                batches: Mutex::new(vec![]),
            },
        });
        let cfg = BatchConfig {
            workers: 2,
            ..config(8, Duration::from_millis(50))
        };
        let load = load(cfg.capacity());
        let (batcher, collector) = Batcher::start(engine.clone(), cfg, load.clone());
        let b = batcher.clone();
        // Single-threaded runtime: all eight are queued in one poll, before the collector
        // takes the first.
        let calls = tokio::spawn(async move {
            futures::future::join_all(
                (0..8).map(|i| b.infer(Items::Texts(vec!["x".repeat(i + 1)]))),
            )
            .await
        });
        while load.inflight() < 8 {
            tokio::task::yield_now().await;
        }
        engine.open.store(true, Ordering::SeqCst);
        for (i, row) in calls.await.unwrap().into_iter().enumerate() {
            assert_eq!(row.unwrap(), vec![vec![(i + 1) as f32]]);
        }
        drop(batcher);
        collector.await.unwrap();
        assert_eq!(*engine.echo.batches.lock().unwrap(), vec![4, 4]);
    }

    #[tokio::test]
    async fn batching_off_runs_one_item_at_a_time() {
        let engine = Arc::new(Echo {
            batches: Mutex::new(vec![]),
        });
        let cfg = config(1, Duration::ZERO);
        let (batcher, collector) = Batcher::start(engine.clone(), cfg, load(1));
        let a = batcher.infer(Items::Texts(vec!["ab".into()]));
        let b = batcher.infer(Items::Texts(vec!["abc".into()]));
        let (a, b) = tokio::join!(a, b);
        assert_eq!((a.unwrap(), b.unwrap()), (vec![vec![2.0]], vec![vec![3.0]]));
        drop(batcher);
        collector.await.unwrap();
        assert_eq!(*engine.batches.lock().unwrap(), vec![1, 1]);
    }

    #[tokio::test]
    async fn a_full_queue_answers_at_once() {
        let engine = Arc::new(Echo {
            batches: Mutex::new(vec![]),
        });
        let cfg = BatchConfig {
            max_batch: 1,
            max_delay: Duration::ZERO,
            max_queue: 0,
            workers: 1,
            max_queue_delay: None,
        };
        let load = load(1);
        let (batcher, collector) = Batcher::start(engine, cfg, load.clone());
        // The collector has not run yet (single-threaded runtime): the one slot fills.
        let first = batcher.infer(Items::Texts(vec!["a".into()]));
        let second = batcher.infer(Items::Texts(vec!["b".into()]));
        let (first, second) = tokio::join!(first, second);
        assert_eq!(first.unwrap(), vec![vec![1.0]]);
        assert_eq!(second, Err(BatchError::Full));
        drop(batcher);
        collector.await.unwrap();
        assert_eq!((load.queued(), load.inflight()), (0, 0));
    }

    #[tokio::test]
    async fn a_panicking_model_fails_the_batch_not_the_server() {
        let (batcher, collector) =
            Batcher::start(Arc::new(Panics), config(4, Duration::ZERO), load(4));
        let err = batcher
            .infer(Items::Texts(vec!["a".into()]))
            .await
            .unwrap_err();
        assert_eq!(err, BatchError::Failed("the model panicked".into()));
        drop(batcher);
        collector.await.unwrap();
    }

    #[tokio::test]
    async fn a_wait_longer_than_the_delay_limit_is_shed_before_queueing() {
        let engine = Arc::new(Echo {
            batches: Mutex::new(vec![]),
        });
        let cfg = BatchConfig {
            max_batch: 1,
            max_delay: Duration::ZERO,
            max_queue: 16,
            workers: 1,
            max_queue_delay: Some(Duration::from_millis(50)),
        };
        let load = load(1);
        // Measured: 20 ms per item. Three requests held → 60 ms ahead of the next one.
        load.observe_batch(1, Duration::from_millis(20));
        let t = Instant::now();
        for _ in 0..3 {
            load.enqueued(t);
        }
        let (batcher, collector) = Batcher::start(engine, cfg, load.clone());
        let refused = batcher.infer(Items::Texts(vec!["a".into()])).await;
        assert_eq!(refused, Err(BatchError::TooSlow));
        // Two held → 40 ms: admitted.
        load.dequeued(1, 0, t);
        let admitted = batcher.infer(Items::Texts(vec!["ab".into()])).await;
        assert_eq!(admitted.unwrap(), vec![vec![2.0]]);
        drop(batcher);
        collector.await.unwrap();
    }
}
