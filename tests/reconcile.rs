//! One reconcile per controller against a scripted API server (tower-test, the kube-rs
//! `controller-rs` fixtures pattern): the exact requests and the exact status patch. The
//! EdgeDeployment controller has its own suite in tests/edge_deployment.rs.

use std::sync::Arc;

use futures::FutureExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::jiff::Timestamp;
use kasmina::api::{ComplianceProfile, EdgeDeployment, ScalingPolicy};
use kasmina::controller::compliance_profile::reconcile::ComplianceContext;
use kasmina::controller::context::{Context, FixedClock, ManualClock, Metrics};
use kasmina::controller::leader::{Held, LeaderElector, LeaseTiming, Observed};
use kasmina::controller::{compliance_profile, ensure_crds_installed, scaling_policy};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

const NOW: i64 = 1_800_000_000;
const NOW_TEXT: &str = "2027-01-15T08:00:00Z";

struct ApiServer(Handle<Request<Body>, Response<Body>>);

impl ApiServer {
    /// Takes the next request, checks method and path (query ignored unless given), answers
    /// with `status` and `reply(body)`, and returns the request body.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        status: StatusCode,
        reply: impl FnOnce(&Value) -> Value,
    ) -> (String, Value) {
        let (request, send) = self
            .0
            .next_request()
            .await
            .expect("the reconciler made no request");
        let uri = request.uri().clone();
        assert_eq!(request.method(), method, "{uri}");
        assert_eq!(uri.path(), path);
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let answer = reply(&body);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        (uri.query().unwrap_or("").to_owned(), body)
    }

    /// Takes the next request: an Event of `type_` and `reason` in namespace ml.
    async fn expect_event(&mut self, type_: &str, reason: &str) -> Value {
        let (_, event) = self
            .expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ml/events",
                StatusCode::CREATED,
                echo,
            )
            .await;
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some(type_), Some(reason)),
            "{event:#}"
        );
        event
    }

    /// Asserts nothing else was asked of the API server.
    fn assert_idle(&mut self) {
        // Pending (client alive, nothing sent) or closed (client dropped) both mean idle.
        if let Some(Some((request, _))) = self.0.next_request().now_or_never() {
            panic!(
                "unexpected extra request: {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
           "message": format!("{what} not found"), "code": 404})
}

fn context() -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Arc::new(Metrics::register(&mut Registry::default()));
    let clock = Arc::new(FixedClock(Timestamp::from_second(NOW).unwrap()));
    (
        Arc::new(Context::new(client, metrics, clock, Some("test".into()))),
        ApiServer(handle),
    )
}

fn edge_deployment() -> EdgeDeployment {
    serde_json::from_value(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
        "metadata": {"name": "sentiment", "namespace": "ml", "generation": 4, "uid": "ed-uid",
                     "labels": {"data-class": "personal"}},
        "spec": {"model": {"name": "minilm", "version": "2.1.0",
                           "source": {"uri": "s3://models/minilm/2.1.0/"}, "architecture": "bert"},
                 "replicas": 3},
    }))
    .unwrap()
}

fn echo(body: &Value) -> Value {
    body.clone()
}

#[tokio::test]
async fn scaling_policy_reports_a_missing_target() {
    let (ctx, mut server) = context();
    let policy: ScalingPolicy = serde_json::from_value(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": "sentiment", "namespace": "ml", "generation": 1, "uid": "sp-uid"},
        "spec": {"targetRef": {"kind": "EdgeDeployment", "name": "sentiment"},
                 "maxReplicas": 5, "metrics": [{"type": "CognitiveLoad", "target": 0.7}]},
    }))
    .unwrap();
    let answered = policy.clone();
    let ctx = Arc::new(scaling_policy::reconcile::ScalingContext::new(ctx));
    let reconcile = tokio::spawn(scaling_policy::reconcile::reconcile(Arc::new(policy), ctx));

    server
        .expect(
            Method::GET,
            "/apis/kasmina.dev/v1alpha1/namespaces/ml/edgedeployments/sentiment",
            StatusCode::NOT_FOUND,
            |_| not_found("edgedeployments \"sentiment\""),
        )
        .await;
    let (_, patch) = server
        .expect(
            Method::PATCH,
            "/apis/kasmina.dev/v1alpha1/namespaces/ml/scalingpolicies/sentiment/status",
            StatusCode::OK,
            |_| serde_json::to_value(&answered).unwrap(),
        )
        .await;
    let message =
        "EdgeDeployment \"sentiment\" not found in namespace \"ml\"; replicas are left as they are";
    assert_eq!(
        patch["status"],
        json!({
            "observedGeneration": 1,
            "conditions": [
                {"type": "AbleToScale", "status": "False", "reason": "TargetNotFound", "message": message,
                 "observedGeneration": 1, "lastTransitionTime": NOW_TEXT},
                {"type": "ScalingActive", "status": "False", "reason": "TargetNotFound", "message": message,
                 "observedGeneration": 1, "lastTransitionTime": NOW_TEXT},
            ],
        })
    );
    server.expect_event("Warning", "TargetNotFound").await;
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
}

