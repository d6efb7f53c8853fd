//! `kasmina build` and `kasmina verify` on small synthetic models: plans, sizes, pruning,
//! signing, encryption, tampering, and every kind of bad input — each with a clear error and
//! no partial artifact left behind.

mod common;

use std::path::Path;

use common::*;
use kasmina::api::edge_deployment::{Architecture, DeviceProfile, Quantization};
use kasmina::artifact::manifest::{GGUF_FILE, MANIFEST_FILE, Manifest};
use kasmina::artifact::prune::Pruning;
use kasmina::artifact::{self, BuildOptions, plan};
use kasmina::crypto::{EncryptionKey, SigningKey};

fn build(options: &BuildOptions) -> Result<artifact::BuildOutcome, artifact::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(artifact::build(options))
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") || n == "out")
        .collect()
}

#[test]
fn bert_q8_0_plan_sizes_and_quality() {
    let scratch = Scratch::new("bert-q8");
    let src = scratch.path("src");
    std::fs::create_dir(&src).unwrap();
    tiny_bert(&src, 1);
    let out = scratch.path("out");
    let outcome = build(&options(&src, Architecture::Bert, &out)).unwrap();
    let m = &outcome.manifest;

    // Norms, biases and tiny tables stay F32; matrices and embeddings are Q8_0.
    for t in &m.tensors {
        let expected = match plan::role(&t.name, &t.shape) {
            plan::Role::Keep => "f32",
            _ => "q8_0",
        };
        assert_eq!(t.dtype, expected, "{}", t.name);
        assert_eq!(
            t.bytes,
            plan::bytes(
                if expected == "f32" {
                    candle_core::quantized::GgmlDType::F32
                } else {
                    candle_core::quantized::GgmlDType::Q8_0
                },
                t.shape.iter().product()
            )
        );
    }
    assert!(
        !m.tensors.iter().any(|t| t.name.contains("pooler")),
        "the pooler is not part of mean pooling"
    );
    // The GGUF is the tensors plus metadata (vocab, tokenizer) and alignment: within 2% + the metadata.
    let tensor_bytes: usize = m.tensors.iter().map(|t| t.bytes).sum();
    assert_eq!(m.sizes.tensor_bytes as usize, tensor_bytes);
    assert!(m.quality.min_cosine > 0.99, "{:?}", m.quality);
    assert_eq!(
        m.quality.samples,
        kasmina::artifact::quality::sentences().len()
    );
    assert_eq!(outcome.summary.quantization, "q8_0");

    let verified = artifact::verify(&out, None, Some(&outcome.digest), None).unwrap();
    assert_eq!(verified.digest, outcome.digest);
    assert_eq!(verified.manifest.tensors.len(), m.tensors.len());
    assert!(
        leftovers(&scratch.0) == ["out"],
        "{:?}",
        leftovers(&scratch.0)
    );
}

#[test]
fn k_quants_fall_back_per_tensor_and_q4_loses_more_than_q8() {
    let scratch = Scratch::new("bert-q4k");
    let src = scratch.path("src");
    std::fs::create_dir(&src).unwrap();
    tiny_bert(&src, 2);
    let mut opts = options(&src, Architecture::Bert, &scratch.path("q4k"));
    opts.quantization = Quantization::Q4K;
    opts.max_quality_loss = 0.5;
    let q4k = build(&opts).unwrap().manifest;
    let dtype = |m: &Manifest, n: &str| {
        m.tensors
            .iter()
            .find(|t| t.name == n)
            .unwrap()
            .dtype
            .clone()
    };
    assert_eq!(
        dtype(&q4k, "blk.0.ffn_down.weight"),
        "q4_k",
        "rows of 256 take the K-quant"
    );
    assert_eq!(
        dtype(&q4k, "blk.0.attn_q.weight"),
        "q5_0",
        "rows of 128 fall back to Q5_0 as in llama.cpp"
    );
    assert_eq!(q4k.quantization_label(), "mixed");
    let q8 = build(&options(&src, Architecture::Bert, &scratch.path("q8")))
        .unwrap()
        .manifest;
    assert!(q8.quality.min_cosine > q4k.quality.min_cosine);
    assert!(q8.sizes.gguf_bytes > q4k.sizes.gguf_bytes);
}

