//! `kasmina serve` end to end on loopback: every OIP v2 route, bad requests, the JWT attack
//! table, batching under concurrency, load shedding, timeouts, drain on shutdown, and — with
//! the real binary — tampered artifacts refusing to start and SIGTERM losing no request.
//! The models are small synthetic ones the tests build; the real all-MiniLM checks live in
//! tests/minilm.rs.

mod common;

use common::http::{get, http, post};

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use common::Scratch;
use kasmina::api::edge_deployment::{Architecture, Quantization};
use kasmina::artifact;
use kasmina::runtime::auth::{self, TokenRequest, Verifier};
use kasmina::runtime::batch::{BatchConfig, Engine};
use kasmina::runtime::protocol::{Items, Signature};
use kasmina::runtime::served::{self, OpenOptions, ServedModel};
use kasmina::runtime::{self, Limits};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

// ---------- servers under test ----------

fn limits(batch: BatchConfig) -> Limits {
    Limits {
        batch,
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 64 * 1024,
        drain_delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(30),
    }
}

fn batching() -> BatchConfig {
    BatchConfig {
        max_batch: 8,
        max_delay: Duration::from_millis(5),
        max_queue: 64,
        workers: 1,
        max_queue_delay: None,
    }
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), runtime::Error>>,
}

async fn start(model: ServedModel, limits: Limits, verifier: Option<Verifier>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runtime::serve(
        model,
        limits,
        verifier,
        "rev1234",
        Duration::from_millis(1),
        listener,
        shutdown.clone(),
    ));
    Server {
        addr,
        shutdown,
        task,
    }
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Builds a synthetic artifact: an MLP 32 → 64 → 4 (Q8_0) or the tiny BERT.
async fn build(dir: &Path, architecture: Architecture) -> artifact::BuildOutcome {
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    let source = match architecture {
        Architecture::Bert => {
            common::tiny_bert(&source, 7);
            source
        }
        _ => {
            let file = source.join("scorer.safetensors");
            common::tiny_mlp(&file, &[32, 64, 4], 11);
            file
        }
    };
    let mut options = common::options(&source, architecture, &dir.join("artifact"));
    options.quantization = Quantization::Q8_0;
    options.name = Some(
        match architecture {
            Architecture::Bert => "encoder",
            _ => "scorer",
        }
        .into(),
    );
    artifact::build(&options).await.unwrap()
}

async fn open(dir: &Path, digest: &str) -> ServedModel {
    let options = OpenOptions {
        artifact: dir.display().to_string(),
        expect_digest: digest.into(),
        public_key: None,
        decrypt_key: None,
        max_tokens: 64,
    };
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || served::open(&options, &handle))
        .await
        .unwrap()
        .unwrap()
        .0
}

fn mlp_request(rows: &[[f32; 32]]) -> Value {
    json!({"id": "r", "inputs": [{"name": "input", "shape": [rows.len(), 32], "datatype": "FP32",
        "data": rows.iter().flatten().collect::<Vec<_>>()}]})
}

fn row(seed: u32) -> [f32; 32] {
    std::array::from_fn(|i| ((seed as f32 + 1.0) * (i as f32 + 1.0) * 0.37).sin())
}

