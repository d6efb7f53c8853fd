//! `kubectl kasmina`: promote, abort, retry, pause and resume an EdgeDeployment's rollout
//! (through annotations the controller consumes), or draw its status.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kasmina::api::EdgeDeployment;
use kasmina::controller::edge_deployment::workload::NAME_LABEL;
use kasmina::plugin;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};

#[derive(Parser)]
#[command(
    name = "kubectl-kasmina",
    version,
    about = "Drive Kasmina EdgeDeployment rollouts"
)]
struct Cli {
    /// Namespace; defaults to the kubeconfig context's.
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Complete the current pause (or promote a blue-green preview).
    Promote { name: String },
    /// Send all traffic back to the stable revision now.
    Abort { name: String },
    /// Try a rolled-back revision (or a failed build) again.
    Retry { name: String },
    /// Hold the rollout where it is.
    Pause { name: String },
    /// Continue a paused rollout.
    Resume { name: String },
    /// Draw the rollout: revisions, weights, steps, analysis, conditions and history.
    Status { name: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("connecting to the cluster: {e}"))?;
    let ns = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), &ns);
    let (verb, name) = match &cli.command {
        Verb::Promote { name } => ("promote", name),
        Verb::Abort { name } => ("abort", name),
        Verb::Retry { name } => ("retry", name),
        Verb::Pause { name } => ("pause", name),
        Verb::Resume { name } => ("resume", name),
        Verb::Status { name } => ("status", name),
    };
    let ed = eds
        .get(name)
        .await
        .map_err(|e| format!("EdgeDeployment {ns}/{name}: {e}"))?;
    if verb == "status" {
        let deployments: Api<Deployment> = Api::namespaced(client, &ns);
        let list = deployments
            .list(&ListParams::default().labels(&format!("{NAME_LABEL}={name}")))
            .await
            .map_err(|e| format!("listing the Deployments of {name}: {e}"))?;
        print!("{}", plugin::render(&ed, &list.items));
        return Ok(());
    }
    let patch = plugin::command_patch(verb, &Timestamp::now().to_string());
    eds.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("annotating EdgeDeployment {ns}/{name}: {e}"))?;
    println!("edgedeployment.kasmina.dev/{name} {verb} requested");
    Ok(())
}
