//! The AVX-512 VNNI kernel: one vpdpbusd multiplies 4 int8 pairs for each of 16 weight rows,
//! so the int32 sums of a block need no horizontal reduction and are scaled once a block for
//! 16 outputs at a time.
//!
//! vpdpbusd multiplies unsigned by signed bytes. The weights are stored offset by 128
//! (`w + 128`, see [`super::Groups`]); each activation block's sum times −128 starts the
//! block's accumulator, so the offset cancels exactly in integer arithmetic.

use std::arch::x86_64::*;

use super::{Activations, BLOCK, Groups, Output, QUADS};

/// Weight rows a group holds: the 16 int32 lanes of a 512-bit register.
pub const LANES: usize = 16;
/// Activation rows and weight groups a tile computes: 4 × 2 int32 and f32 accumulators, 16
/// of the 32 registers.
const MR: usize = 4;
const NG: usize = 2;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn matmul(w: &Groups, x: Activations, out: Output) {
    debug_assert_eq!(w.lanes, LANES);
    let Output { cols, out, stride } = out;
    debug_assert!(cols.start.is_multiple_of(LANES));
    let groups = cols.end.div_ceil(LANES);
    let mut g = cols.start / LANES;
    // Weight groups outermost: two groups (32 rows, ≤ 48 KiB for all-MiniLM) stay in L1/L2
    // while every activation row passes them.
    while g < groups {
        let ng = NG.min(groups - g);
        let mut m = 0;
        while m < x.rows {
            let mr = MR.min(x.rows - m);
            // SAFETY: m + mr ≤ x.rows and g + ng ≤ groups; the caller checked out holds rows
            // of `stride` for the columns.
            unsafe {
                match (mr, ng) {
                    (4, 2) => tile::<4, 2>(w, x, m, g, cols.clone(), out, stride),
                    (4, _) => tile::<4, 1>(w, x, m, g, cols.clone(), out, stride),
                    (3, 2) => tile::<3, 2>(w, x, m, g, cols.clone(), out, stride),
                    (3, _) => tile::<3, 1>(w, x, m, g, cols.clone(), out, stride),
                    (2, 2) => tile::<2, 2>(w, x, m, g, cols.clone(), out, stride),
                    (2, _) => tile::<2, 1>(w, x, m, g, cols.clone(), out, stride),
                    (_, 2) => tile::<1, 2>(w, x, m, g, cols.clone(), out, stride),
                    _ => tile::<1, 1>(w, x, m, g, cols.clone(), out, stride),
                }
            }
            m += mr;
        }
        g += ng;
    }
}

/// Outputs of activation rows `[m, m + M)` for weight groups `[g, g + N)` (within `cols`),
/// column `c` at `out[m * stride + c − cols.start]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile<const M: usize, const N: usize>(
    w: &Groups,
    x: Activations,
    m: usize,
    g: usize,
    cols: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let k = x.cols;
    let blocks = k / BLOCK;
    // SAFETY (all pointer arithmetic below): rows m..m+M of x and groups g..g+N of w exist;
    // a group holds blocks × QUADS × 64 bytes and blocks × 16 scales.
    unsafe {
        let xq: [*const i8; M] = std::array::from_fn(|i| x.quants.as_ptr().add((m + i) * k));
        let xd: [*const f32; M] = std::array::from_fn(|i| x.scales.as_ptr().add((m + i) * blocks));
        let xs: [*const i32; M] = std::array::from_fn(|i| x.sums.as_ptr().add((m + i) * blocks));
        let wq: [*const u8; N] =
            std::array::from_fn(|n| w.quants.as_ptr().add((g + n) * blocks * QUADS * 64));
        let wd: [*const f32; N] =
            std::array::from_fn(|n| w.scales.as_ptr().add((g + n) * blocks * LANES));
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for b in 0..blocks {
            let mut dot: [[__m512i; N]; M] =
                std::array::from_fn(|i| [_mm512_set1_epi32(*xs[i].add(b)); N]);
            for q in 0..QUADS {
                let wv: [__m512i; N] = std::array::from_fn(|n| {
                    _mm512_loadu_si512(wq[n].add((b * QUADS + q) * 64).cast())
                });
                for i in 0..M {
                    let four = xq[i].add(b * BLOCK + q * 4).cast::<i32>().read_unaligned();
                    let xv = _mm512_set1_epi32(four);
                    for n in 0..N {
                        dot[i][n] = _mm512_dpbusd_epi32(dot[i][n], wv[n], xv);
                    }
                }
            }
            for n in 0..N {
                let ws = _mm512_loadu_ps(wd[n].add(b * LANES));
                for i in 0..M {
                    let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*xd[i].add(b)));
                    acc[i][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][n]), scale, acc[i][n]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (n, v) in row.iter().enumerate() {
                let first = (g + n) * LANES;
                let valid = LANES.min(cols.end - first);
                let dst = out.as_mut_ptr().add((m + i) * stride + first - cols.start);
                if valid == LANES {
                    _mm512_storeu_ps(dst, *v);
                } else {
                    _mm512_mask_storeu_ps(dst, (1u16 << valid) - 1, *v);
                }
            }
        }
    }
}
