//! The Q8_0 matrix multiply the runtime serves with: int8 weights times int8-quantized
//! activations, as llama.cpp computes Q8_0, on the fastest kernel the CPU offers
//! ([`Kernel`]: AVX-512 VNNI, AVX-VNNI, AVX2, or portable code), chosen at run time.
//!
//! Why not candle's: candle 0.11 computes each output of a Q8_0 matmul as a separate
//! 32-value block dot product, converting both f16 scales of every block by a function call,
//! and fans every matmul out to a spinning thread pool. On AVX2 without VNNI that measured
//! ~2.5 ns a block and 74 % of an all-MiniLM forward pass. Here the weights are repacked once at
//! load for the kernel (int8 quants in one slice, f32 scales in another), and each activation
//! row is quantized once per matmul.

mod kernel;
mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::cores;

pub use kernel::{Kernel, KernelError};

/// Values per Q8_0 block (one scale each).
pub const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 2 + BLOCK;
/// Groups of 4 values in a block: the VNNI kernels multiply-add 4 int8 pairs at once.
const QUADS: usize = BLOCK / 4;

/// A `[rows, cols]` Q8_0 weight matrix, repacked for one kernel.
#[derive(Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    kernel: Kernel,
    packing: Packing,
}

#[derive(Debug)]
enum Packing {
    /// Row-major: `rows × cols` quants and `rows × cols / BLOCK` scales (portable, AVX2).
    Rows { quants: Vec<i8>, scales: Vec<f32> },
    /// Interleaved for the VNNI kernels.
    Groups(Groups),
}

/// Weight rows in groups of `lanes` (the int32 lanes of a register). Per group and block:
/// [`QUADS`] runs of `lanes × 4` bytes (4 consecutive values of each row), each value offset by
/// 128 to be unsigned; then `lanes` scales per group and block. Rows past the end are zero
/// weights with scale 0.
#[derive(Debug)]
struct Groups {
    lanes: usize,
    quants: Vec<u8>,
    scales: Vec<f32>,
}

impl Groups {
    fn pack(rows: usize, cols: usize, quants: &[i8], scales: &[f32], lanes: usize) -> Self {
        let blocks = cols / BLOCK;
        let groups = rows.div_ceil(lanes);
        let mut packed = vec![128u8; groups * blocks * BLOCK * lanes];
        let mut packed_scales = vec![0f32; groups * blocks * lanes];
        for r in 0..rows {
            let (g, lane) = (r / lanes, r % lanes);
            for b in 0..blocks {
                packed_scales[(g * blocks + b) * lanes + lane] = scales[r * blocks + b];
                for (k, &q) in quants[r * cols + b * BLOCK..][..BLOCK].iter().enumerate() {
                    let at = ((g * blocks + b) * QUADS + k / 4) * lanes * 4 + lane * 4 + k % 4;
                    packed[at] = (q as u8) ^ 0x80;
                }
            }
        }
        Self {
            lanes,
            quants: packed,
            scales: packed_scales,
        }
    }
}

impl Q8Matrix {
    /// Repacks a 2-D Q8_0 tensor for the process's kernel ([`Kernel::packing`]); `None` for
    /// any other dtype or shape.
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<Self>> {
        Self::for_kernel(tensor, Kernel::packing())
    }

    /// Repacks a 2-D Q8_0 tensor for `kernel`, which the CPU must support.
    pub fn for_kernel(tensor: &QTensor, kernel: Kernel) -> candle_core::Result<Option<Self>> {
        let &[rows, cols] = tensor.shape().dims() else {
            return Ok(None);
        };
        if tensor.dtype() != GgmlDType::Q8_0 || !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        if !kernel.is_supported() {
            candle_core::bail!("the {kernel} kernel is not supported by this CPU");
        }
        Self::from_blocks(rows, cols, &tensor.data()?, kernel).map(Some)
    }

