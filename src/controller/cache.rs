//! Views of the cluster kept current by one watch each, which reconciles read instead of
//! listing: an operator that LISTs per reconcile costs the API server in proportion to its
//! objects times their requeues, and a cache costs one watch.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::{ComplianceProfile, EdgeDeployment};
use crate::controller::compliance_profile::rules::{self, NamespaceLabels, Verdict};

/// Tells that a cache changed, not what: enough for a consumer that re-evaluates everything
/// (the ComplianceProfile controller), and a slow consumer never holds the watch back.
#[derive(Clone)]
pub struct Changes(tokio::sync::watch::Receiver<()>);

impl Changes {
    /// The sending end (call `send_replace(())` on every change) and the receiving one.
    pub fn channel() -> (tokio::sync::watch::Sender<()>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(());
        (tx, Self(rx))
    }

    /// One item after each change (changes in between coalesce); ends with the sender.
    pub fn stream(self) -> impl futures::Stream<Item = ()> + Send + 'static {
        futures::stream::unfold(self.0, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }
}

/// The ComplianceProfiles and the namespaces' labels: what admission and the controllers
/// judge an EdgeDeployment by. One per process, shared by the webhook and the controllers.
#[derive(Clone)]
pub struct Policies {
    pub profiles: Store<ComplianceProfile>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// A namespace appeared, went or changed its labels.
    pub namespace_changes: Changes,
    /// Both caches hold a full list.
    synced: Synced,
}

/// The watch behind a cache ended before the cache held a full list.
#[derive(Debug, thiserror::Error)]
#[error("a watch ended before its cache synced")]
pub struct NeverSynced;

/// Tells every waiter that caches hold a full list. One task awaits the stores and tells all:
/// a store's own `wait_until_ready` wakes only the last of several concurrent waiters (found
/// on a real cluster: the webhook of a replica whose controllers started first never became
/// ready).
#[derive(Clone)]
pub struct Synced(tokio::sync::watch::Receiver<bool>);

impl Synced {
    /// Synced once `ready` resolves to true; never, when it resolves to false.
    pub fn after(ready: impl Future<Output = bool> + Send + 'static) -> Self {
        let (tell, synced) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if ready.await {
                let _ = tell.send(true);
            }
        });
        Self(synced)
    }

    /// Synced once `store` holds a full list.
    pub fn store<K>(store: Store<K>) -> Self
    where
        K: Resource + Clone + Send + Sync + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    {
        Self::after(async move { store.wait_until_ready().await.is_ok() })
    }

    /// Synced already (fixed contents).
    pub fn now() -> Self {
        Self(tokio::sync::watch::channel(true).1)
    }

    /// Resolves once synced; fails when the watches ended first.
    pub async fn wait(&self) -> Result<(), NeverSynced> {
        let mut synced = self.0.clone();
        synced
            .wait_for(|synced| *synced)
            .await
            .map(|_| ())
            .map_err(|_| NeverSynced)
    }
}

impl Policies {
    /// Starts the two watches (namespaces metadata only), until `stop`.
    pub fn watch(client: &Client, stop: CancellationToken) -> Self {
        let (profiles, profiles_writer) = reflector::store();
        let (namespaces, namespaces_writer) = reflector::store();
        let watch_profiles = watcher(
            Api::<ComplianceProfile>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(profiles_writer)
        .for_each(|_| async {});
        let (changed, namespace_changes) = Changes::channel();
        let watch_namespaces = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(namespaces_writer)
        .for_each(move |_| {
            changed.send_replace(());
            async {}
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = futures::future::join(watch_profiles, watch_namespaces) => {},
                () = stop.cancelled() => {},
            }
        });
        Self::from_stores(profiles, namespaces, namespace_changes)
    }

    /// Caches filled elsewhere; `synced()` tells every waiter once both hold a full list.
    pub fn from_stores(
        profiles: Store<ComplianceProfile>,
        namespaces: Store<PartialObjectMeta<Namespace>>,
        namespace_changes: Changes,
    ) -> Self {
        let (p, n) = (profiles.clone(), namespaces.clone());
        let synced = Synced::after(async move {
            p.wait_until_ready().await.is_ok() && n.wait_until_ready().await.is_ok()
        });
        Self {
            profiles,
            namespaces,
            namespace_changes,
            synced,
        }
    }

    /// Fixed contents, synced (tests, and a process without a cluster).
    pub fn of(
        profiles: Vec<ComplianceProfile>,
        namespaces: Vec<PartialObjectMeta<Namespace>>,
    ) -> Self {
        Self {
            profiles: filled(profiles),
            namespaces: filled(namespaces),
            namespace_changes: Changes::channel().1,
            synced: Synced::now(),
        }
    }

    /// Resolves once both caches hold a full list (an empty cache allows what an Enforce
    /// profile denies); fails when their watches ended first.
    pub async fn synced(&self) -> Result<(), NeverSynced> {
        self.synced.wait().await
    }