// ---------- routes ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_oip_route_answers_as_the_protocol_says() {
    let scratch = Scratch::new("serve-routes");
    let built = build(&scratch.0, Architecture::Mlp).await;
    let model = open(&scratch.path("artifact"), &built.digest).await;
    let direct = model
        .engine
        .infer(&Items::Rows(vec![row(1).to_vec()]))
        .unwrap();
    let server = start(model, limits(batching()), None).await;
    let a = server.addr;

    assert_eq!(
        get(a, "/v2/health/live").await.json(),
        json!({"live": true})
    );
    assert_eq!(
        get(a, "/v2/health/ready").await.json(),
        json!({"ready": true})
    );
    let meta = get(a, "/v2").await.json();
    assert_eq!(meta["name"], "kasmina");
    assert!(
        meta["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );

    let model_meta = get(a, "/v2/models/scorer").await.json();
    assert_eq!(model_meta["name"], "scorer");
    assert_eq!(model_meta["versions"], json!(["1.0.0"]));
    assert_eq!(
        model_meta["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 32]}])
    );
    assert_eq!(
        model_meta["outputs"],
        json!([{"name": "output", "datatype": "FP32", "shape": [-1, 4]}])
    );
    assert_eq!(model_meta["parameters"]["digest"], json!(built.digest));
    assert_eq!(get(a, "/v2/models/scorer/versions/1.0.0").await.status, 200);
    assert_eq!(
        get(a, "/v2/models/scorer/ready").await.json()["ready"],
        true
    );
    assert_eq!(
        get(a, "/v2/models/scorer/versions/1.0.0/ready")
            .await
            .status,
        200
    );

    for path in [
        "/v2/models/other",
        "/v2/models/other/ready",
        "/v2/models/scorer/versions/9.9.9",
        "/v2/models/scorer/versions/9.9.9/ready",
        "/nowhere",
    ] {
        let r = get(a, path).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(!r.error().is_empty(), "{path}: JSON error body");
    }
    let r = post(a, "/v2/models/other/infer", &mlp_request(&[row(1)])).await;
    assert_eq!((r.status, r.error().contains("\"scorer\"")), (404, true));
    let r = http(a, "DELETE", "/v2/models/scorer", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.error(), "method not allowed");

    for path in [
        "/v2/models/scorer/infer",
        "/v2/models/scorer/versions/1.0.0/infer",
    ] {
        let r = post(a, path, &mlp_request(&[row(1)])).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["model_name"], "scorer");
        assert_eq!(v["model_version"], "1.0.0");
        assert_eq!(v["id"], "r");
        assert_eq!(v["outputs"][0]["shape"], json!([1, 4]));
        assert!(r.headers["server-timing"].starts_with("total;dur="));
        // Held work (none left once answered) over capacity, for the gateway's balancer.
        let (held, capacity) = r.headers["kasmina-load"].split_once('/').unwrap();
        assert_eq!(held, "0");
        assert!(capacity.parse::<u32>().unwrap() >= 1);
        let served: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
        assert_eq!(served, direct[0]);
    }

    // Triton's binary tensor extension: FP32 rows in, FP32 out after the JSON header.
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32",
                    "parameters": {"binary_data_size": 128}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
    }))
    .unwrap();
    let mut body = header.clone();
    for x in row(1) {
        body.extend_from_slice(&x.to_le_bytes());
    }
    let length = header.len().to_string();
    let r = http(
        a,
        "POST",
        "/v2/models/scorer/infer",
        &[("Inference-Header-Content-Length", &length)],
        &body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let n: usize = r.headers["inference-header-content-length"]
        .parse()
        .unwrap();
    let out: Vec<f32> = r.body[n..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(out, direct[0]);

    let metrics = String::from_utf8(get(a, "/metrics").await.body).unwrap();
    for needle in [
        "kasmina_requests_total{model=\"scorer\",code=\"200\"} 3",
        "kasmina_requests_total{model=\"scorer\",code=\"404\"} 1",
        "kasmina_capacity 8",
        "kasmina_inflight_requests 0",
        "kasmina_queue_depth 0",
        "kasmina_cognitive_load",
        "kasmina_request_duration_seconds_count{model=\"scorer\",outcome=\"success\"} 3",
        "revision=\"rev1234\"",
        "quantization=\"",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    // The contract holds both ways: the controller's analysis reads this exposition.
    let snap = kasmina::controller::edge_deployment::scrape::parse(&metrics).unwrap();
    assert_eq!((snap.requests, snap.errors), (4.0, 0.0));
    let (le, count) = *snap.buckets.last().unwrap();
    assert!(le.is_infinite() && count >= 3.0, "{:?}", snap.buckets);
    // ... and so does the autoscaler, which needs every load gauge.
    let g = snap.gauges;
    assert!(
        g.inflight.is_some() && g.queue.is_some() && g.load.is_some() && g.capacity >= Some(1.0),
        "{g:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_a_json_error() {
    let scratch = Scratch::new("serve-bad");
    let built = build(&scratch.0, Architecture::Mlp).await;
    let model = open(&scratch.path("artifact"), &built.digest).await;
    let server = start(model, limits(batching()), None).await;
    let a = server.addr;
    let infer = "/v2/models/scorer/infer";

    let r = http(a, "POST", infer, &[], b"{\"inputs\": [")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error().contains("invalid JSON"), "{}", r.error());

    let cases = [
        (
            json!({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "INT64", "data": [0]}]}),
            422,
            "datatype INT64; the model takes FP32",
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": vec![0.0; 16]}]}),
            422,
            "expected [n, 32]",
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [2, 32], "datatype": "FP32", "data": vec![0.0; 32]}]}),
            422,
            "32 elements in data, the shape says 64",
        ),
        (json!({"inputs": "x"}), 400, "inputs"),
    ];
    for (body, status, needle) in cases {
        let r = post(a, infer, &body).await;
        assert_eq!(r.status, status, "{body}");
        assert!(r.error().contains(needle), "{body}: {}", r.error());
    }

    // Over the 64 KiB body limit.
    let big = vec![b' '; 70 * 1024];
    let r = http(a, "POST", infer, &[], &big).await.unwrap();
    assert_eq!(r.status, 413);
    assert!(r.error().contains("larger than the limit"), "{}", r.error());

    let r = http(
        a,
        "POST",
        infer,
        &[("Inference-Header-Content-Length", "many")],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_each_get_their_own_result() {
    let scratch = Scratch::new("serve-batch");
    let built = build(&scratch.0, Architecture::Mlp).await;
    let model = open(&scratch.path("artifact"), &built.digest).await;
    let engine = model.engine.clone();
    let server = start(model, limits(batching()), None).await;
    let a = server.addr;
    let calls: Vec<_> = (0..48u32)
        .map(|i| {
            tokio::spawn(async move {
                let rows = [row(i), row(i + 100)];
                (
                    i,
                    post(a, "/v2/models/scorer/infer", &mlp_request(&rows)).await,
                )
            })
        })
        .collect();
    for call in calls {
        let (i, r) = call.await.unwrap();
        assert_eq!(r.status, 200);
        let served: Vec<f32> =
            serde_json::from_value(r.json()["outputs"][0]["data"].clone()).unwrap();
        let alone = engine
            .infer(&Items::Rows(vec![row(i).to_vec(), row(i + 100).to_vec()]))
            .unwrap();
        let alone: Vec<f32> = alone.into_iter().flatten().collect();
        for (s, d) in served.iter().zip(&alone) {
            assert!(
                (s - d).abs() <= 1e-5 * d.abs().max(1.0),
                "caller {i}: {s} vs {d}"
            );
        }
    }
    server.stop().await;
}

// ---------- backpressure and drain, with a model the test holds ----------

/// Answers each row with its sum, but only when the test lets it.
struct Gate {
    started: tokio::sync::mpsc::UnboundedSender<usize>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Engine for Gate {
    fn infer(&self, items: &Items) -> Result<Vec<Vec<f32>>, String> {
        let Items::Rows(rows) = items else {
            return Err("rows only".into());
        };
        let _ = self.started.send(rows.len());
        self.release
            .lock()
            .unwrap()
            .recv()
            .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(|r| vec![r.iter().sum()]).collect())
    }
}

fn gated() -> (
    ServedModel,
    tokio::sync::mpsc::UnboundedReceiver<usize>,
    std::sync::mpsc::Sender<()>,
) {
    let (started, started_rx) = tokio::sync::mpsc::unbounded_channel();
    let (release_tx, release) = std::sync::mpsc::channel();
    let model = ServedModel {
        name: "gate".into(),
        version: "1".into(),
        architecture: "mlp".into(),
        digest: "sha256:test".into(),
        quantization: "f32".into(),
        signed_by: None,
        signature: Signature::Tensor {
            input: "input".into(),
            output: "output".into(),
            input_width: 2,
            output_width: 1,
        },
        engine: Arc::new(Gate {
            started,
            release: Mutex::new(release),
        }),
        weight_bytes: 0,
    };
    (model, started_rx, release_tx)
}

fn gate_request(a: f32) -> Value {
    json!({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [a, 1.0]}]})
}

