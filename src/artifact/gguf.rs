//! GGUF files: llama.cpp's tensor names and metadata for `bert` (so llama.cpp can load a
//! Kasmina artifact), `kasmina.*` metadata for `mlp`; the exact `tokenizer.json` is embedded
//! under llama.cpp's `tokenizer.huggingface.json` key so the runtime tokenizes identically.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor, ggml_file};
use candle_core::{Device, Tensor};

use super::Error;
use crate::model::Weights;
use crate::model::bert::BertConfig;
use crate::model::mlp::{Activation, MlpConfig};

pub const TOKENIZER_JSON_KEY: &str = "tokenizer.huggingface.json";

/// Metadata of a BERT sentence encoder, as llama.cpp's converter writes it.
pub fn bert_metadata(
    config: &BertConfig,
    name: &str,
    tokenizer_json: &str,
) -> Result<Vec<(String, Value)>, Error> {
    let u32v = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut meta = vec![
        ("general.architecture".into(), Value::String("bert".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            "bert.context_length".into(),
            u32v(config.max_position_embeddings),
        ),
        ("bert.embedding_length".into(), u32v(config.hidden_size)),
        (
            "bert.feed_forward_length".into(),
            u32v(config.intermediate_size),
        ),
        ("bert.block_count".into(), u32v(config.num_hidden_layers)),
        (
            "bert.attention.head_count".into(),
            u32v(config.num_attention_heads),
        ),
        (
            "bert.attention.layer_norm_epsilon".into(),
            Value::F32(config.layer_norm_eps as f32),
        ),
        ("bert.attention.causal".into(), Value::Bool(false)),
        // 1 = mean pooling, as sentence-transformers does for all-MiniLM.
        ("bert.pooling_type".into(), Value::U32(1)),
        ("tokenizer.ggml.model".into(), Value::String("bert".into())),
        (
            "tokenizer.ggml.token_type_count".into(),
            u32v(config.type_vocab_size),
        ),
    ];
    let vocab = wordpiece_vocab(tokenizer_json, config.vocab_size)?;
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(vocab.tokens.into_iter().map(Value::String).collect()),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(vocab.types.into_iter().map(Value::I32).collect()),
    ));
    for (key, token) in [
        ("tokenizer.ggml.unknown_token_id", "[UNK]"),
        ("tokenizer.ggml.seperator_token_id", "[SEP]"),
        ("tokenizer.ggml.padding_token_id", "[PAD]"),
        ("tokenizer.ggml.cls_token_id", "[CLS]"),
        ("tokenizer.ggml.mask_token_id", "[MASK]"),
    ] {
        if let Some(id) = vocab.ids.get(token) {
            meta.push((key.into(), Value::U32(*id)));
        }
    }
    meta.push((
        TOKENIZER_JSON_KEY.into(),
        Value::String(tokenizer_json.into()),
    ));
    Ok(meta)
}

struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
}

/// The WordPiece vocabulary in id order, in llama.cpp's "phantom space" spelling: `##x` → `x`,
/// other words get a leading `▁`, `[SPECIAL]` tokens stay (type 3, control).
fn wordpiece_vocab(tokenizer_json: &str, vocab_size: usize) -> Result<Vocab, Error> {
    let parsed: serde_json::Value = serde_json::from_str(tokenizer_json)
        .map_err(|e| Error::Source(format!("tokenizer.json: {e}")))?;
    let map = parsed
        .pointer("/model/vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| Error::Source("tokenizer.json: no WordPiece model.vocab".into()))?;
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![5; vocab_size];
    let mut ids = HashMap::new();
    for (token, id) in map {
        let Some(id) = id.as_u64().map(|i| i as usize).filter(|i| *i < vocab_size) else {
            continue;
        };
        let special = token.starts_with('[') && token.ends_with(']');
        tokens[id] = if special {
            token.clone()
        } else if let Some(piece) = token.strip_prefix("##") {
            piece.to_owned()
        } else {
            format!("\u{2581}{token}")
        };
        types[id] = if special { 3 } else { 1 };
        ids.insert(token.clone(), id as u32);
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
        }
    }
    Ok(Vocab { tokens, types, ids })
}