fn compliance_context(
    ctx: Arc<Context>,
    deployments: Vec<EdgeDeployment>,
    profiles: Vec<ComplianceProfile>,
) -> Arc<ComplianceContext> {
    let (store, mut writer) = reflector::store();
    for ed in deployments {
        writer.apply_watcher_event(&Event::InitApply(ed));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let (namespaces, mut ns_writer) = reflector::store();
    ns_writer.apply_watcher_event(&Event::InitDone);
    let (profile_store, mut p_writer) = reflector::store();
    for p in profiles {
        p_writer.apply_watcher_event(&Event::InitApply(p));
    }
    p_writer.apply_watcher_event(&Event::InitDone);
    Arc::new(ComplianceContext {
        ctx,
        synced: kasmina::controller::cache::Synced::store(store.clone()),
        deployments: store,
        namespaces,
        profiles: profile_store,
    })
}

fn gdpr_profile(finalized: bool) -> ComplianceProfile {
    let mut profile: ComplianceProfile = serde_json::from_value(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "ComplianceProfile",
        "metadata": {"name": "personal-data", "generation": 2, "uid": "cp-uid"},
        "spec": {"selector": {"matchLabels": {"data-class": "personal"}}, "regulations": ["GDPR"]},
    }))
    .unwrap();
    if finalized {
        profile.metadata.finalizers = Some(vec!["kasmina.dev/compliance".into()]);
    }
    profile
}

const CP_PATH: &str = "/apis/kasmina.dev/v1alpha1/complianceprofiles/personal-data";

#[tokio::test]
async fn compliance_profile_first_takes_its_finalizer() {
    let (ctx, mut server) = context();
    let cc = compliance_context(ctx, vec![edge_deployment()], vec![]);
    let profile = gdpr_profile(false);
    let answered = gdpr_profile(true);
    let reconcile = tokio::spawn(compliance_profile::reconcile::reconcile(
        Arc::new(profile),
        cc,
    ));
    let (_, patch) = server
        .expect(Method::PATCH, CP_PATH, StatusCode::OK, |_| {
            serde_json::to_value(&answered).unwrap()
        })
        .await;
    assert_eq!(
        patch[1],
        json!({"op": "add", "path": "/metadata/finalizers", "value": ["kasmina.dev/compliance"]})
    );
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
}

