//! The served model: fetch the artifact, verify digest and signature, decrypt, and only then
//! load the GGUF into the forward pass the builder measured (`src/model`). Weights stay in
//! their stored dtypes (quantized matmuls and embedding lookups), as the planner assumed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Error;
use super::batch::Engine;
use super::protocol::{Items, Signature};
use crate::artifact::manifest::{ENCRYPTED_GGUF_FILE, GGUF_FILE, MANIFEST_FILE, SIGNATURE_FILE};
use crate::artifact::source::{self, TempDir};
use crate::artifact::{self, gguf};
use crate::crypto::{EncryptionKey, VerifyingKey};
use crate::model::bert::Bert;
use crate::model::mlp::Mlp;

/// Where the artifact is and what it must be.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// A folder, `file://` URI, or an object-store URI (s3://, gs://, az://, https://).
    pub artifact: String,
    /// `sha256:…` of manifest.json, as the controller recorded it.
    pub expect_digest: String,
    pub public_key: Option<PathBuf>,
    pub decrypt_key: Option<PathBuf>,
    /// Tokens per sentence before truncation (BERT).
    pub max_tokens: usize,
}

/// A loaded, verified model and what the server says about it.
pub struct ServedModel {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub digest: String,
    pub quantization: String,
    pub signed_by: Option<String>,
    pub signature: Signature,
    pub engine: Arc<dyn Engine>,
    pub weight_bytes: usize,
}

/// How long each step of a cold start took.
#[derive(Clone, Copy, Debug, Default)]
pub struct ColdStart {
    /// The artifact fetched (or found) on local disk.
    pub fetch: Duration,
    /// The manifest and signature checked, and the GGUF read into weights while hashed.
    pub verify: Duration,
    /// The model assembled from the weights (quantized matrices packed for the kernel).
    pub load: Duration,
}

impl ColdStart {
    pub fn total(&self) -> Duration {
        self.fetch + self.verify + self.load
    }
}

/// Sentence embeddings from a BERT encoder.
pub struct BertEngine(pub Bert);

impl Engine for BertEngine {
    fn infer(&self, items: &Items) -> Result<Vec<Vec<f32>>, String> {
        match items {
            Items::Texts(texts) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                self.0.embed(&refs).map_err(|e| e.to_string())
            }
            Items::Rows(_) => Err("this model takes text".into()),
        }
    }
}

/// Output rows from an MLP.
pub struct MlpEngine(pub Mlp);

impl Engine for MlpEngine {
    fn infer(&self, items: &Items) -> Result<Vec<Vec<f32>>, String> {
        match items {
            Items::Rows(rows) => self.0.forward(rows).map_err(|e| e.to_string()),
            Items::Texts(_) => Err("this model takes FP32 tensors".into()),
        }
    }
}

/// Fetches (when remote), verifies and loads the artifact. Blocking; call it off the
/// async runtime's workers.
pub fn open(
    options: &OpenOptions,
    runtime: &tokio::runtime::Handle,
) -> Result<(ServedModel, ColdStart), Error> {
    let mut timing = ColdStart::default();
    let started = Instant::now();
    let (dir, _download) = locate(&options.artifact, runtime)?;
    timing.fetch = started.elapsed();

    let started = Instant::now();
    let public_key = options
        .public_key
        .as_deref()
        .map(|p| {
            read_text(p).and_then(|t| Ok(VerifyingKey::from_pem(&t, &p.display().to_string())?))
        })
        .transpose()?;
    let decrypt_key = options
        .decrypt_key
        .as_deref()
        .map(|p| {
            read_text(p).and_then(|t| Ok(EncryptionKey::from_base64(&t, &p.display().to_string())?))
        })
        .transpose()?;
    // One pass: the GGUF is hashed as it is read into the weights.
    let (verified, loaded) = artifact::open_verified(
        &dir,
        public_key.as_ref(),
        &options.expect_digest,
        decrypt_key.as_ref(),
    )?;
    timing.verify = started.elapsed();

    let started = Instant::now();
    let manifest = &verified.manifest;
    let weight_bytes = loaded.weights.size_in_bytes();
    // The model takes the weights, freeing each stored tensor once its working form exists.
    let (engine, signature): (Arc<dyn Engine>, Signature) = match manifest.architecture.as_str() {
        "bert" => {
            let (config, tokenizer) = gguf::bert_from_metadata(&loaded)?;
            let dimension = config.hidden_size;
            let bert = Bert::new(
                config,
                loaded.weights,
                tokenizer.as_bytes(),
                options.max_tokens,
            )?;
            (
                Arc::new(BertEngine(bert)),
                Signature::Text {
                    input: "text".into(),
                    output: "embedding".into(),
                    dimension,
                },
            )
        }
        "mlp" => {
            let config = gguf::mlp_from_metadata(&loaded)?;
            let mlp = Mlp::new(config, loaded.weights)?;
            let signature = Signature::Tensor {
                input: "input".into(),
                output: "output".into(),
                input_width: mlp.input_size(),
                output_width: mlp.output_size(),
            };
            (Arc::new(MlpEngine(mlp)), signature)
        }
        other => {
            return Err(Error::Artifact(artifact::Error::Artifact(format!(
                "architecture {other:?} cannot be served"
            ))));
        }
    };
    timing.load = started.elapsed();
    release_freed_heap();
    Ok((
        ServedModel {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            architecture: manifest.architecture.clone(),
            digest: verified.digest.clone(),
            quantization: manifest.quantization_label(),
            signed_by: verified.signed_by.clone(),
            signature,
            engine,
            weight_bytes,
        },
        timing,
    ))
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Key(format!("{}: {e}", path.display())))
}

/// The artifact's local folder; a remote artifact is downloaded into a temporary one that
/// lives until the model is loaded.
fn locate(
    uri: &str,
    runtime: &tokio::runtime::Handle,
) -> Result<(PathBuf, Option<TempDir>), Error> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok((PathBuf::from(path), None));
    }
    if !uri.contains("://") {
        return Ok((PathBuf::from(uri), None));
    }
    let download = TempDir::new("kasmina-artifact")?;
    let wanted = |name: &str| {
        [
            MANIFEST_FILE,
            SIGNATURE_FILE,
            GGUF_FILE,
            ENCRYPTED_GGUF_FILE,
        ]
        .contains(&name)
    };
    runtime.block_on(source::download(uri, &download.0, &wanted))?;
    Ok((download.0.clone(), Some(download)))
}

/// Gives the heap the load freed (the GGUF header's strings, each quantized tensor's read
/// buffer) back to the kernel: glibc keeps freed memory for reuse otherwise, and it would
/// sit in the serving process's RSS for its whole life.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no live
    // allocation and may be called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
