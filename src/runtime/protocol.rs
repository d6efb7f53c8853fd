//! Open Inference Protocol v2 messages (the KServe/Triton/Seldon REST protocol): parsing and
//! validating an infer request against what the model takes, and writing the response —
//! in JSON, or with Triton's binary tensor data extension, which `tritonclient` uses by
//! default. Pure: no I/O here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The HTTP header carrying the JSON part's length in a binary-extension body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// What a served model takes and gives.
#[derive(Clone, Debug, PartialEq)]
pub enum Signature {
    /// Sentences in (`BYTES`, shape `[n]` or `[n, 1]`), one embedding each out.
    Text {
        input: String,
        output: String,
        dimension: usize,
    },
    /// Rows of features in (`FP32`, shape `[n, width]`), one output row each.
    Tensor {
        input: String,
        output: String,
        input_width: usize,
        output_width: usize,
    },
}

impl Signature {
    pub fn input_name(&self) -> &str {
        match self {
            Signature::Text { input, .. } | Signature::Tensor { input, .. } => input,
        }
    }

    pub fn output_name(&self) -> &str {
        match self {
            Signature::Text { output, .. } | Signature::Tensor { output, .. } => output,
        }
    }

    pub fn output_width(&self) -> usize {
        match self {
            Signature::Text { dimension, .. } => *dimension,
            Signature::Tensor { output_width, .. } => *output_width,
        }
    }

    /// Inputs and outputs as the model metadata route lists them.
    pub fn metadata(&self) -> (Value, Value) {
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| serde_json::json!([{ "name": name, "datatype": datatype, "shape": shape }]);
        match self {
            Signature::Text {
                input,
                output,
                dimension,
            } => (
                tensor(input, "BYTES", vec![-1]),
                tensor(output, "FP32", vec![-1, *dimension as i64]),
            ),
            Signature::Tensor {
                input,
                output,
                input_width,
                output_width,
            } => (
                tensor(input, "FP32", vec![-1, *input_width as i64]),
                tensor(output, "FP32", vec![-1, *output_width as i64]),
            ),
        }
    }
}

/// One request's inputs, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Items {
    Texts(Vec<String>),
    Rows(Vec<Vec<f32>>),
}

impl Items {
    pub fn len(&self) -> usize {
        match self {
            Items::Texts(t) => t.len(),
            Items::Rows(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub data: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

/// A decoded request: its inputs and how the caller wants the answer.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub id: Option<String>,
    pub items: Items,
    /// The output as raw little-endian FP32 after the JSON (binary extension).
    pub binary_output: bool,
}

/// Why a request was refused, with the HTTP status it maps to.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The body is not a well-formed request (400).
    #[error("{0}")]
    Malformed(String),
    /// Well-formed, but not what the model takes (422).
    #[error("{0}")]
    Invalid(String),
}

fn param_bool(params: &Option<Map<String, Value>>, key: &str) -> bool {
    params
        .as_ref()
        .and_then(|p| p.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn param_usize(params: &Option<Map<String, Value>>, key: &str) -> Option<usize> {
    params
        .as_ref()
        .and_then(|p| p.get(key))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
}

/// A body of the binary extension as (JSON, tensor bytes after it), `json_length` being its
/// `Inference-Header-Content-Length` (all JSON without one); None if it is past the body.
pub fn split_binary(body: &[u8], json_length: Option<usize>) -> Option<(&[u8], &[u8])> {
    match json_length {
        Some(n) if n <= body.len() => Some(body.split_at(n)),
        Some(_) => None,
        None => Some((body, &[][..])),
    }
}

/// Parses a request body. With the binary extension, `json_length` is the value of the
/// `Inference-Header-Content-Length` header and the tensor bytes follow the JSON.
pub fn decode(
    body: &[u8],
    json_length: Option<usize>,
    signature: &Signature,
) -> Result<Decoded, ProtocolError> {
    let (json, mut binary) = split_binary(body, json_length).ok_or_else(|| {
        ProtocolError::Malformed(format!(
            "Inference-Header-Content-Length is {} but the body has {} bytes",
            json_length.unwrap_or_default(),
            body.len()
        ))
    })?;
    let de = &mut serde_json::Deserializer::from_slice(json);
    let request: InferRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ProtocolError::Malformed(format!("invalid JSON request: {inner}"))
        } else {
            ProtocolError::Malformed(format!("invalid JSON request at {path}: {inner}"))
        }
    })?;

    if request.inputs.len() != 1 {
        return Err(ProtocolError::Invalid(format!(
            "expected exactly one input named {:?}, got {}",
            signature.input_name(),
            request.inputs.len()
        )));
    }
    let input = &request.inputs[0];
    if input.name != signature.input_name() {
        return Err(ProtocolError::Invalid(format!(
            "unknown input {:?}; the model's input is {:?}",
            input.name,
            signature.input_name()
        )));
    }
    if let Some(outputs) = &request.outputs
        && let Some(unknown) = outputs.iter().find(|o| o.name != signature.output_name())
    {
        return Err(ProtocolError::Invalid(format!(
            "unknown output {:?}; the model's output is {:?}",
            unknown.name,
            signature.output_name()
        )));
    }
    if input.shape.iter().any(|d| *d < 0) {
        return Err(ProtocolError::Invalid(format!(
            "input {:?}: shape {:?} has a negative dimension",
            input.name, input.shape
        )));
    }
    let shape: Vec<usize> = input.shape.iter().map(|d| *d as usize).collect();
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| {
            ProtocolError::Invalid(format!("input {:?}: shape is too large", input.name))
        })?;

