//! Operator faults: SIGKILL of the leader mid-rollout (another replica takes over within the
//! lease duration and finishes the rollout), a restart mid-canary (the rollout resumes at the
//! same step with no new build), and SIGTERM (the process exits within its drain, also while
//! the API server answers it with errors).
//!
//! On the local control plane (`just e2e-local`) pods are processes of this host, signalled
//! and timed directly; elsewhere the pods are deleted (with no grace period for the kill) and
//! timed until the kubelet reports them gone.

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::RolloutOutcome;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::support::model::{healthy, minilm};
use crate::support::operator::{self, NAME as OPERATOR};
use crate::support::{Scenario, kubectl, run, until, wait};

const APP: &str = "minilm";
const FIVE_MINUTES: Duration = Duration::from_secs(300);
/// The chart's leaderElection defaults.
const LEASE_SECONDS: u64 = 15;
const RETRY_SECONDS: u64 = 2;
/// The chart's terminationGracePeriodSeconds.
const GRACE_SECONDS: u64 = 30;

fn canary(pause: serde_json::Value) -> serde_json::Value {
    json!({"type": "Canary",
           "canary": {"trafficRouting": {"replicaRatio": {}},
                      "steps": [{"setWeight": 50}, {"pause": pause}]}})
}

/// The operator processes of a pod on this host: their environment names the pod (the chart
/// sets POD_NAME), whichever container incarnation they are.
fn processes_of(pod: &str) -> Vec<i32> {
    let wanted = format!("POD_NAME={pod}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes()))
                && alive(*pid)
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next())
            != Some("Z")
    })
}

/// The process of an operator pod, when it runs on this host (the local control plane).
fn local_process(pod: &str) -> Option<i32> {
    match processes_of(pod).as_slice() {
        [] => None,
        [pid] => Some(*pid),
        pids => panic!("pod {pod} has {} processes here: {pids:?}", pids.len()),
    }
}

fn kill(pid: i32, signal: &str) {
    let out = run("kill", &[&format!("-{signal}"), &pid.to_string()], None);
    assert!(out.ok, "kill -{signal} {pid}: {}", out.stderr);
}

async fn delete_pod(client: &Client, name: &str, grace_seconds: Option<i64>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), operator::NAMESPACE);
    let params = DeleteParams {
        grace_period_seconds: grace_seconds.map(|g| g as u32),
        ..DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("deleting pod {name}: {e}"),
    }
}

/// SIGKILL to the leader's process, as a crash or an OOM kill does. Here its container
/// restarts in the pod (a new process, a new candidate); then the pod goes, so its ReplicaSet
/// makes a fresh one: the local kubelet gives a restarted container a new IP, which the API
/// server refuses to record, so it would never be seen Ready again. On a cluster whose pods
/// are not processes of this host, the pod is deleted with no grace period instead.
async fn kill_leader(s: &Scenario) -> (String, Instant) {
    let holder = operator::lease_holder(&s.client).await.expect("a leader");
    let pod = operator::pod_of_holder(&holder).to_owned();
    let killed = Instant::now();
    match local_process(&pod) {
        Some(pid) => {
            kill(pid, "KILL");
            until(
                &format!("pod {pod}'s container restarted"),
                Duration::from_secs(30),
                || async { processes_of(&pod).iter().any(|p| *p != pid).then_some(()) },
            )
            .await;
            delete_pod(&s.client, &pod, None).await;
        }
        None => delete_pod(&s.client, &pod, Some(0)).await,
    }
    (holder, killed)
}

/// SIGTERM to an operator pod, the way the kubelet stops it (the pod is deleted); returns how
/// long its process took to exit (elsewhere than here: until the kubelet reported the pod
/// gone, which it does once its container stopped).
async fn terminate(s: &Scenario, pod: &str) -> Duration {
    let pid = local_process(pod);
    let sent = Instant::now();
    delete_pod(&s.client, pod, None).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), operator::NAMESPACE);
    let within = Duration::from_secs(GRACE_SECONDS);
    match pid {
        Some(pid) => {
            until(
                &format!("the process of {pod} exiting after SIGTERM"),
                within,
                || async { (!alive(pid)).then_some(()) },
            )
            .await
        }
        None => crate::support::wait_gone(pods, pod, within).await,
    }
    sent.elapsed()
}