    /// From GGUF Q8_0 blocks: a little-endian f16 scale, then 32 int8 quants.
    fn from_blocks(
        rows: usize,
        cols: usize,
        bytes: &[u8],
        kernel: Kernel,
    ) -> candle_core::Result<Self> {
        let blocks = rows * cols / BLOCK;
        if bytes.len() != blocks * BLOCK_BYTES {
            candle_core::bail!(
                "Q8_0 [{rows}, {cols}] needs {} bytes, found {}",
                blocks * BLOCK_BYTES,
                bytes.len()
            );
        }
        let mut quants = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(blocks);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            quants.extend(block[2..].iter().map(|&q| q as i8));
        }
        let lanes = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => Some(vnni::avx512::LANES),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => Some(vnni::avx::LANES),
            _ => None,
        };
        let packing = match lanes {
            Some(lanes) => Packing::Groups(Groups::pack(rows, cols, &quants, &scales, lanes)),
            None => Packing::Rows { quants, scales },
        };
        Ok(Self {
            rows,
            cols,
            kernel,
            packing,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The kernel this matrix is packed for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// `out[m][r] = Σ_c x[m][c] · w[r][c]` for the quantized rows `x`, on this thread.
    pub fn matmul(&self, x: &Q8Rows, out: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "activation width");
        assert_eq!(out.len(), x.rows * self.rows, "output size");
        self.matmul_cols(x.view(), 0..self.rows, out, self.rows);
    }

    /// Weight rows a kernel computes together: a column chunk starts at a multiple of this.
    fn granule(&self) -> usize {
        match &self.packing {
            Packing::Groups(groups) => groups.lanes,
            Packing::Rows { .. } => 4,
        }
    }

    /// Output columns `cols` (weight rows), column `c` of row `m` at
    /// `out[m * stride + c − cols.start]`.
    fn matmul_cols(&self, x: Activations, cols: Range<usize>, out: &mut [f32], stride: usize) {
        assert!(
            cols.start <= cols.end
                && cols.end <= self.rows
                && cols.start.is_multiple_of(self.granule())
                && stride >= cols.len(),
            "columns {cols:?} of {} (stride {stride})",
            self.rows
        );
        if x.rows == 0 || cols.is_empty() {
            return;
        }
        assert!(
            out.len() >= (x.rows - 1) * stride + cols.len(),
            "output size"
        );
        let out = Output { cols, out, stride };
        match (&self.packing, self.kernel) {
            #[cfg(target_arch = "x86_64")]
            (Packing::Groups(w), Kernel::Avx512Vnni) => {
                // SAFETY: packing checked the CPU supports the kernel; sizes are asserted.
                unsafe { vnni::avx512::matmul(w, x, out) }
            }
            #[cfg(target_arch = "x86_64")]
            (Packing::Groups(w), Kernel::AvxVnni) => {
                // SAFETY: as above.
                unsafe { vnni::avx::matmul(w, x, out) }
            }
            #[cfg(target_arch = "x86_64")]
            (Packing::Rows { quants, scales }, Kernel::Avx2) => {
                // SAFETY: as above.
                unsafe { avx2::matmul(quants, scales, x, out) }
            }
            (Packing::Rows { quants, scales }, _) => portable::matmul(quants, scales, x, out),
            (Packing::Groups(_), kernel) => unreachable!("{kernel} does not pack in groups"),
        }
    }
}

/// `x · wᵀ` over the last dimension of `x`, any layout, as a candle op (see [`forward`]).
pub fn apply(w: &Arc<Q8Matrix>, x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Op(w.clone()))
}

/// Activation rows (tokens) up to which a product is shared with idle cores: a request or two
/// of short sentences. A larger pass is a batch, which forms only while the workers are busy;
/// sharing it in a moment's gap between batches measured no faster, and its helpers' larger
/// buffers raised the runtime's peak memory (82 against 64 MiB at 32 clients).
const SHARED_ROWS_MAX: usize = 64;