#[test]
fn mlp_plans_pruning_and_quality() {
    let scratch = Scratch::new("mlp");
    let file = scratch.path("tabular.safetensors");
    tiny_mlp(&file, &[64, 256, 256, 8], 3);

    let mut opts = options(&file, Architecture::Mlp, &scratch.path("plain"));
    opts.name = None;
    let plain = build(&opts).unwrap().manifest;
    assert_eq!(
        plain.name, "tabular",
        "the default name is the source file's"
    );
    assert_eq!(plain.version, "1.0.0");
    // The 256→8 output layer (2,048 weights) is small enough to stay F32.
    assert_eq!(dtype_counts(&plain).get("q8_0"), Some(&2));
    assert!(plain.quality.min_cosine > 0.999, "{:?}", plain.quality);

    let mut opts = options(&file, Architecture::Mlp, &scratch.path("pruned"));
    opts.pruning = Some(Pruning::SemiStructured24);
    opts.quantization = Quantization::None;
    opts.max_quality_loss = 1.0;
    let pruned = build(&opts).unwrap().manifest;
    let prunable = |t: &&kasmina::artifact::manifest::TensorRecord| {
        plan::role(&t.name, &t.shape) == plan::Role::Matrix
    };
    assert_eq!(
        pruned.tensors.iter().filter(prunable).count(),
        2,
        "small layers are neither quantized nor pruned"
    );
    for t in pruned.tensors.iter().filter(prunable) {
        assert!(
            (t.sparsity - 0.5).abs() < 1e-9,
            "{} sparsity {}",
            t.name,
            t.sparsity
        );
        assert_eq!(t.dtype, "f32");
    }
    let mut opts = options(&file, Architecture::Mlp, &scratch.path("magnitude"));
    opts.pruning = Some(Pruning::Magnitude { sparsity: 0.3 });
    opts.max_quality_loss = 1.0;
    let magnitude = build(&opts).unwrap();
    for t in magnitude.manifest.tensors.iter().filter(prunable) {
        assert!(
            (t.sparsity - 0.3).abs() < 0.01,
            "{} sparsity {}",
            t.name,
            t.sparsity
        );
    }
    assert!(magnitude.summary.sparsity > 0.25);
}

#[test]
fn auto_plan_fits_the_device() {
    let scratch = Scratch::new("auto");
    let src = scratch.path("src");
    std::fs::create_dir(&src).unwrap();
    tiny_bert(&src, 4);
    let mut opts = options(&src, Architecture::Bert, &scratch.path("out"));
    opts.quantization = Quantization::Auto;
    opts.profile = Some(DeviceProfile {
        memory_mib: 256,
        cpu_cores: 2,
        accelerator: Default::default(),
    });
    let m = build(&opts).unwrap().manifest;
    assert!(
        m.tensors.iter().all(|t| t.dtype == "f32"),
        "a tiny model fits a 256 MiB device at full precision"
    );
    assert!(m.quality.loss < 1e-9, "{:?}", m.quality);

    opts.profile = Some(DeviceProfile {
        memory_mib: 16,
        cpu_cores: 1,
        accelerator: Default::default(),
    });
    opts.out = scratch.path("impossible").display().to_string();
    let err = build(&opts).unwrap_err().to_string();
    assert!(err.contains("the profile allows"), "{err}");
}