fn one_at_a_time(max_queue: usize) -> BatchConfig {
    BatchConfig {
        max_batch: 1,
        max_delay: Duration::ZERO,
        max_queue,
        workers: 1,
        max_queue_delay: None,
    }
}

/// Polls /metrics until `needle` shows up (bounded, no fixed sleeps).
async fn wait_for_metric(addr: SocketAddr, needle: &str) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
            if text.contains(needle) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle} never showed up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_sheds_with_503_and_retry_after() {
    let (model, mut started, release) = gated();
    // One computing + two queued are admitted; the fourth is shed.
    let server = start(model, limits(one_at_a_time(2)), None).await;
    let a = server.addr;
    let admitted: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(
                async move { post(a, "/v2/models/gate/infer", &gate_request(i as f32)).await },
            )
        })
        .collect();
    assert_eq!(started.recv().await, Some(1));
    wait_for_metric(a, "kasmina_queue_depth 2").await;
    wait_for_metric(a, "kasmina_cognitive_load").await;
    let shed = post(a, "/v2/models/gate/infer", &gate_request(9.0)).await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.headers["retry-after"], "1");
    assert!(shed.error().contains("capacity"), "{}", shed.error());
    for _ in 0..3 {
        release.send(()).unwrap();
    }
    let mut sums = vec![];
    for call in admitted {
        let r = call.await.unwrap();
        assert_eq!(r.status, 200);
        sums.push(r.json()["outputs"][0]["data"][0].as_f64().unwrap());
    }
    sums.sort_by(f64::total_cmp);
    assert_eq!(sums, vec![1.0, 2.0, 3.0]);
    let metrics = String::from_utf8(get(a, "/metrics").await.body).unwrap();
    assert!(metrics.contains("kasmina_requests_total{model=\"gate\",code=\"503\"} 1"));
    assert!(metrics.contains("outcome=\"shed\""));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_with_504() {
    let (model, mut started, release) = gated();
    let mut l = limits(one_at_a_time(4));
    l.request_timeout = Duration::from_millis(200);
    let server = start(model, l, None).await;
    let a = server.addr;
    let slow =
        tokio::spawn(async move { post(a, "/v2/models/gate/infer", &gate_request(1.0)).await });
    assert_eq!(started.recv().await, Some(1));
    let r = slow.await.unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.error(), "the request timed out");
    release.send(()).unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_readiness_off_and_finishes_every_admitted_request() {
    let (model, mut started, release) = gated();
    let mut l = limits(one_at_a_time(8));
    // Long enough to observe readiness off before the listener closes.
    l.drain_delay = Duration::from_secs(2);
    let server = start(model, l, None).await;
    let a = server.addr;
    let admitted: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(
                async move { post(a, "/v2/models/gate/infer", &gate_request(i as f32)).await },
            )
        })
        .collect();
    assert_eq!(started.recv().await, Some(1));
    wait_for_metric(a, "kasmina_queue_depth 3").await;

    server.shutdown.cancel();
    let ready = get(a, "/v2/health/ready").await;
    assert_eq!(ready.status, 503, "readiness turns false at once");
    assert_eq!(get(a, "/v2/health/live").await.status, 200);

    for _ in 0..4 {
        release.send(()).unwrap();
    }
    for call in admitted {
        assert_eq!(
            call.await.unwrap().status,
            200,
            "an admitted request was lost"
        );
    }
    server.task.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(a).await.is_err(),
        "the listener is closed after the drain"
    );
}