/// `x · wᵀ` for `x` of `m × cols` f32 values, row-major. Inside a forward pass that idle
/// cores help ([`cores`]), the output columns of a product of up to [`SHARED_ROWS_MAX`] rows
/// are split among them.
pub fn forward(w: &Arc<Q8Matrix>, x: &[f32]) -> Vec<f32> {
    let x = Q8Rows::quantize(x, w.cols);
    let (rows, m) = (w.rows, x.rows);
    let mut out = vec![0f32; m * rows];
    if m > SHARED_ROWS_MAX || !cores::helping() {
        w.matmul(&x, &mut out);
        return out;
    }
    // Four chunks, so two cores share the columns evenly, each whole groups of the kernel. A
    // helper computes its chunk into a buffer of its own (zeroing one for every chunk here
    // would cost the lone request more than the helper saves it) and leaves it in the chunk's
    // slot.
    let chunk = rows.div_ceil(4).next_multiple_of(w.granule());
    let range = move |i: usize| i * chunk..((i + 1) * chunk).min(rows);
    let chunks = rows.div_ceil(chunk);
    let x = Arc::new(x);
    let parts: Arc<Vec<Mutex<Vec<f32>>>> =
        Arc::new((0..chunks).map(|_| Mutex::new(Vec::new())).collect());
    let shared = {
        let (w, x, parts) = (w.clone(), x.clone(), parts.clone());
        move |i: usize| {
            let cols = range(i);
            let mut part = vec![0f32; m * cols.len()];
            w.matmul_cols(x.view(), cols.clone(), &mut part, cols.len());
            *parts[i].lock().unwrap_or_else(|e| e.into_inner()) = part;
        }
    };
    let helped = cores::split(chunks, shared, |i| {
        let cols = range(i);
        w.matmul_cols(x.view(), cols.clone(), &mut out[cols.start..], rows);
    });
    for i in helped {
        let cols = range(i);
        let part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        for (row, values) in part.chunks_exact(cols.len()).enumerate() {
            out[row * rows + cols.start..][..cols.len()].copy_from_slice(values);
        }
    }
    out
}

/// Where a kernel writes: columns `cols`, column `c` of row `m` at
/// `out[m * stride + c − cols.start]`.
struct Output<'a> {
    cols: Range<usize>,
    out: &'a mut [f32],
    stride: usize,
}

/// Activations quantized to Q8_0 per 32-value block (scale = max |x| / 127, round half to
/// even), the form the kernels multiply.
#[derive(Debug)]
pub struct Q8Rows {
    rows: usize,
    cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// −128 × each block's sum of quants: cancels the VNNI kernels' weight offset.
    sums: Vec<i32>,
}

impl Q8Rows {
    /// Quantizes `x`, `cols` values a row; `cols` must be a multiple of [`BLOCK`].
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        assert!(
            cols > 0 && cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols),
            "{} values do not make rows of {cols} in blocks of {BLOCK}",
            x.len()
        );
        let mut quants = vec![0i8; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        quantize_blocks(x, &mut quants, &mut scales);
        let sums = quants
            .chunks_exact(BLOCK)
            .map(|b| -128 * b.iter().map(|&q| i32::from(q)).sum::<i32>())
            .collect();
        Self {
            rows: x.len() / cols,
            cols,
            quants,
            scales,
            sums,
        }
    }

    fn view(&self) -> Activations<'_> {
        Activations {
            rows: self.rows,
            cols: self.cols,
            quants: &self.quants,
            scales: &self.scales,
            sums: &self.sums,
        }
    }
}

/// Rows of a [`Q8Rows`], as the kernels read them.
#[derive(Clone, Copy, Debug)]
struct Activations<'a> {
    rows: usize,
    cols: usize,
    quants: &'a [i8],
    scales: &'a [f32],
    sums: &'a [i32],
}

/// Quantizes whole blocks of `x` into `quants` and one scale each, on the fastest path.
fn quantize_blocks(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Kernel::Avx2.is_supported() {
        // SAFETY: the CPU has AVX2 and FMA; the lengths match by construction.
        unsafe { avx2::quantize(x, quants, scales) };
        return;
    }
    portable::quantize(x, quants, scales);
}

