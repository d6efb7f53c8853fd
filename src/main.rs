//! The `kasmina` binary: parse the command line, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kasmina::api::edge_deployment::{Accelerator, Architecture, DeviceProfile, Quantization};
use kasmina::artifact::prune::Pruning;
use kasmina::artifact::{self, BuildOptions};
use kasmina::crypto::{EncryptionKey, SigningKey, VerifyingKey};
use kasmina::telemetry::{self, LogFormat};
use kasmina::{controller, gateway, manifests, runtime};

/// Kasmina takes ML models to production on edge and cluster nodes: it builds artifacts sized
/// for the device, serves them, rolls out new versions with analysis, autoscales on cognitive
/// load and enforces data-protection rules.
#[derive(Parser)]
#[command(name = "kasmina", version, propagate_version = true)]
struct Cli {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KASMINA_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: the EdgeDeployment, ScalingPolicy and ComplianceProfile controllers,
    /// with leader election, metrics and health endpoints. Uses the in-cluster config or
    /// KUBECONFIG.
    Controller(Box<controller::Config>),

    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crdgen {
        /// Write one file per CRD into this folder instead of printing them.
        #[arg(long)]
        out_dir: Vec<PathBuf>,
    },

    /// Build an optimized artifact: load the model, prune, quantize to fit the device, measure
    /// quality against the source, write GGUF + manifest, sign and optionally encrypt.
    // `--version` here is the model's version, so the subcommand has no version flag.
    #[command(disable_version_flag = true)]
    Build(BuildArgs),

    /// Verify an artifact: manifest digest, signature, and the stored file's digest.
    Verify(VerifyArgs),

    /// Write a new Ed25519 signing key pair (PREFIX.key, PREFIX.pub), or with --encryption a
    /// 32-byte AES-256 key (PREFIX.aes).
    Keygen {
        /// Path prefix of the files to write.
        #[arg(long)]
        out: PathBuf,
        /// Write an encryption key instead of a signing key pair.
        #[arg(long)]
        encryption: bool,
    },

    /// Serve an artifact over the Open Inference Protocol v2: verify digest and signature,
    /// decrypt, load, then serve with dynamic batching, backpressure, metrics and optional
    /// JWT authentication; drain on SIGTERM.
    Serve(Box<runtime::Options>),

    /// Route an EdgeDeployment's requests (OIP v2) to its revisions: exact canary weights, a
    /// header to pin a revision, load-aware balancing over the ready pods, one retry on another
    /// pod; drain on SIGTERM.
    Gateway(Box<gateway::Options>),

    /// Issue a JWT for a model: signed with a PEM private key (Ed25519, P-256, RSA) or a
    /// shared-secret file, for an audience and a lifetime. Prints the token.
    Token {
        /// Private key (PEM, PKCS#8) or shared-secret file.
        #[arg(long)]
        key: PathBuf,
        /// The audience: the model name the runtime expects (or its --jwt-audience).
        #[arg(long)]
        audience: String,
        /// How long the token is valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h")]
        lifetime: kasmina::api::duration::Duration,
        /// The issuer claim.
        #[arg(long)]
        issuer: Option<String>,
        /// The subject claim: who the token is for.
        #[arg(long)]
        subject: Option<String>,
        /// A key id for the header (to pick the key from a JWKS).
        #[arg(long)]
        key_id: Option<String>,
    },

    /// Delete artifacts (folders or object-store prefixes holding a manifest): what the
    /// controller's retention Job runs for revisions past a profile's `retentionDays`.
    DeleteArtifacts {
        /// Artifact URIs: paths, file://, s3://, gs://, az://.
        #[arg(required = true)]
        uris: Vec<String>,
    },