/// Reads one HTTP/1.1 response (head and Content-Length body) from a kept-alive connection.
async fn read_response(conn: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut raw = vec![];
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).await.unwrap(),
            1,
            "the response head ended early"
        );
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.unwrap();
    head
}

/// A draining replica closes kept-alive connections after each answer, so clients reconnect
/// through the Service to a replica that stays (found on a real cluster: after a blue-green
/// switch, keep-alive clients stayed on the old revision until its pods went away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_close_kept_alive_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (model, _started, _release) = gated();
    let mut l = limits(one_at_a_time(8));
    l.drain_delay = Duration::from_secs(2);
    let server = start(model, l, None).await;
    let a = server.addr;
    let ask = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n";
    let mut conn = TcpStream::connect(a).await.unwrap();
    conn.write_all(ask).await.unwrap();
    let head = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("connection: close"),
        "kept alive while serving: {head}"
    );

    server.shutdown.cancel();
    let mut ready = get(a, "/v2/health/ready").await;
    while ready.status != 503 {
        tokio::task::yield_now().await;
        ready = get(a, "/v2/health/ready").await;
    }
    conn.write_all(ask).await.unwrap();
    let head = read_response(&mut conn).await;
    assert!(
        head.starts_with("http/1.1 200"),
        "still answered while draining: {head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = [0u8; 1];
    assert_eq!(
        conn.read(&mut rest).await.unwrap(),
        0,
        "the server closed the connection"
    );
    server.task.await.unwrap().unwrap();
}