/// Metadata of an MLP.
pub fn mlp_metadata(config: &MlpConfig, name: &str) -> Vec<(String, Value)> {
    let activation = match config.activation {
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::Tanh => "tanh",
        Activation::Sigmoid => "sigmoid",
    };
    vec![
        (
            "general.architecture".into(),
            Value::String("kasmina-mlp".into()),
        ),
        ("general.name".into(), Value::String(name.into())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            "kasmina.mlp.layer_count".into(),
            Value::U32((config.widths.len() - 1) as u32),
        ),
        (
            "kasmina.mlp.widths".into(),
            Value::Array(
                config
                    .widths
                    .iter()
                    .map(|w| Value::U32(*w as u32))
                    .collect(),
            ),
        ),
        (
            "kasmina.mlp.activation".into(),
            Value::String(activation.into()),
        ),
    ]
}

/// Writes a GGUF file.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, &QTensor)],
) -> Result<(), Error> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut out = std::io::BufWriter::new(file);
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    gguf_file::write(&mut out, &meta, &tensors)?;
    use std::io::Write;
    out.flush().map_err(|e| Error::io(path, e))
}

/// A GGUF file read back: metadata and weights.
pub struct Loaded {
    pub metadata: HashMap<String, Value>,
    pub weights: Weights,
}

/// Reads every tensor of a GGUF stream (the builder's and the tests' reader; the runtime
/// uses [`read_verified`]).
pub fn read(mut reader: impl Read + Seek) -> Result<Loaded, Error> {
    let len = reader.seek(SeekFrom::End(0)).map_err(read_error)?;
    reader.seek(SeekFrom::Start(0)).map_err(read_error)?;
    read_tensors(&mut Forward::new(reader, len))
}

/// Reads the `len` bytes of a GGUF stream front to back, once: every byte passes through
/// SHA-256 on its way into the weights, and the digest must equal `expect` (else the error
/// `mismatch` makes of the digest found; a file that fails to parse is still hashed to the
/// end first, so tampering is reported as such). What is loaded is exactly what was hashed:
/// a file rewritten after the check cannot reach the model, as it could through a mapping.
/// Nothing is held twice either: F32 tensors are read straight into their tensors.
pub fn read_verified(
    reader: impl Read,
    len: u64,
    expect: &str,
    mismatch: impl FnOnce(&str) -> Error,
) -> Result<Loaded, Error> {
    let mut forward = Forward::new(reader, len);
    let loaded = read_tensors(&mut forward);
    let digest = forward.finish()?;
    if digest != expect {
        return Err(mismatch(&digest));
    }
    loaded
}

/// The header, then each tensor in file order.
fn read_tensors<R: Read>(reader: &mut Forward<R>) -> Result<Loaded, Error> {
    let content = gguf_file::Content::read(reader)?;
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut weights = Weights::default();
    for (name, info) in infos {
        let start = content.tensor_data_offset + info.offset;
        if start < reader.pos {
            return Err(Error::Artifact(format!(
                "GGUF tensor {name} overlaps the tensor before it"
            )));
        }
        reader.seek(SeekFrom::Start(start)).map_err(read_error)?;
        let dims = info.shape.dims().to_vec();
        let elems = info.shape.elem_count();
        let dtype = info.ggml_dtype;
        if elems % dtype.block_size() != 0 {
            return Err(Error::Artifact(format!(
                "GGUF tensor {name}: {elems} values are not whole {dtype:?} blocks"
            )));
        }
        if dtype == GgmlDType::F32 {
            let values = read_f32s(reader, elems)?;
            weights.insert_dense(name.clone(), Tensor::from_vec(values, dims, &Device::Cpu)?);
        } else {
            let mut raw = vec![0u8; elems / dtype.block_size() * dtype.type_size()];
            reader.read_exact(&mut raw).map_err(read_error)?;
            let tensor = ggml_file::qtensor_from_ggml(dtype, &raw, dims, &Device::Cpu)?;
            weights.insert(name.clone(), std::sync::Arc::new(tensor));
        }
    }
    Ok(Loaded {
        metadata: content.metadata,
        weights,
    })
}

fn read_error(e: std::io::Error) -> Error {
    Error::Artifact(format!("reading the GGUF: {e}"))
}

