//! Quantization with candle-core, in parallel: every tensor is cut into row chunks that are
//! read straight from the memory-mapped safetensors, pruned, quantized and measured on a pool
//! of threads; the chunks of a tensor are then joined. Peak memory stays near the mapped
//! source plus the quantized output and one chunk per thread.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

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

/// Quantizes one block of rows with candle's block quantizer (the code behind
/// `QTensor::quantize`), without the tensor round trips; returns the block's bytes and, when
/// asked, how far the dequantized values are from the source.
fn quantize_rows(data: &[f32], dtype: GgmlDType, measure: bool) -> Result<(Vec<u8>, Stats), Error> {
    let mut blocks = dtype.cpu_zeros(data.len());
    blocks.from_float(data);
    // SAFETY: `as_ptr` points at the `storage_size_in_bytes` bytes of the block vector that
    // `blocks` owns; they are plain data and outlive this borrow (candle's `QTensor::data`
    // reads them the same way).
    let bytes =
        unsafe { std::slice::from_raw_parts(blocks.as_ptr(), blocks.storage_size_in_bytes()) }
            .to_vec();
    let stats = if measure {
        match blocks.dequantize(data.len())? {
            candle_core::CpuStorage::F32(restored) => Stats::measure(data, &restored),
            _ => Stats::default(),
        }
    } else {
        Stats::default()
    };
    Ok((bytes, stats))
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
        // Magnitude pruning needs each tensor's threshold before its chunks run.
        let thresholds: Vec<Option<f32>> = tensors
            .par_iter()
            .map(|t| match pruning {
                Some(Pruning::Magnitude { sparsity }) if t.role == Role::Matrix => {
                    let all = source.rows_f32(&t.name, 0..t.rows())?;
                    Ok(Some(prune::magnitude_threshold(&all, sparsity)))
                }
                _ => Ok(None),
            })
            .collect::<Result<_, Error>>()?;

        let mut jobs: Vec<(usize, Range<usize>)> = vec![];
        for (i, t) in tensors.iter().enumerate() {
            let rows = t.rows();
            let per_chunk = (CHUNK_ELEMENTS / t.row_len().max(1)).max(1);
            let mut start = 0;
            while start < rows {
                let end = (start + per_chunk).min(rows);
                jobs.push((i, start..end));
                start = end;
            }
        }
        // Biggest first, so no thread is left with a large chunk at the end.
        jobs.sort_by_key(|(_, r)| std::cmp::Reverse(r.len()));

        let done: Vec<(usize, usize, Vec<u8>, Stats)> = jobs
            .into_par_iter()
            .map(|(i, rows)| {
                let t = &tensors[i];
                let row_len = t.row_len();
                let mut data = source.rows_f32(&t.name, rows.clone())?;
                if t.role == Role::Matrix {
                    match (pruning, thresholds[i]) {
                        (Some(Pruning::SemiStructured24), _) => {
                            prune::two_of_four(&mut data, row_len)
                        }
                        (_, Some(threshold)) => prune::apply_threshold(&mut data, threshold),
                        _ => {}
                    }
                }
                let (bytes, mut stats) = quantize_rows(&data, dtypes[i], measure)?;
                // Sparsity is reported whether or not the quality is measured.
                if !measure {
                    stats.zeros = data.iter().filter(|x| **x == 0.0).count();
                }
                Ok((i, rows.start, bytes, stats))
            })
            .collect::<Result<_, Error>>()?;
        assemble(tensors, dtypes, done)
    })
}

fn assemble(
    tensors: &[TensorInfo],
    dtypes: &[GgmlDType],
    mut done: Vec<(usize, usize, Vec<u8>, Stats)>,
) -> Result<Vec<Quantized>, Error> {
    done.sort_by_key(|(i, start, _, _)| (*i, *start));
    let mut out = Vec::with_capacity(tensors.len());
    let mut parts = done.into_iter().peekable();
    for (i, t) in tensors.iter().enumerate() {
        let mut bytes = vec![];
        let mut stats = Stats::default();
        while let Some((_, _, chunk, s)) = parts.next_if(|(j, _, _, _)| *j == i) {
            bytes.extend_from_slice(&chunk);
            stats = stats.add(s);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtypes[i])?;
        let tensor = Arc::new(QTensor::new(storage, t.shape.as_slice())?);
        let cosine = if stats.source_sq == 0.0 || stats.quant_sq == 0.0 {
            1.0
        } else {
            stats.dot / (stats.source_sq.sqrt() * stats.quant_sq.sqrt())
        };
        out.push(Quantized {
            tensor,
            sparsity: stats.zeros as f64 / t.elements().max(1) as f64,
            cosine,
            rel_rmse: if stats.source_sq == 0.0 {
                0.0
            } else {
                (stats.diff_sq / stats.source_sq).sqrt()
            },
        });
    }
    Ok(out)
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
            let data = source.rows_f32(&t.name, 0..t.rows())?;
            let tensor = Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu)?;
            Ok(QTensor::quantize(&tensor, *d)?)
        })
        .collect()
}
