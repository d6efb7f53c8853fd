//! Idle cores lent to a forward pass: while other workers of the runtime have nothing to do,
//! one request's matrix multiplies split their output columns over helper threads, so a
//! lone request's latency falls. When every worker is busy nothing splits: each request keeps
//! its own core and throughput is what it was.
//!
//! The runtime's batch workers run each forward pass through [`Cores::run`], on one of
//! `workers` threads kept for them (so the allocator keeps no more arenas than there are
//! workers: with tokio's blocking pool, passes wandered over up to 9 threads and peak memory
//! grew with them), inside [`Cores::lend`]; the int8 kernel
//! asks [`split`], which splits only inside such a pass and only while a worker is idle.
//! Helpers and the pass's own thread take chunks from one counter, so a helper that wakes late
//! (or never) costs nothing: the owner computes what is left, and waits only for chunks a
//! helper has taken. That is why helpers hold their inputs by `Arc` and return their results
//! instead of borrowing: the owner never waits for a helper merely to start.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper stays awake after its last chunk. A forward pass posts work every few
/// tens of microseconds, and waking a sleeping thread costs about as long as a chunk takes,
/// so a helper that slept between a pass's matrix multiplies would never win a chunk.
const STAY_AWAKE: Duration = Duration::from_micros(200);

/// The runtime's workers and the helper threads that lend their cores.
pub struct Cores {
    /// Workers and how many are busy, shared with the helpers.
    count: Arc<Count>,
    /// Forward passes for the worker threads.
    passes: mpsc::Sender<Pass>,
    /// `workers − 1` threads: with one pass running, every other core helps it.
    helpers: Option<Helpers>,
}

type Pass = Box<dyn FnOnce() + Send>;

/// The workers, and how many run a forward pass now.
#[derive(Debug)]
struct Count {
    workers: usize,
    busy: AtomicUsize,
}

impl Count {
    /// Workers with nothing to do, whose cores may help.
    fn idle(&self) -> usize {
        self.workers
            .saturating_sub(self.busy.load(Ordering::SeqCst))
            .min(self.workers - 1)
    }
}

impl Cores {
    /// For `workers` forward passes at once, one core each. Should the helper threads not
    /// start, passes run alone, as with one worker.
    pub fn new(workers: usize) -> Arc<Self> {
        let workers = workers.max(1);
        let count = Arc::new(Count {
            workers,
            busy: AtomicUsize::new(0),
        });
        let helpers = (workers > 1)
            .then(|| {
                Helpers::start(workers - 1, count.clone())
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "no helper threads: a request uses one core")
                    })
                    .ok()
            })
            .flatten();
        let (passes, queue) = mpsc::channel::<Pass>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let queue = queue.clone();
            let started = std::thread::Builder::new()
                .name(format!("kasmina-worker-{i}"))
                .spawn(move || {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(pass) = next else { break };
                        pass();
                    }
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "a worker thread did not start");
            }
        }
        Arc::new(Self {
            count,
            passes,
            helpers,
        })
    }

    /// Runs a forward pass on a worker thread, inside [`Cores::lend`]. Should the workers be
    /// gone (they never stop while the `Cores` live), it runs on this thread.
    pub fn run(self: &Arc<Self>, pass: impl FnOnce() + Send + 'static) {
        let cores = self.clone();
        let pass: Pass = Box::new(move || cores.lend(pass));
        if let Err(unsent) = self.passes.send(pass) {
            (unsent.0)();
        }
    }

    /// Runs one forward pass on this thread, counted busy; its splittable work may use the
    /// helpers while other workers are idle.
    pub fn lend<R>(self: &Arc<Self>, pass: impl FnOnce() -> R) -> R {
        self.count.busy.fetch_add(1, Ordering::SeqCst);
        let _done = Done(&self.count);
        CURRENT.with(|current| {
            let previous = current.replace(Some(self.clone()));
            let _restore = Restore(previous);
            pass()
        })
    }

    fn idle(&self) -> usize {
        self.count.idle()
    }

    /// The helpers and how many workers are idle, if work split now would be shared.
    fn lent(&self) -> Option<(&Helpers, usize)> {
        let idle = self.idle();
        self.helpers
            .as_ref()
            .filter(|_| idle > 0)
            .map(|h| (h, idle))
    }
}

/// Threads that compute posted chunks, spinning up to [`STAY_AWAKE`] after each before they
/// sleep, but only while a worker is idle: a helper never spins on a core a worker needs.
struct Helpers {
    board: Arc<Board>,
    threads: Vec<JoinHandle<()>>,
}

/// Work posted to the helpers.
struct Board {
    count: Arc<Count>,
    jobs: Mutex<VecDeque<Arc<dyn Help>>>,
    /// Jobs on the board, read without the lock while spinning.
    posted: AtomicUsize,
    /// Helpers waiting on `wake`; a post wakes one only if some sleep (a spinning helper
    /// sees the post by itself, and waking costs the poster a system call).
    sleeping: AtomicUsize,
    wake: Condvar,
    stop: AtomicBool,
}

