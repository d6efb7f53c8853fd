//! Builder benchmarks on the real all-MiniLM-L6-v2 (`just fetch-model` first). Prints:
//! 1. quantize throughput (M elements/s) and peak RSS at Q8_0 and Q4_0 with 1 and 2 threads,
//!    against candle's plain one-tensor-at-a-time `QTensor::quantize` loop;
//! 2. a size × quality table per plan.
//!
//! Each measurement runs in a fresh child process so its peak RSS (VmHWM) is its own.
//!
//! `cargo bench --bench build` (or `just bench-build`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use kasmina::api::edge_deployment::{Architecture, DeviceProfile, Quantization};
use kasmina::artifact::plan::{self, Role, TensorInfo};
use kasmina::artifact::quantize;
use kasmina::artifact::source::SourceTensors;
use kasmina::artifact::{self, BuildOptions};
use kasmina::model::bert;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn tensors(
    source: &mut SourceTensors,
    declared: &[kasmina::artifact::source::Declared],
) -> Vec<TensorInfo> {
    declared
        .iter()
        .filter_map(|d| {
            let name = bert::gguf_name(&d.source_name)?;
            source.alias(&name, &d.source_name);
            Some(TensorInfo {
                role: plan::role(&name, &d.shape),
                name,
                shape: d.shape.clone(),
            })
        })
        .collect()
}

/// Child: quantize once and print "seconds elements rss".
fn child_quantize(mode: &str, dtype: &str, threads: usize) {
    let file = model_dir().join("model.safetensors");
    let (mut source, declared) = SourceTensors::open(&[file]).expect("open");
    let tensors = tensors(&mut source, &declared);
    let dtype = match dtype {
        "q8_0" => GgmlDType::Q8_0,
        _ => GgmlDType::Q4_0,
    };
    let dtypes: Vec<GgmlDType> = tensors
        .iter()
        .map(|t| {
            if t.role == Role::Keep {
                GgmlDType::F32
            } else {
                plan::effective(dtype, t.row_len())
            }
        })
        .collect();
    let elements: usize = tensors.iter().map(TensorInfo::elements).sum();
    let start = Instant::now();
    if mode == "serial" {
        let out = quantize::quantize_serial(&source, &tensors, &dtypes).expect("quantize");
        std::hint::black_box(out);
    } else {
        let measure = mode == "parallel+quality";
        let out = quantize::quantize_all(&source, &tensors, &dtypes, None, threads, measure)
            .expect("quantize");
        std::hint::black_box(out);
    }
    println!(
        "{} {} {}",
        start.elapsed().as_secs_f64(),
        elements,
        peak_rss_mib()
    );
}

fn run_child(args: &[&str]) -> (f64, f64, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .output()
        .expect("child");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(
        v.len() == 3,
        "child failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (v[0], v[1], v[2])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 5 && args[1] == "--child" {
        child_quantize(&args[2], &args[3], args[4].parse().unwrap_or(1));
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a test run is no place for a benchmark.
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "benchmark skipped: run it with `cargo bench --bench build` (or `just bench-build`)"
        );
        return;
    }
    if !model_dir().join("model.safetensors").is_file() {
        eprintln!("all-MiniLM-L6-v2 is not in models/; run `just fetch-model` first");
        return;
    }
    let repeats = 3;
    println!("## Quantize throughput, all-MiniLM-L6-v2 (22.7 M elements), best of {repeats}\n");
    println!(
        "| scheme | implementation | threads | seconds | M elements/s | peak RSS MiB | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|");
    for dtype in ["q8_0", "q4_0"] {
        let best = |mode: &str, threads: usize| {
            (0..repeats)
                .map(|_| run_child(&["--child", mode, dtype, &threads.to_string()]))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap()
        };
        let (base_s, elements, base_rss) = best("serial", 1);
        println!(
            "| {dtype} | candle loop (baseline) | 1 | {base_s:.3} | {:.1} | {base_rss:.0} | 1.00× |",
            elements / base_s / 1e6
        );
        for (mode, label) in [
            ("parallel", "kasmina chunked"),
            (
                "parallel+quality",
                "kasmina chunked + per-tensor cosine/RMSE",
            ),
        ] {
            for threads in [1, 2] {
                let (s, elements, rss) = best(mode, threads);
                println!(
                    "| {dtype} | {label} | {threads} | {s:.3} | {:.1} | {rss:.0} | {:.2}× |",
                    elements / s / 1e6,
                    base_s / s
                );
            }
        }
    }

    println!(
        "\n## Size × quality per plan (min cosine over {} sentences vs F32)\n",
        kasmina::artifact::quality::sentences().len()
    );
    println!("| plan | GGUF MB | tensor bytes MB | min cosine | mean cosine | dtypes |");
    println!("|---|---|---|---|---|---|");
    let scratch = std::env::temp_dir().join(format!("kasmina-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let profile = |mib| {
        Some(DeviceProfile {
            memory_mib: mib,
            cpu_cores: 2,
            accelerator: Default::default(),
        })
    };
    let plans: Vec<(&str, Quantization, Option<DeviceProfile>)> = vec![
        ("none (F32)", Quantization::None, None),
        ("f16", Quantization::F16, None),
        ("q8_0", Quantization::Q8_0, None),
        ("q4_k (→ q5_0 on 384-wide rows)", Quantization::Q4K, None),
        ("q4_0", Quantization::Q4_0, None),
        ("auto, 256 MiB device", Quantization::Auto, profile(256)),
        ("auto, 128 MiB device", Quantization::Auto, profile(128)),
        ("auto, 96 MiB device", Quantization::Auto, profile(96)),
        ("auto, 88 MiB device", Quantization::Auto, profile(88)),
    ];
    for (i, (label, quantization, profile)) in plans.into_iter().enumerate() {
        let options = BuildOptions {
            source: model_dir().display().to_string(),
            architecture: Architecture::Bert,
            profile,
            quantization,
            pruning: None,
            max_quality_loss: 1.0,
            out: scratch.join(format!("plan-{i}")).display().to_string(),
            sign_key: None,
            encrypt_key: None,
            termination_log: None,
            name: Some("minilm".into()),
            version: "bench".into(),
            threads: 2,
            replace: false,
        };
        match runtime.block_on(artifact::build(&options)) {
            Ok(outcome) => {
                let m = &outcome.manifest;
                println!(
                    "| {label} | {:.2} | {:.2} | {:.5} | {:.5} | {:?} |",
                    m.sizes.gguf_bytes as f64 / 1e6,
                    m.sizes.tensor_bytes as f64 / 1e6,
                    m.quality.min_cosine,
                    m.quality.mean_cosine,
                    outcome.summary.dtype_mix
                );
            }
            Err(e) => println!("| {label} | — | — | — | — | {e} |"),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
