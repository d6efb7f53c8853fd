//! Multi-layer perceptrons for tabular data: Linear layers with an activation between them.
//! GGUF names: `mlp.{i}.weight` (`[out, in]`) and `mlp.{i}.bias`.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Error, Linear, Result, Weights};

/// Activations between layers (none after the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            "tanh" => Ok(Self::Tanh),
            "sigmoid" => Ok(Self::Sigmoid),
            other => Err(Error::Config(format!(
                "unsupported activation {other:?}; use relu, gelu, tanh or sigmoid"
            ))),
        }
    }
}

/// The shape of an MLP: layer widths from input to output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// `[input, hidden…, output]`.
    pub widths: Vec<usize>,
    pub activation: Activation,
}

#[derive(Clone)]
pub struct Mlp {
    config: MlpConfig,
    layers: Vec<Linear>,
}

impl Mlp {
    /// Assembles the model, consuming `weights` (pass a clone to keep them).
    pub fn new(config: MlpConfig, mut weights: Weights) -> Result<Self> {
        if config.widths.len() < 2 {
            return Err(Error::Config("an MLP needs at least one layer".into()));
        }
        let layers = config
            .widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::load(&mut weights, &format!("mlp.{i}"), w[1], w[0]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config, layers })
    }

    /// The same model with the weight of `mlp.{i}.weight` replaced.
    pub fn with_weight(
        &self,
        name: &str,
        weight: std::sync::Arc<candle_core::quantized::QTensor>,
    ) -> Result<Self> {
        let i: usize = name
            .strip_prefix("mlp.")
            .and_then(|r| r.strip_suffix(".weight"))
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        let mut next = self.clone();
        let layer = next
            .layers
            .get_mut(i)
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        *layer = layer.with_weight(weight)?;
        Ok(next)
    }

    pub fn input_size(&self) -> usize {
        self.config.widths[0]
    }

    pub fn output_size(&self) -> usize {
        self.config.widths[self.config.widths.len() - 1]
    }

    /// Rows of `input_size` features in, rows of `output_size` values out.
    pub fn forward(&self, rows: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let n = self.input_size();
        if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != n) {
            return Err(Error::Input(format!(
                "row {i} has {} features, the model takes {n}",
                row.len()
            )));
        }
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let mut x = Tensor::from_vec(flat, (rows.len(), n), &Device::Cpu)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i < last {
                x = match self.config.activation {
                    Activation::Relu => x.relu()?,
                    Activation::Gelu => super::gelu_erf(&x)?,
                    Activation::Tanh => x.tanh()?,
                    Activation::Sigmoid => (x.neg()?.exp()? + 1.0)?.recip()?,
                };
            }
        }
        Ok(x.to_dtype(DType::F32)?.to_vec2()?)
    }
}