    let binary_size = param_usize(&input.parameters, "binary_data_size");
    let raw = match binary_size {
        Some(size) => {
            if size > binary.len() {
                return Err(ProtocolError::Malformed(format!(
                    "input {:?}: binary_data_size is {size} but only {} bytes follow the JSON",
                    input.name,
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            binary = rest;
            Some(mine)
        }
        None => None,
    };
    if !binary.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} bytes after the JSON are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    if raw.is_some() && input.data.is_some() {
        return Err(ProtocolError::Malformed(format!(
            "input {:?} has both data and binary_data_size",
            input.name
        )));
    }

    let items = match signature {
        Signature::Text { .. } => {
            expect_datatype(input, "BYTES")?;
            match shape.as_slice() {
                [_] | [_, 1] => {}
                _ => {
                    return Err(ProtocolError::Invalid(format!(
                        "input {:?}: shape {:?}; expected [n] or [n, 1] sentences",
                        input.name, input.shape
                    )));
                }
            }
            let texts = match raw {
                Some(raw) => bytes_elements(raw, &input.name)?,
                None => json_strings(input)?,
            };
            check_count(&input.name, texts.len(), elements)?;
            Items::Texts(texts)
        }
        Signature::Tensor { input_width, .. } => {
            expect_datatype(input, "FP32")?;
            match shape.as_slice() {
                [_, w] if w == input_width => {}
                _ => {
                    return Err(ProtocolError::Invalid(format!(
                        "input {:?}: shape {:?}; expected [n, {input_width}]",
                        input.name, input.shape
                    )));
                }
            }
            let values = match raw {
                Some(raw) => {
                    if raw.len() % 4 != 0 {
                        return Err(ProtocolError::Malformed(format!(
                            "input {:?}: {} binary bytes are not whole FP32 values",
                            input.name,
                            raw.len()
                        )));
                    }
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                }
                None => json_numbers(input)?,
            };
            check_count(&input.name, values.len(), elements)?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(ProtocolError::Invalid(format!(
                    "input {:?}: element {i} is not a finite number",
                    input.name
                )));
            }
            Items::Rows(values.chunks(*input_width).map(<[f32]>::to_vec).collect())
        }
    };
    let binary_output = param_bool(&request.parameters, "binary_data_output")
        || request
            .outputs
            .iter()
            .flatten()
            .any(|o| param_bool(&o.parameters, "binary_data"));
    Ok(Decoded {
        id: request.id,
        items,
        binary_output,
    })
}

fn expect_datatype(input: &RequestInput, datatype: &str) -> Result<(), ProtocolError> {
    if input.datatype == datatype {
        Ok(())
    } else {
        Err(ProtocolError::Invalid(format!(
            "input {:?}: datatype {}; the model takes {datatype}",
            input.name, input.datatype
        )))
    }
}

fn check_count(name: &str, found: usize, expected: usize) -> Result<(), ProtocolError> {
    if found == expected {
        Ok(())
    } else {
        Err(ProtocolError::Invalid(format!(
            "input {name:?}: {found} elements in data, the shape says {expected}"
        )))
    }
}

/// Flattens (possibly nested, row-major) JSON arrays.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

fn json_data(input: &RequestInput) -> Result<Vec<&Value>, ProtocolError> {
    let data = input.data.as_ref().ok_or_else(|| {
        ProtocolError::Malformed(format!(
            "input {:?} has neither data nor binary_data_size",
            input.name
        ))
    })?;
    let mut out = vec![];
    flatten(data, &mut out);
    Ok(out)
}

fn json_strings(input: &RequestInput) -> Result<Vec<String>, ProtocolError> {
    json_data(input)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_owned).ok_or_else(|| {
                ProtocolError::Invalid(format!(
                    "input {:?}: element {i} is {v}, not a string (datatype BYTES)",
                    input.name
                ))
            })
        })
        .collect()
}

