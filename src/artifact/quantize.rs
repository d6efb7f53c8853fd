//! Quantization with candle-core, in parallel: every tensor is cut into row chunks that are
//! read straight from the memory-mapped safetensors, pruned, quantized and measured on a pool
//! of threads, each straight into its place in the tensor's block vector. Peak memory stays
//! near the mapped source plus the quantized output and one chunk per thread.

use std::sync::Arc;

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::Error;
use super::plan::{Role, TensorInfo};
use super::prune::{self, Pruning};
use super::source::SourceTensors;

/// Elements per chunk: large enough to amortise, small enough to balance two threads and to
/// keep buffers in the allocator's heap (no fresh pages to fault in for every chunk).
const CHUNK_ELEMENTS: usize = 1 << 18;

/// One quantized tensor with what was measured on the way.
pub struct Quantized {
    /// Shared, so the quality check and the GGUF writer use it without copies.
    pub tensor: Arc<QTensor>,
    /// Fraction of zeros after pruning (before quantization).
    pub sparsity: f64,
    /// Cosine similarity between the source and the dequantized weights.
    pub cosine: f64,
    /// ‖W − Q(W)‖ / ‖W‖.
    pub rel_rmse: f64,
}

#[derive(Default, Clone, Copy)]
struct Stats {
    zeros: usize,
    dot: f64,
    source_sq: f64,
    quant_sq: f64,
    diff_sq: f64,
}

impl Stats {
    fn add(self, o: Stats) -> Stats {
        Stats {
            zeros: self.zeros + o.zeros,
            dot: self.dot + o.dot,
            source_sq: self.source_sq + o.source_sq,
            quant_sq: self.quant_sq + o.quant_sq,
            diff_sq: self.diff_sq + o.diff_sq,
        }
    }

    fn measure(source: &[f32], restored: &[f32]) -> Stats {
        let mut s = Stats::default();
        for (a, b) in source.iter().zip(restored) {
            let (a, b) = (f64::from(*a), f64::from(*b));
            s.zeros += usize::from(a == 0.0);
            s.dot += a * b;
            s.source_sq += a * a;
            s.quant_sq += b * b;
            s.diff_sq += (a - b) * (a - b);
        }
        s
    }
}

/// Quantizes every tensor to its planned dtype on `threads` threads, pruning matrices first.
/// With `measure`, each tensor's cosine and relative RMSE against the source come along.
pub fn quantize_all(
    source: &SourceTensors,
    tensors: &[TensorInfo],
    dtypes: &[GgmlDType],
    pruning: Option<Pruning>,
    threads: usize,
    measure: bool,
) -> Result<Vec<Quantized>, Error> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    pool.install(|| {
        // Biggest first, so no thread is left with a large tensor at the end; rayon steals
        // the chunks of a tensor across threads.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(tensors[*i].elements()));
        let mut done: Vec<(usize, Quantized)> = order
            .into_par_iter()
            .map(|i| {
                let job = Job {
                    source,
                    tensor: &tensors[i],
                    pruning,
                    measure,
                };
                Ok((i, job.run(dtypes[i])?))
            })
            .collect::<Result<_, Error>>()?;
        done.sort_by_key(|(i, _)| *i);
        Ok(done.into_iter().map(|(_, q)| q).collect())
    })
}

/// One tensor's quantization.
struct Job<'a> {
    source: &'a SourceTensors,
    tensor: &'a TensorInfo,
    pruning: Option<Pruning>,
    measure: bool,
}

