//! Wake from zero: while the stable revision has no ready pod (its EdgeDeployment scaled to 0
//! replicas), the gateway holds its requests, bounded in number and in time, asks for a replica
//! through the EdgeDeployment's scale subresource at once, and forwards them as soon as a pod is
//! Ready. A caller sees a slower answer, not a 503.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::routes::Table;
use super::slot::Slot;
use crate::api::EdgeDeployment;

/// How many requests may wait for a pod at once, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct HoldLimits {
    pub max_held: usize,
    pub max_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error("the scale subresource of EdgeDeployment {name}: {source}")]
    Scale {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What woke the revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// Replicas went from 0 to 1.
    Scaled,
    /// Replicas were already above 0 (the pod is starting, or someone else scaled it).
    Already,
}

type WakeFuture = Pin<Box<dyn Future<Output = Result<Woken, WakeError>> + Send>>;

/// Asks for a replica of what the gateway routes to.
pub trait Wake: Send + Sync + 'static {
    fn wake(&self) -> WakeFuture;
}

/// Wakes an EdgeDeployment through its scale subresource, as a user's `kubectl scale` or the
/// ScalingPolicy controller would: 0 → 1 only, under the resourceVersion it read, so a
/// concurrent scale (to 3, say) is never overwritten with 1.
pub struct ScaleSubresource {
    pub api: Api<EdgeDeployment>,
    pub name: String,
    /// Every API call's bound.
    pub timeout: Duration,
}

impl Wake for ScaleSubresource {
    fn wake(&self) -> WakeFuture {
        let (api, name, timeout) = (self.api.clone(), self.name.clone(), self.timeout);
        Box::pin(async move {
            let err = |source| WakeError::Scale {
                name: name.clone(),
                source,
            };
            let call = async {
                let scale = api.get_scale(&name).await?;
                if scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0 {
                    return Ok(Woken::Already);
                }
                // The resourceVersion read makes the patch conditional: 409 if it moved.
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": scale.metadata.resource_version},
                    "spec": {"replicas": 1},
                });
                api.patch_scale(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                Ok(Woken::Scaled)
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result.map_err(err),
                Err(_) => Err(err(kube::Error::Service(
                    format!("no answer within {timeout:?}").into(),
                ))),
            }
        })
    }
}

/// Why a request was not held until a pod was ready.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotHeld {
    #[error(
        "revision {revision} has no ready pod and the gateway already holds {max} requests waiting for one"
    )]
    Full { revision: String, max: usize },
    #[error(
        "revision {revision} has no ready pod: it was asked for a replica and none was ready within {waited:?}"
    )]
    Timeout { revision: String, waited: Duration },
}

/// The requests held for a pod, and the wake they wait on.
pub struct Holding {
    wake: Arc<dyn Wake>,
    limits: HoldLimits,
    held: Arc<AtomicUsize>,
    waking: Arc<AtomicBool>,
    changed: Notify,
}

