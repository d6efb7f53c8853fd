//! The `kasmina` binary: parse the command line, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kasmina::telemetry::{self, LogFormat};
use kasmina::{controller, manifests};

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
    Controller(controller::Config),

    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crdgen {
        /// Write one file per CRD into this folder instead of printing them.
        #[arg(long)]
        out_dir: Vec<PathBuf>,
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
        Command::Controller(config) => run_controller(config),
        Command::Crdgen { out_dir } => crdgen(&out_dir),
        Command::Validate { files } => validate(&files),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_controller(config: controller::Config) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime
        .block_on(controller::run(config))
        .map_err(|e| error_chain(&e))?;
    Ok(ExitCode::SUCCESS)
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

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