#[tokio::test]
async fn compliance_profile_counts_what_it_selects_and_marks_each_deployment() {
    let (ctx, mut server) = context();
    let mut other = edge_deployment();
    other.metadata.name = Some("public".into());
    other.metadata.labels = None;
    let profile = gdpr_profile(true);
    let cc = compliance_context(ctx, vec![edge_deployment(), other], vec![profile.clone()]);
    let answered = profile.clone();
    let reconcile = tokio::spawn(compliance_profile::reconcile::reconcile(
        Arc::new(profile),
        cc,
    ));

    let (_, patch) = server
        .expect(
            Method::PATCH,
            &format!("{CP_PATH}/status"),
            StatusCode::OK,
            |_| serde_json::to_value(&answered).unwrap(),
        )
        .await;
    let violation = "ComplianceProfile personal-data spec.rules.allowedRegions: GDPR requires data residency: the profile must list the regions the runtime may run in (allowedRegions of ComplianceProfile personal-data: GDPR Ch. V, Art. 44)";
    assert_eq!(
        patch["status"],
        json!({
            "observedGeneration": 2,
            "matched": 1,
            "compliant": 0,
            "violations": [{"deployment": "ml/sentiment", "rule": "allowedRegions", "message": violation}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Selected", "message": "selects 1 EdgeDeployment, 0 compliant",
                 "observedGeneration": 2, "lastTransitionTime": NOW_TEXT},
            ],
        })
    );
    // Only the selected deployment gets the condition, under its own field manager.
    let (query, patch) = server
        .expect(
            Method::PATCH,
            &format!("{ED_PATH}/status"),
            StatusCode::OK,
            |_| serde_json::to_value(edge_deployment()).unwrap(),
        )
        .await;
    assert!(query.contains("fieldManager=kasmina-compliance"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    assert_eq!(
        patch,
        json!({"apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment", "status": {"conditions": [
            {"type": "Compliant", "status": "False", "reason": "Violation",
             "message": format!("not promoted until fixed: {violation}"),
             "observedGeneration": 4, "lastTransitionTime": NOW_TEXT}]}})
    );
    let event = server.expect_event("Warning", "ComplianceViolation").await;
    assert_eq!(event["regarding"]["name"], "sentiment");
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
}

#[tokio::test]
async fn deleting_the_last_profile_clears_what_it_blocked() {
    let (ctx, mut server) = context();
    let mut blocked = edge_deployment();
    blocked.status = Some(
        serde_json::from_value(json!({"conditions": [
            {"type": "Compliant", "status": "False", "reason": "Violation", "message": "not promoted until fixed: ...",
             "observedGeneration": 4, "lastTransitionTime": "2027-01-15T07:00:00Z"}]}))
        .unwrap(),
    );
    let mut profile = gdpr_profile(true);
    profile.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(NOW).unwrap()),
    );
    let cc = compliance_context(ctx, vec![blocked], vec![profile.clone()]);
    let reconcile = tokio::spawn(compliance_profile::reconcile::reconcile(
        Arc::new(profile),
        cc,
    ));
    let (_, patch) = server
        .expect(
            Method::PATCH,
            &format!("{ED_PATH}/status"),
            StatusCode::OK,
            |_| serde_json::to_value(edge_deployment()).unwrap(),
        )
        .await;
    let compliant = &patch["status"]["conditions"][0];
    assert_eq!(
        (&compliant["status"], &compliant["reason"]),
        (&json!("True"), &json!("NotSelected"))
    );
    server.expect_event("Normal", "Compliant").await;
    let (_, patch) = server
        .expect(Method::PATCH, CP_PATH, StatusCode::OK, |_| {
            serde_json::to_value(gdpr_profile(false)).unwrap()
        })
        .await;
    assert_eq!(
        patch[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
}

#[tokio::test]
async fn missing_crds_stop_the_controller_with_install_instructions() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let check = tokio::spawn(async move { ensure_crds_installed(&client).await });
    server
        .expect(
            Method::GET,
            "/apis/kasmina.dev/v1alpha1",
            StatusCode::NOT_FOUND,
            |_| not_found("kasmina.dev/v1alpha1"),
        )
        .await;
    let message = check.await.unwrap().unwrap_err().to_string();
    assert!(
        message.contains("missing: edgedeployments, scalingpolicies, complianceprofiles"),
        "{message}"
    );
    assert!(message.contains("kubectl apply -f crds/"), "{message}");

    let client = ctx.client.clone();
    let check = tokio::spawn(async move { ensure_crds_installed(&client).await });
    server
        .expect(Method::GET, "/apis/kasmina.dev/v1alpha1", StatusCode::OK, |_| {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "kasmina.dev/v1alpha1",
                   "resources": [{"name": "edgedeployments", "singularName": "edgedeployment", "namespaced": true,
                                  "kind": "EdgeDeployment", "verbs": ["get"]}]})
        })
        .await;
    let message = check.await.unwrap().unwrap_err().to_string();
    assert!(
        message.contains("missing: scalingpolicies, complianceprofiles"),
        "{message}"
    );
}

/// replica-a's elector for the operator's Lease, on `clock`.
fn replica_a(ctx: &Context, clock: Arc<dyn kasmina::controller::context::Clock>) -> LeaderElector {
    LeaderElector::new(
        ctx.client.clone(),
        "kasmina-system",
        "kasmina-controller",
        "replica-a",
        LeaseTiming::default(),
        clock,
    )
}

