//! `kasmina build`: load → prune → quantize → measure → write GGUF → manifest → sign
//! (→ encrypt), and `kasmina verify`. Nothing is left behind on failure: the artifact is
//! assembled in a temporary folder beside the output and renamed into place at the end.

pub mod gguf;
pub mod manifest;
pub mod ownership;
pub mod plan;
pub mod prune;
pub mod quality;
pub mod quantize;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::api::edge_deployment::{Architecture, DeviceProfile, Quantization};
use crate::crypto::{self, EncryptionKey, SigningKey, VerifyingKey};
use crate::model::Weights;
use crate::model::bert::{self, Bert, BertConfig};
use crate::model::mlp::{Activation, Mlp, MlpConfig};
use manifest::*;
use plan::{PlanError, Request, Role, TensorInfo, dtype_name};
use prune::Pruning;
use quality::QualityReport;
use source::{Declared, SourceTensors, TempDir};

/// Errors of building and verifying artifacts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("source: {0}")]
    Source(String),
    #[error("tensor {0} has dtype {1}; only F32, F16 and BF16 sources are supported")]
    UnsupportedDtype(String, String),
    #[error("{0}")]
    MissingFile(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "quality loss {loss:.5} (min cosine {min_cosine:.5} over {samples} samples) exceeds the limit {max:.5}; {suggestion}"
    )]
    QualityTooLow {
        loss: f64,
        min_cosine: f64,
        samples: usize,
        max: f64,
        suggestion: String,
    },
    #[error("output {0}")]
    Output(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key: {0}")]
    Key(#[from] crypto::Error),
    #[error("model: {0}")]
    Model(#[from] crate::model::Error),
    #[error("quantization: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("thread pool: {0}")]
    Threads(String),
    #[error("artifact: {0}")]
    Artifact(String),
    #[error("verification failed: {0}")]
    Verify(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Everything `kasmina build` takes.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub source: String,
    pub architecture: Architecture,
    pub profile: Option<DeviceProfile>,
    pub quantization: Quantization,
    pub pruning: Option<Pruning>,
    pub max_quality_loss: f64,
    /// A folder, or an object-store URI the artifact is uploaded under.
    pub out: String,
    pub sign_key: Option<PathBuf>,
    pub encrypt_key: Option<PathBuf>,
    pub termination_log: Option<PathBuf>,
    pub name: Option<String>,
    pub version: String,
    pub threads: usize,
    /// Replace an artifact already at `out` (never anything that is not an artifact).
    pub replace: bool,
}

/// What a build produced.
#[derive(Debug)]
pub struct BuildOutcome {
    pub manifest: Manifest,
    /// `sha256:` of `manifest.json`: the artifact's identity.
    pub digest: String,
    pub summary: Summary,
    pub out: String,
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// A model ready to plan and quantize: its tensors under GGUF names and how to rebuild it.
struct Prepared {
    source: SourceTensors,
    tensors: Vec<TensorInfo>,
    kind: Kind,
    files: Vec<PathBuf>,
    source_bytes: u64,
    name_hint: String,
}

enum Kind {
    Bert {
        config: BertConfig,
        tokenizer: String,
    },
    Mlp(MlpConfig),
}

impl Kind {
    fn assemble(&self, weights: &Weights) -> Result<Model, Error> {
        Ok(match self {
            Kind::Bert { config, tokenizer } => Model::Bert(Box::new(Bert::new(
                config.clone(),
                weights.clone(),
                tokenizer.as_bytes(),
                bert::DEFAULT_MAX_TOKENS,
            )?)),
            Kind::Mlp(config) => Model::Mlp(Mlp::new(config.clone(), weights.clone())?),
        })
    }
}

enum Model {
    Bert(Box<Bert>),
    Mlp(Mlp),
}

impl Model {
    fn outputs(&self) -> Result<Vec<Vec<f32>>, Error> {
        Ok(match self {
            Model::Bert(m) => quality::bert_outputs(m)?,
            Model::Mlp(m) => quality::mlp_outputs(m)?,
        })
    }

    fn with_weight(&self, name: &str, weight: Arc<QTensor>) -> Result<Model, Error> {
        Ok(match self {
            Model::Bert(m) => Model::Bert(Box::new(m.with_weight(name, weight)?)),
            Model::Mlp(m) => Model::Mlp(m.with_weight(name, weight)?),
        })
    }

    /// Outputs on the small calibration set the planner measures sensitivity with.
    fn calibration_outputs(&self) -> Result<Vec<Vec<f32>>, Error> {
        Ok(match self {
            Model::Bert(m) => {
                let sentences = quality::calibration_sentences();
                let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
                m.embed(&refs)?
            }
            Model::Mlp(m) => m.forward(&quality::mlp_inputs(m.input_size(), 16, 0x5eed))?,
        })
    }

    fn report(&self, reference: &[Vec<f32>]) -> Result<QualityReport, Error> {
        Ok(match self {
            Model::Bert(m) => quality::bert_report(reference, m)?,
            Model::Mlp(m) => quality::mlp_report(reference, m)?,
        })
    }
}

fn prepare(files: &source::ModelFiles, architecture: Architecture) -> Result<Prepared, Error> {
    let (mut source, declared) = SourceTensors::open(&files.safetensors)?;
    for d in &declared {
        if !matches!(
            d.dtype,
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        ) {
            // Integer bookkeeping tensors (BERT's position_ids) are not weights.
            if architecture == Architecture::Bert && bert::gguf_name(&d.source_name).is_none() {
                continue;
            }
            return Err(Error::UnsupportedDtype(
                d.source_name.clone(),
                format!("{:?}", d.dtype),
            ));
        }
    }
    let source_bytes = files
        .safetensors
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| Error::io(p, e))
        })
        .sum::<Result<u64, Error>>()?;
    let mut all_files = files.safetensors.clone();
    let (tensors, kind) = match architecture {
        Architecture::Bert => {
            let config_path = files.config.clone().ok_or_else(|| {
                Error::MissingFile(format!(
                    "{}: a bert source needs config.json beside the safetensors",
                    files.dir.display()
                ))
            })?;
            let tokenizer_path = files.tokenizer.clone().ok_or_else(|| {
                Error::MissingFile(format!(
                    "{}: a bert source needs tokenizer.json beside the safetensors",
                    files.dir.display()
                ))
            })?;
            let config: BertConfig = serde_json::from_str(&read_text(&config_path)?)
                .map_err(|e| Error::Source(format!("{}: {e}", config_path.display())))?;
            config.validate()?;
            let tokenizer = read_text(&tokenizer_path)?;
            all_files.insert(0, config_path);
            all_files.push(tokenizer_path);
            let mut tensors = vec![];
            for d in &declared {
                if let Some(name) = bert::gguf_name(&d.source_name) {
                    source.alias(&name, &d.source_name);
                    tensors.push(TensorInfo {
                        role: plan::role(&name, &d.shape),
                        name,
                        shape: d.shape.clone(),
                    });
                }
            }
            (tensors, Kind::Bert { config, tokenizer })
        }
        Architecture::Mlp => {
            let activation = match &files.config {
                Some(p) => {
                    let v: serde_json::Value = serde_json::from_str(&read_text(p)?)
                        .map_err(|e| Error::Source(format!("{}: {e}", p.display())))?;
                    all_files.insert(0, p.clone());
                    v.get("activation")
                        .and_then(|a| a.as_str())
                        .unwrap_or("relu")
                        .parse()?
                }
                None => Activation::Relu,
            };
            let (tensors, config) = mlp_layers(&declared, &mut source, activation)?;
            (tensors, Kind::Mlp(config))
        }
    };
    Ok(Prepared {
        source,
        tensors,
        kind,
        files: all_files,
        source_bytes,
        name_hint: files.name_hint.clone(),
    })
}

/// The Linear layers of an MLP checkpoint: every 2-D `*weight` in natural name order
/// (`layers.0`, `layers.2`, … or `0.weight`, `2.weight`), each with its bias when present.
fn mlp_layers(
    declared: &[Declared],
    source: &mut SourceTensors,
    activation: Activation,
) -> Result<(Vec<TensorInfo>, MlpConfig), Error> {
    let natural = |name: &str| -> Vec<u64> {
        name.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let mut weights: Vec<&Declared> = declared
        .iter()
        .filter(|d| d.shape.len() == 2 && d.source_name.ends_with("weight"))
        .collect();
    weights.sort_by_key(|d| (natural(&d.source_name), d.source_name.clone()));
    if weights.is_empty() {
        return Err(Error::Source(
            "no 2-D weight tensors: not an MLP checkpoint".into(),
        ));
    }
    let mut widths = vec![weights[0].shape[1]];
    let mut tensors = vec![];
    for (i, w) in weights.iter().enumerate() {
        let (out_dim, in_dim) = (w.shape[0], w.shape[1]);
        if in_dim != widths[i] {
            return Err(Error::Source(format!(
                "{} takes {in_dim} inputs but the previous layer gives {}",
                w.source_name, widths[i]
            )));
        }
        widths.push(out_dim);
        let name = format!("mlp.{i}.weight");
        source.alias(&name, &w.source_name);
        tensors.push(TensorInfo {
            role: plan::role(&name, &w.shape),
            name,
            shape: w.shape.clone(),
        });
        let bias_source = format!("{}bias", w.source_name.trim_end_matches("weight"));
        if let Some(b) = declared.iter().find(|d| d.source_name == bias_source) {
            let name = format!("mlp.{i}.bias");
            source.alias(&name, &b.source_name);
            tensors.push(TensorInfo {
                role: Role::Keep,
                name,
                shape: b.shape.clone(),
            });
        }
    }
    Ok((tensors, MlpConfig { widths, activation }))
}

/// The source weights as F32, for the reference outputs.
fn reference_weights(p: &Prepared) -> Result<Weights, Error> {
    let mut weights = Weights::default();
    for t in &p.tensors {
        let data = p.source.rows_f32(&t.name, 0..t.rows())?.into_owned();
        let tensor = Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu)?;
        weights.insert(
            t.name.clone(),
            Arc::new(QTensor::quantize(&tensor, GgmlDType::F32)?),
        );
    }
    Ok(weights)
}

/// How much the model's output moves when one tensor alone is stored at each candidate dtype:
/// mean (1 − cosine) on the calibration inputs. The planner spends bits where this is high.
fn sensitivity(
    p: &Prepared,
    reference: &Weights,
    model: &Model,
) -> Result<Vec<Vec<(GgmlDType, f64)>>, Error> {
    use rayon::prelude::*;
    let calibration = model.calibration_outputs()?;
    // Every (tensor, distinct effective dtype) pair is one independent trial.
    let trials: Vec<(usize, GgmlDType)> = p
        .tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| plan::candidates(t).into_iter().map(move |d| (i, d)))
        .collect();
    let losses: Vec<f64> = trials
        .par_iter()
        .map(|&(i, dtype)| {
            if dtype == GgmlDType::F32 {
                return Ok(0.0);
            }
            let name = &p.tensors[i].name;
            let source = reference.get(name)?.dense()?;
            let trial = model.with_weight(name, Arc::new(QTensor::quantize(&source, dtype)?))?;
            let outputs = trial.calibration_outputs()?;
            let n = outputs.len().max(1) as f64;
            Ok(outputs
                .iter()
                .zip(&calibration)
                .map(|(a, b)| 1.0 - crate::model::cosine(a, b))
                .sum::<f64>()
                / n)
        })
        .collect::<Result<_, Error>>()?;
    let mut result = vec![vec![]; p.tensors.len()];
    for ((i, dtype), loss) in trials.into_iter().zip(losses) {
        result[i].push((dtype, loss));
    }
    Ok(result)
}

