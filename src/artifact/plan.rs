//! Pure: from the device profile or an explicit scheme, the dtype of every tensor.
//!
//! Norms, biases and small tensors stay F32. Matrices are quantized; where a K-quant cannot
//! apply because a row is not a multiple of 256 (all-MiniLM's 384 columns), the tensor falls
//! back as llama.cpp's quantizer does (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0). `auto` fits the
//! memory budget with the least quality loss: starting from F32 it repeatedly downgrades the
//! tensor whose measured error grows least per byte saved, until the weights fit.

use candle_core::quantized::GgmlDType;

use crate::api::edge_deployment::Quantization;

/// Share of device memory kept free (page cache, the OS, spikes).
pub const HEADROOM: f64 = 0.20;
/// Memory the runtime needs besides the weights: binary, tokenizer, HTTP, batch activations.
pub const RUNTIME_OVERHEAD_MIB: f64 = 48.0;
/// Tensors with fewer elements than this stay F32: they cost nothing and carry the scales.
pub const SMALL_TENSOR: usize = 4096;

/// What a tensor is, for the planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A weight matrix of a linear layer: quantized, prunable.
    Matrix,
    /// An embedding table: quantized, never pruned.
    Embedding,
    /// Norms, biases, small tables: kept F32.
    Keep,
}

/// A tensor to plan, by its GGUF name.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions outermost first; the last is the row length.
    pub shape: Vec<usize>,
    pub role: Role,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Rows of `row_len`: a 1-D tensor is one row.
    pub fn rows(&self) -> usize {
        self.elements() / self.row_len().max(1)
    }
}

/// Decides the role of a tensor from its name and shape.
pub fn role(name: &str, shape: &[usize]) -> Role {
    let elements: usize = shape.iter().product();
    if shape.len() != 2 || elements < SMALL_TENSOR {
        Role::Keep
    } else if name.contains("embd") || name.starts_with("token_types") {
        Role::Embedding
    } else {
        Role::Matrix
    }
}

/// Bytes of `elements` stored as `dtype`.
pub fn bytes(dtype: GgmlDType, elements: usize) -> usize {
    elements / dtype.block_size() * dtype.type_size()
}

/// The dtype a row of `row_len` can actually use for `wanted`: K-quants need rows of 256, the
/// others rows of 32; llama.cpp's fallbacks otherwise.
pub fn effective(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    use GgmlDType::*;
    let fallback = match wanted {
        Q2K | Q3K => Q4_0,
        Q4K => Q5_0,
        Q5K => Q5_1,
        Q6K | Q8K => Q8_0,
        other => other,
    };
    let chosen = if row_len.is_multiple_of(wanted.block_size()) {
        wanted
    } else {
        fallback
    };
    if row_len.is_multiple_of(chosen.block_size()) {
        chosen
    } else {
        F16
    }
}

/// The precision ladder `auto` walks down, most precise first.
pub const LADDER: [GgmlDType; 7] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q8_0,
    GgmlDType::Q6K,
    GgmlDType::Q5_0,
    GgmlDType::Q4K,
    GgmlDType::Q4_0,
];

/// The dtypes `auto` may give a tensor: the distinct effective dtypes of the ladder, most
/// precise first (only F32 for tensors kept as they are).
pub fn candidates(t: &TensorInfo) -> Vec<GgmlDType> {
    if t.role == Role::Keep {
        return vec![GgmlDType::F32];
    }
    let mut seen = vec![];
    for d in LADDER {
        let e = effective(d, t.row_len());
        if !seen.contains(&e) {
            seen.push(e);
        }
    }
    seen
}

/// Short lowercase names, as llama.cpp and the manifest write them.
pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    use GgmlDType::*;
    match dtype {
        F32 => "f32",
        F16 => "f16",
        BF16 => "bf16",
        Q4_0 => "q4_0",
        Q4_1 => "q4_1",
        Q5_0 => "q5_0",
        Q5_1 => "q5_1",
        Q8_0 => "q8_0",
        Q8_1 => "q8_1",
        Q2K => "q2_k",
        Q3K => "q3_k",
        Q4K => "q4_k",
        Q5K => "q5_k",
        Q6K => "q6_k",
        Q8K => "q8_k",
    }
}

/// What was asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// Fit `memory_mib` of device memory with the least loss.
    Auto { memory_mib: u32 },
    /// One scheme for every quantizable tensor (`None`: keep F32).
    Fixed(Option<GgmlDType>),
}

