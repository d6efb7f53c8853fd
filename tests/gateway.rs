//! `kasmina gateway` against fake runtimes on loopback: exact weights, pinning, a retry on
//! another pod, hop-by-hop headers, bounds and JSON errors; mirrored answers compared; a request
//! held at zero replicas until the woken pod is ready.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::http::{get, http};
use kasmina::api::edge_deployment::Balancing;
use kasmina::controller::edge_deployment::scrape::parse_agreement;
use kasmina::gateway::proxy::{Gateway, Limits};
use kasmina::gateway::routes::{Split, Table};
use kasmina::gateway::wake::{HoldLimits, Holding, Wake, WakeError, Woken};
use kasmina::gateway::{self, fixed_table};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A fake runtime: answers every infer with its revision, the body's length and the request
/// headers it got, and reports a load of 0/4.
async fn runtime(revision: &'static str) -> SocketAddr {
    async fn infer(
        State(revision): State<&'static str>,
        headers: HeaderMap,
        body: String,
    ) -> ([(&'static str, &'static str); 1], axum::Json<Value>) {
        let names: Vec<String> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        (
            [("kasmina-load", "0/4")],
            axum::Json(json!({"model_version": revision, "length": body.len(), "headers": names})),
        )
    }
    let app = Router::new()
        .route("/v2/models/m/infer", post(infer))
        .with_state(revision);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A loopback address nothing listens on.
async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn gateway(max_body_bytes: usize) -> Gateway {
    Gateway::new(
        Balancing::PowerOfTwoChoices,
        Limits {
            max_body_bytes,
            connect_timeout: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(5),
        },
    )
}

async fn start(table: Table, max_body_bytes: usize) -> (SocketAddr, CancellationToken) {
    serve(Arc::new(gateway(max_body_bytes)), table).await
}

async fn serve(gw: Arc<Gateway>, table: Table) -> (SocketAddr, CancellationToken) {
    gw.set_table(table);
    gw.health.set_ready(true);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        gateway::serve(gw, listener, Duration::ZERO, Duration::from_secs(1), token).await
    });
    (addr, stop)
}

