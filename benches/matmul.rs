//! `just bench-matmul`: one all-MiniLM layer's matrix multiplies (13 tokens, the length of a
//! one-sentence request) with Q8_0 weights, candle's kernel against Kasmina's, and F32 for
//! scale. One thread each: the runtime runs one forward pass per worker and one worker per
//! core, so single-thread speed is what a request sees.

use std::hint::black_box;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use kasmina::model::q8::{BLOCK, Q8Matrix};

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
    let reps = 200;
    let (mut candle_us, mut kasmina_us, mut f32_us, mut blocks) = (0.0, 0.0, 0.0, 0usize);
    println!(
        "| weight (out × in) | candle Q8_0 µs | Kasmina Q8_0 µs | F32 (gemm) µs | Kasmina ns per block |"
    );
    println!("|---|---|---|---|---|");
    for (i, &(out, inp)) in LAYER.iter().enumerate() {
        let w = Tensor::from_vec(values(out * inp, i as u64 + 1), (out, inp), &Device::Cpu)?;
        let x = Tensor::from_vec(values(TOKENS * inp, 99), (TOKENS, inp), &Device::Cpu)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let ours = Q8Matrix::from_qtensor(&q)?.expect("Q8_0 repacks");
        let theirs = QMatMul::from_qtensor(q)?;
        let wt = w.t()?;
        let c = time(reps, || {
            black_box(theirs.forward(&x).expect("candle matmul"));
        });
        let k = time(reps, || {
            black_box(ours.apply(&x).expect("kasmina matmul"));
        });
        let f = time(reps, || {
            black_box(x.matmul(&wt).expect("f32 matmul"));
        });
        let n = TOKENS * out * inp / BLOCK;
        println!(
            "| {out} × {inp} | {c:.1} | {k:.1} | {f:.1} | {:.2} |",
            k * 1e3 / n as f64
        );
        candle_us += c;
        kasmina_us += k;
        f32_us += f;
        blocks += n;
    }
    println!(
        "| one layer | {candle_us:.0} | {kasmina_us:.0} | {f32_us:.0} | {:.2} |",
        kasmina_us * 1e3 / blocks as f64
    );
    println!(
        "\nKasmina is {:.1}× candle's Q8_0 and {:.1}× F32; {:.1} G multiply-adds/s on one thread.",
        candle_us / kasmina_us,
        f32_us / kasmina_us,
        (blocks * BLOCK) as f64 / kasmina_us / 1e3
    );
    Ok(())
}
