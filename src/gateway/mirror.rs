//! Output agreement: a share of the infer requests stable answers is sent again to the canary,
//! off the caller's path, and the two answers compared; the agreement is a metric the
//! rollout's `outputAgreement` check reads. Every revision is a freshly quantized model, so
//! whether its answers agree is what matters most about it. The comparison is pure.

use serde::Deserialize;
use serde_json::Value;

use super::routes::Table;
use super::split::takes_canary;
use crate::runtime::protocol::split_binary;

/// Mirrors in flight at once per gateway: past it a sampled request is not mirrored, so the
/// comparison never queues work on the canary faster than it answers.
pub const MAX_IN_FLIGHT: usize = 8;

/// Largest answer held to compare (an embedding answer of a batch of 64 is ~200 KB).
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// The canary to mirror a request to, if it is one to mirror: an infer the split sent to
/// stable (not pinned), while a canary with a ready pod is judged on its answers. `next` counts
/// the requests that could be mirrored, so exactly `mirror` percent of them are, spread evenly.
pub fn target<'a>(
    table: &'a Table,
    revision: &str,
    pinned: bool,
    infer: bool,
    next: impl FnOnce() -> u64,
) -> Option<&'a str> {
    let split = &table.split;
    let canary = split.canary.as_deref()?;
    let eligible = split.mirror > 0
        && !pinned
        && infer
        && split.stable.as_deref() == Some(revision)
        && !table.pods(canary).is_empty();
    (eligible && takes_canary(next(), split.mirror)).then_some(canary)
}

/// Why two answers could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum Incomparable {
    #[error("the answer is not OIP JSON: {0}")]
    NotOip(String),
    #[error("the answer has no FP32 output")]
    NoFp32,
}

/// One FP32 output of an OIP answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Deserialize)]
struct Answer {
    outputs: Vec<RawOutput>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    datatype: String,
    #[serde(default)]
    shape: Vec<usize>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Option<Value>,
}

/// The FP32 outputs of an answer body; `json_length` is its
/// `inference-header-content-length` (binary extension: raw values follow the JSON, in the
/// order of the outputs that carry `binary_data_size`).
pub fn outputs(body: &[u8], json_length: Option<usize>) -> Result<Vec<Output>, Incomparable> {
    let (json, mut binary) = split_binary(body, json_length).ok_or_else(|| {
        Incomparable::NotOip(format!(
            "JSON length {} is past the {}-byte body",
            json_length.unwrap_or_default(),
            body.len()
        ))
    })?;
    let answer: Answer =
        serde_json::from_slice(json).map_err(|e| Incomparable::NotOip(e.to_string()))?;
    let mut out = vec![];
    for o in answer.outputs {
        let size = o
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        // Binary parts follow one another whatever their type: take this one's off the front.
        let raw = match size {
            Some(n) if n <= binary.len() => {
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                Some(mine)
            }
            Some(n) => {
                return Err(Incomparable::NotOip(format!(
                    "output {:?} claims {n} binary bytes, {} follow",
                    o.name,
                    binary.len()
                )));
            }
            None => None,
        };
        if o.datatype != "FP32" {
            continue;
        }
        let data = match (raw, &o.data) {
            (Some(raw), _) => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            (None, Some(Value::Array(values))) => {
                let mut flat = Vec::with_capacity(values.len());
                flatten(values, &mut flat).ok_or_else(|| {
                    Incomparable::NotOip(format!("output {:?}: data is not numbers", o.name))
                })?;
                flat
            }
            (None, _) => continue,
        };
        out.push(Output {
            name: o.name,
            shape: o.shape,
            data,
        });
    }
    if out.is_empty() {
        return Err(Incomparable::NoFp32);
    }
    Ok(out)
}

/// Row-major values of flat or nested JSON arrays; None at a non-number.
fn flatten(values: &[Value], out: &mut Vec<f32>) -> Option<()> {
    for v in values {
        match v {
            Value::Array(inner) => flatten(inner, out)?,
            v => out.push(v.as_f64()? as f32),
        }
    }
    Some(())
}