/// `x · wᵀ` as a candle op, so a [`Q8Matrix`] is a layer of a candle model.
struct Op(Arc<Q8Matrix>);

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "kasmina-q8_0-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: input must be f32", self.name());
        };
        let w = &self.0;
        let dims = layout.shape().dims();
        if dims.last() != Some(&w.cols) {
            candle_core::bail!(
                "{}: input {:?} does not end in {}",
                self.name(),
                dims,
                w.cols
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous (use q8::apply)", self.name());
        };
        let x = &data[start..end];
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.rows;
        }
        Ok((CpuStorage::F32(forward(w, x)), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// Deterministic values in [-scale, scale), with a few exact zeros and outliers.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                match i % 97 {
                    0 => 0.0,
                    1 => 8.0 * scale,
                    _ => (u * 2.0 - 1.0) * scale,
                }
            })
            .collect()
    }

    fn q8(rows: usize, cols: usize, seed: u64) -> (QTensor, Arc<Q8Matrix>) {
        let w =
            Tensor::from_vec(values(rows * cols, seed, 0.05), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let m = Q8Matrix::from_qtensor(&q).unwrap().unwrap();
        (q, Arc::new(m))
    }

    #[test]
    fn quantizes_like_the_portable_reference_including_ties_and_zero_blocks() {
        let mut x = values(4 * 64, 3, 2.0);
        x[64..96].fill(0.0); // a zero block gets scale 0 and zero quants
        // A block whose largest value is 127 has scale 1, so 2.5 and -3.5 are exact ties.
        x[128] = 127.0;
        x[129] = 2.5;
        x[130] = -3.5;
        let fast = Q8Rows::quantize(&x, 64);
        let (mut quants, mut scales) = (vec![0i8; x.len()], vec![0f32; x.len() / BLOCK]);
        portable::quantize(&x, &mut quants, &mut scales);
        assert_eq!(fast.quants, quants);
        assert_eq!(fast.scales, scales);
        assert_eq!(fast.scales[2], 0.0);
        assert!(fast.quants[64..96].iter().all(|&q| q == 0));
        assert_eq!(fast.scales[4], 1.0);
        assert_eq!(fast.quants[128..131], [127, 2, -4]);
        assert!(fast.quants.iter().all(|&q| q != i8::MIN), "never -128");
    }

    #[test]
    fn every_kernel_this_cpu_has_matches_the_portable_one_and_candle_on_every_tile_shape() {
        // Odd activation rows and weight rows not a multiple of 4, 8 or 16 reach every tile
        // variant and every partial group.
        let kernels = Kernel::supported();
        eprintln!("kernels tested: {kernels:?}");
        for (m, rows, cols) in [
            (1, 4, 32),
            (2, 8, 64),
            (3, 7, 96),
            (5, 17, 64),
            (13, 384, 384),
            (6, 40, 128),
            (5, 6, 1536),
            (9, 33, 256),
        ] {
            let (qt, _) = q8(rows, cols, (m * rows + cols) as u64);
            let x = values(m * cols, 7 + m as u64, 1.5);
            let q = Q8Rows::quantize(&x, cols);
            let portable = Q8Matrix::for_kernel(&qt, Kernel::Portable)
                .unwrap()
                .unwrap();
            let mut reference = vec![0f32; m * rows];
            portable.matmul(&q, &mut reference);
            for &kernel in &kernels {
                let w = Q8Matrix::for_kernel(&qt, kernel).unwrap().unwrap();
                assert_eq!(w.kernel(), kernel);
                let mut fast = vec![f32::NAN; m * rows];
                w.matmul(&q, &mut fast);
                for (a, b) in fast.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{kernel}: {a} vs {b} ({m}×{rows}×{cols})"
                    );
                }
            }
            // candle's own Q8_0 matmul rounds its activation scales to f16; the results agree
            // to that precision.
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let candle = QMatMul::from_qtensor(qt).unwrap().forward(&xt).unwrap();
            let candle: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in reference.iter().zip(&candle) {
                assert!(
                    (a - b).abs() <= 2e-3 * b.abs().max(1.0),
                    "{a} vs candle {b}"
                );
            }
        }
    }

    #[test]
    fn extreme_quants_cancel_the_vnni_offset_exactly() {
        // All ±127 weights and activations with scale 1: the largest block sums, every
        // product exact in f32, so an offset error of even one unit would show.
        let (rows, cols) = (19, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| if (i / 3) % 2 == 0 { 127.0 } else { -127.0 })
            .collect();
        let qt = QTensor::quantize(
            &Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| if i % 5 == 0 { -127.0 } else { 127.0 })
            .collect();
        let q = Q8Rows::quantize(&x, cols);
        let portable = Q8Matrix::for_kernel(&qt, Kernel::Portable)
            .unwrap()
            .unwrap();
        let mut reference = vec![0f32; 2 * rows];
        portable.matmul(&q, &mut reference);
        for kernel in Kernel::supported() {
            let w = Q8Matrix::for_kernel(&qt, kernel).unwrap().unwrap();
            let mut out = vec![0f32; 2 * rows];
            w.matmul(&q, &mut out);
            assert_eq!(out, reference, "{kernel}");
        }
    }

    #[test]
    fn columns_shared_with_idle_cores_are_placed_where_one_thread_puts_them() {
        let cores = cores::Cores::new(2);
        for kernel in Kernel::supported() {
            for (m, rows, cols) in [(13, 384, 384), (3, 37, 64), (1, 1536, 384), (2, 5, 32)] {
                let (qt, _) = q8(rows, cols, (rows + cols) as u64);
                let w = Arc::new(Q8Matrix::for_kernel(&qt, kernel).unwrap().unwrap());
                let x = values(m * cols, 3, 1.0);
                let mut alone = vec![0f32; m * rows];
                w.matmul(&Q8Rows::quantize(&x, cols), &mut alone);
                // Which chunks a helper wins varies from run to run; every outcome must agree.
                for _ in 0..20 {
                    let shared = cores.lend(|| forward(&w, &x));
                    assert_eq!(shared, alone, "{kernel} {m}×{rows}×{cols}");
                }
            }
        }
    }

    #[test]
    fn a_kernel_the_cpu_lacks_is_refused() {
        let (qt, _) = q8(4, 32, 1);
        for kernel in Kernel::ALL.into_iter().filter(|k| !k.is_supported()) {
            let err = Q8Matrix::for_kernel(&qt, kernel).unwrap_err().to_string();
            assert!(err.contains("not supported"), "{err}");
        }
    }

    #[test]
    fn is_a_candle_op_on_batched_and_strided_inputs() {
        let (_, w) = q8(8, 64, 11);
        let x = Tensor::from_vec(values(2 * 3 * 64, 5, 1.0), (2, 3, 64), &Device::Cpu).unwrap();
        let y = apply(&w, &x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 8]);
        let flat: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let direct = forward(&w, &x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(flat, direct);
        // A transposed (non-contiguous) input is made contiguous first.
        let t = x.transpose(0, 1).unwrap();
        assert!(t.apply_op1_no_bwd(&Op(w.clone())).is_err());
        let yt = apply(&w, &t).unwrap();
        let expected = y.transpose(0, 1).unwrap().contiguous().unwrap();
        assert_eq!(
            yt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let wrong = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(apply(&w, &wrong).is_err());
    }

    #[test]
    fn only_two_dimensional_q8_0_is_repacked() {
        let t = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&t, GgmlDType::Q4_0).unwrap();
        assert!(Q8Matrix::from_qtensor(&q4).unwrap().is_none());
        assert!(Q8Matrix::from_blocks(4, 64, &[0u8; 10], Kernel::Portable).is_err());
    }
}
