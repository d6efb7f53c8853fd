//! The webhook server, on every replica (not only the leader: the API server calls any of
//! them through the Service): HTTPS on rustls with aws-lc-rs, a certificate from `certs`
//! reloaded without a restart, `POST /validate` answering AdmissionReviews.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::certs::{self, Location};
use super::rules::namespace_labels;
use super::webhook::{Caches, audit_event, review_with};
use crate::api::ComplianceProfile;
use crate::controller::cache::Policies;
use crate::controller::context::Clock;
use crate::telemetry::json_error;

/// Errors that stop the webhook server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook certificate: {0}")]
    Certificate(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("serving the webhook on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The certificate the server presents, swapped in place on rotation.
#[derive(Debug, Default)]
pub struct Reloadable(RwLock<Option<Arc<CertifiedKey>>>);

impl Reloadable {
    /// Loads a PEM chain and key (PKCS#8, SEC1 or PKCS#1).
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Certificate(format!("tls.crt: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("tls.key: {e}")))?;
        let provider = aws_lc_rs::default_provider();
        let certified = CertifiedKey::from_der(chain, key, &provider)?;
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(Arc::new(certified));
        }
        Ok(())
    }
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok()?.clone()
    }
}

/// rustls on aws-lc-rs (the binary's one provider), TLS 1.2 and 1.3, HTTP/1.1.
pub fn tls_config(certificate: Arc<Reloadable>) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS connections, handshaken off the accept loop (a slow client delays only itself).
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (send, connections) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::debug!(%error, "webhook accept");
                        continue;
                    }
                };
                if send.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let send = send.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let _ = send.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "webhook TLS handshake"),
                        Err(_) => tracing::debug!(%peer, "webhook TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { connections, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// What `/validate` reads: the profiles and namespace labels, kept current by watches.
#[derive(Clone)]
pub struct Admission {
    pub policies: Policies,
    /// Publishes the Events of audited decisions (None: records are logged only).
    pub events: Option<Recorder>,
}

async fn validate(
    State(admission): State<Admission>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A body over the limit, or unreadable, is a JSON error like every other one.
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("the request body is larger than {MAX_BODY_BYTES} bytes")
            } else {
                rejection.body_text()
            };
            return json_error(status, &message);
        }
    };
    let policies = &admission.policies;
    let synced = tokio::time::timeout(CACHE_WAIT, policies.synced()).await;
    let profiles = policies.profiles.state();
    let profiles: Vec<&ComplianceProfile> = profiles.iter().map(AsRef::as_ref).collect();
    let namespaces = namespace_labels(&policies.namespaces.state());
    let caches = match synced {
        Ok(Ok(_)) => Caches::Synced {
            profiles: &profiles,
            namespaces: &namespaces,
        },
        _ => Caches::Unsynced,
    };
    match review_with(&body, caches) {
        Ok(reviewed) => {
            if let Some((record, regarding)) = &reviewed.audit {
                record.emit();
                if let Some(recorder) = admission.events.clone() {
                    // Off the request path: the API server is waiting for the answer.
                    let event = audit_event(record).event();
                    let regarding = regarding.clone();
                    tokio::spawn(async move {
                        if let Err(error) = recorder.publish(&event, &regarding).await {
                            tracing::warn!(%error, "could not publish the admission Event");
                        }
                    });
                }
            }
            axum::Json(reviewed.review).into_response()
        }
        Err(e) => json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// How long a review waits for the caches to sync before it is refused (the API server waits
/// `timeoutSeconds`, 5 s in the chart).
const CACHE_WAIT: Duration = Duration::from_secs(2);

/// The largest AdmissionReview accepted: the API server's own object limit plus envelope.
pub const MAX_BODY_BYTES: usize = 3 << 20;

/// `POST /validate`, bodies up to `MAX_BODY_BYTES`.
pub fn router(admission: Admission) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(admission)
}

/// Settings of the webhook server.
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub location: Location,
    /// What certificate expiry is measured against.
    pub clock: Arc<dyn Clock>,
    /// Told once the webhook can answer truly: caBundle published, caches synced, listener up.
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
    /// The profiles and namespaces it judges by (the process's watched caches).
    pub policies: Policies,
}

/// Serves the webhook until `shutdown`: certificates first (issued or read), then refreshed
/// every hour.
pub async fn run(
    client: Client,
    config: WebhookConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let certificate = Arc::new(Reloadable::default());
    let clock = config.clock.clone();
    let now = move || clock.now().as_second();
    let (cert, key) = certs::ensure(&client, &config.location, now())
        .await
        .map_err(|e| Error::Certificate(crate::telemetry::error_chain(&e)))?;
    certificate.load(&cert, &key)?;
    let events = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kasmina-webhook".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let refresh = {
        let certificate = certificate.clone();
        let stop = shutdown.clone();
        let location = config.location.clone();
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {},
                    _ = stop.cancelled() => return,
                }
                match certs::ensure(&client, &location, now()).await {
                    Ok((cert, key)) => {
                        if let Err(error) = certificate.load(&cert, &key) {
                            tracing::warn!(%error, "webhook certificate not reloaded");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::telemetry::error_chain(&error), "webhook certificate refresh")
                    }
                }
            }
        }
    };
    tokio::spawn(refresh);

    // Ready only once the answers are true: the caches synced (an empty one allows what an
    // Enforce profile denies).
    tokio::select! {
        synced = config.policies.synced() => {
            if synced.is_err() {
                return Ok(());
            }
        }
        () = shutdown.cancelled() => return Ok(()),
    }
    let tcp = TcpListener::bind(config.addr)
        .await
        .map_err(|source| Error::Listen {
            addr: config.addr,
            source,
        })?;
    let listener =
        TlsListener::new(tcp, tls_config(certificate)?).map_err(|source| Error::Listen {
            addr: config.addr,
            source,
        })?;
    tracing::info!(addr = %config.addr, "admission webhook serving");
    if let Some(ready) = config.ready {
        let _ = ready.send(());
    }
    axum::serve(
        listener,
        router(Admission {
            policies: config.policies,
            events: Some(events),
        }),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
    .map_err(|source| Error::Listen {
        addr: config.addr,
        source,
    })
}