    /// How the profiles selecting `ed` judge it: the strictest rules the workload carries
    /// out and the profiles' names.
    pub fn verdict(&self, ed: &EdgeDeployment) -> Verdict {
        let profiles = self.profiles.state();
        let mut namespaces = NamespaceLabels::new();
        if let Some(ns) = ed.namespace()
            && let Some(meta) = self.namespaces.get(&ObjectRef::new(&ns))
        {
            namespaces.insert(ns, meta.labels().clone());
        }
        rules::judge(profiles.iter().map(AsRef::as_ref), ed, &namespaces)
    }
}

impl Default for Policies {
    fn default() -> Self {
        Self::of(vec![], vec![])
    }
}

/// A synced store holding exactly `objects`.
pub fn filled<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let mut writer = reflector::store::Writer::default();
    refill(&mut writer, objects);
    writer.as_reader()
}

/// Replaces what `writer`'s store holds with `objects`, as a watch's re-list does.
pub fn refill<K>(writer: &mut reflector::store::Writer<K>, objects: Vec<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

/// The objects of a store in namespace `ns` labelled `label=value` and controlled by the
/// object with `uid`.
pub fn controlled<K>(store: &Store<K>, ns: &str, label: (&str, &str), uid: &str) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (key, value) = label;
    store
        .state()
        .iter()
        .filter(|k| {
            k.meta().namespace.as_deref() == Some(ns)
                && k.labels().get(key).map(String::as_str) == Some(value)
                && k.owner_references()
                    .iter()
                    .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .map(|k| K::clone(k))
        .collect()
}

/// Drops what no reconcile reads and costs most memory: the managed fields.
pub fn slim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// One object by namespace and name from a store.
pub fn get<K>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn service(ns: &str, name: &str, label: &str, owner: &str, controller: bool) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some([("kasmina.dev/name".to_owned(), label.to_owned())].into()),
                owner_references: Some(vec![OwnerReference {
                    uid: owner.into(),
                    controller: Some(controller),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    #[test]
    fn only_the_owners_children_in_its_namespace_are_its_own() {
        let store = filled(vec![
            service("ml", "a", "a", "uid-a", true),
            service("ml", "a-canary", "a", "uid-a", true),
            service("other", "a", "a", "uid-a", true),
            service("ml", "b", "b", "uid-b", true),
            service("ml", "a-hand-made", "a", "uid-a", false),
        ]);
        let mut names: Vec<String> = controlled(&store, "ml", ("kasmina.dev/name", "a"), "uid-a")
            .iter()
            .map(|s| s.name_any())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "a-canary"]);
        assert!(get(&store, "other", "a").is_some());
        assert!(get(&store, "other", "b").is_none());
    }

    /// Found on the real control plane: the webhook and the controllers both waited for the
    /// caches, and only the controllers were ever woken.
    #[tokio::test]
    async fn every_waiter_learns_that_the_caches_synced() {
        let (profiles, mut profiles_writer) = reflector::store();
        let (namespaces, mut namespaces_writer) = reflector::store();
        let policies = Policies::from_stores(profiles, namespaces, Changes::channel().1);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let p = policies.clone();
                tokio::spawn(async move { p.synced().await.is_ok() })
            })
            .collect();
        tokio::task::yield_now().await;
        refill(&mut profiles_writer, vec![]);
        refill(&mut namespaces_writer, vec![]);
        all_woke(waiters).await;
    }

    /// Every waiter ended, told that its caches synced.
    async fn all_woke(waiters: Vec<tokio::task::JoinHandle<bool>>) {
        for waiter in waiters {
            let woke = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
            assert!(matches!(woke, Ok(Ok(true))), "a waiter was never woken");
        }
    }

    /// Found in review: ComplianceProfile reconciles awaited the EdgeDeployment cache's own
    /// `wait_until_ready`, so of several profiles reconciled before it synced all but one
    /// would wait for good, each holding a reconcile slot.
    #[tokio::test]
    async fn every_reconcile_waiting_for_a_store_learns_that_it_synced() {
        let (store, mut writer) = reflector::store::<Service>();
        let synced = Synced::store(store);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = synced.clone();
                tokio::spawn(async move { s.wait().await.is_ok() })
            })
            .collect();
        tokio::task::yield_now().await;
        refill(&mut writer, vec![]);
        all_woke(waiters).await;
    }

    #[test]
    fn a_refill_replaces_what_was_held() {
        let mut writer = reflector::store::Writer::default();
        refill(&mut writer, vec![service("ml", "a", "a", "u", true)]);
        refill(&mut writer, vec![service("ml", "b", "b", "u", true)]);
        let names: Vec<String> = writer
            .as_reader()
            .state()
            .iter()
            .map(|s| s.name_any())
            .collect();
        assert_eq!(names, ["b"]);
    }
}
