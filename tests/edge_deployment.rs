//! The EdgeDeployment reconciler against a scripted API server (tower-test): a small in-memory
//! store answering list, get, server-side apply, merge patch, status and delete, recording
//! every request. Covers new revision → Job; Job done → Deployment + Services; canary step →
//! weight change; failed analysis → rollback (scraping a real HTTP metrics endpoint); and a
//! steady state that writes nothing.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::jiff::Timestamp;
use kasmina::api::ComplianceProfile;
use kasmina::api::EdgeDeployment;
use kasmina::api::condition::ConditionStatus;
use kasmina::controller::cache::{Changes, Policies, filled, refill};
use kasmina::controller::context::{Context, FixedClock, Metrics};
use kasmina::controller::edge_deployment::names::NAME_LABEL;
use kasmina::controller::edge_deployment::plan;
use kasmina::controller::edge_deployment::reconcile::{EdgeContext, reconcile};
use kasmina::controller::edge_deployment::watch::{ChildCaches, ChildWriters};
use kasmina::controller::edge_deployment::workload::Settings;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock;

const NOW: i64 = 1_800_000_000;
const ED_PATH: &str = "/apis/kasmina.dev/v1alpha1/namespaces/ml/edgedeployments/sentiment";
const JOBS: &str = "/apis/batch/v1/namespaces/ml/jobs";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ml/deployments";
const SERVICES: &str = "/api/v1/namespaces/ml/services";
const PROFILES: &str = "/apis/kasmina.dev/v1alpha1/complianceprofiles/";

/// What the fake API server holds and was asked.
#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Value>,
    requests: Vec<(Method, String)>,
    /// Writes under this path prefix are refused with this status code and message.
    refuse: Option<(String, u16, String)>,
}

impl Store {
    fn writes(&self) -> Vec<String> {
        self.requests
            .iter()
            .filter(|(m, p)| *m != Method::GET && !p.contains("/events"))
            .map(|(m, p)| format!("{m} {p}"))
            .collect()
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn labels_match(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
        })
    })
}

fn answer(
    store: &mut Store,
    method: &Method,
    path: &str,
    query: &str,
    body: Value,
) -> (StatusCode, Value) {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
        )
    };
    if path.ends_with("/events") {
        return (StatusCode::CREATED, body);
    }
    if let Some((prefix, code, message)) = &store.refuse
        && *method != Method::GET
        && path.starts_with(prefix.as_str())
    {
        let reason = if *code == 403 { "Forbidden" } else { "Invalid" };
        return (
            StatusCode::from_u16(*code).unwrap(),
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}),
        );
    }
    match *method {
        Method::GET => {
            if let Some(o) = store.objects.get(path) {
                return (StatusCode::OK, o.clone());
            }
            let prefix = format!("{path}/");
            let selector = query_param(query, "labelSelector").unwrap_or_default();
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|(p, o)| {
                    p.starts_with(&prefix)
                        && !p[prefix.len()..].contains('/')
                        && labels_match(o, &selector)
                })
                .map(|(_, o)| o.clone())
                .collect();
            let plural = path.rsplit('/').next().unwrap_or_default();
            // Children, runtime pods, profiles and namespaces come from the controller's
            // caches: a LIST of them is not answered (a reconcile that lists them fails).
            // Build pods are listed, once per build, for their termination message.
            let build_pods = plural == "pods" && selector.contains("batch.kubernetes.io/job-name");
            if build_pods || plural == "nodes" {
                return (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
                );
            }
            not_found()
        }
        Method::PATCH if path.ends_with("/status") => {
            let object = path.trim_end_matches("/status");
            let Some(o) = store.objects.get_mut(object) else {
                return not_found();
            };
            o["status"] = body["status"].clone();
            (StatusCode::OK, o.clone())
        }
        Method::PATCH if query.contains("fieldManager") => {
            let mut o = body;
            if let Some(old) = store.objects.get(path) {
                o["status"] = old["status"].clone();
            }
            store.objects.insert(path.to_owned(), o.clone());
            (StatusCode::OK, o)
        }
        Method::PATCH => {
            let Some(o) = store.objects.get_mut(path) else {
                return not_found();
            };
            merge(o, &body);
            (StatusCode::OK, o.clone())
        }
        Method::DELETE => match store.objects.remove(path) {
            Some(_) => (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            None => not_found(),
        },
        _ => (StatusCode::METHOD_NOT_ALLOWED, json!({})),
    }
}

