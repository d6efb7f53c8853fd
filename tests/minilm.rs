//! The real all-MiniLM-L6-v2 (fetched by `just fetch-model`, which `.ci/run` calls):
//! our F32 forward against an independent numpy reference, Q8_0 (on every int8 kernel the CPU
//! has) and the auto plan for a 256 MiB device against F32 on every sentence of the set
//! (edge cases included), the GGUF
//! read back by our loader and by llama.cpp's own Python reader.
//!
//! Without the model (or Python's numpy/tokenizers/safetensors/gguf) each test says what is
//! missing and passes locally; under CI (`CI=true`) a missing piece fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Scratch;
use kasmina::api::edge_deployment::{Architecture, DeviceProfile, Quantization};
use kasmina::artifact::{self, gguf, quality};
use kasmina::model::bert::{self, Bert};
use kasmina::model::cosine;
use kasmina::model::q8::Kernel;

fn model_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").is_err(),
        "CI must fetch the model: `just fetch-model`"
    );
    eprintln!("SKIPPED: all-MiniLM-L6-v2 not in models/; run `just fetch-model`");
    None
}

fn python_has(modules: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install the Python modules {modules}"
        );
        eprintln!("SKIPPED: python3 lacks {modules}");
    }
    ok
}

fn build(
    source: &Path,
    out: &Path,
    quantization: Quantization,
    memory_mib: Option<u32>,
) -> artifact::BuildOutcome {
    let mut options = common::options(source, Architecture::Bert, out);
    options.quantization = quantization;
    options.profile = memory_mib.map(|m| DeviceProfile {
        memory_mib: m,
        cpu_cores: 2,
        accelerator: Default::default(),
    });
    options.max_quality_loss = 0.02;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(artifact::build(&options))
        .unwrap()
}

/// Loads a built artifact the way the runtime does: GGUF weights, config and tokenizer.
fn load(dir: &Path) -> Bert {
    let mut file = std::fs::File::open(dir.join("model.gguf")).unwrap();
    let loaded = gguf::read(&mut file).unwrap();
    let (config, tokenizer) = gguf::bert_from_metadata(&loaded).unwrap();
    Bert::new(
        config,
        loaded.weights,
        tokenizer.as_bytes(),
        bert::DEFAULT_MAX_TOKENS,
    )
    .unwrap()
}

fn f32_reference(dir: &Path, scratch: &Scratch) -> Vec<Vec<f32>> {
    let out = scratch.path("f32");
    build(dir, &out, Quantization::None, None);
    quality::bert_outputs(&load(&out)).unwrap()
}

#[test]
fn f32_forward_matches_an_independent_numpy_reference() {
    let Some(dir) = model_dir() else { return };
    if !python_has("numpy, tokenizers, safetensors") {
        return;
    }
    let scratch = Scratch::new("minilm-ref");
    let ours = f32_reference(&dir, &scratch);
    let sentences = quality::sentences();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/minilm_reference.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&sentences).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let theirs: Vec<Vec<f32>> = serde_json::from_slice(&output.stdout).unwrap();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let c = cosine(a, b);
        assert!(
            c > 0.99999,
            "sentence {i} {:?}: cosine {c}",
            &sentences[i][..sentences[i].len().min(40)]
        );
    }
}

#[test]
fn q8_0_and_auto_256_keep_every_sentence_close_to_f32() {
    let Some(dir) = model_dir() else { return };
    let scratch = Scratch::new("minilm-q");
    let reference = f32_reference(&dir, &scratch);
    for (label, quantization, memory, floor) in [
        ("q8_0", Quantization::Q8_0, None, 0.998),
        ("auto-256", Quantization::Auto, Some(256), 0.995),
    ] {
        let out = scratch.path(label);
        let outcome = build(&dir, &out, quantization, memory);
        // The builder's own report covers every sentence…
        assert!(
            outcome.manifest.quality.min_cosine >= floor,
            "{label}: {:?}",
            outcome.manifest.quality
        );
        // …and so does the artifact as the runtime loads it, on every int8 kernel this CPU
        // has (the runtime picks the fastest; `--kernel` may force another).
        for kernel in Kernel::supported() {
            let served = quality::bert_outputs(&Kernel::scoped(kernel, || load(&out))).unwrap();
            let worst = reference
                .iter()
                .zip(&served)
                .map(|(a, b)| cosine(a, b))
                .fold(1.0, f64::min);
            assert!(
                worst >= floor,
                "{label} on {kernel}: min cosine {worst} < {floor}"
            );
            eprintln!("{label} served on the {kernel} kernel: min cosine {worst:.5}");
        }
        // The tensor data follows the block-format arithmetic within 2% (alignment padding);
        // the metadata (vocabulary, tokenizer.json) comes on top and is reported apart.
        let m = &outcome.manifest;
        let arithmetic: usize = m.tensors.iter().map(|t| t.bytes).sum();
        let mut file = std::fs::File::open(out.join("model.gguf")).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let data_bytes = m.sizes.gguf_bytes as usize - content.tensor_data_offset as usize;
        let ratio = data_bytes as f64 / arithmetic as f64;
        assert!(
            (1.0..1.02).contains(&ratio),
            "{label}: tensor data {data_bytes} vs arithmetic {arithmetic}"
        );
        assert_eq!(m.sizes.tensor_bytes as usize, arithmetic);
        eprintln!(
            "{label}: {} bytes, min cosine {:.5}",
            m.sizes.gguf_bytes, m.quality.min_cosine
        );
    }
}