/// How far the canary's outputs agree with stable's, in 0–1 (1: the same): for each output of
/// stable's, the lowest cosine similarity of its rows if it is an embedding (its name says
/// so), else 1 − the largest difference relative to stable's largest magnitude; the lowest over
/// the outputs. An output the canary lacks, or with another shape, agrees 0.
pub fn agreement(stable: &[Output], canary: &[Output]) -> f64 {
    stable
        .iter()
        .map(|s| {
            let Some(c) = canary.iter().find(|c| c.name == s.name) else {
                return 0.0;
            };
            if c.shape != s.shape || c.data.len() != s.data.len() {
                return 0.0;
            }
            if s.name.to_ascii_lowercase().contains("embed") {
                let width = s
                    .shape
                    .last()
                    .copied()
                    .filter(|w| *w > 0)
                    .unwrap_or(s.data.len());
                min_cosine(&s.data, &c.data, width)
            } else {
                1.0 - max_relative_difference(&s.data, &c.data)
            }
        })
        .fold(1.0, f64::min)
        .clamp(0.0, 1.0)
}

/// The lowest cosine similarity of corresponding rows of `width` values.
pub fn min_cosine(a: &[f32], b: &[f32], width: usize) -> f64 {
    a.chunks(width.max(1))
        .zip(b.chunks(width.max(1)))
        .map(|(x, y)| {
            let (mut dot, mut xx, mut yy) = (0.0f64, 0.0f64, 0.0f64);
            for (&p, &q) in x.iter().zip(y) {
                let (p, q) = (f64::from(p), f64::from(q));
                dot += p * q;
                xx += p * p;
                yy += q * q;
            }
            let cosine = match (xx > 0.0, yy > 0.0) {
                (true, true) => dot / (xx.sqrt() * yy.sqrt()),
                (false, false) => 1.0,
                _ => 0.0,
            };
            // A NaN (the canary computed garbage) is no agreement, not a value min skips.
            if cosine.is_nan() { 0.0 } else { cosine }
        })
        .fold(1.0, f64::min)
}