trait Help: Send + Sync {
    /// Computes chunks while any are left and a worker is idle (`count`): once every worker
    /// is busy, the helper's core is theirs.
    fn help(&self, count: &Count);
}

impl Helpers {
    fn start(threads: usize, count: Arc<Count>) -> std::io::Result<Self> {
        let board = Arc::new(Board {
            count,
            jobs: Mutex::default(),
            posted: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut helpers = Self {
            board: board.clone(),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let board = board.clone();
            helpers.threads.push(
                std::thread::Builder::new()
                    .name(format!("kasmina-helper-{i}"))
                    .spawn(move || board.serve())?,
            );
        }
        Ok(helpers)
    }

    fn post(&self, job: Arc<dyn Help>) {
        let sleeping = {
            let mut jobs = self.board.lock();
            jobs.push_back(job);
            self.board.posted.fetch_add(1, Ordering::Release);
            self.board.sleeping.load(Ordering::Acquire)
        };
        if sleeping > 0 {
            self.board.wake.notify_one();
        }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        self.board.stop.store(true, Ordering::Release);
        // Under the lock, so no helper is between its check and its wait.
        drop(self.board.lock());
        self.board.wake.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<dyn Help>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A helper's life: take jobs; without one, spin a while if a worker is idle; then sleep
    /// until one is posted.
    fn serve(&self) {
        let mut last = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            if self.posted.load(Ordering::Acquire) > 0 {
                let job = self.lock().pop_front();
                if let Some(job) = job {
                    self.posted.fetch_sub(1, Ordering::AcqRel);
                    job.help(&self.count);
                    last = Instant::now();
                    continue;
                }
            }
            if self.count.idle() > 0 && last.elapsed() < STAY_AWAKE {
                std::hint::spin_loop();
                continue;
            }
            let mut jobs = self.lock();
            // Counted under the lock: a post either sees this helper asleep or is seen by it.
            self.sleeping.fetch_add(1, Ordering::AcqRel);
            while jobs.is_empty() && !self.stop.load(Ordering::Acquire) {
                jobs = self.wake.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
            self.sleeping.fetch_sub(1, Ordering::AcqRel);
            last = Instant::now();
        }
    }
}

struct Done<'a>(&'a Count);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Restore(Option<Arc<Cores>>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|current| *current.borrow_mut() = previous);
    }
}

thread_local! {
    /// The cores of the forward pass running on this thread, if it runs inside `lend`.
    static CURRENT: RefCell<Option<Arc<Cores>>> = const { RefCell::new(None) };
}

/// Whether work split now would be shared: inside a forward pass run by [`Cores::lend`],
/// with helpers, while a worker is idle.
pub fn helping() -> bool {
    CURRENT.with(|current| {
        current
            .borrow()
            .as_ref()
            .is_some_and(|c| c.lent().is_some())
    })
}

/// Runs chunks `0..chunks`: this thread calls `own(i)` for the chunks it takes. Inside a
/// forward pass run by [`Cores::lend`] while other workers are idle, helpers take chunks too
/// and compute them with `shared(i)`; the chunks they computed are returned, for the caller
/// to place. Otherwise every chunk is `own`'s and nothing is returned.
///
/// A panic in a helper's `shared` is raised here, on the calling thread.
pub fn split<F>(chunks: usize, shared: F, mut own: impl FnMut(usize)) -> Vec<usize>
where
    F: Fn(usize) + Send + Sync + 'static,
{
    let cores = CURRENT.with(|current| current.borrow().clone());
    let lent = cores
        .as_ref()
        .and_then(|cores| cores.lent())
        .filter(|_| chunks > 1);
    let Some((helpers, idle)) = lent else {
        (0..chunks).for_each(own);
        return Vec::new();
    };
    let task = Arc::new(Task {
        chunks,
        next: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        results: Mutex::new(Vec::with_capacity(chunks)),
        shared,
    });
    for _ in 0..idle.min(chunks - 1) {
        helpers.post(task.clone());
    }
    let mut mine = 0;
    while let Some(i) = task.take() {
        own(i);
        mine += 1;
    }
    // Every chunk is taken; wait for those helpers took (each a few microseconds of work).
    let theirs = chunks - mine;
    let mut spins = 0u32;
    while task.finished.load(Ordering::Acquire) < theirs {
        spins += 1;
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    let results = std::mem::take(&mut *task.results.lock().unwrap_or_else(|e| e.into_inner()));
    results
        .into_iter()
        .map(|(i, ok)| match ok {
            true => i,
            false => panic!("a helper thread panicked computing chunk {i}"),
        })
        .collect()
}

/// Chunks being shared: the next to take, and which helpers computed (`false`: it panicked).
struct Task<F> {
    chunks: usize,
    next: AtomicUsize,
    finished: AtomicUsize,
    results: Mutex<Vec<(usize, bool)>>,
    shared: F,
}

impl<F: Fn(usize)> Task<F> {
    fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::AcqRel);
        (i < self.chunks).then_some(i)
    }
}