/// `count` little-endian f32s, through a small buffer (no second copy of the tensor).
fn read_f32s(reader: &mut impl Read, count: usize) -> Result<Vec<f32>, Error> {
    let mut values = Vec::with_capacity(count);
    let mut buf = [0u8; 1 << 16];
    while values.len() < count {
        let n = ((count - values.len()) * 4).min(buf.len());
        reader.read_exact(&mut buf[..n]).map_err(read_error)?;
        values.extend(
            buf[..n]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(values)
}

/// A stream read forward only, every byte hashed. candle's header parser asks for the length
/// by seeking to the end and back, and tensors are reached by seeking ahead over padding:
/// seeks move a logical position, and skipped bytes are read (and hashed) on the next read.
struct Forward<R> {
    inner: R,
    len: u64,
    /// Bytes read (and hashed) so far; never more than `len`.
    pos: u64,
    /// Where the next read starts.
    at: u64,
    hash: aws_lc_rs::digest::Context,
}

impl<R: Read> Forward<R> {
    fn new(inner: R, len: u64) -> Self {
        Self {
            inner,
            len,
            pos: 0,
            at: 0,
            hash: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
        }
    }

    fn catch_up(&mut self) -> std::io::Result<()> {
        if self.at == self.pos {
            return Ok(());
        }
        if self.at < self.pos {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "GGUF read backwards",
            ));
        }
        // Never past the length: the digest is of exactly `len` bytes.
        if self.at > self.len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut buf = [0u8; 1 << 16];
        while self.pos < self.at {
            let want = usize::try_from(self.at - self.pos).map_or(buf.len(), |n| n.min(buf.len()));
            let n = self.inner.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.hash.update(&buf[..n]);
            self.pos += n as u64;
        }
        Ok(())
    }

    /// Hashes whatever was not read, up to the length, and returns `sha256:<hex>`.
    fn finish(mut self) -> Result<String, Error> {
        self.at = self.len;
        self.catch_up().map_err(read_error)?;
        Ok(crate::crypto::sha256_digest(self.hash.finish()))
    }
}

impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.catch_up()?;
        let room = usize::try_from(self.len.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.hash.update(&buf[..n]);
        self.pos += n as u64;
        self.at = self.pos;
        Ok(n)
    }
}

impl<R: Read> Seek for Forward<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at = target.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "GGUF seek out of range")
        })?;
        Ok(self.at)
    }
}

fn meta_u32(meta: &HashMap<String, Value>, key: &str) -> Result<usize, Error> {
    meta.get(key)
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .ok_or_else(|| Error::Artifact(format!("GGUF metadata {key} is missing")))
}

/// The BERT config and tokenizer stored in a GGUF's metadata.
pub fn bert_from_metadata(loaded: &Loaded) -> Result<(BertConfig, String), Error> {
    let m = &loaded.metadata;
    let vocab_size = loaded
        .weights
        .get("token_embd.weight")
        .map_err(|e| Error::Artifact(e.to_string()))?
        .dims()[0];
    let config = BertConfig {
        vocab_size,
        hidden_size: meta_u32(m, "bert.embedding_length")?,
        num_hidden_layers: meta_u32(m, "bert.block_count")?,
        num_attention_heads: meta_u32(m, "bert.attention.head_count")?,
        intermediate_size: meta_u32(m, "bert.feed_forward_length")?,
        max_position_embeddings: meta_u32(m, "bert.context_length")?,
        type_vocab_size: meta_u32(m, "tokenizer.ggml.token_type_count").unwrap_or(2),
        layer_norm_eps: m
            .get("bert.attention.layer_norm_epsilon")
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(1e-12),
        hidden_act: "gelu".into(),
    };
    let tokenizer = m
        .get(TOKENIZER_JSON_KEY)
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Error::Artifact(format!("GGUF metadata {TOKENIZER_JSON_KEY} is missing")))?;
    Ok((config, tokenizer))
}