/// max |a − b| / max |b|: 0 when equal, 1 or more when as far apart as b is large.
pub fn max_relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max);
    let mut diff = 0.0f64;
    for (&p, &q) in a.iter().zip(b) {
        let d = (f64::from(p) - f64::from(q)).abs();
        // NaN or infinity on either side (f64::max would skip a NaN): as far apart as can be.
        if !d.is_finite() && p.to_bits() != q.to_bits() {
            return 1.0;
        }
        if d.is_finite() {
            diff = diff.max(d);
        }
    }
    if diff == 0.0 {
        0.0
    } else if scale == 0.0 || !scale.is_finite() {
        1.0
    } else {
        (diff / scale).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::Split;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    #[test]
    fn exactly_the_mirror_share_of_stables_unpinned_infers_is_mirrored() {
        let pods = |revs: &[&str]| -> BTreeMap<String, Vec<(String, SocketAddr)>> {
            revs.iter()
                .map(|r| {
                    let addr = SocketAddr::from(([10, 0, 0, 1], 80));
                    ((*r).to_owned(), vec![(format!("{r}-pod"), addr)])
                })
                .collect()
        };
        let split = Split {
            stable: Some("s".into()),
            canary: Some("c".into()),
            weight: 5,
            mirror: 10,
        };
        let table = Table::default().next(split.clone(), pods(&["s", "c"]));
        let mut n = 0;
        let mut count = || {
            n += 1;
            n - 1
        };
        let mirrored = (0..1_000)
            .filter(|_| target(&table, "s", false, true, &mut count) == Some("c"))
            .count();
        assert_eq!(mirrored, 100);
        // Not the canary's own requests, pinned ones, non-infers, or with no canary pod.
        let never = |t: &Table, rev, pinned, infer| target(t, rev, pinned, infer, || 9).is_none();
        assert!(never(&table, "c", false, true));
        assert!(never(&table, "s", true, true));
        assert!(never(&table, "s", false, false));
        let starting = Table::default().next(split.clone(), pods(&["s"]));
        assert!(never(&starting, "s", false, true));
        let off = Table::default().next(Split { mirror: 0, ..split }, pods(&["s", "c"]));
        assert!(never(&off, "s", false, true));
    }

    fn embedding(rows: &[[f32; 3]]) -> Vec<Output> {
        vec![Output {
            name: "embedding".into(),
            shape: vec![rows.len(), 3],
            data: rows.iter().flatten().copied().collect(),
        }]
    }

    #[test]
    fn reads_json_and_binary_answers_alike() {
        let body = serde_json::to_vec(&json!({"model_name": "m", "outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]},
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}))
        .unwrap();
        let json = outputs(&body, None).unwrap();
        assert_eq!(json.len(), 1, "BYTES outputs are not compared");
        assert_eq!(json[0].data, [1.0, 2.0, 3.0, 4.0]);
        // The binary extension: the JSON, then the values.
        let mut binary = serde_json::to_vec(&json!({"outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [2, 2],
             "parameters": {"binary_data_size": 16}}]}))
        .unwrap();
        let length = binary.len();
        for v in [1.0f32, 2.0, 3.0, 4.0] {
            binary.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(outputs(&binary, Some(length)).unwrap(), json);
        // Nested data is row-major.
        let nested = serde_json::to_vec(&json!({"outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}))
        .unwrap();
        assert_eq!(outputs(&nested, None).unwrap(), json);
    }

    #[test]
    fn what_is_not_an_fp32_answer_is_said_so() {
        assert!(matches!(
            outputs(b"<html>", None),
            Err(Incomparable::NotOip(_))
        ));
        let bytes_only = serde_json::to_vec(&json!({"outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}))
        .unwrap();
        assert!(matches!(
            outputs(&bytes_only, None),
            Err(Incomparable::NoFp32)
        ));
        assert!(matches!(
            outputs(b"{}", Some(99)),
            Err(Incomparable::NotOip(_))
        ));
    }

    #[test]
    fn embeddings_agree_by_their_worst_row_cosine() {
        let stable = embedding(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
        assert_eq!(agreement(&stable, &stable), 1.0);
        // Scale does not matter to an embedding; direction does.
        let scaled = embedding(&[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]);
        assert!((agreement(&stable, &scaled) - 1.0).abs() < 1e-12);
        // The second row is 45° off: cos = 0.7071, the answer's agreement.
        let off = embedding(&[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]);
        let a = agreement(&stable, &off);
        assert!((a - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{a}");
        // Opposite directions agree 0, not -1; a missing or reshaped output 0.
        let opposite = embedding(&[[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]);
        assert_eq!(agreement(&stable, &opposite), 0.0);
        assert_eq!(agreement(&stable, &embedding(&[[1.0, 0.0, 0.0]])), 0.0);
        assert_eq!(agreement(&stable, &[]), 0.0);
    }

    #[test]
    fn other_outputs_agree_by_their_largest_relative_difference() {
        let out = |data: &[f32]| {
            vec![Output {
                name: "logits".into(),
                shape: vec![1, data.len()],
                data: data.to_vec(),
            }]
        };
        let stable = out(&[10.0, -20.0, 5.0]);
        assert_eq!(agreement(&stable, &stable), 1.0);
        // Off by 0.2 somewhere, against a largest magnitude of 20: 1 %.
        let a = agreement(&stable, &out(&[10.0, -20.0, 5.2]));
        assert!((a - 0.99).abs() < 1e-6, "{a}");
        assert_eq!(agreement(&stable, &out(&[f32::NAN, -20.0, 5.0])), 0.0);
        let nan = embedding(&[[f32::NAN, 0.0, 0.0], [0.0, 1.0, 0.0]]);
        assert_eq!(
            agreement(&embedding(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), &nan),
            0.0
        );
        assert_eq!(max_relative_difference(&[1.0], &[0.0]), 1.0);
        assert_eq!(max_relative_difference(&[0.0], &[0.0]), 0.0);
    }
}