impl<F: Fn(usize) + Send + Sync> Help for Task<F> {
    fn help(&self, count: &Count) {
        while count.idle() > 0
            && let Some(i) = self.take()
        {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| (self.shared)(i))).is_ok();
            self.results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((i, result));
            self.finished.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicBool;

    /// Splits `chunks`, returning which chunks the caller computed and which helpers did.
    fn run(
        chunks: usize,
        shared: impl Fn(usize) + Send + Sync + 'static,
    ) -> (Vec<usize>, Vec<usize>) {
        let mut own = Vec::new();
        let helped = split(chunks, shared, |i| own.push(i));
        (own, helped)
    }

    fn every_chunk_once(own: &[usize], helped: &[usize], chunks: usize) {
        let mut all: Vec<usize> = own.iter().chain(helped).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..chunks).collect::<Vec<_>>());
    }

    #[test]
    fn outside_a_pass_the_caller_computes_every_chunk() {
        let (own, helped) = run(5, |_| panic!("no helper outside a pass"));
        assert_eq!(own, [0, 1, 2, 3, 4]);
        assert!(helped.is_empty());
    }

    #[test]
    fn a_lone_pass_shares_its_chunks_and_each_is_computed_once() {
        let cores = Cores::new(2);
        let (own, helped) = cores.lend(|| {
            assert_eq!(cores.idle(), 1);
            assert!(helping());
            run(1000, |_| ())
        });
        assert!(!helping(), "outside the pass");
        // How many the helper won depends on scheduling; each chunk is computed once.
        every_chunk_once(&own, &helped, 1000);
        assert_eq!(cores.count.busy.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_helper_computes_a_chunk_while_the_caller_is_held_up() {
        let cores = Cores::new(2);
        // The caller's first chunk waits for a helper's chunk to start: only a helper can.
        let both = Arc::new(Barrier::new(2));
        let helper_side = both.clone();
        let mut own = Vec::new();
        let helped = cores.lend(|| {
            split(
                2,
                move |_| {
                    helper_side.wait();
                },
                |i| {
                    own.push(i);
                    both.wait();
                },
            )
        });
        assert_eq!(own.len(), 1);
        assert_eq!(helped.len(), 1);
        assert_ne!(own[0], helped[0]);
    }

    #[test]
    fn with_every_worker_busy_nothing_is_shared() {
        let cores = Cores::new(2);
        let other = Barrier::new(2);
        let release = Barrier::new(2);
        let helped = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            s.spawn(|| {
                cores.lend(|| {
                    other.wait();
                    release.wait();
                })
            });
            other.wait();
            let flag = helped.clone();
            let (own, theirs) = cores.lend(|| {
                assert_eq!(cores.idle(), 0);
                assert!(!helping());
                run(100, move |_| flag.store(true, Ordering::SeqCst))
            });
            release.wait();
            assert_eq!(own.len(), 100);
            assert!(theirs.is_empty());
        });
        assert!(!helped.load(Ordering::SeqCst));
        assert_eq!(cores.count.busy.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_helpers_panic_is_raised_on_the_caller() {
        let cores = Cores::new(2);
        let both = Arc::new(Barrier::new(2));
        let helper_side = both.clone();
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            cores.lend(|| {
                split(
                    2,
                    move |_| {
                        helper_side.wait();
                        panic!("boom");
                    },
                    |_| {
                        both.wait();
                    },
                )
            })
        }));
        assert!(caught.is_err());
        assert_eq!(
            cores.count.busy.load(Ordering::SeqCst),
            0,
            "the worker is not left busy"
        );
    }

    #[test]
    fn helpers_stop_when_the_cores_are_dropped() {
        let cores = Cores::new(3);
        let board = Arc::downgrade(&cores.helpers.as_ref().unwrap().board);
        drop(cores);
        // Every helper thread has returned and let go of the board.
        assert!(board.upgrade().is_none());
    }

    #[test]
    fn passes_run_on_the_worker_threads_inside_lend() {
        let cores = Cores::new(2);
        let (tx, rx) = mpsc::channel();
        for _ in 0..4 {
            let (tx, inner) = (tx.clone(), cores.clone());
            cores.run(move || {
                let name = std::thread::current().name().map(String::from);
                tx.send((name, inner.count.busy.load(Ordering::SeqCst)))
                    .unwrap();
            });
        }
        for _ in 0..4 {
            let (name, busy) = rx.recv().unwrap();
            assert!(name.unwrap().starts_with("kasmina-worker-"));
            assert!(busy >= 1, "counted busy while it runs");
        }
    }

    #[test]
    fn one_worker_has_no_helpers() {
        let cores = Cores::new(1);
        let (own, helped) = cores.lend(|| run(10, |_| panic!("no helper with one worker")));
        assert_eq!(own.len(), 10);
        assert!(helped.is_empty());
    }
}
