//! `manifest.json`: what was built from what, how, and how well — plus its detached Ed25519
//! signature `manifest.sig`. The artifact's digest is the SHA-256 of `manifest.json`, which
//! in turn pins the GGUF by its own SHA-256: one digest covers everything.

use serde::{Deserialize, Serialize};

use super::quality::QualityReport;
use crate::crypto::{self, SigningKey, VerifyingKey};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.sig";
pub const GGUF_FILE: &str = "model.gguf";
pub const ENCRYPTED_GGUF_FILE: &str = "model.gguf.enc";
pub const SCHEMA: &str = "kasmina.dev/artifact/v1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema: String,
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub builder_version: String,
    pub source: SourceInfo,
    /// The device planned for, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileInfo>,
    /// The quantization asked for (`auto`, `q8_0`, …); per-tensor results are in `tensors`.
    pub quantization: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<super::prune::Pruning>,
    pub tensors: Vec<TensorRecord>,
    pub sizes: Sizes,
    pub quality: QualityReport,
    pub max_quality_loss: f64,
    /// The GGUF in clear.
    pub gguf: FileRecord,
    /// The file as stored: the GGUF itself, or its encryption.
    pub stored: StoredFile,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    pub uri: String,
    /// SHA-256 over the source's config and weight files, in name order.
    pub digest: String,
    pub files: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileInfo {
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
    pub cpu_cores: u32,
    pub accelerator: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TensorRecord {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub bytes: usize,
    pub sparsity: f64,
    pub cosine: f64,
    pub rel_rmse: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sizes {
    pub source_bytes: u64,
    /// Sum of the tensors' stored bytes.
    pub tensor_bytes: u64,
    pub gguf_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileRecord {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredFile {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// `aes-256-gcm-stream` when encrypted at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// The detached signature in `manifest.sig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Signature {
    pub algorithm: String,
    pub key_id: String,
    /// Base64 Ed25519 signature over the exact bytes of `manifest.json`.
    pub signature: String,
}

impl Signature {
    pub fn sign(manifest_bytes: &[u8], key: &SigningKey) -> Self {
        use base64::Engine;
        Self {
            algorithm: "ed25519".into(),
            key_id: key.public_key().key_id(),
            signature: base64::engine::general_purpose::STANDARD.encode(key.sign(manifest_bytes)),
        }
    }

    pub fn verify(&self, manifest_bytes: &[u8], key: &VerifyingKey) -> Result<(), crypto::Error> {
        use base64::Engine;
        if self.algorithm != "ed25519" {
            return Err(crypto::Error::BadSignature);
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| crypto::Error::BadSignature)?;
        key.verify(manifest_bytes, &raw)
    }
}

/// The ≤ 4 KiB summary for the Job's termination message, read into `status.artifact`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub digest: String,
    pub uri: String,
    pub size_bytes: u64,
    pub original_size_bytes: u64,
    pub quantization: String,
    /// Tensor count per dtype, e.g. `{"q8_0": 36, "f32": 65}`.
    pub dtype_mix: std::collections::BTreeMap<String, usize>,
    pub sparsity: f64,
    pub quality_loss: f64,
    pub min_cosine: f64,
    pub signed: bool,
    pub encrypted: bool,
}

impl Manifest {
    /// A one-word description of the dtypes used: the one dtype of all quantized tensors, or `mixed`.
    pub fn quantization_label(&self) -> String {
        let mut quantized: Vec<&str> = self
            .tensors
            .iter()
            .filter(|t| {
                t.shape.len() == 2 && t.shape.iter().product::<usize>() >= super::plan::SMALL_TENSOR
            })
            .map(|t| t.dtype.as_str())
            .collect();
        quantized.sort_unstable();
        quantized.dedup();
        match quantized.as_slice() {
            [one] => (*one).to_owned(),
            [] => "f32".into(),
            _ => "mixed".into(),
        }
    }

    pub fn summary(&self, digest: &str, uri: &str, signed: bool) -> Summary {
        let mut dtype_mix = std::collections::BTreeMap::new();
        let mut zeros = 0.0;
        let mut elements = 0.0;
        for t in &self.tensors {
            *dtype_mix.entry(t.dtype.clone()).or_insert(0) += 1;
            let n = t.shape.iter().product::<usize>() as f64;
            zeros += t.sparsity * n;
            elements += n;
        }
        Summary {
            digest: digest.into(),
            uri: uri.into(),
            size_bytes: self.stored.bytes,
            original_size_bytes: self.sizes.source_bytes,
            quantization: self.quantization_label(),
            dtype_mix,
            sparsity: if elements > 0.0 {
                zeros / elements
            } else {
                0.0
            },
            quality_loss: self.quality.loss,
            min_cosine: self.quality.min_cosine,
            signed,
            encrypted: self.stored.encryption.is_some(),
        }
    }
}