// ---------- authentication ----------

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// (private key file, public key file) for RS256, ES256 and EdDSA, plus an HS256 secret.
fn keys(dir: &Path) -> Vec<(&'static str, std::path::PathBuf, std::path::PathBuf)> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let rsa_private: aws_lc_rs::encoding::Pkcs8V1Der = rsa.as_der().unwrap();
    let rsa_public = rsa.public_key().as_der().unwrap();
    let ec = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let ec_private = ec.to_pkcs8v1().unwrap();
    let ec_public = ec.public_key().as_der().unwrap();
    let ed = kasmina::crypto::SigningKey::generate().unwrap();
    vec![
        (
            "RS256",
            write("rsa.key", pem("PRIVATE KEY", rsa_private.as_ref())),
            write("rsa.pub", pem("PUBLIC KEY", rsa_public.as_ref())),
        ),
        (
            "ES256",
            write("ec.key", pem("PRIVATE KEY", ec_private.as_ref())),
            write("ec.pub", pem("PUBLIC KEY", ec_public.as_ref())),
        ),
        (
            "EdDSA",
            write("ed.key", ed.to_pem().unwrap()),
            write("ed.pub", ed.public_key().to_pem()),
        ),
        (
            "HS256",
            write(
                "hs.secret",
                "a-shared-secret-of-more-than-32-bytes!!".into(),
            ),
            dir.join("hs.secret"),
        ),
    ]
}