impl Request {
    pub fn from_api(q: Quantization, memory_mib: Option<u32>) -> Result<Self, PlanError> {
        Ok(match q {
            Quantization::Auto => Request::Auto {
                memory_mib: memory_mib.ok_or(PlanError::AutoWithoutProfile)?,
            },
            Quantization::Q8_0 => Request::Fixed(Some(GgmlDType::Q8_0)),
            Quantization::Q4_0 => Request::Fixed(Some(GgmlDType::Q4_0)),
            Quantization::Q4K => Request::Fixed(Some(GgmlDType::Q4K)),
            Quantization::F16 => Request::Fixed(Some(GgmlDType::F16)),
            Quantization::None => Request::Fixed(None),
        })
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the model does not fit: it needs ≥ {needed_mib:.1} MiB at Q4_0 ({weights_mib:.1} MiB of weights + \
         {RUNTIME_OVERHEAD_MIB} MiB runtime), the profile allows {allowed_mib:.1} MiB ({memory_mib} MiB − 20% headroom); \
         use a device with more memory"
    )]
    DoesNotFit {
        needed_mib: f64,
        weights_mib: f64,
        allowed_mib: f64,
        memory_mib: u32,
    },
    #[error(
        "quantization auto needs a device profile (--profile memoryMiB=...) or an explicit scheme"
    )]
    AutoWithoutProfile,
}

/// The bytes the weights may take on a device with `memory_mib`.
pub fn weight_budget(memory_mib: u32) -> f64 {
    (f64::from(memory_mib) * (1.0 - HEADROOM) - RUNTIME_OVERHEAD_MIB) * 1024.0 * 1024.0
}

/// The chosen dtype of each tensor, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub dtypes: Vec<GgmlDType>,
    pub total_bytes: usize,
}

/// Plans every tensor. `error(i, dtype)` is the measured loss of storing tensor `i` alone as
/// `dtype` (losses are taken as additive); `auto` uses it to spend bits where the loss is.
pub fn plan(
    tensors: &[TensorInfo],
    request: &Request,
    error: impl Fn(usize, GgmlDType) -> f64,
) -> Result<Plan, PlanError> {
    let dtypes: Vec<GgmlDType> = match request {
        Request::Fixed(scheme) => tensors
            .iter()
            .map(|t| match (t.role, scheme) {
                (Role::Keep, _) | (_, None) => GgmlDType::F32,
                (_, Some(d)) => effective(*d, t.row_len()),
            })
            .collect(),
        Request::Auto { memory_mib } => auto(tensors, *memory_mib, error)?,
    };
    let total_bytes = tensors
        .iter()
        .zip(&dtypes)
        .map(|(t, d)| bytes(*d, t.elements()))
        .sum();
    Ok(Plan {
        dtypes,
        total_bytes,
    })
}

