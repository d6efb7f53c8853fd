//! `kubectl kasmina`: promote, abort, retry, pause and resume an EdgeDeployment's rollout
//! (through annotations the controller consumes), draw its status, or mint a token for its
//! runtime.

use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kasmina::api::EdgeDeployment;
use kasmina::controller::edge_deployment::names::NAME_LABEL;
use kasmina::controller::edge_deployment::security;
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
    /// Print a JWT for the EdgeDeployment's runtime, signed with the key in its keys Secret
    /// (made when a ComplianceProfile requires authentication); audience: the model's name.
    Token {
        name: String,
        /// How long the token is valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h")]
        lifetime: kasmina::api::duration::Duration,
        /// The subject claim: who the token is for.
        #[arg(long)]
        subject: Option<String>,
    },
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
        Verb::Token { name, .. } => ("token", name),
    };
    let ed = eds
        .get(name)
        .await
        .map_err(|e| format!("EdgeDeployment {ns}/{name}: {e}"))?;
    if let Verb::Token {
        lifetime, subject, ..
    } = &cli.command
    {
        let secret = security::secret_name(&ed);
        let secrets: Api<Secret> = Api::namespaced(client, &ns);
        let data = secrets
            .get(&secret)
            .await
            .map_err(|e| {
                format!(
                    "Secret {ns}/{secret}: {e} (does a ComplianceProfile require authentication?)"
                )
            })?
            .data
            .unwrap_or_default();
        let key = data
            .get(security::JWT_KEY)
            .ok_or_else(|| format!("Secret {ns}/{secret} has no {}", security::JWT_KEY))?;
        let request = kasmina::runtime::auth::TokenRequest {
            audience: &ed.spec.model.name,
            issuer: None,
            subject: subject.as_deref(),
            lifetime: lifetime.as_std(),
            key_id: None,
        };
        let what = format!("Secret {ns}/{secret}, key {}", security::JWT_KEY);
        let token = kasmina::runtime::auth::issue_with(&key.0, &what, &request, SystemTime::now())
            .map_err(|e| e.to_string())?;
        println!("{token}");
        return Ok(());
    }
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