#[tokio::test]
async fn leader_election_creates_the_lease_then_loses_a_race() {
    let (ctx, mut server) = context();
    let elector = Arc::new(replica_a(&ctx, ctx.clock.clone()));
    let lease_path =
        "/apis/coordination.k8s.io/v1/namespaces/kasmina-system/leases/kasmina-controller";

    let e = elector.clone();
    let look = tokio::spawn(async move { e.try_acquire_or_renew().await });
    server
        .expect(Method::GET, lease_path, StatusCode::NOT_FOUND, |_| {
            not_found("lease")
        })
        .await;
    let (_, created) = server
        .expect(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/kasmina-system/leases",
            StatusCode::CREATED,
            echo,
        )
        .await;
    assert_eq!(created["spec"]["holderIdentity"], "replica-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(look.await.unwrap().unwrap(), Observed::Leading);

    // A lease of replica-b renewed "a minute ago" by its clock: judged by when we saw it, not
    // by its renewTime, so the first look follows. Unchanged for the lease duration, it has
    // expired: we try to take it, but b renewed first (409 Conflict).
    let clock = Arc::new(ManualClock::new(Timestamp::from_second(NOW).unwrap()));
    let (ctx, mut server) = context();
    let elector = Arc::new(replica_a(&ctx, clock.clone()));
    let expired = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kasmina-controller", "namespace": "kasmina-system", "resourceVersion": "7"},
        "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 15,
                 "renewTime": "2027-01-15T07:59:00.000000Z", "leaseTransitions": 3}});
    let e = elector.clone();
    let look = tokio::spawn(async move { e.try_acquire_or_renew().await });
    server
        .expect(Method::GET, lease_path, StatusCode::OK, |_| expired.clone())
        .await;
    assert!(matches!(
        look.await.unwrap().unwrap(),
        Observed::Following { holder, .. } if holder == "replica-b"
    ));
    clock.advance(std::time::Duration::from_secs(15));
    let e = elector.clone();
    let look = tokio::spawn(async move { e.try_acquire_or_renew().await });
    server
        .expect(Method::GET, lease_path, StatusCode::OK, |_| expired.clone())
        .await;
    let (_, replaced) = server
        .expect(Method::PUT, lease_path, StatusCode::CONFLICT, |_| {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                   "message": "the object has been modified"})
        })
        .await;
    assert_eq!(
        replaced["metadata"]["resourceVersion"], "7",
        "the write is fenced by resourceVersion"
    );
    assert_eq!(replaced["spec"]["leaseTransitions"], 4);
    assert!(matches!(
        look.await.unwrap().unwrap(),
        Observed::Following { .. }
    ));
    server.assert_idle();
}

/// Found in review: a renewal had no deadline (kube's client has no read timeout), so a
/// request the API server never answered kept a leader working after its lease ran out.
#[tokio::test(start_paused = true)]
async fn a_renewal_that_never_answers_loses_leadership_at_the_renew_deadline() {
    let (ctx, mut server) = context();
    let elector = Arc::new(replica_a(&ctx, ctx.clock.clone()));
    let started = tokio::time::Instant::now();
    let e = elector.clone();
    let holding = tokio::spawn(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        e.hold(&stop).await
    });
    // The first renewal's GET is taken and never answered.
    let (request, _never) = server.0.next_request().await.expect("a renewal");
    assert_eq!(request.method(), Method::GET);
    let held = holding.await.unwrap();
    let took = started.elapsed();
    assert!(
        matches!(&held, Held::Lost(why) if why.contains("no answer")),
        "{held:?}"
    );
    assert!(
        took <= LeaseTiming::default().renew_deadline + std::time::Duration::from_millis(10),
        "gave up after {took:?}"
    );
}

/// Found in review: if the controllers' task ended, the replica went on renewing its lease
/// and reconciled nothing, so no standby ever took over. Holding ends when the work does.
#[tokio::test(start_paused = true)]
async fn holding_ends_when_the_controllers_stop() {
    let (ctx, _server) = context();
    let elector = replica_a(&ctx, ctx.clock.clone());
    let (stop, done) = (
        tokio_util::sync::CancellationToken::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    done.cancel();
    assert_eq!(
        elector.hold_while(&stop, &done).await,
        Held::Abandoned("the controllers stopped".into())
    );
    // Stopped on purpose, the controllers end first: that is a stop, not an abandonment.
    stop.cancel();
    assert_eq!(elector.hold_while(&stop, &done).await, Held::Stopped);
}

/// A runtime's `/metrics` on `ip`:`port` (0 = any) answering `body`, counting its scrapes.
async fn runtime_metrics(
    ip: &str,
    port: u16,
    body: &'static str,
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, hits)
}