fn json_numbers(input: &RequestInput) -> Result<Vec<f32>, ProtocolError> {
    json_data(input)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_f64().map(|x| x as f32).ok_or_else(|| {
                ProtocolError::Invalid(format!(
                    "input {:?}: element {i} is {v}, not a number (datatype FP32)",
                    input.name
                ))
            })
        })
        .collect()
}

/// BYTES elements in the binary extension: each a 4-byte little-endian length, then bytes.
fn bytes_elements(mut raw: &[u8], name: &str) -> Result<Vec<String>, ProtocolError> {
    let mut out = vec![];
    while !raw.is_empty() {
        let bad = || ProtocolError::Malformed(format!("input {name:?}: truncated BYTES element"));
        let len_bytes: [u8; 4] = raw
            .get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let bytes = raw.get(4..4 + len).ok_or_else(bad)?;
        let text = std::str::from_utf8(bytes).map_err(|_| {
            ProtocolError::Invalid(format!(
                "input {name:?}: element {} is not UTF-8 text",
                out.len()
            ))
        })?;
        out.push(text.to_owned());
        raw = &raw[4 + len..];
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: [usize; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

#[derive(Debug, Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: [ResponseOutput<'a>; 1],
}

/// An encoded response body, and with the binary extension the JSON part's length.
pub struct Encoded {
    pub body: Vec<u8>,
    pub json_length: Option<usize>,
}

/// Writes the response: one output row per input item.
pub fn encode(
    model: &str,
    version: &str,
    id: Option<&str>,
    signature: &Signature,
    rows: &[Vec<f32>],
    binary: bool,
) -> Encoded {
    let width = signature.output_width();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    // Binary: the values follow the JSON as little-endian FP32; JSON: they go in `data`.
    let (data, raw) = if binary {
        let raw: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
        (None, Some(raw))
    } else {
        (Some(flat), None)
    };
    let output = ResponseOutput {
        name: signature.output_name(),
        datatype: "FP32",
        shape: [rows.len(), width],
        data,
        parameters: raw
            .as_ref()
            .map(|raw| serde_json::json!({ "binary_data_size": raw.len() })),
    };
    let response = InferResponse {
        model_name: model,
        model_version: version,
        id,
        outputs: [output],
    };
    // Serializing plain structs of strings and finite floats cannot fail.
    let mut body = serde_json::to_vec(&response).unwrap_or_default();
    let json_length = raw.map(|raw| {
        let json_length = body.len();
        body.extend_from_slice(&raw);
        json_length
    });
    Encoded { body, json_length }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text() -> Signature {
        Signature::Text {
            input: "text".into(),
            output: "embedding".into(),
            dimension: 3,
        }
    }

    fn tensor() -> Signature {
        Signature::Tensor {
            input: "input".into(),
            output: "output".into(),
            input_width: 2,
            output_width: 1,
        }
    }

    fn decode_json(v: Value, s: &Signature) -> Result<Decoded, ProtocolError> {
        decode(&serde_json::to_vec(&v).unwrap(), None, s)
    }

    #[test]
    fn text_requests_decode_in_both_shapes() {
        for shape in [json!([2]), json!([2, 1])] {
            let d = decode_json(
                json!({"id": "a", "inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": ["x", "y"]}]}),
                &text(),
            )
            .unwrap();
            assert_eq!(d.items, Items::Texts(vec!["x".into(), "y".into()]));
            assert_eq!(d.id.as_deref(), Some("a"));
            assert!(!d.binary_output);
        }
        // Nested data in row-major order is accepted too.
        let d = decode_json(
            json!({"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["x"], ["y"]]}]}),
            &text(),
        )
        .unwrap();
        assert_eq!(d.items.len(), 2);
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let cases: Vec<(Value, Signature, bool, &str)> = vec![
            (json!({"inputs": 3}), text(), true, "inputs"),
            (json!({}), text(), true, "missing field `inputs`"),
            (
                json!({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
                text(),
                false,
                "datatype FP32; the model takes BYTES",
            ),
            (
                json!({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}),
                text(),
                false,
                "expected [n] or [n, 1]",
            ),
            (
                json!({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}),
                text(),
                false,
                "1 elements in data, the shape says 3",
            ),
            (
                json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}]}),
                text(),
                false,
                "not a string",
            ),
            (
                json!({"inputs": [{"name": "words", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}),
                text(),
                false,
                "unknown input \"words\"",
            ),
            (
                json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "outputs": [{"name": "logits"}]}),
                text(),
                false,
                "unknown output \"logits\"",
            ),
            (
                json!({"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]}),
                text(),
                false,
                "negative dimension",
            ),
            (
                json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}),
                text(),
                true,
                "neither data nor binary_data_size",
            ),
            (
                json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}),
                tensor(),
                false,
                "expected [n, 2]",
            ),
            (
                json!({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, "x"]}]}),
                tensor(),
                false,
                "element 1 is \"x\", not a number",
            ),
            (json!({"inputs": []}), tensor(), false, "exactly one input"),
        ];
        for (body, signature, malformed, needle) in cases {
            let err = decode_json(body.clone(), &signature).unwrap_err();
            assert_eq!(
                matches!(err, ProtocolError::Malformed(_)),
                malformed,
                "{body}: {err}"
            );
            assert!(err.to_string().contains(needle), "{body}: {err}");
        }
        let err = decode(b"{not json", None, &text()).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    }

    #[test]
    fn tensor_rows_decode_and_encode() {
        let d = decode_json(
            json!({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]}]}),
            &tensor(),
        )
        .unwrap();
        assert_eq!(d.items, Items::Rows(vec![vec![1.0, 2.0], vec![3.0, 4.5]]));
        let e = encode(
            "m",
            "1",
            Some("q"),
            &tensor(),
            &[vec![0.5], vec![1.5]],
            false,
        );
        assert!(e.json_length.is_none());
        let v: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(
            v,
            json!({"model_name": "m", "model_version": "1", "id": "q", "outputs": [
                {"name": "output", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 1.5]}]})
        );
    }

    #[test]
    fn binary_extension_round_trips() {
        let header = serde_json::to_vec(&json!({
            "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": 14}}],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": true}}]
        }))
        .unwrap();
        let mut body = header.clone();
        for s in ["hello", "é"] {
            body.extend_from_slice(&(s.len() as u32).to_le_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        assert_eq!(body.len() - header.len(), 15);
        let wrong = decode(&body, Some(header.len()), &text());
        // 14 declared, 15 present: the extra byte is refused.
        assert!(wrong.is_err());
        let fixed = String::from_utf8(header.clone())
            .unwrap()
            .replace("14", "15");
        let mut body2 = fixed.clone().into_bytes();
        body2.extend_from_slice(&body[header.len()..]);
        let d = decode(&body2, Some(fixed.len()), &text()).unwrap();
        assert_eq!(d.items, Items::Texts(vec!["hello".into(), "é".into()]));
        assert!(d.binary_output);

        let e = encode("m", "1", None, &text(), &[vec![1.0, 2.0, 3.0]], true);
        let n = e.json_length.unwrap();
        let v: Value = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 12);
        assert_eq!(&e.body[n..n + 4], &1.0f32.to_le_bytes());
        assert_eq!(e.body.len(), n + 12);

        // A length header beyond the body is malformed, not a panic.
        assert!(decode(b"{}", Some(10), &text()).is_err());
        // Truncated BYTES elements are malformed.
        let mut short = fixed.into_bytes();
        short.extend_from_slice(&[20, 0, 0, 0, b'x']);
        short.extend_from_slice(&[0; 10]);
        assert!(decode(&short, Some(short.len() - 15), &text()).is_err());
    }
}
