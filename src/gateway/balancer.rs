//! Pure: which ready pod of a revision takes a request. Power of two choices: of two pods
//! drawn at random, the one whose next answer looks soonest — its service time × how many
//! turns the request waits, max(1, (work + 1) / capacity) (see `PodLoad`); it avoids a busy
//! or slower pod without herding every request onto the one that looked idlest last.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::routes::Pod;
use crate::api::edge_deployment::Balancing;

/// Picks a pod of `pods`, avoiding `exclude` (the pod a retry failed on) when there is
/// another; `random(n)` draws from 0..n, `turn` is the round-robin cursor.
pub fn pick(
    pods: &[Arc<Pod>],
    balancing: Balancing,
    exclude: Option<&Pod>,
    now: Instant,
    random: &mut impl FnMut(usize) -> usize,
    turn: &AtomicUsize,
) -> Option<Arc<Pod>> {
    let excluded = |p: &Arc<Pod>| exclude.is_some_and(|e| std::ptr::eq(Arc::as_ptr(p), e));
    let candidates: Vec<&Arc<Pod>> = if pods.len() > 1 {
        pods.iter().filter(|p| !excluded(p)).collect()
    } else {
        pods.iter().collect()
    };
    let pod = match (candidates.len(), balancing) {
        (0, _) => return None,
        (1, _) => candidates[0],
        (n, Balancing::RoundRobin) => candidates[turn.fetch_add(1, Ordering::Relaxed) % n],
        (n, Balancing::PowerOfTwoChoices) => {
            let first = random(n);
            // A second draw distinct from the first: 0..n-1, shifted past it.
            let second = (first + 1 + random(n - 1)) % n;
            let (a, b) = (candidates[first], candidates[second]);
            if cost(a, b, now) <= cost(b, a, now) {
                // Ties (both have a free worker, as fast): the one with fewer turns held.
                a
            } else {
                b
            }
        }
    };
    Some(pod.clone())
}

/// The expected wait at `pod`, then the turns it holds: its service-time estimate ×
/// max(1, (work + 1) / capacity) — with a free worker a request takes one service time,
/// else it waits its turns. The estimate leaves queueing out (`PodLoad::served`): counting
/// it again through the work would make a busy fast pod look slower than an idle slow one.
/// What a pod has not measured yet (no answer, no load report) is taken to be as `other`'s.
fn cost(pod: &Pod, other: &Pod, now: Instant) -> (f64, f64) {
    let (work, capacity) = pod.load.work(now);
    let capacity = if pod.load.reported() {
        capacity
    } else {
        other.load.work(now).1
    };
    let latency = match (pod.load.latency_us(now), other.load.latency_us(now)) {
        (0.0, 0.0) => 1.0,
        (0.0, theirs) => theirs,
        (ours, _) => ours,
    };
    let turns = (work + 1) as f64 / capacity as f64;
    (latency * turns.max(1.0), turns)
}