fn runtime_pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "ml",
                        "labels": {"kasmina.dev/edge-deployment": "sentiment", "kasmina.dev/revision": "aaaa1111"}},
           "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn serving_edge_deployment(replicas: i32) -> Value {
    let mut ed = serde_json::to_value(edge_deployment()).unwrap();
    ed["spec"]["replicas"] = json!(replicas);
    ed["status"] = json!({"rollout": {"stable": "aaaa1111"}});
    ed
}

fn scaling_policy(metrics: Value) -> ScalingPolicy {
    serde_json::from_value(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": "sentiment", "namespace": "ml", "generation": 1, "uid": "sp-uid"},
        "spec": {"targetRef": {"kind": "EdgeDeployment", "name": "sentiment"},
                 "minReplicas": 1, "maxReplicas": 10, "metrics": metrics},
    }))
    .unwrap()
}

/// Takes the next request: a PATCH of the target's scale subresource, answered `to` / `from`.
async fn expect_scale(server: &mut ApiServer, to: i32, from: i32) -> (String, Value) {
    server
        .expect(
            Method::PATCH,
            &format!("{ED_PATH}/scale"),
            StatusCode::OK,
            |_| {
                json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                       "metadata": {"name": "sentiment", "namespace": "ml"},
                       "spec": {"replicas": to}, "status": {"replicas": from}})
            },
        )
        .await
}

const ED_PATH: &str = "/apis/kasmina.dev/v1alpha1/namespaces/ml/edgedeployments/sentiment";
const SP_STATUS: &str = "/apis/kasmina.dev/v1alpha1/namespaces/ml/scalingpolicies/sentiment/status";

#[tokio::test]
async fn scaling_policy_scrapes_the_pods_and_scales_through_the_scale_subresource() {
    use std::sync::atomic::Ordering;
    // Two ready runtime pods on two loopback addresses, one port: loads 0.90 and 0.96.
    let busy = "# TYPE kasmina_cognitive_load gauge\nkasmina_cognitive_load 0.9\n\
                # TYPE kasmina_queue_depth gauge\nkasmina_queue_depth 3\n# EOF\n";
    let busier = "# TYPE kasmina_cognitive_load gauge\nkasmina_cognitive_load 0.96\n\
                  # TYPE kasmina_queue_depth gauge\nkasmina_queue_depth 5\n# EOF\n";
    let (port, hits_a) = runtime_metrics("127.0.0.1", 0, busy).await;
    let (_, hits_b) = runtime_metrics("127.0.0.2", port, busier).await;

    let (base, mut server) = context();
    let mut ctx = scaling_policy::reconcile::ScalingContext::new(base);
    ctx.metrics_port = port;
    let ctx = Arc::new(ctx);
    let policy = scaling_policy(json!([{"type": "CognitiveLoad", "target": 0.7}]));
    let answered = policy.clone();
    let reconcile = tokio::spawn(scaling_policy::reconcile::reconcile(
        Arc::new(policy.clone()),
        ctx.clone(),
    ));

    let ed = serving_edge_deployment(2);
    server
        .expect(Method::GET, ED_PATH, StatusCode::OK, |_| ed.clone())
        .await;
    let (query, _) = server
        .expect(Method::GET, "/api/v1/namespaces/ml/pods", StatusCode::OK, |_| {
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                   "items": [runtime_pod("sentiment-a", "127.0.0.1"), runtime_pod("sentiment-b", "127.0.0.2")]})
        })
        .await;
    assert!(
        query.contains("labelSelector=kasmina.dev%2Fedge-deployment%3Dsentiment"),
        "{query}"
    );
    // ceil(2 × mean(0.90, 0.96) / 0.70) = ceil(2.66) = 3, through the scale subresource.
    let (query, scale) = expect_scale(&mut server, 3, 2).await;
    assert_eq!(scale, json!({"spec": {"replicas": 3}}));
    assert!(query.contains("fieldManager=kasmina"), "{query}");
    let (_, patch) = server
        .expect(Method::PATCH, SP_STATUS, StatusCode::OK, |_| {
            serde_json::to_value(&answered).unwrap()
        })
        .await;
    let status = &patch["status"];
    assert_eq!(status["desiredReplicas"], 3, "{status:#}");
    assert_eq!(status["currentReplicas"], 2, "{status:#}");
    assert_eq!(status["lastScaleTime"], NOW_TEXT);
    assert_eq!(
        status["history"][0]["reason"], "cognitive load 0.93 > 0.70: 2 → 3",
        "{status:#}"
    );
    let reasons: Vec<(&str, &str)> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["reason"].as_str().unwrap()))
        .collect();
    assert!(
        reasons.contains(&("ScalingActive", "ValidMetricFound")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("AbleToScale", "ReadyForNewScale")),
        "{reasons:?}"
    );
    let event = server.expect_event("Normal", "SuccessfulRescale").await;
    assert_eq!(event["note"], "cognitive load 0.93 > 0.70: 2 → 3");
    // Whether a profile asks to audit the scale comes from the process's cache: no request.
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
    assert_eq!(
        (hits_a.load(Ordering::SeqCst), hits_b.load(Ordering::SeqCst)),
        (1, 1)
    );

    // The target's status changes wake the policy again within the interval: it reads the
    // target, but neither scrapes nor writes.
    let reconcile = tokio::spawn(scaling_policy::reconcile::reconcile(Arc::new(policy), ctx));
    let ed = serving_edge_deployment(3);
    server
        .expect(Method::GET, ED_PATH, StatusCode::OK, |_| ed.clone())
        .await;
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
    assert_eq!(
        (hits_a.load(Ordering::SeqCst), hits_b.load(Ordering::SeqCst)),
        (1, 1)
    );
}