/// A running fake API server and the reconciler's context around it.
struct Cluster {
    store: Arc<Mutex<Store>>,
    ctx: Arc<EdgeContext>,
    /// The controller's caches of children and profiles, filled from the store before each
    /// reconcile as the watches would have.
    caches: Mutex<(ChildWriters, Writer<ComplianceProfile>)>,
}

impl Cluster {
    fn new(now: i64, metrics_port: u16) -> Self {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let store = Arc::new(Mutex::new(Store::default()));
        let served = store.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or("").to_owned();
                let bytes = request.into_body().collect().await.unwrap().to_bytes();
                let body = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let (status, reply) = {
                    let mut s = served.lock().unwrap();
                    s.requests.push((method.clone(), path.clone()));
                    answer(&mut s, &method, &path, &query, body)
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
        });
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::register(&mut Registry::default()));
        let clock = Arc::new(FixedClock(Timestamp::from_second(now).unwrap()));
        let (profiles, profiles_writer) = reflector::store();
        let policies = Policies::from_stores(profiles, filled(vec![]), Changes::channel().1);
        let base = Arc::new(
            Context::new(client, metrics, clock, Some("test".into())).with_policies(policies),
        );
        let settings = Settings {
            image: "kasmina:0.1.0".into(),
            artifact_store: "s3://artifacts".into(),
            artifact_store_secret: None,
            host_paths: vec![],
            gateway_cluster_role: "kasmina-gateway".into(),
        };
        let (children, writers) = ChildCaches::new();
        let mut ctx = EdgeContext::new(base, settings, children);
        ctx.metrics_port = metrics_port;
        Self {
            store,
            ctx: Arc::new(ctx),
            caches: Mutex::new((writers, profiles_writer)),
        }
    }

    /// What the watches would have put in the caches by now: every child in the store.
    fn sync_caches(&self) {
        let objects = self.store.lock().unwrap().objects.clone();
        fn under<K: serde::de::DeserializeOwned>(
            objects: &BTreeMap<String, Value>,
            prefix: &str,
        ) -> Vec<K> {
            objects
                .iter()
                .filter(|(p, _)| p.starts_with(prefix))
                .map(|(_, o)| serde_json::from_value(o.clone()).unwrap())
                .collect()
        }
        let mut caches = self.caches.lock().unwrap();
        let (writers, profiles) = &mut *caches;
        refill(profiles, under(&objects, PROFILES));
        refill(&mut writers.jobs, under(&objects, JOBS));
        refill(&mut writers.deployments, under(&objects, DEPLOYMENTS));
        refill(&mut writers.services, under(&objects, SERVICES));
        refill(
            &mut writers.pods,
            under(&objects, "/api/v1/namespaces/ml/pods/"),
        );
    }

    fn put(&self, path: &str, object: Value) {
        self.store
            .lock()
            .unwrap()
            .objects
            .insert(path.to_owned(), object);
    }

    fn get(&self, path: &str) -> Value {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(path)
            .cloned()
            .unwrap_or_else(|| panic!("no {path}"))
    }

    fn has(&self, path: &str) -> bool {
        self.store.lock().unwrap().objects.contains_key(path)
    }

    fn ed(&self) -> EdgeDeployment {
        serde_json::from_value(self.get(ED_PATH)).unwrap()
    }

    /// One reconcile of the stored EdgeDeployment; returns the writes it made.
    async fn reconcile(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clear();
        self.sync_caches();
        reconcile(Arc::new(self.ed()), self.ctx.clone())
            .await
            .unwrap();
        self.store.lock().unwrap().writes()
    }

    /// Marks every Deployment fully available and every Job finished (with `message`).
    fn settle(&self) {
        let mut s = self.store.lock().unwrap();
        for (path, o) in s.objects.iter_mut() {
            if path.starts_with(DEPLOYMENTS) {
                let n = o["spec"]["replicas"].clone();
                o["status"] = json!({"replicas": n, "readyReplicas": n, "availableReplicas": n, "updatedReplicas": n});
            }
        }
    }

    /// A reconcile creates the build Job of `rev`, which then succeeds with `digest`.
    async fn build(&self, rev: &str, digest: &str) {
        self.reconcile().await;
        let summary = summary(digest).replace("/x/", &format!("/{rev}/"));
        self.finish_job(&format!("sentiment-build-{}", &rev[..8]), &summary);
    }

    /// `n` rounds of a reconcile followed by every Deployment becoming available.
    async fn rounds(&self, n: usize) {
        for _ in 0..n {
            self.reconcile().await;
            self.settle();
        }
    }

    fn finish_job(&self, job: &str, message: &str) {
        let path = format!("{JOBS}/{job}");
        let mut o = self.get(&path);
        o["status"] = json!({"succeeded": 1});
        let labels = o["spec"]["template"]["metadata"]["labels"].clone();
        self.put(&path, o);
        let mut pod_labels = labels;
        pod_labels["batch.kubernetes.io/job-name"] = json!(job);
        self.put(
            &format!("/api/v1/namespaces/ml/pods/{job}-abcde"),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("{job}-abcde"), "namespace": "ml", "labels": pod_labels},
                   "status": {"containerStatuses": [{"name": "build", "image": "kasmina", "imageID": "", "ready": false, "restartCount": 0,
                              "state": {"terminated": {"exitCode": 0, "message": message, "finishedAt": "2027-01-15T07:59:00Z"}}}]}}),
        );
    }
}

