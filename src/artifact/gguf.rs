//! GGUF files: llama.cpp's tensor names and metadata for `bert` (so llama.cpp can load a
//! Kasmina artifact), `kasmina.*` metadata for `mlp`; the exact `tokenizer.json` is embedded
//! under llama.cpp's `tokenizer.huggingface.json` key so the runtime tokenizes identically.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};

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

/// Reads every tensor of in-memory GGUF bytes, calling `release(offset, len)` with each
/// tensor's byte range once it has been copied out, so a mapped file's pages can be given back
/// as loading goes instead of all staying resident until the end.
pub fn read_releasing(
    bytes: &[u8],
    mut release: impl FnMut(usize, usize),
) -> Result<Loaded, Error> {
    let mut reader = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut reader)?;
    let mut weights = Weights::default();
    for (name, info) in &content.tensor_infos {
        let tensor: QTensor = content.tensor(&mut reader, name, &Device::Cpu)?;
        let dtype = info.ggml_dtype;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        release((content.tensor_data_offset + info.offset) as usize, len);
        weights.insert(name.clone(), std::sync::Arc::new(tensor));
    }
    Ok(Loaded {
        metadata: content.metadata,
        weights,
    })
}

/// Reads every tensor of a GGUF stream.
pub fn read(reader: &mut (impl Read + Seek)) -> Result<Loaded, Error> {
    let content = gguf_file::Content::read(reader)?;
    let mut weights = Weights::default();
    for name in content.tensor_infos.keys() {
        let tensor: QTensor = content.tensor(reader, name, &Device::Cpu)?;
        weights.insert(name.clone(), std::sync::Arc::new(tensor));
    }
    Ok(Loaded {
        metadata: content.metadata,
        weights,
    })
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
        .shape()
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
