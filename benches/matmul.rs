//! `just bench-matmul`: one all-MiniLM layer's matrix multiplies (13 tokens, the length of a
//! one-sentence request) with Q8_0 weights, candle's kernel against Kasmina's, and F32 for
//! scale. One thread each: the runtime runs one forward pass per worker and one worker per
//! core, so single-thread speed is what a request sees.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use kasmina::model::q8::{self, Kernel, Q8Matrix};

const TOKENS: usize = 13;
/// attn_q/k/v/output, ffn_up, ffn_down: (out, in).
const LAYER: [(usize, usize); 6] = [
    (384, 384),
    (384, 384),
    (384, 384),
    (384, 384),
    (1536, 384),
    (384, 1536),
];

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Best of 5 runs of `reps` calls, in microseconds per call.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> candle_core::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "benchmark skipped: run it with `cargo bench --bench matmul` (or `just bench-matmul`)"
        );
        return Ok(());
    }
    // SAFETY: set before any other thread exists; candle reads it when its pool starts.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    let kernels = Kernel::supported();
    println!(
        "CPU kernels: {} (the runtime picks {})\n",
        kernels
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        Kernel::detect()
    );
    // One sentence, and a batch of 8 packed into one matrix (the batcher's case).
    for tokens in [TOKENS, 8 * TOKENS] {
        layer(tokens, &kernels, if tokens == TOKENS { 200 } else { 25 })?;
    }
    Ok(())
}

fn layer(tokens: usize, kernels: &[Kernel], reps: usize) -> candle_core::Result<()> {
    let columns: Vec<String> = kernels.iter().map(|k| format!("Kasmina {k} µs")).collect();
    println!("{tokens} tokens:\n");
    println!(
        "| weight (out × in) | candle Q8_0 µs | F32 (gemm) µs | {} |",
        columns.join(" | ")
    );
    println!("|---|---|---|{}", "---|".repeat(kernels.len()));
    let (mut candle_us, mut f32_us) = (0.0, 0.0);
    let mut ours_us = vec![0.0; kernels.len()];
    let mut macs = 0usize;
    for (i, &(out, inp)) in LAYER.iter().enumerate() {
        let w = Tensor::from_vec(values(out * inp, i as u64 + 1), (out, inp), &Device::Cpu)?;
        let x = Tensor::from_vec(values(tokens * inp, 99), (tokens, inp), &Device::Cpu)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let ours: Vec<Arc<Q8Matrix>> = kernels
            .iter()
            .map(|&k| Q8Matrix::for_kernel(&q, k).map(|m| Arc::new(m.expect("Q8_0 repacks"))))
            .collect::<candle_core::Result<_>>()?;
        let theirs = QMatMul::from_qtensor(q)?;
        let wt = w.t()?;
        let c = time(reps, || {
            black_box(theirs.forward(&x).expect("candle matmul"));
        });
        let f = time(reps, || {
            black_box(x.matmul(&wt).expect("f32 matmul"));
        });
        let k: Vec<f64> = ours
            .iter()
            .map(|m| {
                time(reps, || {
                    black_box(q8::apply(m, &x).expect("kasmina matmul"));
                })
            })
            .collect();
        let cells: Vec<String> = k.iter().map(|k| format!("{k:.1}")).collect();
        println!(
            "| {out} × {inp} | {c:.1} | {f:.1} | {} |",
            cells.join(" | ")
        );
        candle_us += c;
        f32_us += f;
        ours_us.iter_mut().zip(&k).for_each(|(t, k)| *t += k);
        macs += tokens * out * inp;
    }
    let cells: Vec<String> = ours_us.iter().map(|k| format!("{k:.0}")).collect();
    println!(
        "| one layer | {candle_us:.0} | {f32_us:.0} | {} |",
        cells.join(" | ")
    );
    println!();
    for (kernel, us) in kernels.iter().zip(&ours_us) {
        println!(
            "Kasmina {kernel}: {:.1}× candle's Q8_0, {:.1}× F32, {:.1} G multiply-adds/s on one thread",
            candle_us / us,
            f32_us / us,
            macs as f64 / us / 1e3
        );
    }
    println!();
    Ok(())
}