fn summary(digest: &str) -> String {
    json!({"digest": digest, "uri": "s3://artifacts/ml/sentiment/x/", "sizeBytes": 22_000_000, "originalSizeBytes": 90_000_000,
           "quantization": "q8_0", "dtypeMix": {}, "sparsity": 0.0, "qualityLoss": 0.001, "minCosine": 0.999,
           "signed": false, "encrypted": false})
    .to_string()
}

fn edge_deployment(version: &str, strategy: Value) -> Value {
    json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
        "metadata": {"name": "sentiment", "namespace": "ml", "generation": 1, "uid": "ed-uid"},
        "spec": {"model": {"name": "minilm", "version": version,
                           "source": {"uri": "s3://models/minilm/"}, "architecture": "bert"},
                 "optimization": {"profile": {"memoryMiB": 256}},
                 "replicas": 3, "strategy": strategy},
    })
}

fn canary() -> Value {
    json!({"type": "Canary",
           "canary": {"steps": [{"setWeight": 20}, {"analysis": {"iterations": 3}}, {"setWeight": 60}]},
           "analysis": {"interval": "30s", "failureLimit": 0, "checks": [{"metric": "errorRate", "max": 0.05}]}})
}

fn revision_of(ed: &Value) -> String {
    let ed: EdgeDeployment = serde_json::from_value(ed.clone()).unwrap();
    plan::revision(&ed.spec, &Default::default())
}

/// Brings the first version to Healthy: build, serve, promote.
async fn serving(cluster: &Cluster, strategy: Value) -> String {
    let ed = edge_deployment("1.0.0", strategy);
    let rev = revision_of(&ed);
    cluster.put(ED_PATH, ed);
    cluster.build(&rev, "sha256:one").await;
    cluster.rounds(4).await;
    assert_eq!(
        cluster.ed().status.unwrap().phase,
        Some(kasmina::api::edge_deployment::Phase::Healthy)
    );
    rev
}

async fn new_version(cluster: &Cluster, version: &str) -> String {
    let mut ed = cluster.get(ED_PATH);
    ed["spec"]["model"]["version"] = json!(version);
    ed["metadata"]["generation"] = json!(2);
    let rev = revision_of(&ed);
    cluster.put(ED_PATH, ed);
    rev
}

#[tokio::test]
async fn a_new_revision_creates_its_build_job() {
    let cluster = Cluster::new(NOW, 0);
    let ed = edge_deployment("1.0.0", json!({}));
    let rev = revision_of(&ed);
    cluster.put(ED_PATH, ed);
    let writes = cluster.reconcile().await;
    let job = format!("{JOBS}/sentiment-build-{}", &rev[..8]);
    assert!(writes.contains(&format!("PATCH {job}")), "{writes:?}");
    let job = cluster.get(&job);
    assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "ed-uid");
    assert_eq!(job["metadata"]["labels"][NAME_LABEL], "sentiment");
    let args = job["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains(&format!("s3://artifacts/ml/sentiment/{rev}/")),
        "{args}"
    );
    let status = cluster.ed().status.unwrap();
    assert_eq!(
        status.phase,
        Some(kasmina::api::edge_deployment::Phase::Building)
    );
    assert_eq!(status.target_revision.as_deref(), Some(rev.as_str()));
}

