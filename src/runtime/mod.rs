//! `kasmina serve`: the edge runtime in every EdgeDeployment pod. It verifies the artifact
//! before loading it, serves it over the Open Inference Protocol v2 with dynamic batching and
//! backpressure, reports its cognitive load, and drains on SIGTERM without losing a request.

pub mod auth;
pub mod batch;
pub mod load;
pub mod protocol;
pub mod served;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::duration::Duration as KubeDuration;
use crate::model::q8::Kernel;
use crate::telemetry::{DrainError, Health};
use batch::{BatchConfig, Batcher};
use load::{InfoLabels, Load};
use served::{OpenOptions, ServedModel};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("artifact: {0}")]
    Artifact(#[from] crate::artifact::Error),
    #[error("model: {0}")]
    Model(#[from] crate::model::Error),
    #[error("key: {0}")]
    Key(String),
    #[error(transparent)]
    Crypto(#[from] crate::crypto::Error),
    #[error("authentication: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("{0}")]
    Config(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("drain timed out after {0:?} with requests still running")]
    DrainTimeout(Duration),
}

/// The exit code of a runtime that refused its artifact (digest, signature or decryption did
/// not check out). Waiting will not fix that, so the controller aborts the rollout on it.
pub const REFUSED_EXIT_CODE: u8 = 3;

impl Error {
    /// Whether the artifact itself was refused, as opposed to failing to fetch or load it.
    pub fn refuses_artifact(&self) -> bool {
        use crate::crypto::Error as Crypto;
        match self {
            Error::Artifact(crate::artifact::Error::Verify(_)) => true,
            Error::Artifact(crate::artifact::Error::Key(e)) | Error::Crypto(e) => matches!(
                e,
                Crypto::BadSignature
                    | Crypto::BadHeader
                    | Crypto::Decrypt(_)
                    | Crypto::Truncated(_)
            ),
            _ => false,
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Artifact(_) => "artifact",
            Error::Model(_) => "model",
            Error::Key(_) | Error::Crypto(_) => "key",
            Error::Auth(_) => "auth",
            Error::Config(_) => "config",
            Error::Listen { .. } | Error::Serve(_) => "io",
            Error::DrainTimeout(_) => "drain_timeout",
        }
    }
}

/// How requests are authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No authentication (a trusted network, or a mesh doing it).
    #[default]
    None,
    /// A bearer JWT on every model route; health routes stay open.
    Jwt,
}

/// `kasmina serve` options.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// The artifact: a folder, file:// URI, or s3://, gs://, az://, https:// prefix.
    #[arg(long, env = "KASMINA_ARTIFACT")]
    pub artifact: String,
    /// The manifest digest the artifact must have (sha256:…); anything else refuses to start.
    #[arg(long, env = "KASMINA_EXPECT_DIGEST")]
    pub expect_digest: String,
    /// Ed25519 public key (PEM): the manifest signature must verify with it.
    #[arg(long, env = "KASMINA_PUBLIC_KEY")]
    pub public_key: Option<PathBuf>,
    /// AES-256 key file (base64) for an encrypted artifact.
    #[arg(long, env = "KASMINA_DECRYPT_KEY")]
    pub decrypt_key: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,
    /// Port for the inference, health and metrics routes.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Items per forward pass; 1 turns batching off.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// How long a batch waits to fill, e.g. 2ms.
    #[arg(long, default_value = "2ms")]
    pub max_batch_delay: KubeDuration,
    /// Requests that may wait beyond what the workers hold; more are shed with 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Shed a request (503) when the work ahead of it would make it wait longer than this,
    /// e.g. 25ms; 0s sheds only when the queue is full.
    #[arg(long, default_value = "0s")]
    pub max_queue_delay: KubeDuration,
    /// Forward passes at once; 0 means one per CPU the process may use (its cgroup quota
    /// included). The cores are divided among the workers: see [`Options::threads_per_pass`].
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// The int8 matrix kernel: auto (the fastest this CPU offers), avx512-vnni, avx-vnni, avx2
    /// or portable. Naming one the CPU lacks refuses to start.
    #[arg(long, env = "KASMINA_KERNEL", default_value = "auto")]
    pub kernel: String,
    /// A request not answered within this gets 504.
    #[arg(long, default_value = "30s")]
    pub request_timeout: KubeDuration,
    /// Largest request body in bytes; bigger gets 413.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// After SIGTERM, keep serving this long with readiness false, so endpoints are removed
    /// before the listener closes (set it to the endpoint propagation time, e.g. 5s).
    #[arg(long, default_value = "0s")]
    pub drain_delay: KubeDuration,
    /// Longest wait for admitted requests after the listener closes.
    #[arg(long, default_value = "30s")]
    pub drain_timeout: KubeDuration,
    /// Where to write why the artifact was refused: the pod's termination message, which the
    /// operator puts in the EdgeDeployment's status when it aborts the rollout.
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
    /// Authentication for the model routes.
    #[arg(long, value_enum, default_value_t = AuthMode::None)]
    pub auth: AuthMode,
    /// JWT verification key: PEM public key (RSA, P-256, Ed25519) or a shared-secret file.
    #[arg(long, env = "KASMINA_JWT_KEY")]
    pub jwt_key: Option<PathBuf>,
    /// JWT verification keys as a JWKS file (instead of --jwt-key).
    #[arg(long, env = "KASMINA_JWKS")]
    pub jwks: Option<PathBuf>,
    /// The audience tokens must carry (default: the model's name).
    #[arg(long)]
    pub jwt_audience: Option<String>,
    /// The issuer tokens must carry, if any.
    #[arg(long)]
    pub jwt_issuer: Option<String>,
    /// The EdgeDeployment revision, for the model_info metric.
    #[arg(long, env = "KASMINA_REVISION", default_value = "")]
    pub revision: String,
    /// Tokens per sentence before truncation.
    #[arg(long, default_value_t = crate::model::bert::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
}