    /// Give a `file://` artifact store's folders (not what is in them) to the image's user:
    /// what the build, retention and cleanup Jobs' init container runs, as root with only
    /// CAP_CHOWN, because the kubelet makes a hostPath folder root's.
    OwnStore {
        /// The new owner, UID:GID.
        #[arg(long, default_value = "65532:65532", value_parser = kasmina::artifact::ownership::parse_owner)]
        owner: (u32, u32),
        /// Folders; missing ones are skipped.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },

    /// Check Kasmina manifests offline with the rules the controller applies: unknown fields,
    /// types and semantic validation, each problem naming its field.
    Validate {
        /// YAML files (multi-document allowed); `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Controller(config) => run_controller(*config),
        Command::Crdgen { out_dir } => crdgen(&out_dir),
        Command::Validate { files } => validate(&files),
        Command::Build(args) => build(args),
        Command::Verify(args) => verify(&args),
        Command::Keygen { out, encryption } => keygen(&out, encryption),
        Command::Serve(options) => serve(*options),
        Command::Gateway(options) => run_service(async {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(telemetry::cancel_on_signal(shutdown.clone()));
            gateway::run(*options, shutdown).await
        }),
        Command::DeleteArtifacts { uris } => delete_artifacts(&uris),
        Command::OwnStore { owner, paths } => own_store(&paths, owner),
        Command::Token {
            key,
            audience,
            lifetime,
            issuer,
            subject,
            key_id,
        } => token(
            &key,
            &runtime::auth::TokenRequest {
                audience: &audience,
                issuer: issuer.as_deref(),
                subject: subject.as_deref(),
                lifetime: lifetime.as_std(),
                key_id: key_id.as_deref(),
            },
        ),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct BuildArgs {
    /// Model source: a Hugging Face layout folder (config.json + safetensors, sharded or not),
    /// or a single .safetensors for mlp; a path or file://, s3://, gs://, az://, https:// URI.
    #[arg(long)]
    source: String,
    /// bert (sentence encoders) or mlp (tabular).
    #[arg(long, value_parser = serde_enum::<Architecture>)]
    architecture: Architecture,
    /// The target device, e.g. memoryMiB=256,cpuCores=2,accelerator=none.
    #[arg(long, value_parser = parse_profile)]
    profile: Option<DeviceProfile>,
    /// auto (fit the profile with the least loss), q8_0, q4_0, q4_k, f16 or none.
    #[arg(long, default_value = "auto", value_parser = serde_enum::<Quantization>)]
    quantization: Quantization,
    /// magnitude:<sparsity> (e.g. magnitude:0.3) or 2:4.
    #[arg(long)]
    pruning: Option<Pruning>,
    /// Fail when 1 − min cosine against the source exceeds this.
    #[arg(long, default_value_t = 0.02)]
    max_quality_loss: f64,
    /// Output folder or object-store URI; it must hold no artifact yet, unless --replace.
    #[arg(long)]
    out: String,
    /// Replace an artifact already at --out (what the operator's build Jobs do: the folder of
    /// a revision is theirs, and a retried or repeated build must succeed). Anything there
    /// that is not an artifact is never replaced.
    #[arg(long)]
    replace: bool,
    /// Ed25519 private key (PEM) to sign the manifest with.
    #[arg(long)]
    sign_key: Option<PathBuf>,
    /// AES-256 key file (base64) to encrypt the GGUF at rest.
    #[arg(long)]
    encrypt_key: Option<PathBuf>,
    /// Where to write the ≤ 4 KiB JSON summary (Kubernetes termination message).
    #[arg(long)]
    termination_log: Option<PathBuf>,
    /// Model name; default: the source folder's name.
    #[arg(long)]
    name: Option<String>,
    /// Model version.
    #[arg(long, default_value = "0.0.0")]
    version: String,
    /// Quantization threads; default: all cores.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct VerifyArgs {
    /// The artifact folder.
    artifact: PathBuf,
    /// Ed25519 public key (PEM) the manifest must be signed with.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// The manifest digest the artifact must have (sha256:…).
    #[arg(long)]
    expect_digest: Option<String>,
    /// AES-256 key to also check the decrypted GGUF.
    #[arg(long)]
    decrypt_key: Option<PathBuf>,
}

fn serde_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}

fn parse_profile(s: &str) -> Result<DeviceProfile, String> {
    let mut profile = DeviceProfile {
        memory_mib: 0,
        cpu_cores: 1,
        accelerator: Accelerator::None,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected key=value"))?;
        match key {
            "memoryMiB" => {
                profile.memory_mib = value.parse().map_err(|e| format!("memoryMiB: {e}"))?
            }
            "cpuCores" => {
                profile.cpu_cores = value.parse().map_err(|e| format!("cpuCores: {e}"))?
            }
            "accelerator" => profile.accelerator = serde_enum(value)?,
            other => {
                return Err(format!(
                    "unknown profile key {other:?}; use memoryMiB, cpuCores, accelerator"
                ));
            }
        }
    }
    if profile.memory_mib < 16 {
        return Err("memoryMiB is required and at least 16".into());
    }
    Ok(profile)
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn build(args: BuildArgs) -> Result<ExitCode, String> {
    let options = BuildOptions {
        source: args.source,
        architecture: args.architecture,
        profile: args.profile,
        quantization: args.quantization,
        pruning: args.pruning,
        max_quality_loss: args.max_quality_loss,
        out: args.out,
        sign_key: args.sign_key,
        encrypt_key: args.encrypt_key,
        termination_log: args.termination_log,
        name: args.name,
        version: args.version,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        replace: args.replace,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let outcome = runtime.block_on(artifact::build(&options)).map_err(|e| {
        let message = telemetry::error_chain(&e);
        // The Job's termination message: the operator shows it in the EdgeDeployment's status.
        if let Some(path) = &options.termination_log {
            artifact::write_failure(path, &message);
        }
        message
    })?;
    let s = &outcome.summary;
    println!(
        "built {} {} → {}\n  digest {}\n  {} → {} bytes ({:.1}%), {} {:?}\n  quality: min cosine {:.5} (loss {:.5}) over {} samples\n  signed: {}, encrypted: {}",
        outcome.manifest.name,
        outcome.manifest.version,
        outcome.out,
        outcome.digest,
        s.original_size_bytes,
        s.size_bytes,
        100.0 * s.size_bytes as f64 / s.original_size_bytes.max(1) as f64,
        s.quantization,
        s.dtype_mix,
        s.min_cosine,
        s.quality_loss,
        outcome.manifest.quality.samples,
        s.signed,
        s.encrypted,
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(args: &VerifyArgs) -> Result<ExitCode, String> {
    let public = args
        .public_key
        .as_ref()
        .map(|p| {
            VerifyingKey::from_pem(&read(p)?, &p.display().to_string()).map_err(|e| e.to_string())
        })
        .transpose()?;
    let decrypt = args
        .decrypt_key
        .as_ref()
        .map(|p| {
            EncryptionKey::from_base64(&read(p)?, &p.display().to_string())
                .map_err(|e| e.to_string())
        })
        .transpose()?;
    let verified = artifact::verify(
        &args.artifact,
        public.as_ref(),
        args.expect_digest.as_deref(),
        decrypt.as_ref(),
    )
    .map_err(|e| telemetry::error_chain(&e))?;
    println!(
        "ok: {} {} digest {}{}",
        verified.manifest.name,
        verified.manifest.version,
        verified.digest,
        verified
            .signed_by
            .map(|k| format!(", signed by key {k}"))
            .unwrap_or_else(|| ", signature not checked (no --public-key)".into())
    );
    Ok(ExitCode::SUCCESS)
}

fn keygen(out: &std::path::Path, encryption: bool) -> Result<ExitCode, String> {
    let write = |path: PathBuf, text: String, private: bool| -> Result<(), String> {
        if path.exists() {
            return Err(format!("{}: already exists", path.display()));
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        println!("wrote {}", path.display());
        Ok(())
    };
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", out.display()));
    if encryption {
        let key = EncryptionKey::generate().map_err(|e| e.to_string())?;
        write(with("aes"), key.to_base64() + "\n", true)?;
    } else {
        let key = SigningKey::generate().map_err(|e| e.to_string())?;
        write(with("key"), key.to_pem().map_err(|e| e.to_string())?, true)?;
        write(with("pub"), key.public_key().to_pem(), false)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `work` to its end on a multi-threaded async runtime.
fn block_on<T>(work: impl Future<Output = T>) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let out = runtime.block_on(work);
    // A blocking task still running (a DNS lookup, a file read) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(out)
}

/// Runs a long-lived service (controller, runtime) on a multi-threaded async runtime.
fn run_service<E: std::error::Error>(
    service: impl Future<Output = Result<(), E>>,
) -> Result<ExitCode, String> {
    block_on(service)?.map_err(|e| telemetry::error_chain(&e))?;
    Ok(ExitCode::SUCCESS)
}

fn serve(options: runtime::Options) -> Result<ExitCode, String> {
    // candle sizes its thread pools from these when a model first runs; an explicit setting
    // wins.
    let threads = options.threads_per_pass().to_string();
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: start-up, before the async runtime or any other thread exists.
            unsafe { std::env::set_var(var, &threads) };
        }
    }
    let termination_log = options.termination_log.clone();
    let served = block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(telemetry::cancel_on_signal(shutdown.clone()));
        runtime::run(options, shutdown).await
    })?;
    match served {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // Its own exit code, which the controller reads from the pod to abort the rollout.
        Err(e) if e.refuses_artifact() => {
            let message = telemetry::error_chain(&e);
            eprintln!("error: {message}");
            if let Some(path) = &termination_log {
                artifact::write_failure(path, &message);
            }
            Ok(ExitCode::from(runtime::REFUSED_EXIT_CODE))
        }
        Err(e) => Err(telemetry::error_chain(&e)),
    }
}

fn delete_artifacts(uris: &[String]) -> Result<ExitCode, String> {
    run_service(async {
        for uri in uris {
            let files = kasmina::artifact::delete(uri).await?;
            println!("{uri}: {files} files deleted");
        }
        Ok::<(), kasmina::artifact::Error>(())
    })
}

fn own_store(paths: &[PathBuf], (uid, gid): (u32, u32)) -> Result<ExitCode, String> {
    let changed = kasmina::artifact::ownership::own(paths, uid, gid).map_err(|e| e.to_string())?;
    for path in changed {
        println!("{}: now {uid}:{gid}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn token(key: &std::path::Path, request: &runtime::auth::TokenRequest) -> Result<ExitCode, String> {
    let token = runtime::auth::issue(key, request, std::time::SystemTime::now())
        .map_err(|e| e.to_string())?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn run_controller(config: controller::Config) -> Result<ExitCode, String> {
    run_service(controller::run(config))
}

fn crdgen(out_dirs: &[PathBuf]) -> Result<ExitCode, String> {
    if out_dirs.is_empty() {
        print!("{}", manifests::crds_yaml().map_err(|e| e.to_string())?);
        return Ok(ExitCode::SUCCESS);
    }
    let files = manifests::crd_files().map_err(|e| e.to_string())?;
    for dir in out_dirs {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        for (name, yaml) in &files {
            let path = dir.join(name);
            std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(files: &[PathBuf]) -> Result<ExitCode, String> {
    let mut failed = false;
    for file in files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).map_err(|e| format!("reading stdin: {e}"))?
        } else {
            std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?
        };
        let verdicts =
            manifests::validate_yaml(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        for v in verdicts {
            if v.skipped {
                continue;
            }
            if v.problems.is_empty() {
                println!("{}: {} is valid", file.display(), v.object);
            } else {
                failed = true;
                for problem in &v.problems {
                    println!("{}: {}: {problem}", file.display(), v.object);
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
