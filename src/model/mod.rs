//! The networks themselves: forward passes over F32 or quantized weights, shared by the
//! builder (to measure quality) and the runtime (to serve).
//!
//! Weights are addressed by their GGUF (llama.cpp) names, whatever the source called them, so
//! the model built from safetensors and the model loaded from an artifact are the same code.

pub mod attention;
pub mod bert;
pub mod cores;
pub mod mlp;
pub mod q8;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

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

/// One stored weight: quantized (or F16) blocks as candle holds them, or an F32 tensor read
/// straight into its working form (an F32 `QTensor` would be copied again to multiply).
#[derive(Clone)]
pub enum Weight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Quantized(q) => q.shape().dims(),
            Self::Dense(t) => t.dims(),
        }
    }

    pub fn dtype(&self) -> GgmlDType {
        match self {
            Self::Quantized(q) => q.dtype(),
            Self::Dense(_) => GgmlDType::F32,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// The weight as an F32 tensor (dequantized if needed).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.dequantize(&Device::Cpu)?,
            Self::Dense(t) => t.clone(),
        })
    }

    /// The weight as candle's matrix multiply (and embedding lookup).
    pub fn matmul(&self) -> Result<QMatMul> {
        Ok(match self {
            Self::Quantized(q) => QMatMul::from_arc(q.clone())?,
            Self::Dense(t) => QMatMul::Tensor(t.clone()),
        })
    }
}

/// Named weights, each F32, F16 or quantized.
#[derive(Clone, Default)]
pub struct Weights {
    tensors: HashMap<String, Weight>,
}

impl Weights {
    pub fn insert(&mut self, name: impl Into<String>, tensor: Arc<QTensor>) {
        self.tensors.insert(name.into(), Weight::Quantized(tensor));
    }

    pub fn insert_dense(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), Weight::Dense(tensor));
    }

    pub fn get(&self, name: &str) -> Result<&Weight> {
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
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let w = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        check_shape(name, w.dims(), shape)?;
        Ok(w)
    }

    /// Takes the weight as an F32 tensor (dequantized if needed).
    pub fn take_dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take(name, shape)?.dense()
    }

    /// Takes the weight as a matrix multiply: quantized kernels for quantized weights.
    pub fn take_matmul(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        self.take(name, shape)?.matmul()
    }

    /// Total bytes of all weights as stored.
    pub fn size_in_bytes(&self) -> usize {
        self.tensors.values().map(Weight::size_in_bytes).sum()
    }

    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        self.tensors.get(name).map(Weight::dtype)
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
    weight: Product,
    bias: Option<Tensor>,
}

/// How a layer multiplies: Kasmina's int8 kernel for Q8_0 weights (see [`q8`]), candle's
/// matmul for every other dtype.
#[derive(Clone)]
enum Product {
    Q8(Arc<q8::Q8Matrix>),
    Candle(QMatMul),
}

impl Product {
    fn new(weight: Weight) -> Result<Self> {
        if let Weight::Quantized(q) = &weight
            && let Some(matrix) = q8::Q8Matrix::from_qtensor(q)?
        {
            return Ok(Self::Q8(Arc::new(matrix)));
        }
        Ok(Self::Candle(weight.matmul()?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Q8(matrix) => q8::apply(matrix, x)?,
            Self::Candle(matmul) => x.apply(matmul)?,
        })
    }
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
            weight: Product::new(weights.take(&format!("{prefix}.weight"), &[out_dim, in_dim])?)?,
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
            weight: Product::new(Weight::Quantized(weight))?,
            bias: self.bias.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
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

    /// One pass over each row (candle's ops took nine, each allocating a tensor).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op3_no_bwd(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            &Normalize { eps: self.eps },
        )?)
    }

    /// The same in candle's ops: what `forward` is tested against.
    #[cfg(test)]
    fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(candle_core::D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// The values of a contiguous f32 input of a custom op.
fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: inputs must be f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    Ok(&data[start..end])
}

struct Normalize {
    eps: f64,
}

impl candle_core::CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "kasmina-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let name = self.name();
        let (x, weight, bias) = (
            contiguous_f32(s1, l1, name)?,
            contiguous_f32(s2, l2, name)?,
            contiguous_f32(s3, l3, name)?,
        );
        let n = weight.len();
        if n == 0 || bias.len() != n || l1.dims().last() != Some(&n) {
            candle_core::bail!("{}: weight, bias and rows must have one width", self.name());
        }
        let eps = self.eps as f32;
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let mean = row.iter().sum::<f32>() / n as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (v - mean) * inv * w + b;
            }
        }
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU with the exact (erf) form BERT was trained with, `x · (1 + erf(x / √2)) / 2`.
///
/// candle's `gelu_erf` calls libm's scalar `erff` (and through it `expf`) per value: 17 % of an
/// all-MiniLM forward pass once the matrix multiplies were fast. This rational approximation
/// (Eigen's; GELU within 2e-6 of the libm form) has no calls or branches, so the loop vectorizes.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&GeluErf)?)
}

struct GeluErf;

impl candle_core::CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "kasmina-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let out = contiguous_f32(storage, layout, self.name())?
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// erf(x) as `x · P(x²) / Q(x²)` on [-4, 4] (erf(±4) is ±1 in f32). Plain multiply-adds:
/// `mul_add` would be a libm call on a CPU baseline without FMA.
#[inline]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 + -2.101_024e-6;
    let p = p * x2 + -5.692_506_4e-5;
    let p = p * x2 + -7.349_906_3e-4;
    let p = p * x2 + -2.954_600_1e-3;
    let p = p * x2 + -1.609_603_3e-2;
    let q = -1.456_607_2e-5_f32;
    let q = q * x2 + -2.133_740_6e-4;
    let q = q * x2 + -1.682_827e-3;
    let q = q * x2 + -7.373_329_3e-3;
    let q = q * x2 + -1.426_474e-2;
    x * p / q
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_in_one_pass_equals_candles_ops() {
        let (rows, n) = (7, 384);
        let values = |k: usize, scale: f32| -> Vec<f32> {
            (0..k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
                .collect()
        };
        let norm = LayerNorm {
            weight: Tensor::from_vec(values(n, 0.02), n, &Device::Cpu).unwrap(),
            bias: Tensor::from_vec(values(n, 0.01), n, &Device::Cpu).unwrap(),
            eps: 1e-12,
        };
        let x = Tensor::from_vec(values(rows * n, 0.3), (rows, n), &Device::Cpu).unwrap();
        // A transposed view is read in order too.
        for x in [x.clone(), x.t().unwrap().contiguous().unwrap().t().unwrap()] {
            let ours = norm.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let theirs = norm.reference(&x).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        let narrow = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(
            norm.forward(&narrow).is_err(),
            "rows narrower than the weight"
        );
    }

    #[test]
    fn gelu_matches_candles_exact_form_everywhere() {
        let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 / 1000.0).collect();
        let t = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        let ours: Vec<f32> = gelu_erf(&t).unwrap().to_vec1().unwrap();
        let candle: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
        let worst = ours
            .iter()
            .zip(&candle)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 2e-6, "worst relative error {worst}");
        // A strided view is read in order.
        let m =
            Tensor::from_vec(vec![-2f32, -0.5, 0.0, 0.25, 1.0, 3.0], (2, 3), &Device::Cpu).unwrap();
        let ours = gelu_erf(&m.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let candle = m.gelu_erf().unwrap().t().unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in ours.iter().flatten().zip(candle.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