fn token(key: &Path, audience: &str, lifetime: Duration, now: SystemTime) -> String {
    auth::issue(
        key,
        &TokenRequest {
            audience,
            issuer: Some("kasmina-test"),
            subject: Some("tester"),
            lifetime,
            key_id: None,
        },
        now,
    )
    .unwrap()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_attacks_all_get_401_and_good_tokens_pass() {
    let scratch = Scratch::new("serve-jwt");
    let built = build(&scratch.0, Architecture::Mlp).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    for (alg, private, public) in keys(&scratch.0) {
        let model = open(&scratch.path("artifact"), &built.digest).await;
        let verifier = Verifier::from_key_file(&public, "scorer", Some("kasmina-test")).unwrap();
        let server = start(model, limits(batching()), Some(verifier)).await;
        let a = server.addr;
        let infer = "/v2/models/scorer/infer";
        let body = mlp_request(&[row(3)]).to_string();
        let call = |auth: Option<String>| {
            let body = body.clone();
            async move {
                let header = auth.map(|t| ("Authorization", t));
                let headers: Vec<(&str, &str)> =
                    header.iter().map(|(k, v)| (*k, v.as_str())).collect();
                http(a, "POST", infer, &headers, body.as_bytes())
                    .await
                    .unwrap()
            }
        };

        let good = token(&private, "scorer", hour, now);
        let r = call(Some(format!("Bearer {good}"))).await;
        assert_eq!(r.status, 200, "{alg}: {}", r.error());
        let r = http(a, "GET", "/v2/models/scorer", &[], b"").await.unwrap();
        assert_eq!(r.status, 401, "{alg}: metadata needs a token too");

        let parts: Vec<&str> = good.split('.').collect();
        let claims = json!({"aud": "scorer", "exp": 4102444800u64, "iat": 0, "nbf": 0,
                            "iss": "kasmina-test", "sub": "admin"});
        let alg_none = format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(claims.to_string().as_bytes())
        );
        // The classic confusion: HS256 "signed" with the server's public key as the secret.
        let confused = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
        )
        .unwrap();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64url(claims.to_string().as_bytes()),
            parts[2]
        );
        let expired = token(&private, "scorer", hour, now - 3 * hour);
        let wrong_audience = token(&private, "another-model", hour, now);
        let not_yet = token(&private, "scorer", hour, now + 2 * hour);
        let wrong_issuer = auth::issue(
            &private,
            &TokenRequest {
                audience: "scorer",
                issuer: Some("someone-else"),
                subject: None,
                lifetime: hour,
                key_id: None,
            },
            now,
        )
        .unwrap();
        let mut attacks: Vec<(&str, Option<String>)> = vec![
            ("no token", None),
            ("not bearer", Some(format!("Basic {good}"))),
            ("garbage", Some("Bearer not.a.jwt".into())),
            ("alg none", Some(format!("Bearer {alg_none}"))),
            ("expired", Some(format!("Bearer {expired}"))),
            ("wrong audience", Some(format!("Bearer {wrong_audience}"))),
            ("not valid yet", Some(format!("Bearer {not_yet}"))),
            ("wrong issuer", Some(format!("Bearer {wrong_issuer}"))),
            ("tampered payload", Some(format!("Bearer {tampered}"))),
        ];
        if alg != "HS256" {
            attacks.push((
                "HS256 signed with the public key",
                Some(format!("Bearer {confused}")),
            ));
        }
        for (attack, header) in attacks {
            let r = call(header).await;
            assert_eq!(r.status, 401, "{alg}: {attack} got through");
            let challenge = r
                .headers
                .get("www-authenticate")
                .cloned()
                .unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer realm=\"kasmina\""),
                "{alg}: {attack}"
            );
            assert!(!r.error().is_empty(), "{alg}: {attack}: JSON error body");
        }
        // Health stays open.
        assert_eq!(get(a, "/v2/health/ready").await.status, 200);
        assert_eq!(get(a, "/v2/models/scorer/ready").await.status, 200);
        assert_eq!(get(a, "/metrics").await.status, 200);
        let metrics = String::from_utf8(get(a, "/metrics").await.body).unwrap();
        assert!(metrics.contains("outcome=\"unauthorized\""), "{alg}");
        server.stop().await;
    }
}

