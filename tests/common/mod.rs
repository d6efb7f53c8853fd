//! Small synthetic models written by the tests themselves: a tiny BERT with its own
//! WordPiece tokenizer, and MLPs. Seeded, so every run is the same.

#![allow(dead_code)]

pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kasmina-test-{name}-{}-{}",
            std::process::id(),
            Rng::new(name.len() as u64 + 7).next().to_bits()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes F32 tensors to a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

pub const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "edge", "device",
    "cluster", "runs", "fast", "small", "a", "is", "and", "of", "to", "in", "data", "student",
    "patient", "##s", "##ing", "##ed", ".", ",", "!", "?",
];

/// A WordPiece tokenizer.json over a tiny vocabulary, with BERT's normalizer and post-processor.
pub fn tokenizer_json() -> (String, usize) {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let n = vocab.len();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab},
    });
    (tok.to_string(), n)
}

/// A tiny BERT in Hugging Face layout (config.json, tokenizer.json, model.safetensors):
/// hidden 128, 2 layers, 4 heads, FFN 256, 64 positions: rows of 128 (K-quants fall back) and 256.
pub fn tiny_bert(dir: &Path, seed: u64) {
    let (tokenizer, vocab) = tokenizer_json();
    let (h, ffn, layers, positions) = (128usize, 256usize, 2usize, 64usize);
    let config = json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab, "hidden_size": h,
        "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": ffn,
        "max_position_embeddings": positions, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    let mut rng = Rng::new(seed);
    let mut t = vec![];
    let mut push = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        let data = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
        t.push((name, shape, data));
    };
    // Enough rows to exceed the planner's small-tensor limit for the embedding.
    push(
        "embeddings.word_embeddings.weight".into(),
        vec![vocab, h],
        0.5,
        0.0,
        &mut rng,
    );
    push(
        "embeddings.position_embeddings.weight".into(),
        vec![positions, h],
        0.1,
        0.0,
        &mut rng,
    );
    push(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, h],
        0.1,
        0.0,
        &mut rng,
    );
    push(
        "embeddings.LayerNorm.weight".into(),
        vec![h],
        0.05,
        1.0,
        &mut rng,
    );
    push(
        "embeddings.LayerNorm.bias".into(),
        vec![h],
        0.05,
        0.0,
        &mut rng,
    );
    for i in 0..layers {
        let p = |s: &str| format!("encoder.layer.{i}.{s}");
        for (name, out_dim, in_dim) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ffn, h),
            ("output.dense", h, ffn),
        ] {
            push(
                p(&format!("{name}.weight")),
                vec![out_dim, in_dim],
                0.3 / (in_dim as f32).sqrt() * 3.0,
                0.0,
                &mut rng,
            );
            push(
                p(&format!("{name}.bias")),
                vec![out_dim],
                0.02,
                0.0,
                &mut rng,
            );
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            push(p(&format!("{ln}.weight")), vec![h], 0.05, 1.0, &mut rng);
            push(p(&format!("{ln}.bias")), vec![h], 0.05, 0.0, &mut rng);
        }
    }
    push("pooler.dense.weight".into(), vec![h, h], 0.1, 0.0, &mut rng);
    write_safetensors(&dir.join("model.safetensors"), &t);
}

/// An MLP `widths[0] → … → widths[n]` in PyTorch nn.Sequential naming (`0.weight`, `2.weight`, …).
pub fn tiny_mlp(path: &Path, widths: &[usize], seed: u64) {
    let mut rng = Rng::new(seed);
    let mut t = vec![];
    for (i, w) in widths.windows(2).enumerate() {
        let idx = i * 2;
        t.push((
            format!("{idx}.weight"),
            vec![w[1], w[0]],
            rng.vec(w[0] * w[1], 1.0 / (w[0] as f32).sqrt()),
        ));
        t.push((format!("{idx}.bias"), vec![w[1]], rng.vec(w[1], 0.1)));
    }
    write_safetensors(path, &t);
}

/// What the tests usually pass to `kasmina build`.
pub fn options(
    source: &Path,
    arch: kasmina::api::edge_deployment::Architecture,
    out: &Path,
) -> kasmina::artifact::BuildOptions {
    kasmina::artifact::BuildOptions {
        source: source.display().to_string(),
        architecture: arch,
        profile: None,
        quantization: kasmina::api::edge_deployment::Quantization::Q8_0,
        pruning: None,
        max_quality_loss: 0.05,
        out: out.display().to_string(),
        sign_key: None,
        encrypt_key: None,
        termination_log: None,
        name: Some("test".into()),
        version: "1.0.0".into(),
        threads: 2,
        replace: false,
    }
}

pub fn dtype_counts(m: &kasmina::artifact::manifest::Manifest) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for t in &m.tensors {
        *c.entry(t.dtype.clone()).or_insert(0) += 1;
    }
    c
}