/// The source's digest: its files, in order, hashed as one stream.
fn source_digest(files: &[PathBuf]) -> Result<String, Error> {
    let mut hasher = HashingWriter::default();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(f, e))?;
    }
    Ok(hasher.finish())
}

fn suggestion(options: &BuildOptions) -> String {
    if options.pruning.is_some() {
        return "prune less (lower the sparsity) or drop pruning".into();
    }
    match options.quantization {
        Quantization::Q4_0 | Quantization::Q4K => "try quantization q8_0".into(),
        Quantization::Q8_0 => "try quantization f16".into(),
        Quantization::F16 => "try quantization none".into(),
        Quantization::Auto => {
            "plan for a device with more memory (memoryMiB) or raise maxQualityLoss".into()
        }
        Quantization::None => "raise maxQualityLoss".into(),
    }
}

/// Builds an artifact. See the module docs for the steps.
pub async fn build(options: &BuildOptions) -> Result<BuildOutcome, Error> {
    // Keys first: a wrong key fails before minutes of work.
    let signer = options
        .sign_key
        .as_ref()
        .map(|p| SigningKey::from_pem(&read_text(p)?, &p.display().to_string()).map_err(Error::Key))
        .transpose()?;
    let encrypter = options
        .encrypt_key
        .as_ref()
        .map(|p| {
            EncryptionKey::from_base64(&read_text(p)?, &p.display().to_string()).map_err(Error::Key)
        })
        .transpose()?;
    let output = Output::prepare(&options.out, options.replace).await?;

    let files = source::fetch(&options.source).await?;
    let prepared = prepare(&files, options.architecture)?;
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| prepared.name_hint.clone());
    tracing::info!(
        tensors = prepared.tensors.len(),
        source_bytes = prepared.source_bytes,
        "source loaded"
    );

    // Reference outputs from the F32 source, then the reference weights are dropped.
    let request = Request::from_api(
        options.quantization,
        options.profile.as_ref().map(|p| p.memory_mib),
    )?;
    let (reference, errors) = {
        let weights = reference_weights(&prepared)?;
        let model = prepared.kind.assemble(&weights)?;
        let errors = match request {
            Request::Auto { .. } => sensitivity(&prepared, &weights, &model)?,
            Request::Fixed(_) => vec![],
        };
        (model.outputs()?, errors)
    };
    let lookup = |i: usize, d: GgmlDType| {
        errors
            .get(i)
            .and_then(|e| e.iter().find(|(dt, _)| *dt == d))
            .map_or(0.0, |(_, err)| *err)
    };
    let chosen = plan::plan(&prepared.tensors, &request, lookup)?;
    let quantized = quantize::quantize_all(
        &prepared.source,
        &prepared.tensors,
        &chosen.dtypes,
        options.pruning,
        options.threads,
        true,
    )?;

    let mut weights = Weights::default();
    for (t, q) in prepared.tensors.iter().zip(&quantized) {
        weights.insert(t.name.clone(), q.tensor.clone());
    }
    let report = prepared.kind.assemble(&weights)?.report(&reference)?;
    drop(weights);
    tracing::info!(
        min_cosine = report.min_cosine,
        loss = report.loss,
        bytes = chosen.total_bytes,
        "quality measured"
    );
    if report.loss > options.max_quality_loss {
        return Err(Error::QualityTooLow {
            loss: report.loss,
            min_cosine: report.min_cosine,
            samples: report.samples,
            max: options.max_quality_loss,
            suggestion: suggestion(options),
        });
    }

    // Write the GGUF.
    let metadata = match &prepared.kind {
        Kind::Bert { config, tokenizer } => gguf::bert_metadata(config, &name, tokenizer)?,
        Kind::Mlp(config) => gguf::mlp_metadata(config, &name),
    };
    let named: Vec<(String, &QTensor)> = prepared
        .tensors
        .iter()
        .zip(&quantized)
        .map(|(t, q)| (t.name.clone(), &*q.tensor))
        .collect();
    let gguf_path = output.staging.0.join(GGUF_FILE);
    gguf::write(&gguf_path, &metadata, &named)?;
    let gguf_record = file_record(&gguf_path, GGUF_FILE)?;

    let stored = match &encrypter {
        None => StoredFile {
            file: GGUF_FILE.into(),
            sha256: gguf_record.sha256.clone(),
            bytes: gguf_record.bytes,
            encryption: None,
        },
        Some(key) => {
            let enc_path = output.staging.0.join(ENCRYPTED_GGUF_FILE);
            let input = std::fs::File::open(&gguf_path).map_err(|e| Error::io(&gguf_path, e))?;
            let out = std::fs::File::create(&enc_path).map_err(|e| Error::io(&enc_path, e))?;
            key.encrypt(std::io::BufReader::new(input), std::io::BufWriter::new(out))?;
            std::fs::remove_file(&gguf_path).map_err(|e| Error::io(&gguf_path, e))?;
            let r = file_record(&enc_path, ENCRYPTED_GGUF_FILE)?;
            StoredFile {
                file: r.file,
                sha256: r.sha256,
                bytes: r.bytes,
                encryption: Some("aes-256-gcm-stream".into()),
            }
        }
    };

    let manifest = Manifest {
        schema: SCHEMA.into(),
        name,
        version: options.version.clone(),
        architecture: match options.architecture {
            Architecture::Bert => "bert".into(),
            Architecture::Mlp => "mlp".into(),
        },
        builder_version: env!("CARGO_PKG_VERSION").into(),
        source: SourceInfo {
            uri: options.source.clone(),
            digest: source_digest(&prepared.files)?,
            files: prepared
                .files
                .iter()
                .map(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect(),
        },
        profile: options.profile.as_ref().map(|p| ProfileInfo {
            memory_mib: p.memory_mib,
            cpu_cores: p.cpu_cores,
            accelerator: format!("{:?}", p.accelerator).to_lowercase(),
        }),
        quantization: serde_json::to_value(options.quantization)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        pruning: options.pruning,
        tensors: prepared
            .tensors
            .iter()
            .zip(&quantized)
            .map(|(t, q)| TensorRecord {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: dtype_name(q.tensor.dtype()).into(),
                bytes: q.tensor.storage_size_in_bytes(),
                sparsity: q.sparsity,
                cosine: q.cosine,
                rel_rmse: q.rel_rmse,
            })
            .collect(),
        sizes: Sizes {
            source_bytes: prepared.source_bytes,
            tensor_bytes: chosen.total_bytes as u64,
            gguf_bytes: gguf_record.bytes,
        },
        quality: report,
        max_quality_loss: options.max_quality_loss,
        gguf: gguf_record,
        stored,
    };
    let manifest_bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Artifact(e.to_string()))?;
    let manifest_path = output.staging.0.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, &manifest_bytes).map_err(|e| Error::io(&manifest_path, e))?;
    if let Some(key) = &signer {
        let sig = Signature::sign(&manifest_bytes, key);
        let sig_path = output.staging.0.join(SIGNATURE_FILE);
        let text = serde_json::to_vec_pretty(&sig).map_err(|e| Error::Artifact(e.to_string()))?;
        std::fs::write(&sig_path, text).map_err(|e| Error::io(&sig_path, e))?;
    }
    let digest = crypto::sha256(&manifest_bytes);
    let out = output.commit().await?;
    let summary = manifest.summary(&digest, &out, signer.is_some());
    if let Some(path) = &options.termination_log {
        write_termination_log(path, &summary)?;
    }
    Ok(BuildOutcome {
        manifest,
        digest,
        summary,
        out,
    })
}