/// A fast random index for the balancer: std's per-thread random keys hashed with a counter.
pub fn random_below(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: std::cell::Cell<(std::hash::RandomState, u64)> =
            std::cell::Cell::new((std::hash::RandomState::new(), 0));
    }
    if n <= 1 {
        return 0;
    }
    STATE.with(|cell| {
        let (keys, count) = cell.replace((std::hash::RandomState::new(), 0));
        let mut hasher = keys.build_hasher();
        hasher.write_u64(count);
        let value = hasher.finish();
        cell.set((keys, count.wrapping_add(1)));
        (value % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn pods(n: u16) -> Vec<Arc<Pod>> {
        (0..n)
            .map(|i| {
                Arc::new(Pod::new(
                    format!("p{i}"),
                    SocketAddr::from(([10, 0, 0, 1], 8000 + i)),
                ))
            })
            .collect()
    }

    /// The pod power of two choices takes when the random draws are `draws`.
    fn drawn(pods: &[Arc<Pod>], draws: [usize; 2], now: Instant) -> String {
        let mut draws = draws.into_iter();
        let turn = AtomicUsize::new(0);
        pick(
            pods,
            Balancing::PowerOfTwoChoices,
            None,
            now,
            &mut |_| draws.next().unwrap(),
            &turn,
        )
        .unwrap()
        .name
        .clone()
    }

    #[test]
    fn of_two_draws_the_pod_with_less_work_per_capacity_wins() {
        let pods = pods(2);
        let now = Instant::now();
        let _busy = [pods[0].load.start(), pods[0].load.start()];
        for first in [0, 1] {
            assert_eq!(drawn(&pods, [first, 0], now), "p1");
        }
        // A pod with twice the capacity holding twice the work is as loaded: the first draw.
        pods[1].load.report("4/8", now);
        pods[0].load.report("2/4", now);
        assert_eq!(drawn(&pods, [1, 0], now), "p1");
        // A slower pod (capacity 1) reporting the same work loses.
        pods[1].load.report("2/1", now);
        assert_eq!(drawn(&pods, [1, 0], now), "p0");
    }

    #[test]
    fn a_slower_pod_takes_a_request_only_when_the_faster_one_is_much_busier() {
        let pods = pods(2);
        let now = Instant::now();
        pods[0]
            .load
            .answered(std::time::Duration::from_millis(10), now);
        pods[1]
            .load
            .answered(std::time::Duration::from_millis(1), now);
        let choose = |first: usize| drawn(&pods, [first, 0], now);
        assert_eq!(choose(0), "p1");
        let _busy: Vec<_> = (0..5).map(|_| pods[1].load.start()).collect();
        assert_eq!(choose(0), "p1", "1 ms x 6 still beats 10 ms x 1");
        let _busier: Vec<_> = (0..6).map(|_| pods[1].load.start()).collect();
        assert_eq!(choose(1), "p0", "1 ms x 12 does not");
    }

    #[test]
    fn a_busy_fast_pod_is_not_mistaken_for_a_slow_one() {
        let pods = pods(2);
        let now = Instant::now();
        // Both runtimes serve 2 at once. The fast one answered in 40 ms after waiting behind
        // 7 others (10 ms of service); the slow one in 40 ms alone.
        pods[0].load.report("0/2", now);
        pods[1].load.report("0/2", now);
        pods[0]
            .load
            .served(std::time::Duration::from_millis(40), 8, now);
        pods[1]
            .load
            .served(std::time::Duration::from_millis(40), 1, now);
        let choose = |first: usize| drawn(&pods, [first, 0], now);
        // Idle, both would answer at once: the one that serves faster.
        assert_eq!(choose(1), "p0");
        // With 5 held, the fast one answers in 3 turns of 10 ms: still sooner than 40 ms.
        let _busy: Vec<_> = (0..5).map(|_| pods[0].load.start()).collect();
        assert_eq!(choose(1), "p0");
        // With 8 held (4.5 turns, 45 ms), the slow one answers sooner.
        let _busier: Vec<_> = (0..3).map(|_| pods[0].load.start()).collect();
        assert_eq!(choose(0), "p1");
    }

    #[test]
    fn a_pod_not_measured_yet_is_taken_as_the_other_and_a_failure_keeps_it_away() {
        let pods = pods(2);
        let now = Instant::now();
        pods[1]
            .load
            .answered(std::time::Duration::from_millis(1), now);
        pods[1].load.report("0/4", now);
        // Unmeasured, p0 ties with p1 (same latency and capacity): the first draw wins.
        assert_eq!(drawn(&pods, [0, 0], now), "p0");
        assert_eq!(drawn(&pods, [1, 0], now), "p1");
        // What the proxy records for an attempt that got no answer: the connect timeout.
        pods[0]
            .load
            .answered(std::time::Duration::from_secs(1), now);
        assert_eq!(drawn(&pods, [0, 0], now), "p1");
    }

    #[test]
    fn the_two_draws_are_distinct_pods() {
        let pods = pods(3);
        let now = Instant::now();
        // Draws (2, then 0 of the remaining 2) land on pods 2 and 0; pod 2 is busy.
        let _busy = pods[2].load.start();
        assert_eq!(drawn(&pods, [2, 0], now), "p0");
    }

    #[test]
    fn round_robin_takes_turns_and_a_retry_avoids_the_pod_that_failed() {
        let pods = pods(3);
        let now = Instant::now();
        let turn = AtomicUsize::new(0);
        let names: Vec<String> = (0..6)
            .map(|_| {
                pick(&pods, Balancing::RoundRobin, None, now, &mut |_| 0, &turn)
                    .unwrap()
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(names, ["p0", "p1", "p2", "p0", "p1", "p2"]);
        for balancing in [Balancing::RoundRobin, Balancing::PowerOfTwoChoices] {
            for _ in 0..20 {
                let chosen = pick(
                    &pods,
                    balancing,
                    Some(&pods[1]),
                    now,
                    &mut random_below,
                    &turn,
                );
                assert_ne!(chosen.unwrap().name, "p1");
            }
        }
        // The only pod is retried rather than nothing.
        let one = &pods[..1];
        let chosen = pick(
            one,
            Balancing::PowerOfTwoChoices,
            Some(&one[0]),
            now,
            &mut random_below,
            &turn,
        );
        assert_eq!(chosen.unwrap().name, "p0");
        assert!(
            pick(
                &[],
                Balancing::RoundRobin,
                None,
                now,
                &mut random_below,
                &turn
            )
            .is_none()
        );
    }

    #[test]
    fn random_indexes_stay_in_range_and_cover_it() {
        let mut seen = [0u32; 5];
        for _ in 0..1_000 {
            seen[random_below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 100), "{seen:?}");
        assert_eq!(random_below(1), 0);
        assert_eq!(random_below(0), 0);
    }
}