pub async fn run_scenario() {
    let s = Scenario::begin("faults").await;
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(APP, "1.0.0", 2, canary(json!({"duration": "20s"}))))
        .await;
    healthy(&eds, APP, "1.0.0", FIVE_MINUTES).await;

    leader_killed_mid_rollout(&s).await;
    restart_mid_canary(&s).await;
    sigterm_exits_within_the_drain(&s).await;
    sigterm_exits_while_the_api_answers_errors(&s).await;
    operator::wait_ready(&s.client, Duration::from_secs(120)).await;
    s.end().await;
}

/// Waits for a process other than `holder` to hold the Lease; returns its identity.
async fn next_leader(s: &Scenario, holder: &str, what: &str, within: Duration) -> String {
    until(what, within, || async {
        operator::lease_holder(&s.client)
            .await
            .filter(|h| h != holder)
    })
    .await
}

async fn build_jobs(s: &Scenario) -> Vec<Job> {
    s.api::<Job>()
        .list(&ListParams::default().labels("app.kubernetes.io/component=build"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

async fn leader_killed_mid_rollout(s: &Scenario) {
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(APP, "2.0.0", 2, canary(json!({"duration": "20s"}))))
        .await;
    wait(&eds, APP, "the canary in its pause", FIVE_MINUTES, |ed| {
        ed.status
            .as_ref()
            .is_some_and(|st| st.canary_revision.is_some() && st.current_step == Some(1))
    })
    .await;
    let builds = build_jobs(s).await.len();
    let (holder, killed) = kill_leader(s).await;
    // The standby, or a fresh pod, whichever claims the expired lease first.
    let next = next_leader(
        s,
        &holder,
        "another process leading",
        Duration::from_secs(LEASE_SECONDS + 30),
    )
    .await;
    let takeover = killed.elapsed();
    s.seconds("SIGKILL of the leader → another process leads", takeover);
    // A standby judges expiry by its own clock from when it saw the last renewal, and it
    // looks every retry period: the last renewal is seen up to one period after it was made,
    // and made up to one period before the kill.
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 2 * RETRY_SECONDS),
        "{next} took over {takeover:?} after the kill; the lease lasts {LEASE_SECONDS} s"
    );
    let ed = healthy(&eds, APP, "2.0.0", FIVE_MINUTES).await;
    s.seconds(
        "SIGKILL → rollout finished by the new leader",
        killed.elapsed(),
    );
    let history = ed.status.unwrap_or_default().history;
    assert_eq!(history[0].outcome, RolloutOutcome::Promoted, "{history:?}");
    assert_eq!(
        build_jobs(s).await.len(),
        builds,
        "no build repeated by the new leader"
    );
    operator::wait_ready(&s.client, Duration::from_secs(120)).await;
}

async fn restart_mid_canary(s: &Scenario) {
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(APP, "3.0.0", 2, canary(json!({}))))
        .await;
    let before = wait(
        &eds,
        APP,
        "the canary paused at step 1",
        FIVE_MINUTES,
        |ed| {
            ed.status
                .as_ref()
                .is_some_and(|st| st.canary_revision.is_some() && st.current_step == Some(1))
        },
    )
    .await
    .status
    .unwrap_or_default();
    let jobs: Vec<String> = build_jobs(s).await.iter().filter_map(|j| j.uid()).collect();
    let old_pods: Vec<String> = operator::operator_pods(&s.client)
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();

    let restarted = Instant::now();
    kubectl(
        &[
            "rollout",
            "restart",
            "deployment",
            OPERATOR,
            "-n",
            operator::NAMESPACE,
        ],
        None,
    );
    until(
        "every operator pod replaced",
        Duration::from_secs(180),
        || async {
            let pods = operator::operator_pods(&s.client).await;
            let fresh = pods.iter().all(|p| !old_pods.contains(&p.name_any()));
            (fresh && pods.len() == 2).then_some(())
        },
    )
    .await;
    operator::wait_ready(&s.client, Duration::from_secs(120)).await;
    s.seconds("operator restart → ready again", restarted.elapsed());
    // Promotion needs the new leader: its answer proves it took over at the same step.
    let ed = eds.get(APP).await.expect("the EdgeDeployment");
    let after = ed.status.unwrap_or_default();
    assert_eq!(
        after.canary_revision, before.canary_revision,
        "same candidate"
    );
    assert_eq!(after.current_step, before.current_step, "same step");
    kubectl(&["kasmina", "promote", APP, "-n", &s.ns], None);
    healthy(&eds, APP, "3.0.0", Duration::from_secs(120)).await;
    let now: Vec<String> = build_jobs(s).await.iter().filter_map(|j| j.uid()).collect();
    assert_eq!(now, jobs, "no new build after the restart");
}

