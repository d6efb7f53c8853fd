//! The Q8_0 matrix multiply the runtime serves with: int8 weights times int8-quantized
//! activations, as llama.cpp computes Q8_0, on AVX2 where the CPU has it and in portable code
//! elsewhere.
//!
//! Why not candle's: candle 0.11 computes each output of a Q8_0 matmul as a separate
//! 32-value block dot product, converting both f16 scales of every block by a function call,
//! and fans every matmul out to a spinning thread pool. On AVX2 without VNNI that measured
//! ~2.5 ns a block and 74 % of an all-MiniLM forward pass. Here the weights are repacked once at
//! load (int8 quants in one slice, f32 scales in another), each activation row is quantized once
//! per matmul, and every block of activations loaded is used against four weight rows and every
//! weight block against two activation rows.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// Values per Q8_0 block (one scale each).
pub const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 2 + BLOCK;

/// A `[rows, cols]` Q8_0 weight matrix, repacked for the kernel.
#[derive(Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols`, row-major.
    quants: Vec<i8>,
    /// `rows × cols / BLOCK`, row-major.
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Repacks a 2-D Q8_0 tensor; `None` for any other dtype or shape.
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<Self>> {
        let &[rows, cols] = tensor.shape().dims() else {
            return Ok(None);
        };
        if tensor.dtype() != GgmlDType::Q8_0 || !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        Self::from_blocks(rows, cols, &tensor.data()?).map(Some)
    }

    /// From GGUF Q8_0 blocks: a little-endian f16 scale, then 32 int8 quants.
    fn from_blocks(rows: usize, cols: usize, bytes: &[u8]) -> candle_core::Result<Self> {
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
        Ok(Self {
            rows,
            cols,
            quants,
            scales,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out[m][r] = Σ_c x[m][c] · w[r][c]` for the quantized rows `x`.
    pub fn matmul(&self, x: &Q8Rows, out: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "activation width");
        assert_eq!(out.len(), x.rows * self.rows, "output size");
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above); the sizes are asserted.
            unsafe { avx::matmul(self, x, out) };
            return;
        }
        portable::matmul(self, x, out);
    }

    /// `x · wᵀ` over the last dimension of `x`, any layout.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `x · wᵀ` for `x` of `m × cols` f32 values, row-major.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let x = Q8Rows::quantize(x, self.cols);
        let mut out = vec![0f32; x.rows * self.rows];
        self.matmul(&x, &mut out);
        out
    }
}

/// Activations quantized to Q8_0 per 32-value block (scale = max |x| / 127, round half to
/// even), the form the kernel multiplies.
#[derive(Debug)]
pub struct Q8Rows {
    rows: usize,
    cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
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
        Self {
            rows: x.len() / cols,
            cols,
            quants,
            scales,
        }
    }
}

/// Quantizes whole blocks of `x` into `quants` and one scale each, on the fastest path.
fn quantize_blocks(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the lengths match by construction.
        unsafe { avx::quantize(x, quants, scales) };
        return;
    }
    portable::quantize(x, quants, scales);
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// `x · wᵀ` as a candle op, so a [`Q8Matrix`] is a layer of a candle model.
impl CustomOp1 for Q8Matrix {
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
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "{}: input {:?} does not end in {}",
                self.name(),
                dims,
                self.cols
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!(
                "{}: input must be contiguous (use Q8Matrix::apply)",
                self.name()
            );
        };
        let x = &data[start..end];
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.rows;
        }
        Ok((CpuStorage::F32(self.forward(x)), Shape::from(out_dims)))
    }
}

/// The reference the AVX2 path must match, and the path on other CPUs.
mod portable {
    use super::{BLOCK, Q8Matrix, Q8Rows};

    pub fn quantize(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
        for ((x, q), d) in x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
        {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let id = if *d == 0.0 { 0.0 } else { 1.0 / *d };
            for (q, v) in q.iter_mut().zip(x) {
                *q = (v * id).round_ties_even() as i8;
            }
        }
    }

    pub fn matmul(w: &Q8Matrix, x: &Q8Rows, out: &mut [f32]) {
        let blocks = w.cols / BLOCK;
        for m in 0..x.rows {
            let xq = &x.quants[m * w.cols..][..w.cols];
            let xd = &x.scales[m * blocks..][..blocks];
            for r in 0..w.rows {
                let wq = &w.quants[r * w.cols..][..w.cols];
                let wd = &w.scales[r * blocks..][..blocks];
                let mut sum = 0f32;
                for b in 0..blocks {
                    let dot: i32 = wq[b * BLOCK..][..BLOCK]
                        .iter()
                        .zip(&xq[b * BLOCK..][..BLOCK])
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                    sum += dot as f32 * (wd[b] * xd[b]);
                }
                out[m * w.rows + r] = sum;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{BLOCK, Q8Matrix, Q8Rows};

    /// Activation rows and weight rows a tile computes: 2 × 4 = 8 accumulators, which with
    /// the loaded blocks fit AVX2's 16 registers.
    const MR: usize = 2;
    const NR: usize = 4;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
        let sign_mask = _mm256_set1_ps(-0.0);
        for ((x, q), d) in x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
        {
            // SAFETY: each chunk holds exactly 32 values and 32 quants.
            unsafe {
                let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(x.as_ptr().add(i)));
                let abs = v.map(|v| _mm256_andnot_ps(sign_mask, v));
                let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_movehdup_ps(m));
                let amax = _mm_cvtss_f32(m);
                *d = amax / 127.0;
                let id = _mm256_set1_ps(if *d == 0.0 { 0.0 } else { 1.0 / *d });
                // Round half to even, as the portable path's round_ties_even.
                let i = v.map(|v| {
                    _mm256_cvtps_epi32(_mm256_round_ps(
                        _mm256_mul_ps(v, id),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                    ))
                });
                // packs interleave 128-bit lanes; the permute restores element order.
                let lo = _mm256_packs_epi32(i[0], i[1]);
                let hi = _mm256_packs_epi32(i[2], i[3]);
                let bytes = _mm256_packs_epi16(lo, hi);
                let bytes =
                    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul(w: &Q8Matrix, x: &Q8Rows, out: &mut [f32]) {
        let (mut m, mut r) = (0, 0);
        // Weight quads outermost: a quad (4 rows, ≤ 6 KiB for all-MiniLM) stays in L1 while
        // every activation row passes it.
        while r < w.rows {
            let nr = NR.min(w.rows - r);
            while m < x.rows {
                let mr = MR.min(x.rows - m);
                // SAFETY: m + mr ≤ x.rows and r + nr ≤ w.rows; out has x.rows × w.rows values.
                unsafe {
                    match (mr, nr) {
                        (2, 4) => tile::<2, 4>(w, x, m, r, out),
                        (1, 4) => tile::<1, 4>(w, x, m, r, out),
                        (2, _) => {
                            for j in 0..nr {
                                tile::<2, 1>(w, x, m, r + j, out)
                            }
                        }
                        _ => {
                            for j in 0..nr {
                                tile::<1, 1>(w, x, m, r + j, out)
                            }
                        }
                    }
                }
                m += mr;
            }
            m = 0;
            r += nr;
        }
    }

    /// Outputs `[m, m + M) × [r, r + N)`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const M: usize, const N: usize>(
        w: &Q8Matrix,
        x: &Q8Rows,
        m: usize,
        r: usize,
        out: &mut [f32],
    ) {
        let k = w.cols;
        let blocks = k / BLOCK;
        // SAFETY (all pointer arithmetic below): rows m..m+M of x and r..r+N of w exist, and
        // every offset stays within a row of `k` quants or `blocks` scales.
        unsafe {
            let xq: [*const i8; M] = std::array::from_fn(|i| x.quants.as_ptr().add((m + i) * k));
            let xd: [*const f32; M] =
                std::array::from_fn(|i| x.scales.as_ptr().add((m + i) * blocks));
            let wq: [*const i8; N] = std::array::from_fn(|j| w.quants.as_ptr().add((r + j) * k));
            let wd: [*const f32; N] =
                std::array::from_fn(|j| w.scales.as_ptr().add((r + j) * blocks));
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); N]; M];
            for b in 0..blocks {
                let xv: [__m256i; M] =
                    std::array::from_fn(|i| _mm256_loadu_si256(xq[i].add(b * BLOCK).cast()));
                let xs: [__m256; M] = std::array::from_fn(|i| _mm256_broadcast_ss(&*xd[i].add(b)));
                for j in 0..N {
                    let wv = _mm256_loadu_si256(wq[j].add(b * BLOCK).cast());
                    let ws = _mm256_broadcast_ss(&*wd[j].add(b));
                    // maddubs multiplies unsigned by signed: |w| times x carrying w's sign.
                    // |w|, |x| ≤ 127, so pair sums (≤ 32 258) never saturate.
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for ((a, x), xs) in acc.iter_mut().zip(&xv).zip(&xs) {
                        let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(*x, wv));
                        let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                        a[j] = _mm256_fmadd_ps(s, _mm256_mul_ps(*xs, ws), a[j]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    *out.get_unchecked_mut((m + i) * w.rows + r + j) = hsum(*v);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
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

    fn q8(rows: usize, cols: usize, seed: u64) -> (QTensor, Q8Matrix) {
        let w =
            Tensor::from_vec(values(rows * cols, seed, 0.05), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let m = Q8Matrix::from_qtensor(&q).unwrap().unwrap();
        (q, m)
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
    fn matches_the_portable_kernel_and_candle_on_every_tile_shape() {
        // Odd activation rows and weight rows not a multiple of 4 reach every tile variant.
        for (m, rows, cols) in [
            (1, 4, 32),
            (2, 8, 64),
            (3, 7, 96),
            (13, 384, 384),
            (5, 6, 1536),
        ] {
            let (qt, w) = q8(rows, cols, (m * rows + cols) as u64);
            let x = values(m * cols, 7 + m as u64, 1.5);
            let q = Q8Rows::quantize(&x, cols);
            let mut fast = vec![0f32; m * rows];
            w.matmul(&q, &mut fast);
            let mut reference = vec![0f32; m * rows];
            portable::matmul(&w, &q, &mut reference);
            for (a, b) in fast.iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{a} vs {b} ({m}×{rows}×{cols})"
                );
            }
            // candle's own Q8_0 matmul rounds its activation scales to f16; the results agree
            // to that precision.
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let candle = QMatMul::from_qtensor(qt).unwrap().forward(&xt).unwrap();
            let candle: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in fast.iter().zip(&candle) {
                assert!(
                    (a - b).abs() <= 2e-3 * b.abs().max(1.0),
                    "{a} vs candle {b}"
                );
            }
        }
    }

    #[test]
    fn is_a_candle_op_on_batched_and_strided_inputs() {
        let (_, w) = q8(8, 64, 11);
        let x = Tensor::from_vec(values(2 * 3 * 64, 5, 1.0), (2, 3, 64), &Device::Cpu).unwrap();
        let y = w.apply(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 8]);
        let flat: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let direct = w.forward(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(flat, direct);
        // A transposed (non-contiguous) input is made contiguous first.
        let t = x.transpose(0, 1).unwrap();
        assert!(t.apply_op1_no_bwd(&w).is_err());
        let yt = w.apply(&t).unwrap();
        let expected = y.transpose(0, 1).unwrap().contiguous().unwrap();
        assert_eq!(
            yt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let wrong = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(w.apply(&wrong).is_err());
    }

    #[test]
    fn only_two_dimensional_q8_0_is_repacked() {
        let t = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&t, GgmlDType::Q4_0).unwrap();
        assert!(Q8Matrix::from_qtensor(&q4).unwrap().is_none());
        assert!(Q8Matrix::from_blocks(4, 64, &[0u8; 10]).is_err());
    }
}