#[tokio::test]
async fn a_finished_job_becomes_a_deployment_and_services() {
    let cluster = Cluster::new(NOW, 0);
    let ed = edge_deployment("1.0.0", json!({"type": "BlueGreen"}));
    let rev = revision_of(&ed);
    cluster.put(ED_PATH, ed);
    cluster.build(&rev, "sha256:one").await;
    let writes = cluster.reconcile().await;
    let deployment = format!("{DEPLOYMENTS}/sentiment-{}", &rev[..8]);
    assert!(
        writes.contains(&format!("PATCH {deployment}")),
        "{writes:?}"
    );
    assert!(
        cluster.has(&format!("{SERVICES}/sentiment"))
            && cluster.has(&format!("{SERVICES}/sentiment-preview"))
    );
    let d = cluster.get(&deployment);
    let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("\"--expect-digest\",\"sha256:one\""),
        "{args}"
    );
    assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
    let status = cluster.ed().status.unwrap();
    assert_eq!(status.artifact.unwrap().digest, "sha256:one");
    // Ready once the pods are.
    cluster.settle();
    cluster.reconcile().await;
    let ed = cluster.ed();
    let ready = ed
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(ready.is_true(), "{ready:?}");
}

#[tokio::test]
async fn steady_state_writes_nothing() {
    let cluster = Cluster::new(NOW, 0);
    serving(&cluster, canary()).await;
    let writes = cluster.reconcile().await;
    assert!(writes.is_empty(), "steady state wrote: {writes:?}");
    // It reads its children and the profiles from the caches: no request at all (it made
    // one LIST each of Deployments, Services, Jobs and ComplianceProfiles per reconcile).
    let requests = cluster.store.lock().unwrap().requests.clone();
    assert!(requests.is_empty(), "{requests:?}");
}

#[tokio::test]
async fn a_profile_with_allowed_regions_pins_the_runtime_there() {
    let cluster = Cluster::new(NOW, 0);
    let rev = serving(&cluster, json!({})).await;
    let deployment = format!("{DEPLOYMENTS}/sentiment-{}", &rev[..8]);
    let affinity = |c: &Cluster| c.get(&deployment)["spec"]["template"]["spec"]["affinity"].clone();
    assert_eq!(affinity(&cluster), Value::Null);

    // A profile selecting it (an empty selector selects all): the Deployment is re-applied
    // with the region requirement; the revision, and so the rollout, stays as it is.
    cluster.put(
        "/apis/kasmina.dev/v1alpha1/complianceprofiles/eu",
        json!({"apiVersion": "kasmina.dev/v1alpha1", "kind": "ComplianceProfile", "metadata": {"name": "eu"},
               "spec": {"rules": {"allowedRegions": ["eu-west-1", "eu-central-1"]}}}),
    );
    let writes = cluster.reconcile().await;
    assert!(
        writes.contains(&format!("PATCH {deployment}")),
        "{writes:?}"
    );
    assert_eq!(
        affinity(&cluster)["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([{"matchExpressions": [{"key": "topology.kubernetes.io/region", "operator": "In",
                                      "values": ["eu-west-1", "eu-central-1"]}]}])
    );
    assert_eq!(
        cluster.ed().status.unwrap().stable_revision.as_deref(),
        Some(rev.as_str())
    );
    cluster.settle();
    let writes = cluster.reconcile().await;
    assert!(writes.is_empty(), "then steady again: {writes:?}");
}

#[tokio::test]
async fn a_canary_step_changes_the_weight() {
    let cluster = Cluster::new(NOW, 0);
    let stable = serving(&cluster, canary()).await;
    let candidate = new_version(&cluster, "2.0.0").await;
    cluster.build(&candidate, "sha256:two").await;
    cluster.reconcile().await; // artifact recorded, candidate starts with no pods
    cluster.settle();
    let writes = cluster.reconcile().await; // setWeight 20
    let c = format!("{DEPLOYMENTS}/sentiment-{}", &candidate[..8]);
    let s = format!("{DEPLOYMENTS}/sentiment-{}", &stable[..8]);
    assert!(
        writes.contains(&format!("PATCH {c}")) && writes.contains(&format!("PATCH {s}")),
        "{writes:?}"
    );
    assert_eq!(cluster.get(&c)["spec"]["replicas"], 1);
    assert_eq!(cluster.get(&s)["spec"]["replicas"], 2);
    cluster.settle();
    cluster.reconcile().await;
    let status = cluster.ed().status.unwrap();
    assert_eq!(status.canary_weight, Some(33));
    assert_eq!(status.current_step, Some(1));
    assert_eq!(status.canary_revision.as_deref(), Some(candidate.as_str()));
}

