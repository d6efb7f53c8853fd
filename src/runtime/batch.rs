//! Dynamic batching: admitted requests wait in one bounded queue; a collector takes up to
//! `max_batch` items (or whatever arrived within `max_batch_delay`) as soon as a worker is
//! free, runs them as one forward pass on a bounded pool of blocking workers, and routes each
//! caller its own rows. Requests whose callers gave up (timeout, disconnect) are skipped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::load::Load;
use super::protocol::Items;

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
    /// Forward passes at once. Each pass already uses every core (candle's thread pool), so
    /// one worker is right for a small device.
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
    let max_batch = config.max_batch.max(1);
    let mut carry: Option<Job> = None;
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
        let mut size = first.items.len();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while size < max_batch {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) if !config.max_delay.is_zero() => {
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
        tokio::task::spawn_blocking(move || {
            run(engine.as_ref(), jobs, &load);
            drop(permit);
        });
    }
    // Wait for the batches still running before reporting the queue drained.
    let _ = workers.acquire_many(config.workers.max(1) as u32).await;
}

/// Runs one batch and answers every caller, whatever happens inside the model.
fn run(engine: &dyn Engine, jobs: Vec<Job>, load: &Load) {
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