#[test]
fn a_jwks_key_is_chosen_by_kid_and_pinned_to_its_algorithm() {
    let scratch = Scratch::new("serve-jwks");
    let ed = kasmina::crypto::SigningKey::generate().unwrap();
    std::fs::write(scratch.path("ed.key"), ed.to_pem().unwrap()).unwrap();
    // The raw Ed25519 public key is the last 32 bytes of its SPKI encoding.
    let spki = ed.public_key().to_pem();
    let der = base64::engine::general_purpose::STANDARD
        .decode(
            spki.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let jwks = json!({"keys": [
        {"kty": "oct", "kid": "shared", "alg": "HS256", "k": b64url(b"another-shared-secret-that-is-long-enough")},
        {"kty": "OKP", "crv": "Ed25519", "kid": "edge-1", "alg": "EdDSA", "x": b64url(&der[der.len() - 32..])},
    ]});
    std::fs::write(scratch.path("keys.json"), jwks.to_string()).unwrap();
    let verifier = Verifier::from_jwks_file(&scratch.path("keys.json"), "m", None).unwrap();
    let issue = |kid: Option<&str>| {
        auth::issue(
            &scratch.path("ed.key"),
            &TokenRequest {
                audience: "m",
                issuer: None,
                subject: None,
                lifetime: Duration::from_secs(60),
                key_id: kid,
            },
            SystemTime::now(),
        )
        .unwrap()
    };
    assert!(verifier.verify(&issue(Some("edge-1"))).is_ok());
    // Pointed at the HS256 key, an EdDSA token is refused (algorithm pinned per key).
    let err = verifier.verify(&issue(Some("shared"))).unwrap_err();
    assert!(err.to_string().contains("not accepted"), "{err}");
    // With several keys, a token must say which.
    assert!(verifier.verify(&issue(None)).is_err());
    assert!(verifier.verify(&issue(Some("unknown"))).is_err());
    // A short shared secret is refused at start-up.
    std::fs::write(scratch.path("short"), "tiny").unwrap();
    let err = Verifier::from_key_file(&scratch.path("short"), "m", None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("at least 32 bytes"), "{err}");
}

// ---------- the real binary ----------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kasmina() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kasmina"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_unexpected_artifact_refuses_to_start() {
    let scratch = Scratch::new("serve-tamper");
    let out = scratch.path("artifact");
    let source = scratch.path("scorer.safetensors");
    common::tiny_mlp(&source, &[32, 64, 4], 3);
    let keys = scratch.path("signer");
    assert!(
        kasmina()
            .args(["keygen", "--out"])
            .arg(&keys)
            .status()
            .unwrap()
            .success()
    );
    let other = scratch.path("other");
    assert!(
        kasmina()
            .args(["keygen", "--out"])
            .arg(&other)
            .status()
            .unwrap()
            .success()
    );
    let mut options = common::options(&source, Architecture::Mlp, &out);
    options.sign_key = Some(scratch.path("signer.key"));
    let built = artifact::build(&options).await.unwrap();

    let serve = |args: &[&str]| {
        let port = free_port().to_string();
        let mut cmd = kasmina();
        cmd.args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--artifact",
        ])
        .arg(&out)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let output = cmd.output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let public = scratch.path("signer.pub").display().to_string();
    let wrong_public = scratch.path("other.pub").display().to_string();

    let wrong_digest = format!("sha256:{}", "0".repeat(64));
    let (status, stderr) = serve(&["--expect-digest", &wrong_digest]);
    // Refusals have their own exit code: the controller aborts the rollout on it.
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("manifest digest is"), "{stderr}");
    assert!(!stderr.contains("serving"), "{stderr}");

    let (status, stderr) = serve(&[
        "--expect-digest",
        &built.digest,
        "--public-key",
        &wrong_public,
    ]);
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("signature"), "{stderr}");

    // One flipped byte in the GGUF.
    let gguf = out.join("model.gguf");
    let mut bytes = std::fs::read(&gguf).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 1;
    std::fs::write(&gguf, &bytes).unwrap();
    let (status, stderr) = serve(&["--expect-digest", &built.digest, "--public-key", &public]);
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("model.gguf has digest"), "{stderr}");
    assert!(!stderr.contains("serving"), "{stderr}");

    // An encrypted artifact without its key, and a key for a clear artifact.
    bytes[i] ^= 1;
    std::fs::write(&gguf, &bytes).unwrap();
    let aes = scratch.path("k");
    assert!(
        kasmina()
            .args(["keygen", "--encryption", "--out"])
            .arg(&aes)
            .status()
            .unwrap()
            .success()
    );
    let (status, stderr) = serve(&[
        "--expect-digest",
        &built.digest,
        "--decrypt-key",
        &scratch.path("k.aes").display().to_string(),
    ]);
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not encrypted"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_losing_a_request_and_exits_zero() {
    let scratch = Scratch::new("serve-sigterm");
    let built = build(&scratch.0, Architecture::Mlp).await;
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = kasmina()
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--drain-delay",
            "1s",
            "--expect-digest",
            &built.digest,
            "--artifact",
        ])
        .arg(scratch.path("artifact"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while http(addr, "GET", "/v2/health/ready", &[], b"")
            .await
            .map(|r| r.status)
            .ok()
            != Some(200)
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the runtime became ready");

    // A stream of requests across the signal: every one that is answered is answered 200.
    let load = tokio::spawn(async move {
        let mut answered = 0;
        let mut refused = 0;
        for i in 0..100_000u32 {
            match http(
                addr,
                "POST",
                "/v2/models/scorer/infer",
                &[],
                mlp_request(&[row(i)]).to_string().as_bytes(),
            )
            .await
            {
                Ok(r) => {
                    assert_eq!(r.status, 200, "request {i} failed during the drain");
                    answered += 1;
                }
                // Connection refused: the listener has closed after the drain delay.
                Err(_) => {
                    refused += 1;
                    break;
                }
            }
        }
        (answered, refused)
    });
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(r) = http(addr, "GET", "/v2/health/ready", &[], b"").await
                && r.status == 503
            {
                return r.status;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("readiness turned false during the drain delay");
    assert_eq!(ready, 503);
    let (answered, refused) = load.await.unwrap();
    assert!(
        answered > 0 && refused == 1,
        "{answered} answered, {refused} refused"
    );
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}: {stderr}",
        output.status
    );
    assert!(stderr.contains("drained"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bert_artifact_serves_sentence_embeddings() {
    let scratch = Scratch::new("serve-bert");
    let built = build(&scratch.0, Architecture::Bert).await;
    let model = open(&scratch.path("artifact"), &built.digest).await;
    let direct = model
        .engine
        .infer(&Items::Texts(vec!["the cat".into(), "".into()]))
        .unwrap();
    let server = start(model, limits(batching()), None).await;
    let r = post(
        server.addr,
        "/v2/models/encoder/infer",
        &json!({"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["the cat", ""]}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.error());
    let v = r.json();
    let dim = direct[0].len();
    assert_eq!(v["outputs"][0]["shape"], json!([2, dim]));
    let data: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(data, direct.concat());
    let r = post(
        server.addr,
        "/v2/models/encoder/infer",
        &json!({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
    )
    .await;
    assert_eq!(r.status, 422);
    server.stop().await;
}

/// What the retention Job runs: an artifact folder goes, a folder that is not an artifact is
/// refused untouched, and one already gone is fine (a retried Job succeeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_artifacts_removes_only_artifacts() {
    let scratch = Scratch::new("delete-artifacts");
    build(&scratch.0, Architecture::Mlp).await;
    let artifact = scratch.path("artifact");
    let other = scratch.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();

    let run = |uri: String| {
        let out = kasmina().args(["delete-artifacts", &uri]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(format!("file://{}", artifact.display()));
    assert!(ok, "{text}");
    assert!(text.contains("files deleted"), "{text}");
    assert!(!artifact.exists());
    let (ok, text) = run(artifact.display().to_string());
    assert!(ok, "already gone is not an error: {text}");
    let (ok, text) = run(other.display().to_string());
    assert!(!ok);
    assert!(
        text.contains("not an artifact (no manifest.json); nothing deleted"),
        "{text}"
    );
    assert!(other.join("notes.txt").exists());
}
