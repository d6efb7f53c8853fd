//! What the three controllers' reconciles share, so each module holds only its own decision:
//! every reconcile counted and timed; a success forgets the object's failures and a failure is
//! retried with per-object backoff and counted by error kind; status written to the status
//! subresource only when it changed; notices published as Events and, where a profile asks,
//! audited; and the run loop.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::audit;
use super::context::{Backoff, Context, Notice};
use super::status::apply_status;
use crate::api::EdgeDeployment;

/// A controller's error: its short, stable label for metrics.
pub trait ErrorKind: std::error::Error + Send + Sync + 'static {
    fn kind(&self) -> &'static str;
}

/// Runs `controller` until its shutdown future resolves, each object reconciled by `reconcile`
/// with `ctx`: counted and timed under `name`; a success forgets the object's failures (its
/// backoff starts over); a failure is logged, counted by kind and retried after the object's
/// backoff.
pub async fn run<K, C, E, F, Fut>(
    controller: Controller<K>,
    name: &'static str,
    ctx: Arc<C>,
    reconcile: F,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    C: AsRef<Context> + Send + Sync + 'static,
    E: ErrorKind,
    F: Fn(Arc<K>, Arc<C>) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    controller
        .run(counted(name, reconcile), retried(name), ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, controller = name, "controller event");
            }
        })
        .await;
}

/// The error policy: the failure logged and counted by kind, the object retried after its
/// backoff.
fn retried<K, C, E>(name: &'static str) -> impl Fn(Arc<K>, &E, Arc<C>) -> Action
where
    K: Resource<DynamicType = ()>,
    C: AsRef<Context>,
    E: ErrorKind,
{
    move |object, error, ctx| {
        (*ctx)
            .as_ref()
            .retry_failed(name, object.as_ref(), error, error.kind())
    }
}

/// `reconcile`, counted and timed under `name`; a success forgets the object's failures.
fn counted<K, C, E, F, Fut>(
    name: &'static str,
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<C>) -> BoxFuture<'static, Result<Action, E>>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    C: AsRef<Context> + Send + Sync + 'static,
    E: ErrorKind,
    F: Fn(Arc<K>, Arc<C>) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    move |object, ctx| {
        let key = Backoff::key(object.as_ref());
        let reconciled = reconcile(object, ctx.clone());
        Box::pin(async move {
            let base: &Context = (*ctx).as_ref();
            let _timer = base.metrics.reconcile_started(name);
            let result = reconciled.await;
            if result.is_ok() {
                base.backoff.succeeded(&key);
            }
            result
        })
    }
}

/// Writes `after` to the status subresource of `name` when it differs from `before`.
pub async fn write_status<K, S>(
    api: &Api<K>,
    name: &str,
    before: Option<&S>,
    after: &S,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if before != Some(after) {
        apply_status(api, name, after).await?;
    }
    Ok(())
}

/// Whose decisions on which EdgeDeployment notices record, for its audit log.
pub struct Audited<'a> {
    pub ed: &'a EdgeDeployment,
    /// What set the decisions off (a field manager, a ScalingPolicy).
    pub on_behalf_of: Option<String>,
}

/// Publishes `notices` as Events regarding `object` and, when a ComplianceProfile selecting
/// `audited` asks for audit logging, writes the audit records of its audited decisions.
pub async fn announce<K>(
    base: &Context,
    object: &K,
    notices: &[Notice],
    audited: Option<Audited<'_>>,
) where
    K: Resource<DynamicType = ()>,
{
    if notices.is_empty() {
        return;
    }
    base.publish(&object.object_ref(&()), notices).await;
    if let Some(Audited { ed, on_behalf_of }) = audited {
        let verdict = base.policies.verdict(ed);
        audit::emit_for(&base.instance, on_behalf_of, ed, &verdict, notices);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::context::{ManualClock, Metrics};
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A controller whose reconcile fails while `fail` is set.
    struct Flaky {
        base: Context,
        fail: std::sync::atomic::AtomicBool,
    }

    impl AsRef<Context> for Flaky {
        fn as_ref(&self) -> &Context {
            &self.base
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    impl ErrorKind for Refused {
        fn kind(&self) -> &'static str {
            "refused"
        }
    }

    async fn flaky(_: Arc<ConfigMap>, ctx: Arc<Flaky>) -> Result<Action, Refused> {
        if ctx.fail.load(std::sync::atomic::Ordering::SeqCst) {
            Err(Refused)
        } else {
            Ok(Action::await_change())
        }
    }

    fn object() -> Arc<ConfigMap> {
        Arc::new(ConfigMap {
            metadata: ObjectMeta {
                name: Some("a".into()),
                namespace: Some("ml".into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        })
    }

    /// Each failure doubles the object's retry; a success starts it over; every reconcile and
    /// failure is counted under the controller's name and the error's kind.
    #[tokio::test]
    async fn failures_back_off_a_success_forgets_them_and_both_are_counted() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("kasmina");
        let metrics = Arc::new(Metrics::register(&mut registry));
        // The reconcile sends nothing: a client whose server never answers.
        let (service, _server) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let clock = Arc::new(ManualClock::new(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let ctx = Arc::new(Flaky {
            base: Context::new(client, metrics, clock, None),
            fail: true.into(),
        });
        let mut reconcile = counted("flaky", flaky);
        let policy = retried("flaky");
        let mut retry = async |ctx: &Arc<Flaky>| {
            let error = reconcile(object(), ctx.clone()).await.unwrap_err();
            policy(object(), &error, ctx.clone())
        };
        assert_eq!(retry(&ctx).await, Action::requeue(Backoff::FIRST));
        assert_eq!(retry(&ctx).await, Action::requeue(Backoff::FIRST * 2));
        ctx.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut reconcile_ok = counted("flaky", flaky);
        reconcile_ok(object(), ctx.clone()).await.unwrap();
        ctx.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(retry(&ctx).await, Action::requeue(Backoff::FIRST));

        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains(r#"kasmina_reconciliations_total{controller="flaky"} 4"#),
            "{out}"
        );
        assert!(
            out.contains(r#"controller="flaky",error="refused"} 3"#),
            "{out}"
        );
    }
}