#[tokio::test]
async fn failed_analysis_rolls_back_to_stable() {
    // The candidate's runtime: 40 of 100 requests failed since the baseline.
    let metrics = "# TYPE kasmina_requests counter\n\
        kasmina_requests_total{model=\"minilm\",code=\"200\"} 60\n\
        kasmina_requests_total{model=\"minilm\",code=\"500\"} 40\n\
        # TYPE kasmina_cognitive_load gauge\nkasmina_cognitive_load 0.2\n# EOF\n";
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { metrics }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let cluster = Cluster::new(NOW, port);
    let stable = serving(&cluster, canary()).await;
    let candidate = new_version(&cluster, "2.0.0").await;
    cluster.build(&candidate, "sha256:two").await;
    cluster.rounds(3).await;
    // At the analysis step, with a baseline of the pod's counters at zero one interval ago.
    let mut ed = cluster.get(ED_PATH);
    assert_eq!(ed["status"]["currentStep"], 1, "{:#}", ed["status"]);
    ed["status"]["analysis"] = json!({"revision": candidate, "baseline": {"at": "2027-01-15T07:59:00Z",
        "candidatePods": [{"pod": "canary-pod", "requests": 0.0, "errors": 0.0, "buckets": []}]}});
    cluster.put(ED_PATH, ed);
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "canary-pod", "namespace": "ml", "labels": {NAME_LABEL: "sentiment", "app.kubernetes.io/component": "runtime", "kasmina.dev/revision": candidate}},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}});
    cluster.put("/api/v1/namespaces/ml/pods/canary-pod", pod);

    let writes = cluster.reconcile().await;
    let c = format!("{DEPLOYMENTS}/sentiment-{}", &candidate[..8]);
    assert!(
        writes.contains(&format!("DELETE {c}")),
        "canary scaled away: {writes:?}"
    );
    assert_eq!(
        cluster.get(&format!("{DEPLOYMENTS}/sentiment-{}", &stable[..8]))["spec"]["replicas"],
        3
    );
    let status = cluster.ed().status.unwrap();
    assert_eq!(
        status.phase,
        Some(kasmina::api::edge_deployment::Phase::RolledBack)
    );
    assert_eq!(status.stable_revision.as_deref(), Some(stable.as_str()));
    let record = &status.history[0];
    assert_eq!(
        record.outcome,
        kasmina::api::edge_deployment::RolloutOutcome::RolledBack
    );
    assert!(
        record.reason.contains("errorRate 0.400 > max 0.050"),
        "{}",
        record.reason
    );
    assert_eq!(status.analysis.unwrap().values["errorRate"], 0.4);
}

#[tokio::test]
async fn a_write_only_a_user_can_unblock_is_a_condition_not_only_a_log_line() {
    let cluster = Cluster::new(NOW, 0);
    serving(&cluster, canary()).await;
    let candidate = new_version(&cluster, "2.0.0").await;
    let job = format!("{JOBS}/sentiment-build-{}", &candidate[..8]);
    cluster.store.lock().unwrap().refuse = Some((
        JOBS.to_owned(),
        403,
        format!(
            "jobs.batch \"sentiment-build-{}\" is forbidden: exceeded quota: ml-quota, requested: count/jobs.batch=1, used: count/jobs.batch=10, limited: count/jobs.batch=10",
            &candidate[..8]
        ),
    ));
    cluster.sync_caches();
    let error = reconcile(Arc::new(cluster.ed()), cluster.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(error.needs_user(), Some("QuotaExceeded"));
    let ready = |ed: &EdgeDeployment| {
        ed.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned())
            .unwrap()
    };
    let c = ready(&cluster.ed());
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "QuotaExceeded")
    );
    assert!(
        c.message.contains("apply Job sentiment-build-") && c.message.contains("ml-quota"),
        "names the object and the quota: {}",
        c.message
    );
    assert!(!cluster.has(&job));
    // The quota raised, the next reconcile builds and Ready is planned afresh.
    cluster.store.lock().unwrap().refuse = None;
    cluster.reconcile().await;
    assert!(cluster.has(&job));
    assert_ne!(ready(&cluster.ed()).reason, "QuotaExceeded");
    // A server error passes by itself: retried with backoff, no condition.
    let transient = kasmina::controller::edge_deployment::reconcile::Error::Api {
        verb: "apply",
        what: "Job x".into(),
        namespace: "ml".into(),
        source: kube::Error::Api(Box::new(
            kube::core::Status::failure("etcd timeout", "InternalError").with_code(500),
        )),
    };
    assert_eq!(transient.needs_user(), None);
}