/// The MLP config stored in a GGUF's metadata.
pub fn mlp_from_metadata(loaded: &Loaded) -> Result<MlpConfig, Error> {
    let m = &loaded.metadata;
    let widths = m
        .get("kasmina.mlp.widths")
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .filter_map(|w| w.to_u32().ok())
                .map(|w| w as usize)
                .collect::<Vec<_>>()
        })
        .ok_or_else(|| Error::Artifact("GGUF metadata kasmina.mlp.widths is missing".into()))?;
    let activation = m
        .get("kasmina.mlp.activation")
        .and_then(|v| v.to_string().ok())
        .map(|s| s.parse())
        .transpose()
        .map_err(|e: crate::model::Error| Error::Artifact(e.to_string()))?
        .unwrap_or(Activation::Relu);
    Ok(MlpConfig { widths, activation })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto;
    use crate::model::Weight;

    /// A GGUF of one F32 and one Q8_0 tensor, and the F32 values.
    fn sample() -> (Vec<u8>, Vec<f32>) {
        let values: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 7.0).collect();
        let dense = Tensor::from_vec(values.clone(), (2, 32), &Device::Cpu).unwrap();
        let f32 = QTensor::quantize(&dense, GgmlDType::F32).unwrap();
        let q8 = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        let name = Value::String("sample".into());
        gguf_file::write(
            &mut out,
            &[("general.name", &name)],
            &[("b.weight", &q8), ("a.weight", &f32)],
        )
        .unwrap();
        (out.into_inner(), values)
    }

    fn verified(bytes: &[u8], expect: &str) -> Result<Loaded, Error> {
        read_verified(bytes, bytes.len() as u64, expect, |found| {
            Error::Verify(format!("digest {found}"))
        })
    }

    #[test]
    fn a_verified_read_holds_f32_dense_and_quantized_blocks_as_candle_reads_them() {
        let (bytes, values) = sample();
        let loaded = verified(&bytes, &crypto::sha256(&bytes)).unwrap();
        let Weight::Dense(a) = loaded.weights.get("a.weight").unwrap() else {
            panic!("an F32 weight is read straight into a tensor");
        };
        assert_eq!(a.dims(), [2, 32]);
        assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), values);
        let Weight::Quantized(b) = loaded.weights.get("b.weight").unwrap() else {
            panic!("a Q8_0 weight stays quantized");
        };
        assert_eq!(b.dtype(), GgmlDType::Q8_0);
        let mut cursor = std::io::Cursor::new(&bytes);
        let content = gguf_file::Content::read(&mut cursor).unwrap();
        let candle = content
            .tensor(&mut cursor, "b.weight", &Device::Cpu)
            .unwrap();
        let ours = b.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let theirs = candle
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(
            ours.to_vec1::<f32>().unwrap(),
            theirs.to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            loaded.metadata["general.name"].to_string().unwrap(),
            "sample"
        );
        // The reader for the builder and tests gives the same weights.
        let plain = read(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(
            plain.weights.size_in_bytes(),
            loaded.weights.size_in_bytes()
        );
    }

    #[test]
    fn bytes_other_than_the_digested_ones_are_refused_as_such_even_when_they_do_not_parse() {
        let (bytes, _) = sample();
        let expect = crypto::sha256(&bytes);
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let err = verified(&flipped, &expect).err().unwrap().to_string();
        assert!(err.contains(&crypto::sha256(&flipped)), "{err}");
        // Truncated: it no longer parses, and what is reported is the digest.
        let half = &bytes[..bytes.len() / 2];
        let err = verified(half, &expect).err().unwrap().to_string();
        assert!(err.contains(&crypto::sha256(half)), "{err}");
        // Bytes that match their digest but are no GGUF: the parse error.
        let garbage = vec![7u8; 64];
        let err = verified(&garbage, &crypto::sha256(&garbage))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown magic"), "{err}");
    }

    #[test]
    fn the_stream_is_read_forward_once_and_every_byte_is_hashed() {
        let bytes: Vec<u8> = (0..10).collect();
        let mut forward = Forward::new(bytes.as_slice(), 10);
        assert_eq!(forward.seek(SeekFrom::End(0)).unwrap(), 10);
        forward.seek(SeekFrom::Start(4)).unwrap();
        let mut two = [0u8; 2];
        forward.read_exact(&mut two).unwrap();
        assert_eq!(two, [4, 5]);
        assert_eq!(forward.stream_position().unwrap(), 6);
        forward.seek(SeekFrom::Start(1)).unwrap();
        assert!(forward.read(&mut two).is_err(), "no reading backwards");
        forward.seek(SeekFrom::Start(6)).unwrap();
        assert_eq!(forward.finish().unwrap(), crypto::sha256(&bytes));
    }
}
