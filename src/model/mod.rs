//! The networks themselves: forward passes over F32 or quantized weights, shared by the
//! builder (to measure quality) and the runtime (to serve).
//!
//! Weights are addressed by their GGUF (llama.cpp) names, whatever the source called them, so
//! the model built from safetensors and the model loaded from an artifact are the same code.

pub mod bert;
pub mod mlp;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, Device, Tensor};

/// Errors of the forward passes and of assembling a model from weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("weight {0} is missing")]
    MissingWeight(String),
    #[error("weight {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Named weights, each F32, F16 or quantized.
#[derive(Clone, Default)]
pub struct Weights {
    tensors: HashMap<String, Arc<QTensor>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Arc<QTensor>>) -> Self {
        Self { tensors }
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Arc<QTensor>) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Result<&Arc<QTensor>> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingWeight(name.into()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Removes a weight, checked against `shape`. Taking (not borrowing) lets a model being
    /// assembled free each stored tensor as soon as its working form exists, so loading
    /// never holds two copies of every weight.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Arc<QTensor>> {
        let q = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        check_shape(name, q.shape().dims(), shape)?;
        Ok(q)
    }

    /// Takes the weight as an F32 tensor (dequantized if needed).
    pub fn take_dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.take(name, shape)?.dequantize(&Device::Cpu)?)
    }

    /// Takes the weight as a matrix multiply: quantized kernels for quantized weights.
    pub fn take_matmul(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        Ok(QMatMul::from_arc(self.take(name, shape)?)?)
    }

    /// Total bytes of all weights as stored.
    pub fn size_in_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.storage_size_in_bytes())
            .sum()
    }

    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        self.tensors.get(name).map(|t| t.dtype())
    }
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

/// A dense layer `y = x Wᵀ + b`.
#[derive(Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    /// `{prefix}.weight` of shape `[out, in]` and `{prefix}.bias` of shape `[out]` if present.
    pub fn load(
        weights: &mut Weights,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self> {
        let bias_name = format!("{prefix}.bias");
        Ok(Self {
            weight: weights.take_matmul(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: if weights.contains(&bias_name) {
                Some(weights.take_dense(&bias_name, &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// The same layer with another weight (same shape), e.g. a quantized trial.
    pub fn with_weight(&self, weight: Arc<QTensor>) -> Result<Self> {
        Ok(Self {
            weight: QMatMul::from_arc(weight)?,
            bias: self.bias.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.apply(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Layer normalisation over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(weights: &mut Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weights.take_dense(&format!("{prefix}.weight"), &[dim])?,
            bias: weights.take_dense(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last dimension, stable against large logits.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return if na == nb { 1.0 } else { 0.0 };
    }
    dot / (na.sqrt() * nb.sqrt())
}
