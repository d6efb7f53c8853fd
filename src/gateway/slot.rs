//! A bounded count of work in progress (mirrors in flight, requests held for a pod): a
//! `Slot` counts one until dropped, and none is given past the bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One unit of `count`, given back when dropped.
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A slot if fewer than `max` are taken.
    pub fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_slot_past_the_bound_and_a_dropped_one_is_given_back() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = Slot::take(&count, 2).unwrap();
        let _b = Slot::take(&count, 2).unwrap();
        assert!(Slot::take(&count, 2).is_none());
        drop(a);
        assert_eq!(count.load(Ordering::Acquire), 1);
        assert!(Slot::take(&count, 2).is_some());
    }
}