async fn infer(addr: SocketAddr, headers: &[(&str, &str)]) -> common::http::Reply {
    http(
        addr,
        "POST",
        "/v2/models/m/infer",
        headers,
        br#"{"inputs":[]}"#,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_five_percent_canary_gets_exactly_five_percent_whatever_its_pods() {
    let (s, c1, c2) = (
        runtime("stable").await,
        runtime("canary").await,
        runtime("canary").await,
    );
    let table = fixed_table(&[("s".into(), s), ("c".into(), c1), ("c".into(), c2)], 5, 0);
    let (gw, _stop) = start(table, 1 << 20).await;
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..2_000 {
        let r = infer(gw, &[]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let version = r.json()["model_version"].as_str().unwrap().to_owned();
        let revision = &r.headers["kasmina-revision"];
        assert_eq!(revision, if version == "canary" { "c" } else { "s" });
        *answered.entry(version).or_default() += 1;
    }
    assert_eq!(answered["canary"], 100, "{answered:?}");
    assert_eq!(answered["stable"], 1_900);
}

#[tokio::test]
async fn a_header_pins_a_revision_and_an_unknown_one_is_refused_by_name() {
    let (s, c) = (runtime("stable").await, runtime("canary").await);
    let (gw, _stop) = start(
        fixed_table(&[("s".into(), s), ("c".into(), c)], 0, 0),
        1 << 20,
    )
    .await;
    for _ in 0..10 {
        let r = infer(gw, &[("kasmina-revision", "canary")]).await;
        assert_eq!(r.json()["model_version"], "canary");
    }
    assert_eq!(infer(gw, &[]).await.json()["model_version"], "stable");
    let r = infer(gw, &[("kasmina-revision", "nope")]).await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("kasmina-revision"), "{}", r.error());
}

#[tokio::test]
async fn a_request_a_pod_never_answered_is_sent_once_more_to_another() {
    let (dead, live) = (dead_address().await, runtime("stable").await);
    let (gw, _stop) = start(
        fixed_table(&[("s".into(), dead), ("s".into(), live)], 0, 0),
        1 << 20,
    )
    .await;
    for _ in 0..40 {
        let r = infer(gw, &[]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let metrics = String::from_utf8(get(gw, "/metrics").await.body).unwrap();
    let retries: f64 = metrics
        .lines()
        .find(|l| l.starts_with("kasmina_gateway_retries_total{revision=\"s\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(retries >= 1.0, "{metrics}");
    assert!(
        metrics.contains("kasmina_gateway_upstream_errors_total{revision=\"s\",kind=\"connect\"}")
    );
    assert!(metrics.contains("kasmina_gateway_requests_total{revision=\"s\",code=\"200\"} 40"));

    // With no pod left that answers, the caller gets a 502 naming the pod, not a hang.
    let (gw, _stop) = start(fixed_table(&[("s".into(), dead)], 0, 0), 1 << 20).await;
    let r = infer(gw, &[]).await;
    assert_eq!(r.status, 502);
    assert!(r.error().contains("revision s"), "{}", r.error());
}

#[tokio::test]
async fn headers_pass_but_hop_by_hop_ones_and_oversized_bodies_do_not() {
    let s = runtime("stable").await;
    let (gw, _stop) = start(fixed_table(&[("s".into(), s)], 0, 0), 64).await;
    let r = infer(
        gw,
        &[
            ("x-request-id", "42"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
        ],
    )
    .await;
    let seen: Vec<String> = serde_json::from_value(r.json()["headers"].clone()).unwrap();
    assert!(seen.contains(&"x-request-id".to_owned()), "{seen:?}");
    for hop in ["connection", "keep-alive", "upgrade"] {
        assert!(!seen.contains(&hop.to_owned()), "{hop} forwarded: {seen:?}");
    }
    assert_eq!(r.json()["length"], 13, "the body arrives whole");
    let big = vec![b'x'; 65];
    let r = http(gw, "POST", "/v2/models/m/infer", &[], &big)
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    assert!(r.error().contains("64 byte"), "{}", r.error());
    let r = get(gw, "/other").await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/v2"));
}

#[tokio::test]
async fn with_no_ready_pod_the_caller_is_told_to_retry_shortly() {
    let split = Split {
        stable: Some("s".into()),
        canary: None,
        weight: 0,
        mirror: 0,
    };
    let (gw, _stop) = start(Table::default().next(split, BTreeMap::new()), 1 << 20).await;
    let r = infer(gw, &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.error().contains("no ready pod"), "{}", r.error());
    let (gw, _stop) = start(Table::default(), 1 << 20).await;
    let r = infer(gw, &[]).await;
    assert_eq!(r.status, 503);
    assert!(r.error().contains("no revision"), "{}", r.error());
}

/// A fake runtime answering every infer with one embedding, `vector`, as OIP JSON.
async fn embedder(revision: &'static str, vector: [f32; 3]) -> SocketAddr {
    let app = Router::new().route(
        "/v2/models/m/infer",
        post(move || async move {
            axum::Json(
                json!({"model_name": "m", "model_version": revision, "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": [1, 3], "data": vector}]}),
            )
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn mirrored_requests_measure_the_canarys_agreement_and_never_reach_the_caller() {
    // The canary's embedding is 45° off stable's: cosine 0.7071.
    let s = embedder("stable", [1.0, 0.0, 0.0]).await;
    let c = embedder("canary", [1.0, 1.0, 0.0]).await;
    let (gw, _stop) = start(
        fixed_table(&[("s".into(), s), ("c".into(), c)], 0, 50),
        1 << 20,
    )
    .await;
    for _ in 0..40 {
        let r = infer(gw, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["model_version"], "stable", "only stable answers");
        assert_eq!(r.headers["kasmina-revision"], "s");
    }
    // A pinned request is the tester's own: not mirrored.
    assert_eq!(
        infer(gw, &[("kasmina-revision", "stable")]).await.status,
        200
    );
    // The comparisons finish after the answers: read until all 20 are in.
    let mut seen = Default::default();
    for _ in 0..500 {
        let text = String::from_utf8(get(gw, "/metrics").await.body).unwrap();
        seen = parse_agreement(&text, "c").unwrap();
        if seen.agreement_count >= 20.0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(seen.agreement_count, 20.0, "50 % of 40 mirrored");
    let mean = seen.agreement_sum / seen.agreement_count;
    assert!(
        (mean - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-4,
        "{mean}"
    );
    let text = String::from_utf8(get(gw, "/metrics").await.body).unwrap();
    assert!(
        text.contains(r#"kasmina_gateway_mirrored_total{revision="c",outcome="compared"} 20"#),
        "{text}"
    );
}

/// A wake that reports each call on a channel (the test then starts the "pod").
struct Woke(tokio::sync::mpsc::UnboundedSender<()>);

impl Wake for Woke {
    fn wake(&self) -> std::pin::Pin<Box<dyn Future<Output = Result<Woken, WakeError>> + Send>> {
        let _ = self.0.send(());
        Box::pin(async { Ok(Woken::Scaled) })
    }
}

#[tokio::test]
async fn at_zero_replicas_a_request_is_held_until_the_woken_pod_is_ready() {
    let (woke, mut wakes) = tokio::sync::mpsc::unbounded_channel();
    let limits = HoldLimits {
        max_held: 4,
        max_wait: Duration::from_secs(5),
    };
    let gw = Arc::new(gateway(1 << 20).holding(Holding::new(Arc::new(Woke(woke)), limits)));
    let at_zero = |pods| {
        let split = Split {
            stable: Some("s".into()),
            ..Split::default()
        };
        Table::default().next(split, pods)
    };
    let (addr, _stop) = serve(gw.clone(), at_zero(BTreeMap::new())).await;
    let held = tokio::spawn(async move { infer(addr, &[]).await });
    // The wake is asked for; then the pod is Ready and the table says so.
    wakes.recv().await.expect("a wake");
    let pod = runtime("stable").await;
    gw.set_table(at_zero(BTreeMap::from([(
        "s".to_owned(),
        vec![("s-pod".to_owned(), pod)],
    )])));
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["model_version"], "stable");
    assert!(wakes.try_recv().is_err(), "one wake");
}
