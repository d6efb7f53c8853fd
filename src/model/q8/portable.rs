//! The reference every other kernel must match, and the path on CPUs without them.

use super::{Activations, BLOCK, Output};

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

/// `out[m][r] = Σ_b dot(w[r]_b, x[m]_b) · (wd[r][b] · xd[m][b])` over row-major weights.
pub fn matmul(quants: &[i8], scales: &[f32], x: Activations, out: Output) {
    let Output {
        cols: wanted,
        out,
        stride,
    } = out;
    let cols = x.cols;
    let blocks = cols / BLOCK;
    for m in 0..x.rows {
        let xq = &x.quants[m * cols..][..cols];
        let xd = &x.scales[m * blocks..][..blocks];
        for r in wanted.clone() {
            let wq = &quants[r * cols..][..cols];
            let wd = &scales[r * blocks..][..blocks];
            let mut sum = 0f32;
            for b in 0..blocks {
                let dot: i32 = wq[b * BLOCK..][..BLOCK]
                    .iter()
                    .zip(&xq[b * BLOCK..][..BLOCK])
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
                sum += dot as f32 * (wd[b] * xd[b]);
            }
            out[m * stride + r - wanted.start] = sum;
        }
    }
}