impl Options {
    /// Forward passes at once: `--workers`, or one per CPU.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => cpus(),
            n => n,
        }
    }

    /// Threads each forward pass may use: the CPUs divided among the workers (1 with the
    /// default of a worker per CPU). Parallel requests beat parallel matrix multiplies here:
    /// candle's pool spins while idle and lets one pass in at a time, and a one-sentence pass
    /// is too small to split well (on 2 cores, 8 clients: 86 req/s with one 2-thread worker,
    /// against 252 req/s with two 1-thread workers).
    pub fn threads_per_pass(&self) -> usize {
        (cpus() / self.workers()).max(1)
    }

    pub fn batch(&self) -> BatchConfig {
        BatchConfig {
            max_batch: self.max_batch.max(1),
            max_delay: self.max_batch_delay.as_std(),
            max_queue: self.max_queue,
            workers: self.workers(),
            max_queue_delay: Some(self.max_queue_delay.as_std()).filter(|d| !d.is_zero()),
        }
    }

    fn open(&self) -> OpenOptions {
        OpenOptions {
            artifact: self.artifact.clone(),
            expect_digest: self.expect_digest.clone(),
            public_key: self.public_key.clone(),
            decrypt_key: self.decrypt_key.clone(),
            max_tokens: self.max_tokens,
        }
    }

    fn verifier(&self, model: &str) -> Result<Option<auth::Verifier>, Error> {
        if self.auth == AuthMode::None {
            return Ok(None);
        }
        let audience = self.jwt_audience.as_deref().unwrap_or(model);
        let issuer = self.jwt_issuer.as_deref();
        match (&self.jwt_key, &self.jwks) {
            (Some(key), None) => Ok(Some(auth::Verifier::from_key_file(key, audience, issuer)?)),
            (None, Some(jwks)) => Ok(Some(auth::Verifier::from_jwks_file(
                jwks, audience, issuer,
            )?)),
            _ => Err(Error::Config(
                "--auth jwt needs exactly one of --jwt-key or --jwks".into(),
            )),
        }
    }
}