impl Job<'_> {
    fn run(&self, dtype: GgmlDType) -> Result<Quantized, Error> {
        use candle_core::quantized::k_quants::*;
        use half::{bf16, f16};
        match dtype {
            GgmlDType::F32 => self.blocks::<f32>(),
            GgmlDType::F16 => self.blocks::<f16>(),
            GgmlDType::BF16 => self.blocks::<bf16>(),
            GgmlDType::Q4_0 => self.blocks::<BlockQ4_0>(),
            GgmlDType::Q4_1 => self.blocks::<BlockQ4_1>(),
            GgmlDType::Q5_0 => self.blocks::<BlockQ5_0>(),
            GgmlDType::Q5_1 => self.blocks::<BlockQ5_1>(),
            GgmlDType::Q8_0 => self.blocks::<BlockQ8_0>(),
            GgmlDType::Q8_1 => self.blocks::<BlockQ8_1>(),
            GgmlDType::Q2K => self.blocks::<BlockQ2K>(),
            GgmlDType::Q3K => self.blocks::<BlockQ3K>(),
            GgmlDType::Q4K => self.blocks::<BlockQ4K>(),
            GgmlDType::Q5K => self.blocks::<BlockQ5K>(),
            GgmlDType::Q6K => self.blocks::<BlockQ6K>(),
            GgmlDType::Q8K => self.blocks::<BlockQ8K>(),
        }
    }

    /// Quantizes into one block vector for the whole tensor, chunks of rows in parallel,
    /// each read straight from the map and written straight into its place: no copies to
    /// join afterwards.
    fn blocks<T: GgmlType + 'static>(&self) -> Result<Quantized, Error> {
        let t = self.tensor;
        let row_len = t.row_len().max(1);
        if !row_len.is_multiple_of(T::BLCK_SIZE) {
            return Err(Error::Source(format!(
                "{}: rows of {row_len} are not a multiple of the {:?} block ({})",
                t.name,
                T::DTYPE,
                T::BLCK_SIZE
            )));
        }
        let blocks_per_row = row_len / T::BLCK_SIZE;
        let rows_per_chunk = (CHUNK_ELEMENTS / row_len).max(1);
        let threshold = match self.pruning {
            Some(Pruning::Magnitude { sparsity }) if t.role == Role::Matrix => {
                let all = self.source.rows_f32(&t.name, 0..t.rows())?;
                Some(prune::magnitude_threshold(&all, sparsity))
            }
            _ => None,
        };
        let mut blocks = vec![T::zeros(); t.rows() * blocks_per_row];
        let stats = blocks
            .par_chunks_mut(rows_per_chunk * blocks_per_row)
            .enumerate()
            .map(|(c, out)| {
                let first = c * rows_per_chunk;
                let rows = first..first + out.len() / blocks_per_row;
                let mut data = self.source.rows_f32(&t.name, rows)?;
                if t.role == Role::Matrix {
                    match (self.pruning, threshold) {
                        (Some(Pruning::SemiStructured24), _) => {
                            prune::two_of_four(data.to_mut(), row_len)
                        }
                        (_, Some(threshold)) => prune::apply_threshold(data.to_mut(), threshold),
                        _ => {}
                    }
                }
                T::from_float(&data, out);
                Ok::<_, Error>(if self.measure {
                    let mut restored = vec![0f32; data.len()];
                    T::to_float(out, &mut restored);
                    Stats::measure(&data, &restored)
                } else {
                    // Sparsity is reported whether or not the quality is measured.
                    Stats {
                        zeros: data.iter().filter(|x| **x == 0.0).count(),
                        ..Stats::default()
                    }
                })
            })
            .try_reduce(Stats::default, |a, b| Ok(a.add(b)))?;
        let storage = QStorage::Cpu(Box::new(blocks));
        let tensor = Arc::new(QTensor::new(storage, t.shape.as_slice())?);
        Ok(Quantized {
            tensor,
            sparsity: stats.zeros as f64 / t.elements().max(1) as f64,
            cosine: if stats.source_sq == 0.0 || stats.quant_sq == 0.0 {
                1.0
            } else {
                stats.dot / (stats.source_sq.sqrt() * stats.quant_sq.sqrt())
            },
            rel_rmse: if stats.source_sq == 0.0 {
                0.0
            } else {
                (stats.diff_sq / stats.source_sq).sqrt()
            },
        })
    }
}

/// candle's plain loop, one tensor at a time on one thread: the baseline the benchmark beats.
pub fn quantize_serial(
    source: &SourceTensors,
    tensors: &[TensorInfo],
    dtypes: &[GgmlDType],
) -> Result<Vec<QTensor>, Error> {
    tensors
        .iter()
        .zip(dtypes)
        .map(|(t, d)| {
            let data = source.rows_f32(&t.name, 0..t.rows())?.into_owned();
            let tensor = Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu)?;
            Ok(QTensor::quantize(&tensor, *d)?)
        })
        .collect()
}