#[test]
fn llama_cpp_reader_lists_every_tensor_with_the_manifest_dtype() {
    let Some(dir) = model_dir() else { return };
    if !python_has("gguf") {
        return;
    }
    let scratch = Scratch::new("minilm-gguf");
    let out = scratch.path("q4k");
    let mut options = common::options(&dir, Architecture::Bert, &out);
    options.quantization = Quantization::Q4K;
    options.max_quality_loss = 0.2;
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(artifact::build(&options))
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/gguf_list.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(out.join("model.gguf"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed["architecture"], "bert");
    let tensors = listed["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), outcome.manifest.tensors.len());
    for t in &outcome.manifest.tensors {
        assert_eq!(tensors[&t.name], t.dtype.as_str(), "{}", t.name);
    }
    assert!(
        tensors.values().any(|d| d == "q4_k") && tensors.values().any(|d| d == "q5_0"),
        "{tensors:?}"
    );
}

/// The Q8_0 artifact served by the real `kasmina serve` binary: every sentence of the set,
/// sent concurrently (so they batch), stays within cosine 0.998 of the builder's F32 forward;
/// and NVIDIA's own OIP v2 client, `tritonclient[http]`, gets the same embeddings with the
/// binary tensor extension and with plain JSON.
#[test]
fn served_q8_0_matches_f32_over_http_and_through_tritonclient() {
    let Some(dir) = model_dir() else { return };
    let scratch = Scratch::new("minilm-serve");
    let reference = f32_reference(&dir, &scratch);
    let out = scratch.path("q8_0");
    let outcome = build(&dir, &out, Quantization::Q8_0, None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_kasmina"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--expect-digest", &outcome.digest, "--artifact"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sentences = quality::sentences();
    let model = outcome.manifest.name.clone();
    let served: Vec<Vec<f32>> = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while common::http::get_status(addr, "/v2/health/ready").await != Some(200) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("kasmina serve became ready");
        let calls: Vec<_> = sentences
            .iter()
            .map(|s| {
                let body = serde_json::json!({"inputs": [{"name": "text", "shape": [1],
                    "datatype": "BYTES", "data": [s]}]});
                let path = format!("/v2/models/{model}/infer");
                tokio::spawn(async move { common::http::post(addr, &path, &body).await })
            })
            .collect();
        let mut served = vec![];
        for call in calls {
            let r = call.await.unwrap();
            assert_eq!(r.status, 200, "{}", r.error());
            served.push(serde_json::from_value(r.json()["outputs"][0]["data"].clone()).unwrap());
        }
        served
    });
    for (i, (a, b)) in reference.iter().zip(&served).enumerate() {
        let c = cosine(a, b);
        assert!(
            c >= 0.998,
            "served sentence {i} ({:?}): cosine {c}",
            sentences[i]
        );
    }

    if python_has("numpy, tritonclient.http") {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/triton_infer.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(addr.to_string())
            .arg(&model)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = serde_json::to_vec(&sentences).unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "tritonclient failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(v["metadata"]["name"], model);
        for mode in ["binary", "json"] {
            let rows: Vec<Vec<f32>> = serde_json::from_value(v[mode].clone()).unwrap();
            assert_eq!(rows.len(), sentences.len(), "{mode}");
            for (i, (a, b)) in reference.iter().zip(&rows).enumerate() {
                let c = cosine(a, b);
                assert!(c >= 0.998, "tritonclient {mode}: sentence {i} cosine {c}");
            }
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    assert!(server.wait().unwrap().success());
}