fn file_record(path: &Path, file: &str) -> Result<FileRecord, Error> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bytes = f.metadata().map_err(|e| Error::io(path, e))?.len();
    Ok(FileRecord {
        file: file.into(),
        sha256: crypto::sha256_reader(std::io::BufReader::new(f))?,
        bytes,
    })
}

/// Writes the summary for the Job's termination message, kept under Kubernetes' 4 KiB.
fn write_termination_log(path: &Path, summary: &Summary) -> Result<(), Error> {
    let mut summary = summary.clone();
    let mut text = serde_json::to_string(&summary).map_err(|e| Error::Artifact(e.to_string()))?;
    if text.len() > 4096 {
        summary.dtype_mix.clear();
        text = serde_json::to_string(&summary).map_err(|e| Error::Artifact(e.to_string()))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes why a build failed as its termination message (best effort: the exit code says it
/// failed anyway), cut to Kubernetes' 4 KiB.
pub fn write_failure(path: &Path, message: &str) {
    let mut text = message.to_owned();
    if text.len() > 4096 {
        let mut end = 4096;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    let _ = std::fs::write(path, text);
}

/// Where the artifact goes: a local folder (staged beside it, renamed at the end) or an
/// object-store prefix (staged in a temporary folder, uploaded at the end).
struct Output {
    staging: TempDir,
    target: Target,
    /// The objects of the remote artifact being replaced.
    replaces: Vec<object_store::path::Path>,
}

enum Target {
    Local(PathBuf),
    Remote(String),
}

/// The folder of a path or `file://` URI; None for object-store URIs.
fn local_dir(uri: &str) -> Option<PathBuf> {
    uri.strip_prefix("file://")
        .map(PathBuf::from)
        .or_else(|| (!uri.contains("://")).then(|| PathBuf::from(uri)))
}

/// Deletes the artifact at `uri` (a folder, or an object-store prefix) and returns how many
/// files went. Only an artifact is deleted — something without a manifest is refused — and
/// one already gone is not an error, so a retried clean-up succeeds.
pub async fn delete(uri: &str) -> Result<usize, Error> {
    let not_artifact = || {
        Error::Output(format!(
            "{uri}: not an artifact (no {MANIFEST_FILE}); nothing deleted"
        ))
    };
    if let Some(dir) = local_dir(uri) {
        if !dir.exists() {
            return Ok(0);
        }
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(not_artifact());
        }
        let files = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .count();
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        return Ok(files);
    }
    use object_store::ObjectStoreExt;
    let failed = |e: object_store::Error| Error::Output(format!("{uri}: {e}"));
    let objects = remote_objects(uri).await?;
    let url = url::Url::parse(uri).map_err(|e| Error::Output(format!("{uri}: {e}")))?;
    let (store, _) = source::open_store(&url).map_err(failed)?;
    if objects.is_empty() {
        return Ok(0);
    }
    if !objects.iter().any(|o| o.filename() == Some(MANIFEST_FILE)) {
        return Err(not_artifact());
    }
    for object in &objects {
        store.delete(object).await.map_err(failed)?;
    }
    Ok(objects.len())
}

impl Output {
    /// Where the build stages its files. An artifact already at `out` is an error unless
    /// `replace`; anything there that is not an artifact is never replaced.
    async fn prepare(out: &str, replace: bool) -> Result<Self, Error> {
        let not_artifact = || {
            Error::Output(format!(
                "{out}: already exists and is not an artifact; remove it or choose another --out"
            ))
        };
        let exists = || {
            Error::Output(format!(
                "{out}: already exists; remove it, choose another --out, or pass --replace"
            ))
        };
        let Some(dir) = local_dir(out) else {
            let existing = remote_objects(out).await?;
            if !existing.is_empty() {
                if !existing.iter().any(|o| o.filename() == Some(MANIFEST_FILE)) {
                    return Err(not_artifact());
                }
                if !replace {
                    return Err(exists());
                }
            }
            return Ok(Self {
                staging: TempDir::new("kasmina-artifact")?,
                target: Target::Remote(out.to_owned()),
                replaces: existing,
            });
        };
        if dir.exists() {
            let empty = std::fs::read_dir(&dir).is_ok_and(|mut e| e.next().is_none());
            if !empty && !dir.join(MANIFEST_FILE).is_file() {
                return Err(not_artifact());
            }
            if !replace {
                return Err(exists());
            }
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Output(format!("{}: {e}", parent.display())))?;
        let staging = beside(&dir, "partial");
        std::fs::create_dir(&staging)
            .map_err(|e| Error::Output(format!("{}: not writable: {e}", parent.display())))?;
        Ok(Self {
            staging: TempDir(staging),
            target: Target::Local(dir),
            replaces: vec![],
        })
    }

    async fn commit(self) -> Result<String, Error> {
        match &self.target {
            Target::Local(dir) => {
                // The old artifact moves aside first, so the new one lands whole or not at all.
                let aside = beside(dir, "replaced");
                let replaced = dir.exists();
                if replaced {
                    std::fs::rename(dir, &aside)
                        .map_err(|e| Error::Output(format!("{}: {e}", dir.display())))?;
                }
                std::fs::rename(&self.staging.0, dir)
                    .map_err(|e| Error::Output(format!("{}: {e}", dir.display())))?;
                // Renamed away: nothing left for the guard to remove.
                std::mem::forget(self.staging);
                if replaced {
                    std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
                }
                Ok(dir.display().to_string())
            }
            Target::Remote(uri) => {
                use object_store::ObjectStoreExt;
                let url = url::Url::parse(uri).map_err(|e| Error::Output(format!("{uri}: {e}")))?;
                let (store, prefix) =
                    source::open_store(&url).map_err(|e| Error::Output(format!("{uri}: {e}")))?;
                let mut written = vec![];
                for entry in
                    std::fs::read_dir(&self.staging.0).map_err(|e| Error::io(&self.staging.0, e))?
                {
                    let path = entry.map_err(|e| Error::io(&self.staging.0, e))?.path();
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                    let location = prefix.clone().join(name);
                    store
                        .put(&location, bytes.into())
                        .await
                        .map_err(|e| Error::Output(format!("{uri}: {e}")))?;
                    written.push(location);
                }
                // What the replaced artifact had and this one has not (a signature, say).
                for stale in self.replaces.iter().filter(|o| !written.contains(o)) {
                    store
                        .delete(stale)
                        .await
                        .map_err(|e| Error::Output(format!("{uri}: {e}")))?;
                }
                Ok(uri.clone())
            }
        }
    }
}

/// A hidden, unique sibling of `dir` (`.<name>.<what>-<n>`), on the same file system so a
/// rename to or from it is atomic.
fn beside(dir: &Path, what: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{what}-{}", source::unique()))
}

/// The objects under an object-store prefix.
async fn remote_objects(uri: &str) -> Result<Vec<object_store::path::Path>, Error> {
    use futures::TryStreamExt;
    let failed = |e: object_store::Error| Error::Output(format!("{uri}: {e}"));
    let url = url::Url::parse(uri).map_err(|e| Error::Output(format!("{uri}: {e}")))?;
    let (store, prefix) = source::open_store(&url).map_err(failed)?;
    store
        .list(Some(&prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .map_err(failed)
}

/// What `verify` checked.
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub digest: String,
    /// The key id the signature was checked against, when it was.
    pub signed_by: Option<String>,
}

/// Checks an artifact folder: the manifest digest (when expected), the signature (when a key
/// is given, or when `require_signature`), the stored file's digest, and — with the key —
/// the decrypted GGUF's digest.
pub fn verify(
    dir: &Path,
    public_key: Option<&VerifyingKey>,
    expect_digest: Option<&str>,
    decrypt_key: Option<&EncryptionKey>,
) -> Result<Verified, Error> {
    let verified = verify_manifest(dir, public_key, expect_digest)?;
    let manifest = &verified.manifest;
    let stored_path = dir.join(&manifest.stored.file);
    let stored = file_record(&stored_path, &manifest.stored.file)?;
    if stored.sha256 != manifest.stored.sha256 {
        return Err(stored_mismatch(manifest, &stored.sha256));
    }
    if let (Some(key), Some(_)) = (decrypt_key, &manifest.stored.encryption) {
        let file = std::fs::File::open(&stored_path).map_err(|e| Error::io(&stored_path, e))?;
        let mut hasher = HashingWriter::default();
        key.decrypt(std::io::BufReader::new(file), &mut hasher)?;
        let plain = hasher.finish();
        if plain != manifest.gguf.sha256 {
            return Err(gguf_mismatch(manifest, &plain));
        }
    }
    Ok(verified)
}

/// The manifest, checked against the expected digest and (with a key) its signature.
fn verify_manifest(
    dir: &Path,
    public_key: Option<&VerifyingKey>,
    expect_digest: Option<&str>,
) -> Result<Verified, Error> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let digest = crypto::sha256(&bytes);
    if let Some(expected) = expect_digest
        && expected != digest
    {
        return Err(Error::Verify(format!(
            "manifest digest is {digest}, expected {expected}"
        )));
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Verify(format!("{}: {e}", manifest_path.display())))?;
    let signed_by = match public_key {
        Some(key) => {
            let sig_path = dir.join(SIGNATURE_FILE);
            let text = std::fs::read(&sig_path).map_err(|_| {
                Error::Verify(format!(
                    "{} is missing: the artifact is not signed",
                    sig_path.display()
                ))
            })?;
            let sig: Signature = serde_json::from_slice(&text)
                .map_err(|e| Error::Verify(format!("{}: {e}", sig_path.display())))?;
            sig.verify(&bytes, key)
                .map_err(|e| Error::Verify(e.to_string()))?;
            Some(key.key_id())
        }
        None => None,
    };
    Ok(Verified {
        manifest,
        digest,
        signed_by,
    })
}

fn stored_mismatch(manifest: &Manifest, found: &str) -> Error {
    Error::Verify(format!(
        "{} has digest {found}, the manifest says {}",
        manifest.stored.file, manifest.stored.sha256
    ))
}

fn gguf_mismatch(manifest: &Manifest, found: &str) -> Error {
    Error::Verify(format!(
        "decrypted GGUF has digest {found}, the manifest says {}",
        manifest.gguf.sha256
    ))
}

/// Verifies an artifact and loads its GGUF from the very bytes that were hashed (read once,
/// front to back, into the weights: see [`gguf::read_verified`]), so nothing can change
/// between the check and the load. An encrypted artifact needs `decrypt_key`; a key for a
/// clear artifact is refused too, since whoever passed it expected encryption.
pub fn open_verified(
    dir: &Path,
    public_key: Option<&VerifyingKey>,
    expect_digest: &str,
    decrypt_key: Option<&EncryptionKey>,
) -> Result<(Verified, gguf::Loaded), Error> {
    let verified = verify_manifest(dir, public_key, Some(expect_digest))?;
    let manifest = &verified.manifest;
    let stored_path = dir.join(&manifest.stored.file);
    let file = std::fs::File::open(&stored_path).map_err(|e| Error::io(&stored_path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(&stored_path, e))?
        .len();
    let loaded = match (&manifest.stored.encryption, decrypt_key) {
        (None, None) => gguf::read_verified(
            std::io::BufReader::new(file),
            len,
            &manifest.stored.sha256,
            |found| stored_mismatch(manifest, found),
        )?,
        (Some(_), Some(key)) => {
            let mut sealed = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            std::io::Read::read_to_end(&mut std::io::Read::take(file, len), &mut sealed)
                .map_err(|e| Error::io(&stored_path, e))?;
            let stored_digest = crypto::sha256(&sealed);
            if stored_digest != manifest.stored.sha256 {
                return Err(stored_mismatch(manifest, &stored_digest));
            }
            let mut plain = Vec::with_capacity(manifest.gguf.bytes as usize);
            key.decrypt(sealed.as_slice(), &mut plain)?;
            drop(sealed);
            gguf::read_verified(
                plain.as_slice(),
                plain.len() as u64,
                &manifest.gguf.sha256,
                |found| gguf_mismatch(manifest, found),
            )?
        }
        (Some(_), None) => {
            return Err(Error::Verify(
                "the artifact is encrypted; a decryption key is needed".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(Error::Verify(
                "a decryption key was given but the artifact is not encrypted".into(),
            ));
        }
    };
    Ok((verified, loaded))
}

/// A writer that only hashes what passes through.
struct HashingWriter(aws_lc_rs::digest::Context);

impl Default for HashingWriter {
    fn default() -> Self {
        Self(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
}

impl HashingWriter {
    fn finish(self) -> String {
        crypto::sha256_digest(self.0.finish())
    }
}

impl std::io::Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