/// One held request, counted (and shown in the revision's gauge) until dropped.
struct Held {
    _slot: Slot,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Holding {
    pub fn new(wake: Arc<dyn Wake>, limits: HoldLimits) -> Self {
        Self {
            wake,
            limits,
            held: Arc::new(AtomicUsize::new(0)),
            waking: Arc::new(AtomicBool::new(false)),
            changed: Notify::new(),
        }
    }

    /// A new table is in force: held requests look again.
    pub fn table_changed(&self) {
        self.changed.notify_waiters();
    }

    /// Holds a request for `revision` until `table()` has a ready pod of it, waking it (once
    /// at a time) meanwhile; the table to route by, or why the request was not held.
    pub async fn until_ready(
        &self,
        revision: &str,
        table: impl Fn() -> Arc<Table>,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<Table>, NotHeld> {
        let max = self.limits.max_held;
        let Some(slot) = Slot::take(&self.held, max) else {
            return Err(NotHeld::Full {
                revision: revision.to_owned(),
                max,
            });
        };
        let gauge = metrics.held(revision);
        gauge.inc();
        let _held = Held { _slot: slot, gauge };
        let deadline = Instant::now() + self.limits.max_wait;
        loop {
            // Registered before the look, so a table put in force between the two is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = table();
            if !now.pods(revision).is_empty() {
                return Ok(now);
            }
            self.wake_once(revision, metrics);
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(NotHeld::Timeout {
                    revision: revision.to_owned(),
                    waited: self.limits.max_wait,
                });
            }
        }
    }

    /// Starts a wake unless one is under way.
    fn wake_once(&self, revision: &str, metrics: &Arc<Metrics>) {
        if self.waking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (wake, waking) = (self.wake.clone(), self.waking.clone());
        let (metrics, revision) = (metrics.clone(), revision.to_owned());
        tokio::spawn(async move {
            let outcome = match wake.wake().await {
                Ok(Woken::Scaled) => {
                    tracing::info!(%revision, "woken from zero replicas: asked for 1");
                    "scaled"
                }
                Ok(Woken::Already) => "already",
                Err(e) => {
                    tracing::warn!(%revision, error = %e, "could not wake the revision");
                    "failed"
                }
            };
            metrics.woke(&revision, outcome);
            waking.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::Split;
    use prometheus_client::registry::Registry;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    /// Counts its wakes.
    struct Fake {
        wakes: AtomicUsize,
    }

    impl Wake for Fake {
        fn wake(&self) -> WakeFuture {
            self.wakes.fetch_add(1, Ordering::AcqRel);
            Box::pin(async { Ok(Woken::Scaled) })
        }
    }

    fn table(pods: bool) -> Arc<Table> {
        let split = Split {
            stable: Some("r".into()),
            ..Split::default()
        };
        let mut revisions = BTreeMap::new();
        if pods {
            let addr = SocketAddr::from(([10, 0, 0, 1], 80));
            revisions.insert("r".to_owned(), vec![("r-pod".to_owned(), addr)]);
        }
        Arc::new(Table::default().next(split, revisions))
    }

    fn holding(max_held: usize) -> (Arc<Holding>, Arc<Fake>, Arc<Metrics>) {
        let fake = Arc::new(Fake {
            wakes: AtomicUsize::new(0),
        });
        let limits = HoldLimits {
            max_held,
            max_wait: Duration::from_secs(10),
        };
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        (Arc::new(Holding::new(fake.clone(), limits)), fake, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_goes_on_when_a_pod_is_ready_and_wakes_once() {
        let (holding, fake, metrics) = holding(8);
        let current = Arc::new(Mutex::new(table(false)));
        let look = {
            let current = current.clone();
            move || current.lock().unwrap().clone()
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (holding, metrics, look) = (holding.clone(), metrics.clone(), look.clone());
                tokio::spawn(async move { holding.until_ready("r", look, &metrics).await })
            })
            .collect();
        while holding.held.load(Ordering::Acquire) < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.held("r").get(), 3);
        // A table change without the pod: they hold on.
        holding.table_changed();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(holding.held.load(Ordering::Acquire), 3);
        *current.lock().unwrap() = table(true);
        holding.table_changed();
        for w in waiters {
            let t = w.await.unwrap().unwrap();
            assert_eq!(t.pods("r").len(), 1);
        }
        assert_eq!(holding.held.load(Ordering::Acquire), 0);
        assert_eq!(metrics.held("r").get(), 0);
        // Three waiters, one wake at first; a look after it finished may ask again (it is
        // then "already" on the real API), never once per request at once.
        let wakes = fake.wakes.load(Ordering::Acquire);
        assert!((1..=2).contains(&wakes), "{wakes}");
    }

    #[tokio::test(start_paused = true)]
    async fn holding_is_bounded_in_number_and_time() {
        let (holding, _, metrics) = holding(1);
        let look = || table(false);
        let first = {
            let (holding, metrics) = (holding.clone(), metrics.clone());
            tokio::spawn(async move { holding.until_ready("r", look, &metrics).await })
        };
        while holding.held.load(Ordering::Acquire) < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            holding.until_ready("r", look, &metrics).await.err(),
            Some(NotHeld::Full {
                revision: "r".into(),
                max: 1
            })
        );
        assert_eq!(
            first.await.unwrap().err(),
            Some(NotHeld::Timeout {
                revision: "r".into(),
                waited: Duration::from_secs(10)
            })
        );
        // A ready pod at the first look: no wait, no wake.
        let (holding, fake, metrics) = self::holding(1);
        assert!(
            holding
                .until_ready("r", || table(true), &metrics)
                .await
                .is_ok()
        );
        assert_eq!(fake.wakes.load(Ordering::Acquire), 0);
    }
}