/// CPUs the process may use (cgroup quota and affinity included).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Serving limits the router enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub batch: BatchConfig,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
}

impl From<&Options> for Limits {
    fn from(o: &Options) -> Self {
        Self {
            batch: o.batch(),
            request_timeout: o.request_timeout.as_std(),
            max_body_bytes: o.max_body_bytes,
            drain_delay: o.drain_delay.as_std(),
            drain_timeout: o.drain_timeout.as_std(),
        }
    }
}

/// Verifies and loads the artifact, then serves until `shutdown` fires and the drain ends.
/// Nothing listens until the artifact has been verified and loaded.
pub async fn run(options: Options, shutdown: CancellationToken) -> Result<(), Error> {
    // Before any matrix is packed: the weights are laid out for the kernel.
    let kernel = Kernel::choose(&options.kernel).map_err(|e| Error::Config(e.to_string()))?;
    let open = options.open();
    let handle = tokio::runtime::Handle::current();
    let (model, cold) = tokio::task::spawn_blocking(move || served::open(&open, &handle))
        .await
        .map_err(|e| Error::Config(format!("loading panicked: {e}")))??;
    tracing::info!(
        model = %model.name,
        version = %model.version,
        digest = %model.digest,
        quantization = %model.quantization,
        %kernel,
        signed_by = model.signed_by.as_deref().unwrap_or("-"),
        weights_mib = model.weight_bytes as f64 / 1048576.0,
        fetch_ms = cold.fetch.as_secs_f64() * 1e3,
        verify_ms = cold.verify.as_secs_f64() * 1e3,
        load_ms = cold.load.as_secs_f64() * 1e3,
        "artifact verified and loaded"
    );
    if model.signed_by.is_none() {
        tracing::warn!("the artifact's signature was not checked: no --public-key");
    }
    let verifier = options.verifier(&model.name)?;
    let addr = SocketAddr::new(options.host, options.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    serve(
        model,
        Limits::from(&options),
        verifier,
        &options.revision,
        cold.total(),
        listener,
        shutdown,
    )
    .await
}

/// Serves a loaded model on `listener`. Readiness turns true at once and false the moment
/// `shutdown` fires; admitted requests then finish (bounded by the drain timeout).
pub async fn serve(
    model: ServedModel,
    limits: Limits,
    verifier: Option<auth::Verifier>,
    revision: &str,
    cold_start: Duration,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut registry = Registry::default();
    let load = Arc::new(Load::new(
        &mut registry,
        InfoLabels {
            model: model.name.clone(),
            version: model.version.clone(),
            revision: revision.into(),
            digest: model.digest.clone(),
            quantization: model.quantization.clone(),
            kernel: Kernel::active().to_string(),
        },
        limits.batch.capacity(),
        Instant::now(),
    ));
    let cold_gauge =
        prometheus_client::metrics::gauge::Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    cold_gauge.set(cold_start.as_secs_f64());
    registry.register(
        "kasmina_cold_start_seconds",
        "Fetch, verify and load time of the served artifact",
        cold_gauge,
    );
    let (batcher, collector) = Batcher::start(model.engine.clone(), limits.batch, load.clone());
    let health = Arc::new(Health::default());
    let state = server::State {
        model: Arc::new(server::ModelInfo::from(&model)),
        batcher,
        load,
        health: health.clone(),
        registry: Arc::new(registry),
        verifier: verifier.map(Arc::new),
    };
    let app = server::router(state, &limits);
    health.set_ready(true);
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, model = %model.name, "serving");

    crate::telemetry::serve_draining(
        listener,
        app,
        health,
        limits.drain_delay,
        limits.drain_timeout,
        shutdown,
    )
    .await
    .map_err(|e| match e {
        DrainError::Serve(e) => Error::Serve(e),
        DrainError::Timeout(t) => Error::DrainTimeout(t),
    })?;
    // Every connection is closed, so every batcher handle is gone; the collector finishes
    // what is left.
    let _ = collector.await;
    tracing::info!("drained");
    Ok(())
}