fn auto(
    tensors: &[TensorInfo],
    memory_mib: u32,
    error: impl Fn(usize, GgmlDType) -> f64,
) -> Result<Vec<GgmlDType>, PlanError> {
    let budget = weight_budget(memory_mib);
    // Per tensor, the distinct effective dtypes of the ladder, most precise first.
    let options: Vec<Vec<GgmlDType>> = tensors.iter().map(candidates).collect();
    let size = |levels: &[usize]| -> usize {
        tensors
            .iter()
            .zip(levels)
            .enumerate()
            .map(|(i, (t, l))| bytes(options[i][*l], t.elements()))
            .sum()
    };
    let mut levels = vec![0usize; tensors.len()];
    let floor: Vec<usize> = options.iter().map(|o| o.len() - 1).collect();
    let smallest = size(&floor) as f64;
    if smallest > budget {
        return Err(PlanError::DoesNotFit {
            needed_mib: smallest / 1024.0 / 1024.0 + RUNTIME_OVERHEAD_MIB,
            weights_mib: smallest / 1024.0 / 1024.0,
            allowed_mib: (budget / 1024.0 / 1024.0 + RUNTIME_OVERHEAD_MIB).max(0.0),
            memory_mib,
        });
    }
    while (size(&levels) as f64) > budget {
        // The move that adds the least error per byte saved.
        let best = (0..tensors.len())
            .filter(|&i| levels[i] < floor[i])
            .map(|i| {
                let (now, next) = (options[i][levels[i]], options[i][levels[i] + 1]);
                let saved = (bytes(now, tensors[i].elements()) - bytes(next, tensors[i].elements()))
                    .max(1) as f64;
                let added = (error(i, next) - error(i, now)).max(0.0);
                (i, added / saved)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((i, _)) => levels[i] += 1,
            None => break,
        }
    }
    Ok(levels
        .iter()
        .enumerate()
        .map(|(i, l)| options[i][*l])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlDType::*;

    fn minilm_like() -> Vec<TensorInfo> {
        let t = |name: &str, shape: &[usize]| TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            role: role(name, shape),
        };
        let mut v = vec![
            t("token_embd.weight", &[30522, 384]),
            t("position_embd.weight", &[512, 384]),
            t("token_types.weight", &[2, 384]),
            t("token_embd_norm.weight", &[384]),
        ];
        for i in 0..6 {
            v.push(t(&format!("blk.{i}.attn_q.weight"), &[384, 384]));
            v.push(t(&format!("blk.{i}.attn_q.bias"), &[384]));
            v.push(t(&format!("blk.{i}.ffn_up.weight"), &[1536, 384]));
            v.push(t(&format!("blk.{i}.ffn_down.weight"), &[384, 1536]));
        }
        v
    }

    #[test]
    fn roles_keep_small_and_one_dimensional_tensors() {
        assert_eq!(role("token_types.weight", &[2, 384]), Role::Keep);
        assert_eq!(role("blk.0.attn_q.bias", &[384]), Role::Keep);
        assert_eq!(role("token_embd.weight", &[30522, 384]), Role::Embedding);
        assert_eq!(role("blk.0.ffn_up.weight", &[1536, 384]), Role::Matrix);
    }

    #[test]
    fn k_quants_fall_back_like_llama_cpp() {
        assert_eq!(effective(Q4K, 384), Q5_0);
        assert_eq!(effective(Q6K, 384), Q8_0);
        assert_eq!(effective(Q4K, 1536), Q4K);
        assert_eq!(effective(Q8_0, 384), Q8_0);
        assert_eq!(
            effective(Q8_0, 30),
            F16,
            "rows not a multiple of 32 cannot use block formats"
        );
    }

    #[test]
    fn fixed_scheme_keeps_norms_and_falls_back_per_tensor() {
        let tensors = minilm_like();
        let p = plan(&tensors, &Request::Fixed(Some(Q4K)), |_, _| 0.0).unwrap();
        for (t, d) in tensors.iter().zip(&p.dtypes) {
            let expected = match (t.role, t.row_len()) {
                (Role::Keep, _) => F32,
                (_, 1536) => Q4K,
                _ => Q5_0,
            };
            assert_eq!(*d, expected, "{}", t.name);
        }
    }

    #[test]
    fn sizes_follow_block_arithmetic() {
        assert_eq!(bytes(Q8_0, 384 * 384), 384 * 384 / 32 * 34);
        assert_eq!(bytes(Q4_0, 1024), 1024 / 32 * 18);
        assert_eq!(bytes(Q4K, 256), 144);
        assert_eq!(bytes(F16, 10), 20);
    }

    #[test]
    fn auto_fits_the_budget_and_spends_bits_where_the_error_is() {
        let tensors = minilm_like();
        // Embeddings tolerate quantization; the FFN matrices do not.
        let error = |i: usize, d: GgmlDType| {
            let base = match d {
                F32 => 0.0,
                F16 => 1e-7,
                Q8_0 => 1e-5,
                Q6K => 4e-5,
                Q5_0 => 1e-4,
                Q4K => 3e-4,
                _ => 1e-3,
            };
            if tensors[i].name.contains("ffn") {
                base * 100.0
            } else {
                base
            }
        };
        let roomy = plan(&tensors, &Request::Auto { memory_mib: 1024 }, error).unwrap();
        assert!(
            roomy.dtypes.iter().all(|d| *d == F32),
            "everything fits at F32"
        );

        let tight = plan(&tensors, &Request::Auto { memory_mib: 88 }, error).unwrap();
        assert!(tight.total_bytes as f64 <= weight_budget(88));
        let dtype_of =
            |name: &str| tight.dtypes[tensors.iter().position(|t| t.name == name).unwrap()];
        let rank = |d: GgmlDType| LADDER.iter().position(|l| *l == d).unwrap();
        assert!(
            rank(dtype_of("token_embd.weight")) > rank(dtype_of("blk.0.ffn_up.weight")),
            "the embedding gives up bits before the sensitive FFN"
        );
        assert_eq!(dtype_of("token_embd_norm.weight"), F32);
    }

    #[test]
    fn impossible_budget_says_what_is_needed() {
        let err = plan(&minilm_like(), &Request::Auto { memory_mib: 64 }, |_, _| {
            0.0
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("at Q4_0 (") && message.contains("the profile allows 51.2 MiB"),
            "{message}"
        );
        assert!(matches!(err, PlanError::DoesNotFit { needed_mib, .. } if needed_mib > 48.0));
    }
}