#[tokio::test]
async fn scaling_policy_holds_replicas_when_prometheus_is_unreachable() {
    // A port that was bound and released: connections are refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (base, mut server) = context();
    let ctx = Arc::new(
        scaling_policy::reconcile::ScalingContext::new(base)
            .with_prometheus_hosts(vec!["127.0.0.1".into()]),
    );
    let policy = scaling_policy(json!([{"type": "Prometheus", "target": 10.0,
        "serverAddress": format!("http://127.0.0.1:{closed}"),
        "query": "sum(rate(http_requests_total{app=\"sentiment\"}[1m]))"}]));
    let answered = policy.clone();
    let reconcile = tokio::spawn(scaling_policy::reconcile::reconcile(Arc::new(policy), ctx));
    let ed = serving_edge_deployment(4);
    server
        .expect(Method::GET, ED_PATH, StatusCode::OK, |_| ed.clone())
        .await;
    // No scale request: the next request is the status.
    let (_, patch) = server
        .expect(Method::PATCH, SP_STATUS, StatusCode::OK, |_| {
            serde_json::to_value(&answered).unwrap()
        })
        .await;
    let status = &patch["status"];
    assert_eq!(status["desiredReplicas"], 4, "{status:#}");
    let active = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ScalingActive")
        .unwrap();
    assert_eq!(active["status"], "False", "{active:#}");
    assert_eq!(active["reason"], "FailedGetMetrics", "{active:#}");
    let message = active["message"].as_str().unwrap();
    assert!(
        message.contains("spec.metrics[0] (Prometheus)"),
        "{message}"
    );
    assert!(
        message.contains(&format!("127.0.0.1:{closed}")),
        "{message}"
    );
    assert!(
        message.contains("Connection refused"),
        "the cause, not only the URL: {message}"
    );
    server.expect_event("Warning", "FailedGetMetrics").await;
    reconcile.await.unwrap().unwrap();
    server.assert_idle();
}

/// Takes the next request: a LIST of pods in ml, answered with `pod`; returns its query.
async fn expect_pods(server: &mut ApiServer, pod: Value) -> String {
    let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]});
    let (query, _) = server
        .expect(
            Method::GET,
            "/api/v1/namespaces/ml/pods",
            StatusCode::OK,
            |_| list,
        )
        .await;
    query
}

/// The gateway pod of EdgeDeployment sentiment on `ip`.
fn gateway_pod(ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "sentiment-gateway-a", "namespace": "ml",
                        "labels": {"kasmina.dev/edge-deployment": "sentiment",
                                   "app.kubernetes.io/component": "gateway"}},
           "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

