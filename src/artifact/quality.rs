//! How much an optimized model differs from its source: end to end on fixed inputs.

use serde::{Deserialize, Serialize};

use crate::model::bert::Bert;
use crate::model::mlp::Mlp;
use crate::model::{Result, cosine};

/// The fixed sentence set for BERT quality, edge cases included: empty, one character,
/// long (past the 256-token truncation), non-English, numbers, punctuation.
pub fn sentences() -> Vec<String> {
    let mut s: Vec<String> = [
        "",
        "a",
        "The quick brown fox jumps over the lazy dog.",
        "Kubernetes schedules containers onto nodes in a cluster.",
        "I loved this movie, the acting was wonderful!",
        "This was the worst service I have ever experienced.",
        "How do I reset my password?",
        "The patient reported mild chest pain after exercise.",
        "Students must submit their assignments before Friday.",
        "Quantization reduces model size with little loss of accuracy.",
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "El aprendizaje automático transforma la industria.",
        "機械学習はデータからパターンを学びます。",
        "Машинное обучение меняет мир.",
        "3.14159 26535 89793 — π to fifteen digits",
        "?!... ;-) #hashtag @mention https://example.org/path?q=1",
        "UPPERCASE WORDS AND lowercase words",
        "edge",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    s.push("long input ".repeat(200));
    s.push("The model runs on small devices at the edge of the network. ".repeat(12));
    s
}

/// The inputs the planner measures per-tensor sensitivity on: a few ordinary sentences of
/// the set (short, so the measurement stays cheap).
pub fn calibration_sentences() -> Vec<String> {
    sentences().into_iter().skip(2).take(8).collect()
}

/// End-to-end agreement of an optimized model with its source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QualityReport {
    /// What was compared.
    pub metric: String,
    /// Inputs compared.
    pub samples: usize,
    /// Worst cosine similarity between source and optimized outputs.
    pub min_cosine: f64,
    pub mean_cosine: f64,
    /// Worst relative error ‖y − ŷ‖ / ‖y‖ (MLP; 1 − min cosine reported for BERT too).
    pub max_relative_error: f64,
    /// The loss the build limit applies to: 1 − min cosine.
    pub loss: f64,
}

fn report(metric: &str, reference: &[Vec<f32>], candidate: &[Vec<f32>]) -> QualityReport {
    let cosines: Vec<f64> = reference
        .iter()
        .zip(candidate)
        .map(|(a, b)| cosine(a, b))
        .collect();
    let rel: Vec<f64> = reference
        .iter()
        .zip(candidate)
        .map(|(a, b)| {
            let diff: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            if norm == 0.0 { diff } else { diff / norm }
        })
        .collect();
    let min = cosines.iter().copied().fold(1.0, f64::min);
    QualityReport {
        metric: metric.into(),
        samples: cosines.len(),
        min_cosine: min,
        mean_cosine: cosines.iter().sum::<f64>() / cosines.len().max(1) as f64,
        max_relative_error: rel.iter().copied().fold(0.0, f64::max),
        loss: (1.0 - min).max(0.0),
    }
}

/// Embeds the sentence set with `model`.
pub fn bert_outputs(model: &Bert) -> Result<Vec<Vec<f32>>> {
    let sentences = sentences();
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    // Small batches keep the activations of the long sentences in check.
    let mut out = vec![];
    for batch in refs.chunks(4) {
        out.extend(model.embed(batch)?);
    }
    Ok(out)
}

pub fn bert_report(reference: &[Vec<f32>], candidate: &Bert) -> Result<QualityReport> {
    Ok(report(
        "sentence embedding cosine vs source",
        reference,
        &bert_outputs(candidate)?,
    ))
}

/// Seeded inputs for an MLP (xorshift, so every build compares the same rows).
pub fn mlp_inputs(input_size: usize, rows: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed.max(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..rows)
        .map(|_| (0..input_size).map(|_| next()).collect())
        .collect()
}

pub fn mlp_outputs(model: &Mlp) -> Result<Vec<Vec<f32>>> {
    model.forward(&mlp_inputs(model.input_size(), 64, 0x006b_6173_6d69_6e61))
}

pub fn mlp_report(reference: &[Vec<f32>], candidate: &Mlp) -> Result<QualityReport> {
    Ok(report(
        "output cosine vs source on 64 seeded inputs",
        reference,
        &mlp_outputs(candidate)?,
    ))
}
