//! Real traffic through the cluster: OIP v2 infer requests to a ClusterIP or pod IP of this
//! control plane, from a few keep-alive clients, bounded in count and in time. Every answer
//! is tallied: status, which model version answered, connection errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kasmina::telemetry::error_chain;
use tokio::task::JoinSet;

/// How a load runs.
#[derive(Clone, Debug)]
pub struct Load {
    /// Concurrent clients, each with its own connection pool.
    pub clients: usize,
    /// Pause between one client's requests (zero: back to back).
    pub pause: Duration,
    /// Hard bounds: the load stops at whichever comes first.
    pub max_requests: u64,
    pub max_duration: Duration,
    /// Extra request headers (e.g. Authorization).
    pub headers: Vec<(String, String)>,
    /// A new connection per request, as a crowd of independent callers arrives (a Service
    /// spreads connections, not requests); false: each client keeps its connection alive.
    pub fresh_connections: bool,
}

impl Load {
    /// A gentle probe: two callers, 10 requests per second each, a connection per request.
    pub fn probe() -> Self {
        Self {
            clients: 2,
            pause: Duration::from_millis(100),
            max_requests: 20_000,
            max_duration: Duration::from_secs(600),
            headers: vec![],
            fresh_connections: true,
        }
    }

    /// `clients` keep-alive clients, back to back (pause zero) or paced.
    pub fn kept_alive(clients: usize, pause: Duration, max_duration: Duration) -> Self {
        Self {
            clients,
            pause,
            max_requests: 100_000,
            max_duration,
            headers: vec![],
            fresh_connections: false,
        }
    }
}

/// What the traffic met.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    /// Non-2xx answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer (refused, reset, timed out).
    pub connection_errors: u64,
    /// 2xx answers by the model version in the body.
    pub versions: BTreeMap<String, u64>,
    /// The first few failures, for the assertion message.
    pub failures: Vec<String>,
    pub latencies_ms: Vec<f64>,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.sent - self.ok
    }

    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.connection_errors += other.connection_errors;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.versions {
            *self.versions.entry(k).or_default() += v;
        }
        for f in other.failures {
            if self.failures.len() < 5 {
                self.failures.push(f);
            }
        }
        self.latencies_ms.extend(other.latencies_ms);
    }

    /// The latency at quantile `q` (0..=1), in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[i]
    }

    /// Fails naming what went wrong unless every request was answered 2xx.
    pub fn assert_no_failures(&self, what: &str) {
        assert!(self.sent > 0, "{what}: no request was sent");
        assert!(
            self.failed() == 0,
            "{what}: {} of {} requests failed (non-2xx {:?}, connection errors {}): {:?}",
            self.failed(),
            self.sent,
            self.statuses,
            self.connection_errors,
            self.failures
        );
    }

    /// Fails unless each of `versions` answered some of the requests.
    pub fn assert_answered_by(&self, versions: &[&str]) {
        for version in versions {
            assert!(
                self.versions.contains_key(*version),
                "no answer from {version}: {:?}",
                self.versions
            );
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "sent {}, failed {} (non-2xx {:?}, connection errors {}), p50 {:.1} ms, p99 {:.1} ms, versions {:?}",
            self.sent,
            self.failed(),
            self.statuses,
            self.connection_errors,
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.versions
        )
    }
}

/// Successful answers by model version, as they come.
type Live = Arc<Mutex<BTreeMap<String, u64>>>;

/// Traffic running in the background until stopped (or its bounds are reached).
pub struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Tally>,
    live: Live,
}

impl Traffic {
    /// Starts `load` against `url` (an OIP infer URL) posting `body`.
    pub fn start(url: String, body: Vec<u8>, load: Load) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let live = Live::default();
        let mut tasks = JoinSet::new();
        let per_client = load.max_requests.div_ceil(load.clients.max(1) as u64);
        let deadline = Instant::now() + load.max_duration;
        for _ in 0..load.clients {
            let (url, body, load, stop) = (url.clone(), body.clone(), load.clone(), stop.clone());
            let live = live.clone();
            tasks.spawn(async move {
                let mut http = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10));
                if load.fresh_connections {
                    http = http.pool_max_idle_per_host(0);
                }
                let http = http.build().expect("an HTTP client");
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed)
                    && tally.sent < per_client
                    && Instant::now() < deadline
                {
                    if let Some(version) = one(&http, &url, &body, &load.headers, &mut tally).await
                        && let Ok(mut live) = live.lock()
                    {
                        *live.entry(version).or_default() += 1;
                    }
                    if !load.pause.is_zero() {
                        tokio::time::sleep(load.pause).await;
                    }
                }
                tally
            });
        }
        Self { stop, tasks, live }
    }

    /// How many answers so far came from `version`.
    pub fn answered_by(&self, version: &str) -> u64 {
        self.live
            .lock()
            .map(|live| live.get(version).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Stops the clients after their current request and adds up what they met.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }

    /// Waits until the clients reach their bounds (requests or duration) and adds up what
    /// they met.
    pub async fn finish(mut self) -> Tally {
        let mut total = Tally::default();
        while let Some(done) = self.tasks.join_next().await {
            total.merge(done.expect("a traffic client"));
        }
        total
    }
}

/// Sends one request and tallies it; returns the answering model version on success.
async fn one(
    http: &reqwest::Client,
    url: &str,
    body: &[u8],
    headers: &[(String, String)],
    tally: &mut Tally,
) -> Option<String> {
    let started = Instant::now();
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    tally.sent += 1;
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                tally.ok += 1;
                tally
                    .latencies_ms
                    .push(started.elapsed().as_secs_f64() * 1e3);
                let version = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["model_version"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                *tally.versions.entry(version.clone()).or_default() += 1;
                return Some(version);
            }
            *tally.statuses.entry(status).or_default() += 1;
            if tally.failures.len() < 5 {
                tally.failures.push(format!("{status}: {text}"));
            }
        }
        Err(error) => {
            tally.connection_errors += 1;
            if tally.failures.len() < 5 {
                tally.failures.push(error_chain(&error));
            }
        }
    }
    None
}

/// One request, answered or not: (status, body).
pub async fn infer_once(
    url: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.map_err(|e| error_chain(&e))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.unwrap_or_default()))
}