#[tokio::test]
async fn deleting_an_edge_deployment_deletes_its_artifacts_before_it_goes() {
    let cluster = Cluster::new(NOW, 0);
    let first = serving(&cluster, canary()).await;
    let ed = cluster.get(ED_PATH);
    assert_eq!(
        ed["metadata"]["finalizers"],
        json!(["kasmina.dev/artifacts"]),
        "held from the first reconcile"
    );
    let second = new_version(&cluster, "2.0.0").await;
    cluster.build(&second, "sha256:two").await;
    cluster.rounds(3).await;

    // `kubectl delete`: the API server sets deletionTimestamp and waits for the finalizer.
    let mut ed = cluster.get(ED_PATH);
    ed["metadata"]["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
    cluster.put(ED_PATH, ed);
    let writes = cluster.reconcile().await;
    let job_path = format!("{JOBS}/sentiment-cleanup-ed-uid");
    assert_eq!(
        writes,
        vec![format!("PATCH {job_path}")],
        "only the cleanup Job"
    );
    let job = cluster.get(&job_path);
    let args = job["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    for rev in [&first, &second] {
        let uri = format!("s3://artifacts/ml/sentiment/{rev}/");
        assert!(
            args.as_array().unwrap().contains(&json!(uri)),
            "{uri} in {args}"
        );
    }
    assert!(job["metadata"].get("ownerReferences").is_none());
    // Running: the object stays.
    assert!(cluster.reconcile().await.is_empty());
    assert_eq!(
        cluster.get(ED_PATH)["metadata"]["finalizers"],
        json!(["kasmina.dev/artifacts"])
    );
    // Done: the finalizer goes (and with it, on a real server, the object).
    cluster.finish_job("sentiment-cleanup-ed-uid", "");
    let writes = cluster.reconcile().await;
    assert_eq!(writes, vec![format!("PATCH {ED_PATH}")]);
    assert_eq!(cluster.get(ED_PATH)["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn a_promote_annotation_is_consumed() {
    let cluster = Cluster::new(NOW, 0);
    serving(
        &cluster,
        json!({"type": "BlueGreen", "blueGreen": {"autoPromote": false}}),
    )
    .await;
    let candidate = new_version(&cluster, "2.0.0").await;
    cluster.build(&candidate, "sha256:two").await;
    cluster.rounds(3).await;
    assert_eq!(
        cluster.ed().status.unwrap().phase,
        Some(kasmina::api::edge_deployment::Phase::Paused)
    );
    let mut ed = cluster.get(ED_PATH);
    ed["metadata"]["annotations"] = json!({"kasmina.dev/promote": "2027-01-15T08:00:00Z"});
    cluster.put(ED_PATH, ed);
    let writes = cluster.reconcile().await;
    assert!(writes.contains(&format!("PATCH {ED_PATH}")), "{writes:?}");
    let ed = cluster.get(ED_PATH);
    assert!(
        ed["metadata"]["annotations"]
            .get("kasmina.dev/promote")
            .is_none()
    );
    assert_eq!(ed["status"]["stableRevision"], json!(candidate));
    assert_eq!(
        cluster.get(&format!("{SERVICES}/sentiment"))["spec"]["selector"]["kasmina.dev/revision"],
        json!(candidate)
    );
}

const SECRET: &str = "/api/v1/namespaces/ml/secrets/sentiment-kasmina-keys";

fn profile(rules: Value) -> Value {
    json!({"apiVersion": "kasmina.dev/v1alpha1", "kind": "ComplianceProfile", "metadata": {"name": "hipaa"},
           "spec": {"enforcement": "Warn", "rules": rules}})
}

/// The keys Secret's entries, decoded.
fn secret_data(cluster: &Cluster) -> BTreeMap<String, String> {
    use base64::Engine as _;
    let secret = cluster.get(SECRET);
    secret["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap();
            (k.clone(), String::from_utf8(bytes).unwrap())
        })
        .collect()
}

fn container_args(object: &Value) -> Vec<String> {
    serde_json::from_value(object["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

#[tokio::test]
async fn a_profile_requiring_keys_gets_them_made_mounted_and_usable() {
    let cluster = Cluster::new(NOW, 0);
    cluster.put(
        "/apis/kasmina.dev/v1alpha1/complianceprofiles/hipaa",
        profile(
            json!({"requireSignedArtifacts": true, "requireEncryptionAtRest": true,
                       "requireAuthentication": true}),
        ),
    );
    let ed = edge_deployment("1.0.0", json!({}));
    let unkeyed = revision_of(&ed);
    cluster.put(ED_PATH, ed);

    // First reconcile: the keys Secret, owned by the EdgeDeployment, then the build Job.
    let writes = cluster.reconcile().await;
    assert!(
        writes.contains(&format!("PATCH {SECRET}")),
        "{writes:?} {:#}",
        cluster.get(ED_PATH)["status"]
    );
    let secret = cluster.get(SECRET);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "ed-uid");
    let data = secret_data(&cluster);
    let names: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "encryption.key",
            "jwt.key",
            "jwt.pub",
            "signing.key",
            "signing.pub"
        ]
    );

    // The revision is named by the keys too: new keys would rebuild.
    let rev = cluster.ed().status.unwrap().target_revision.unwrap();
    assert_ne!(rev, unkeyed);
    let job = cluster.get(&format!("{JOBS}/sentiment-build-{}", &rev[..8]));
    let args = container_args(&job).join(" ");
    assert!(
        args.contains("--sign-key /var/run/kasmina/keys/signing.key --encrypt-key /var/run/kasmina/keys/encryption.key"),
        "{args}"
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["items"],
        json!([{"key": "signing.key", "path": "signing.key"}, {"key": "encryption.key", "path": "encryption.key"}])
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);

    // The artifact is built signed and encrypted: the runtime verifies, decrypts, and checks
    // JWTs, mounting no private key.
    cluster.finish_job(
        &format!("sentiment-build-{}", &rev[..8]),
        &summary("sha256:one")
            .replace("\"signed\":false", "\"signed\":true")
            .replace("\"encrypted\":false", "\"encrypted\":true"),
    );
    let writes = cluster.reconcile().await;
    assert!(
        !writes.contains(&format!("PATCH {SECRET}")),
        "keys are made once: {writes:?}"
    );
    let deployment = cluster.get(&format!("{DEPLOYMENTS}/sentiment-{}", &rev[..8]));
    let args = container_args(&deployment).join(" ");
    assert!(
        args.ends_with("--public-key /var/run/kasmina/keys/signing.pub --decrypt-key /var/run/kasmina/keys/encryption.key --jwt-key /var/run/kasmina/keys/jwt.pub --auth jwt"),
        "{args}"
    );
    let items = &deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["items"];
    assert!(!items.to_string().contains("signing.key") && !items.to_string().contains("jwt.key"));

    // `kasmina token --key jwt.key` mints a token the runtime's jwt.pub accepts.
    let scratch = tempdir("keys");
    for (name, text) in &data {
        std::fs::write(scratch.join(name), text).unwrap();
    }
    let token = kasmina::runtime::auth::issue(
        &scratch.join("jwt.key"),
        &kasmina::runtime::auth::TokenRequest {
            audience: "minilm",
            issuer: None,
            subject: Some("ci"),
            lifetime: std::time::Duration::from_secs(60),
            key_id: None,
        },
        std::time::SystemTime::now(),
    )
    .unwrap();
    let verifier =
        kasmina::runtime::auth::Verifier::from_key_file(&scratch.join("jwt.pub"), "minilm", None)
            .unwrap();
    assert_eq!(verifier.verify(&token).unwrap().sub.as_deref(), Some("ci"));
    let _ = std::fs::remove_dir_all(&scratch);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kasmina-ed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The whole refusal path with real pieces: the controller makes the keys, a real build signs
/// with them, the artifact is tampered with, the real runtime started with the candidate
/// Deployment's own arguments refuses it, and the pod status it leaves aborts the rollout
/// while the stable revision keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_candidate_is_refused_and_the_rollout_aborts_on_stable() {
    let cluster = Cluster::new(NOW, 0);
    let stable = serving(&cluster, canary()).await;
    cluster.put(
        "/apis/kasmina.dev/v1alpha1/complianceprofiles/hipaa",
        profile(json!({"requireSignedArtifacts": true})),
    );
    new_version(&cluster, "2.0.0").await;
    cluster.reconcile().await;
    let candidate = cluster.ed().status.unwrap().target_revision.unwrap();
    let job = format!("sentiment-build-{}", &candidate[..8]);
    assert!(container_args(&cluster.get(&format!("{JOBS}/{job}"))).contains(&"--sign-key".into()));

    // The build, as the Job runs it, with the key from the Secret.
    let dir = tempdir("tamper");
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for (name, text) in secret_data(&cluster) {
        std::fs::write(keys.join(name), text).unwrap();
    }
    let source = dir.join("scorer.safetensors");
    let out = dir.join("artifact");
    common::tiny_mlp(&source, &[16, 32, 4], 5);
    let mut options = common::options(
        &source,
        kasmina::api::edge_deployment::Architecture::Mlp,
        &out,
    );
    options.sign_key = Some(keys.join("signing.key"));
    options.termination_log = Some(dir.join("termination-log"));
    kasmina::artifact::build(&options).await.unwrap();
    let summary = std::fs::read_to_string(dir.join("termination-log")).unwrap();
    assert!(summary.contains("\"signed\":true"), "{summary}");
    cluster.finish_job(&job, &summary);
    cluster.rounds(2).await;
    let c = format!("{DEPLOYMENTS}/sentiment-{}", &candidate[..8]);
    let args = container_args(&cluster.get(&c));
    assert!(args.contains(&"--public-key".into()), "{args:?}");

    // One flipped byte in the stored GGUF, then the pod's own command.
    let gguf = out.join("model.gguf");
    let mut bytes = std::fs::read(&gguf).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&gguf, &bytes).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let termination_log = dir.join("runtime-termination-log");
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.replace("/var/run/kasmina/keys", &keys.display().to_string()))
        .map(|a| {
            a.replace(
                "/dev/termination-log",
                &termination_log.display().to_string(),
            )
        })
        .map(|a| if a == "8080" { port.to_string() } else { a })
        .collect();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kasmina"))
        .args(&args)
        .args(["--host", "127.0.0.1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(i32::from(kasmina::runtime::REFUSED_EXIT_CODE)),
        "{stderr}"
    );

    // The kubelet reports it: the crashed container's last state, with the termination
    // message the runtime wrote.
    let message = std::fs::read_to_string(&termination_log).unwrap();
    assert!(message.contains("model.gguf has digest"), "{message}");
    cluster.put(
        "/api/v1/namespaces/ml/pods/candidate-pod",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "candidate-pod", "namespace": "ml", "labels": {NAME_LABEL: "sentiment", "app.kubernetes.io/component": "runtime", "kasmina.dev/revision": candidate}},
               "status": {"containerStatuses": [{"name": "runtime", "image": "kasmina", "imageID": "", "ready": false, "restartCount": 1,
                          "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                          "lastState": {"terminated": {"exitCode": output.status.code().unwrap(), "message": message}}}]}}),
    );
    let writes = cluster.reconcile().await;
    assert!(writes.contains(&format!("DELETE {c}")), "{writes:?}");
    assert_eq!(
        cluster.get(&format!("{DEPLOYMENTS}/sentiment-{}", &stable[..8]))["spec"]["replicas"],
        3,
        "stable keeps serving at full size"
    );
    let status = cluster.ed().status.unwrap();
    assert_eq!(
        status.phase,
        Some(kasmina::api::edge_deployment::Phase::RolledBack)
    );
    assert_eq!(status.stable_revision.as_deref(), Some(stable.as_str()));
    let record = &status.history[0];
    assert_eq!(
        record.outcome,
        kasmina::api::edge_deployment::RolloutOutcome::Aborted
    );
    assert!(
        record.reason.contains("refused the artifact")
            && record.reason.contains("model.gguf has digest"),
        "{}",
        record.reason
    );
    let _ = std::fs::remove_dir_all(&dir);
}