#[test]
fn signed_and_encrypted_artifacts_verify_and_tampering_fails() {
    let scratch = Scratch::new("sign");
    let file = scratch.path("m.safetensors");
    tiny_mlp(&file, &[32, 64, 4], 5);
    let key = SigningKey::generate().unwrap();
    std::fs::write(scratch.path("k.key"), key.to_pem().unwrap()).unwrap();
    let aes = EncryptionKey::generate().unwrap();
    std::fs::write(scratch.path("k.aes"), aes.to_base64()).unwrap();

    let out = scratch.path("out");
    let mut opts = options(&file, Architecture::Mlp, &out);
    opts.sign_key = Some(scratch.path("k.key"));
    opts.encrypt_key = Some(scratch.path("k.aes"));
    opts.termination_log = Some(scratch.path("termination-log"));
    let outcome = build(&opts).unwrap();
    assert!(!out.join(GGUF_FILE).exists(), "no clear GGUF at rest");
    let public = key.public_key();
    artifact::verify(&out, Some(&public), Some(&outcome.digest), Some(&aes)).unwrap();

    let log = std::fs::read_to_string(scratch.path("termination-log")).unwrap();
    assert!(log.len() <= 4096);
    let summary: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(summary["digest"], outcome.digest.as_str());
    assert_eq!(summary["signed"], true);
    assert_eq!(summary["encrypted"], true);

    // Another key does not verify.
    let other = SigningKey::generate().unwrap().public_key();
    assert!(artifact::verify(&out, Some(&other), None, None).is_err());
    assert!(
        artifact::verify(
            &out,
            Some(&public),
            None,
            Some(&EncryptionKey::generate().unwrap())
        )
        .is_err()
    );

    // One flipped byte in the stored model, then in the manifest.
    let stored = out.join(&outcome.manifest.stored.file);
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&stored, &bytes).unwrap();
    let err = artifact::verify(&out, Some(&public), None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has digest"), "{err}");
    bytes[middle] ^= 0x01;
    std::fs::write(&stored, &bytes).unwrap();
    artifact::verify(&out, Some(&public), None, None).unwrap();

    let manifest_path = out.join(MANIFEST_FILE);
    let mut m = std::fs::read(&manifest_path).unwrap();
    let at = m.len() / 3;
    m[at] = if m[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&manifest_path, &m).unwrap();
    let err = artifact::verify(&out, Some(&public), None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature does not match"), "{err}");
    assert!(
        artifact::verify(&out, None, Some(&outcome.digest), None).is_err(),
        "the digest pins the manifest"
    );
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing_behind() {
    let scratch = Scratch::new("bad");
    let good = scratch.path("good.safetensors");
    tiny_mlp(&good, &[32, 64, 4], 6);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = scratch.path("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let corrupt = scratch.path("corrupt.safetensors");
    let mut c = bytes.clone();
    c[8..20].copy_from_slice(b"not json!!!!");
    std::fs::write(&corrupt, &c).unwrap();
    let ints = scratch.path("ints.safetensors");
    {
        let data: Vec<u8> = (0..64i64).flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![8, 8], &data)
            .unwrap();
        safetensors::tensor::serialize_to_file(vec![("0.weight".to_string(), view)], None, &ints)
            .unwrap();
    }
    let no_config = scratch.path("bert-no-config");
    std::fs::create_dir(&no_config).unwrap();
    std::fs::copy(&good, no_config.join("model.safetensors")).unwrap();
    std::fs::write(
        scratch.path("bad.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(scratch.path("a-file"), "x").unwrap();

    let out = scratch.path("out");
    let cases: Vec<(&str, BuildOptions, &str)> = vec![
        (
            "truncated",
            options(&truncated, Architecture::Mlp, &out),
            "not a valid safetensors file",
        ),
        (
            "corrupt",
            options(&corrupt, Architecture::Mlp, &out),
            "not a valid safetensors file",
        ),
        (
            "unsupported dtype",
            options(&ints, Architecture::Mlp, &out),
            "only F32, F16 and BF16",
        ),
        (
            "missing config",
            options(&no_config, Architecture::Bert, &out),
            "needs config.json",
        ),
        (
            "missing source",
            options(&scratch.path("nope"), Architecture::Mlp, &out),
            "No such file",
        ),
        (
            "unreachable source",
            {
                let mut o = options(&good, Architecture::Mlp, &out);
                o.source = "https://127.0.0.1:9/models/m/".into();
                o
            },
            "error sending request",
        ),
        (
            "unsupported scheme",
            {
                let mut o = options(&good, Architecture::Mlp, &out);
                o.source = "ftp://example.invalid/m.safetensors".into();
                o
            },
            "unsupported scheme",
        ),
        (
            "impossible budget",
            {
                let mut o = options(&good, Architecture::Mlp, &out);
                o.quantization = Quantization::Auto;
                o.profile = Some(DeviceProfile {
                    memory_mib: 32,
                    cpu_cores: 1,
                    accelerator: Default::default(),
                });
                o
            },
            "needs ≥",
        ),
        (
            "unwritable output",
            options(&good, Architecture::Mlp, &scratch.path("a-file/out")),
            "output",
        ),
        (
            "wrong key",
            {
                let mut o = options(&good, Architecture::Mlp, &out);
                o.sign_key = Some(scratch.path("bad.key"));
                o
            },
            "not an Ed25519 key",
        ),
        (
            "quality limit",
            {
                let mut o = options(&good, Architecture::Mlp, &out);
                o.quantization = Quantization::Q4_0;
                o.max_quality_loss = 0.0;
                o
            },
            "try quantization q8_0",
        ),
    ];
    for (case, opts, expected) in cases {
        let err = build(&opts)
            .err()
            .unwrap_or_else(|| panic!("{case}: built"));
        let message = error_chain(&err);
        assert!(message.contains(expected), "{case}: {message}");
        assert!(!out.exists(), "{case}: left {out:?} behind");
        assert!(
            leftovers(&scratch.0).is_empty(),
            "{case}: left {:?}",
            leftovers(&scratch.0)
        );
    }
    // An existing output is never overwritten without --replace.
    std::fs::create_dir(&out).unwrap();
    let err = build(&options(&good, Architecture::Mlp, &out))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--replace"),
        "{err}"
    );
}

/// What the operator's build Jobs rely on: a retried attempt, or the same revision built again
/// for an EdgeDeployment made anew, replaces the artifact at its path; a folder that is not an
/// artifact is never replaced.
#[test]
fn replace_rebuilds_over_an_artifact_and_never_over_anything_else() {
    let scratch = Scratch::new("replace");
    let source = scratch.0.join("mlp.safetensors");
    tiny_mlp(&source, &[8, 16, 4], 3);
    let out = scratch.0.join("artifact");
    let first = build(&options(&source, Architecture::Mlp, &out)).unwrap();
    std::fs::write(out.join("stale-extra-file"), b"x").unwrap();
    let mut again = options(&source, Architecture::Mlp, &out);
    again.replace = true;
    let second = build(&again).unwrap();
    assert_eq!(first.digest, second.digest, "same inputs, same artifact");
    assert!(!out.join("stale-extra-file").exists(), "replaced whole");
    let mut entries: Vec<String> = std::fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["artifact", "mlp.safetensors"],
        "nothing staged or set aside is left"
    );

    let other = scratch.0.join("photos");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("holiday.jpg"), b"not a model").unwrap();
    let mut over = options(&source, Architecture::Mlp, &other);
    over.replace = true;
    let err = build(&over).err().unwrap().to_string();
    assert!(err.contains("is not an artifact"), "{err}");
    assert!(other.join("holiday.jpg").exists(), "nothing touched");
}

/// A failed build says why in its termination message, which the operator puts in status.
#[test]
fn a_failed_build_writes_its_reason_to_the_termination_log() {
    let scratch = Scratch::new("termination");
    let log = scratch.0.join("termination-log");
    let missing = scratch.0.join("no-such-model");
    let build_from = |source: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kasmina"))
            .args(["build", "--architecture", "bert", "--source"])
            .arg(source)
            .arg("--out")
            .arg(scratch.0.join("out"))
            .arg("--termination-log")
            .arg(&log)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        std::fs::read_to_string(&log).unwrap()
    };
    let message = build_from(&missing);
    assert!(
        message.contains("no-such-model") && message.contains("No such file"),
        "{message}"
    );
    // An empty folder is what a missing hostPath source looks like inside a pod.
    std::fs::create_dir(&missing).unwrap();
    let message = build_from(&missing);
    assert!(
        message.contains("the model is not found there"),
        "{message}"
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn cli_rejects_an_unknown_architecture_and_a_bad_profile() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kasmina"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "build",
        "--source",
        "x",
        "--architecture",
        "gpt",
        "--out",
        "y",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--architecture")
            && err.contains("unknown variant `gpt`, expected `bert` or `mlp`"),
        "{err}"
    );
    let (code, err) = run(&[
        "build",
        "--source",
        "x",
        "--architecture",
        "bert",
        "--profile",
        "memory=1",
        "--out",
        "y",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown profile key \"memory\""), "{err}");
    let (code, err) = run(&["verify", "/nonexistent-artifact"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("manifest.json"), "{err}");
}
