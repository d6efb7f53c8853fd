//! The VNNI kernels: one vpdpbusd multiplies 4 int8 pairs for each of `LANES` weight rows (16
//! on AVX-512 VNNI, 8 on AVX-VNNI), so the int32 sums of a block need no horizontal reduction
//! and are scaled once a block for `LANES` outputs at a time. Both are made from one template
//! ([`vnni_kernel!`]); only the register width and the intrinsics' names differ.
//!
//! vpdpbusd multiplies unsigned by signed bytes. The weights are stored offset by 128
//! (`w + 128`, see [`super::Groups`]); each activation block's sum times −128 starts the
//! block's accumulator, so the offset cancels exactly in integer arithmetic.

/// One kernel module: `matmul` over weights packed in groups of `$lanes` rows, tiles of up to
/// `$mr` activation rows × 2 groups.
macro_rules! vnni_kernel {
    (
        $module:ident, $features:literal, lanes: $lanes:literal, rows: $mr:literal,
        $int:ident, $float:ident,
        zero: $zero:ident, splat_i32: $splat_i:ident, splat_f32: $splat_f:ident,
        load_i: $load_i:ident, load_f: $load_f:ident, store_f: $store_f:ident,
        dot: $dot:ident, to_f32: $to_f:ident, mul: $mul:ident, fma: $fma:ident $(,)?
    ) => {
        pub mod $module {
            use std::arch::x86_64::*;

            use super::super::{Activations, BLOCK, Groups, Output, QUADS};

            /// Weight rows a group holds: the int32 lanes of a register.
            pub const LANES: usize = $lanes;
            /// Bytes of one quad run of a group: 4 values of each of its rows.
            const RUN: usize = LANES * 4;
            /// Activation rows and weight groups a tile computes; `MR × NG` int32 and f32
            /// accumulators take half the registers.
            const MR: usize = $mr;
            const NG: usize = 2;

            #[target_feature(enable = $features)]
            pub unsafe fn matmul(w: &Groups, x: Activations, out: Output) {
                debug_assert_eq!(w.lanes, LANES);
                let Output { cols, out, stride } = out;
                debug_assert!(cols.start.is_multiple_of(LANES));
                let groups = cols.end.div_ceil(LANES);
                let mut g = cols.start / LANES;
                // Weight groups outermost: two groups (≤ 48 KiB for all-MiniLM) stay in L1/L2
                // while every activation row passes them.
                while g < groups {
                    let ng = NG.min(groups - g);
                    let mut m = 0;
                    while m < x.rows {
                        let mr = MR.min(x.rows - m);
                        let cols = cols.clone();
                        // SAFETY: m + mr ≤ x.rows and g + ng ≤ groups; the caller checked out
                        // holds rows of `stride` for the columns.
                        unsafe {
                            match (mr, ng) {
                                (6, 2) => tile::<6, 2>(w, x, m, g, cols, out, stride),
                                (6, _) => tile::<6, 1>(w, x, m, g, cols, out, stride),
                                (5, 2) => tile::<5, 2>(w, x, m, g, cols, out, stride),
                                (5, _) => tile::<5, 1>(w, x, m, g, cols, out, stride),
                                (4, 2) => tile::<4, 2>(w, x, m, g, cols, out, stride),
                                (4, _) => tile::<4, 1>(w, x, m, g, cols, out, stride),
                                (3, 2) => tile::<3, 2>(w, x, m, g, cols, out, stride),
                                (3, _) => tile::<3, 1>(w, x, m, g, cols, out, stride),
                                (2, 2) => tile::<2, 2>(w, x, m, g, cols, out, stride),
                                (2, _) => tile::<2, 1>(w, x, m, g, cols, out, stride),
                                (_, 2) => tile::<1, 2>(w, x, m, g, cols, out, stride),
                                _ => tile::<1, 1>(w, x, m, g, cols, out, stride),
                            }
                        }
                        m += mr;
                    }
                    g += ng;
                }
            }

            /// Outputs of activation rows `[m, m + M)` for weight groups `[g, g + N)` (within
            /// `cols`), column `c` at `out[m * stride + c − cols.start]`.
            #[target_feature(enable = $features)]
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
                // SAFETY (all pointer arithmetic below): rows m..m+M of x and groups g..g+N of
                // w exist; a group holds blocks × QUADS × RUN bytes and blocks × LANES scales.
                unsafe {
                    let xq: [*const i8; M] =
                        std::array::from_fn(|i| x.quants.as_ptr().add((m + i) * k));
                    let xd: [*const f32; M] =
                        std::array::from_fn(|i| x.scales.as_ptr().add((m + i) * blocks));
                    let xs: [*const i32; M] =
                        std::array::from_fn(|i| x.sums.as_ptr().add((m + i) * blocks));
                    let wq: [*const u8; N] = std::array::from_fn(|n| {
                        w.quants.as_ptr().add((g + n) * blocks * QUADS * RUN)
                    });
                    let wd: [*const f32; N] =
                        std::array::from_fn(|n| w.scales.as_ptr().add((g + n) * blocks * LANES));
                    let mut acc = [[$zero(); N]; M];
                    for b in 0..blocks {
                        let mut dot: [[$int; N]; M] =
                            std::array::from_fn(|i| [$splat_i(*xs[i].add(b)); N]);
                        for q in 0..QUADS {
                            let wv: [$int; N] = std::array::from_fn(|n| {
                                $load_i(wq[n].add((b * QUADS + q) * RUN).cast())
                            });
                            for i in 0..M {
                                let four =
                                    xq[i].add(b * BLOCK + q * 4).cast::<i32>().read_unaligned();
                                let xv = $splat_i(four);
                                for n in 0..N {
                                    dot[i][n] = $dot(dot[i][n], wv[n], xv);
                                }
                            }
                        }
                        for n in 0..N {
                            let ws = $load_f(wd[n].add(b * LANES));
                            for i in 0..M {
                                let scale = $mul(ws, $splat_f(*xd[i].add(b)));
                                acc[i][n] = $fma($to_f(dot[i][n]), scale, acc[i][n]);
                            }
                        }
                    }
                    for (i, row) in acc.iter().enumerate() {
                        for (n, v) in row.iter().enumerate() {
                            let first = (g + n) * LANES;
                            let valid = LANES.min(cols.end - first);
                            let dst = out.as_mut_ptr().add((m + i) * stride + first - cols.start);
                            if valid == LANES {
                                $store_f(dst, *v);
                            } else {
                                let mut lanes = [0f32; LANES];
                                $store_f(lanes.as_mut_ptr(), *v);
                                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, valid);
                            }
                        }
                    }
                }
            }
        }
    };
}

vnni_kernel!(
    avx512, "avx512f,avx512bw,avx512vnni", lanes: 16, rows: 6,
    __m512i, __m512,
    zero: _mm512_setzero_ps, splat_i32: _mm512_set1_epi32, splat_f32: _mm512_set1_ps,
    load_i: _mm512_loadu_si512, load_f: _mm512_loadu_ps, store_f: _mm512_storeu_ps,
    dot: _mm512_dpbusd_epi32, to_f32: _mm512_cvtepi32_ps, mul: _mm512_mul_ps,
    fma: _mm512_fmadd_ps,
);

vnni_kernel!(
    avx, "avx2,fma,avxvnni", lanes: 8, rows: 3,
    __m256i, __m256,
    zero: _mm256_setzero_ps, splat_i32: _mm256_set1_epi32, splat_f32: _mm256_set1_ps,
    load_i: _mm256_loadu_si256, load_f: _mm256_loadu_ps, store_f: _mm256_storeu_ps,
    dot: _mm256_dpbusd_avx_epi32, to_f32: _mm256_cvtepi32_ps, mul: _mm256_mul_ps,
    fma: _mm256_fmadd_ps,
);