#[tokio::test]
async fn scaling_policy_goes_to_zero_on_the_gateways_idle_window_only() {
    // An idle runtime pod, and a gateway pod whose answered requests stay at 12.
    let idle = "# TYPE kasmina_cognitive_load gauge\nkasmina_cognitive_load 0\n# EOF\n";
    let quiet = "# TYPE kasmina_gateway_requests counter\n\
                 kasmina_gateway_requests_total{revision=\"aaaa1111\",code=\"200\"} 12\n\
                 # TYPE kasmina_gateway_held_requests gauge\n\
                 kasmina_gateway_held_requests{revision=\"aaaa1111\"} 0\n# EOF\n";
    let (port, runtime_hits) = runtime_metrics("127.0.0.1", 0, idle).await;
    let (_, gateway_hits) = runtime_metrics("127.0.0.3", port, quiet).await;

    let (client_ctx, mut server) = context();
    let clock = Arc::new(ManualClock::new(Timestamp::from_second(NOW).unwrap()));
    let base = Arc::new(Context::new(
        client_ctx.client.clone(),
        client_ctx.metrics.clone(),
        clock.clone(),
        Some("test".into()),
    ));
    let mut ctx = scaling_policy::reconcile::ScalingContext::new(base);
    ctx.metrics_port = port;
    let ctx = Arc::new(ctx);
    let mut policy = scaling_policy(json!([{"type": "CognitiveLoad", "target": 0.7}]));
    policy.spec.min_replicas = 0;
    policy.spec.scrape_interval = "5s".parse().unwrap();
    policy.spec.idle_window = Some("10s".parse().unwrap());
    let mut ed = serving_edge_deployment(1);
    ed["spec"]["strategy"] = json!({"type": "Canary",
        "canary": {"steps": [{"setWeight": 50}], "trafficRouting": {"gateway": {}}}});

    // Three intervals, 5 s apart: idle from the first look (t = 0) to t = 10.
    for (t, scaled) in [(0, false), (5, false), (10, true)] {
        let reconcile = tokio::spawn(scaling_policy::reconcile::reconcile(
            Arc::new(policy.clone()),
            ctx.clone(),
        ));
        server
            .expect(Method::GET, ED_PATH, StatusCode::OK, |_| ed.clone())
            .await;
        expect_pods(&mut server, runtime_pod("sentiment-a", "127.0.0.1")).await;
        let query = expect_pods(&mut server, gateway_pod("127.0.0.3")).await;
        assert!(
            query.contains("app.kubernetes.io%2Fcomponent%3Dgateway"),
            "{query}"
        );
        if scaled {
            let (_, scale) = expect_scale(&mut server, 0, 1).await;
            assert_eq!(scale, json!({"spec": {"replicas": 0}}), "t = {t}");
        }
        if t == 5 {
            // Nothing changed: no status write.
            reconcile.await.unwrap().unwrap();
            server.assert_idle();
            clock.advance(std::time::Duration::from_secs(5));
            continue;
        }
        let answered = policy.clone();
        let (_, patch) = server
            .expect(Method::PATCH, SP_STATUS, StatusCode::OK, |_| {
                serde_json::to_value(&answered).unwrap()
            })
            .await;
        let status: kasmina::api::ScalingPolicyStatus =
            serde_json::from_value(patch["status"].clone()).unwrap();
        let reason = |type_: &str| {
            let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
            c.reason.clone()
        };
        if scaled {
            assert_eq!(status.desired_replicas, Some(0));
            assert_eq!(reason("ScalingActive"), "IdleWindow");
            server.expect_event("Normal", "SuccessfulRescale").await;
        } else {
            assert_eq!(status.desired_replicas, Some(1), "t = {t}");
            assert_eq!(reason("ScalingLimited"), "IdleWindow", "t = {t}");
        }
        reconcile.await.unwrap().unwrap();
        server.assert_idle();
        policy.status = Some(status);
        clock.advance(std::time::Duration::from_secs(5));
    }
    use std::sync::atomic::Ordering;
    assert_eq!(gateway_hits.load(Ordering::SeqCst), 3);
    assert_eq!(runtime_hits.load(Ordering::SeqCst), 3);
}
