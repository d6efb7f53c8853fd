//! The AVX2 + FMA kernel: per 32-value block, maddubs dot products of one activation row and
//! one weight row, four weight rows and two activation rows a tile, summed across lanes at the end.

use std::arch::x86_64::*;

use super::{Activations, BLOCK, Output};

/// Activation rows and weight rows a tile computes: 2 × 4 = 8 accumulators, which with
/// the loaded blocks fit AVX2's 16 registers.
const MR: usize = 2;
const NR: usize = 4;

/// Row-major weights: `cols` quants and `cols / BLOCK` scales a row.
struct Rows<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
}

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
pub unsafe fn matmul(quants: &[i8], scales: &[f32], x: Activations, out: Output) {
    let w = &Rows { quants, scales };
    let Output { cols, out, stride } = out;
    let (mut m, mut r) = (0, cols.start);
    // Weight quads outermost: a quad (4 rows, ≤ 6 KiB for all-MiniLM) stays in L1 while
    // every activation row passes it.
    while r < cols.end {
        let nr = NR.min(cols.end - r);
        while m < x.rows {
            let mr = MR.min(x.rows - m);
            // SAFETY: m + mr ≤ x.rows and r + nr ≤ cols.end ≤ the weight rows; the caller checked out
            // holds rows of `stride` for the columns.
            unsafe {
                match (mr, nr) {
                    (2, 4) => tile::<2, 4>(w, x, m, r, cols.start, out, stride),
                    (1, 4) => tile::<1, 4>(w, x, m, r, cols.start, out, stride),
                    (2, _) => {
                        for j in 0..nr {
                            tile::<2, 1>(w, x, m, r + j, cols.start, out, stride)
                        }
                    }
                    _ => {
                        for j in 0..nr {
                            tile::<1, 1>(w, x, m, r + j, cols.start, out, stride)
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

/// Outputs `[m, m + M) × [r, r + N)`, column `c` at `out[m * stride + c − first]`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const M: usize, const N: usize>(
    w: &Rows,
    x: Activations,
    m: usize,
    r: usize,
    first: usize,
    out: &mut [f32],
    stride: usize,
) {
    let k = x.cols;
    let blocks = k / BLOCK;
    // SAFETY (all pointer arithmetic below): rows m..m+M of x and r..r+N of w exist, and
    // every offset stays within a row of `k` quants or `blocks` scales.
    unsafe {
        let xq: [*const i8; M] = std::array::from_fn(|i| x.quants.as_ptr().add((m + i) * k));
        let xd: [*const f32; M] = std::array::from_fn(|i| x.scales.as_ptr().add((m + i) * blocks));
        let wq: [*const i8; N] = std::array::from_fn(|j| w.quants.as_ptr().add((r + j) * k));
        let wd: [*const f32; N] = std::array::from_fn(|j| w.scales.as_ptr().add((r + j) * blocks));
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
                *out.get_unchecked_mut((m + i) * stride + r + j - first) = hsum(*v);
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