async fn sigterm_exits_within_the_drain(s: &Scenario) {
    let holder = operator::lease_holder(&s.client).await.expect("a leader");
    let sent = Instant::now();
    let exit = terminate(s, operator::pod_of_holder(&holder)).await;
    s.seconds("SIGTERM of the leader → exit", exit);
    // The lease was handed back: another process leads long before it would have expired.
    let next = next_leader(
        s,
        &holder,
        "another process leading after the release",
        Duration::from_secs(LEASE_SECONDS),
    )
    .await;
    let handover = sent.elapsed();
    s.seconds("SIGTERM of the leader → another process leads", handover);
    assert!(
        handover < Duration::from_secs(LEASE_SECONDS),
        "{next} led {handover:?} after the SIGTERM: the lease was not handed back"
    );
    operator::wait_ready(&s.client, Duration::from_secs(120)).await;
}

/// The API answering errors: the operator's ClusterRole loses every rule its controllers list
/// with (the webhook's stay, so no replica restarts), the leader is killed, and the process
/// that leads next starts controllers whose every list answers 403, so their caches never
/// sync. It must still exit on SIGTERM within its drain (before the fix it hung for good
/// after "released leadership").
async fn sigterm_exits_while_the_api_answers_errors(s: &Scenario) {
    let roles: Api<ClusterRole> = Api::all(s.client.clone());
    let role = roles.get(OPERATOR).await.expect("the chart's ClusterRole");
    let restore = Restore(role.clone());
    let webhook_only: Vec<_> = role
        .rules
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|rule| {
            rule.resources.iter().flatten().any(|r| {
                [
                    "complianceprofiles",
                    "namespaces",
                    "validatingwebhookconfigurations",
                    "events",
                ]
                .contains(&r.as_str())
            })
        })
        .collect();
    roles
        .patch(
            OPERATOR,
            &PatchParams::default(),
            &Patch::Merge(json!({"rules": webhook_only})),
        )
        .await
        .expect("narrowing the ClusterRole");
    let (holder, _) = kill_leader(s).await;
    let next = next_leader(
        s,
        &holder,
        "a new leader without permissions",
        Duration::from_secs(LEASE_SECONDS + 30),
    )
    .await;
    let pod = operator::pod_of_holder(&next).to_owned();
    until(
        "the new leader meeting 403s",
        Duration::from_secs(30),
        || async {
            operator::logs(operator::NAMESPACE, &pod, 100)
                .contains("403")
                .then_some(())
        },
    )
    .await;
    let exit = terminate(s, &pod).await;
    s.seconds("SIGTERM while every list answers 403 → exit", exit);
    assert!(
        exit < Duration::from_secs(GRACE_SECONDS),
        "exited within the grace period"
    );
    drop(restore);
}

/// Puts the ClusterRole back however the scenario ends, so later scenarios run.
struct Restore(ClusterRole);

impl Drop for Restore {
    fn drop(&mut self) {
        let rules = json!({"rules": self.0.rules});
        let out = run(
            "kubectl",
            &[
                "patch",
                "clusterrole",
                OPERATOR,
                "--type=merge",
                "-p",
                &rules.to_string(),
            ],
            None,
        );
        if !out.ok {
            eprintln!("could not restore the ClusterRole: {}", out.stderr);
        }
    }
}
