//! `just sim-rollout`: a good and a bad canary through simulated time and metrics, and the
//! cost of the pure rollout decision + analysis for 1,000 EdgeDeployments.
//!
//! The canary: setWeight 20 → analysis ×2 → setWeight 50 → analysis ×2, analysis every 15 s,
//! failureLimit 2, checks error rate ≤ 5 % and p99 ≤ 1.5× stable. The controller reconciles
//! every second of simulated time; a measurement lands at each analysis interval.

use std::time::Instant;

use kasmina::api::edge_deployment::{AnalysisMetric, MetricCheck};
use kasmina::controller::edge_deployment::analysis::{self, Window};
use kasmina::controller::edge_deployment::rollout::{
    self, Kind, Observed, Outcome, Phase, State, Step, Strategy,
};

const INTERVAL: i64 = 15;

fn strategy() -> Strategy {
    Strategy {
        kind: Kind::Canary {
            steps: vec![
                Step::SetWeight(20),
                Step::Analysis(2),
                Step::SetWeight(50),
                Step::Analysis(2),
            ],
        },
        failure_limit: 2,
    }
}

fn checks() -> Vec<MetricCheck> {
    vec![
        MetricCheck {
            metric: AnalysisMetric::ErrorRate,
            min: None,
            max: Some(0.05),
            max_relative_to_stable: None,
        },
        MetricCheck {
            metric: AnalysisMetric::LatencyP99Ms,
            min: None,
            max: None,
            max_relative_to_stable: Some(1.5),
        },
    ]
}

fn window(error_rate: f64, p99: f64) -> Window {
    Window {
        requests: 500.0,
        error_rate,
        p50_ms: p99 / 3.0,
        p95_ms: p99 / 1.5,
        p99_ms: p99,
        load: 0.5,
        agreement: None,
    }
}

struct Run {
    promoted_at: Option<i64>,
    rolled_back_at: Option<i64>,
    limit_reached_at: Option<i64>,
    first_bad_at: Option<i64>,
}

/// `bad_from`: simulated second from which the candidate misbehaves (None: never).
fn simulate(bad_from: Option<i64>) -> Run {
    let strategy = strategy();
    let checks = checks();
    let mut state = State {
        stable: Some("stable".into()),
        ..State::default()
    };
    let mut run = Run {
        promoted_at: None,
        rolled_back_at: None,
        limit_reached_at: None,
        first_bad_at: None,
    };
    let start = 1_000;
    let mut last_measurement = start;
    for now in start..start + 600 {
        let due = now - last_measurement >= INTERVAL;
        let measurement = (due && state.candidate.is_some()).then(|| {
            last_measurement = now;
            let bad = bad_from.is_some_and(|t| now - start >= t);
            if bad && run.first_bad_at.is_none() {
                run.first_bad_at = Some(now);
            }
            let candidate = if bad {
                window(0.2, 90.0)
            } else {
                window(0.01, 31.0)
            };
            analysis::judge(&checks, Some(&candidate), Some(&window(0.005, 30.0)))
        });
        let seen = Observed {
            now,
            target: "canary".into(),
            artifact_ready: true,
            candidate_ready: true,
            compliant: true,
            refused: None,
            spec_paused: false,
            measurement,
            command: None,
        };
        let d = rollout::decide(&strategy, &state, &seen);
        if d.state.failed == strategy.failure_limit && run.limit_reached_at.is_none() {
            run.limit_reached_at = Some(now);
        }
        match d.ended.as_ref().map(|e| e.outcome) {
            Some(Outcome::Promoted) => run.promoted_at = Some(now - start),
            Some(Outcome::RolledBack) => run.rolled_back_at = Some(now),
            _ => {}
        }
        state = d.state;
        if matches!(d.phase, Phase::Healthy | Phase::RolledBack) && state.candidate.is_none() {
            break;
        }
    }
    run
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "benchmark skipped: run it with `cargo bench --bench rollout` (or `just sim-rollout`)"
        );
        return;
    }
    println!("## Rollout simulation (analysis every {INTERVAL} s, failureLimit 2)\n");
    println!(
        "| canary | outcome | time to full promotion s | first bad interval → traffic on stable s | failureLimit reached → rollback s |"
    );
    println!("|---|---|---|---|---|");
    let good = simulate(None);
    println!(
        "| good | promoted | {} | – | – |",
        good.promoted_at.map_or("never".into(), |t| t.to_string())
    );
    let bad = simulate(Some(40));
    let (Some(first), Some(back), Some(limit)) =
        (bad.first_bad_at, bad.rolled_back_at, bad.limit_reached_at)
    else {
        println!("| bad | NOT rolled back | – | – | – |");
        return;
    };
    println!(
        "| bad (from t = 40 s) | rolled back | – | {} | {} (target ≤ {INTERVAL}) |",
        back - first,
        back - limit
    );

    // Decision cost: 1,000 objects at a mix of steps, each decided with a fresh measurement.
    let strategy = strategy();
    let checks = checks();
    let states: Vec<State> = (0..1000)
        .map(|i| State {
            stable: Some("a".into()),
            candidate: Some("b".into()),
            step: (i % 4) as u32,
            weight: if i % 4 >= 2 { 50 } else { 20 },
            ..State::default()
        })
        .collect();
    let rounds = 200;
    let started = Instant::now();

    for round in 0..rounds {
        for (i, s) in states.iter().enumerate() {
            let m = analysis::judge(
                &checks,
                Some(&window(if (i + round) % 7 == 0 { 0.1 } else { 0.01 }, 31.0)),
                Some(&window(0.005, 30.0)),
            );
            let d = rollout::decide(
                &strategy,
                s,
                &Observed {
                    now: 10_000 + round as i64,
                    target: "b".into(),
                    artifact_ready: true,
                    candidate_ready: true,
                    compliant: true,
                    refused: None,
                    spec_paused: false,
                    measurement: Some(m),
                    command: None,
                },
            );
            std::hint::black_box(d);
        }
    }
    let per = started.elapsed().as_secs_f64() * 1e6 / (rounds * states.len()) as f64;
    println!("\n## Decision cost\n");
    println!(
        "judge + decide for 1,000 EdgeDeployments: {per:.2} µs per object ({per:.2} ms per 1,000)"
    );
    full_plan_cost();
}

/// The whole pure reconcile — validation, revision hash, rollout decision, the desired Job,
/// Deployments and Services with their content hashes, status and conditions — for 1,000
/// canary EdgeDeployments mid-rollout, each with its live children observed.
fn full_plan_cost() {
    use k8s_openapi::jiff::Timestamp;
    use kasmina::api::EdgeDeployment;
    use kasmina::api::edge_deployment::{ArtifactStatus, RevisionRecord, RolloutState};
    use kasmina::controller::edge_deployment::observed::Observed;
    use kasmina::controller::edge_deployment::plan;
    use kasmina::controller::edge_deployment::workload::Settings;

    let settings = Settings {
        image: "kasmina:0.1.0".into(),
        artifact_store: "s3://artifacts".into(),
        artifact_store_secret: None,
        host_paths: vec![],
        gateway_cluster_role: "kasmina-gateway".into(),
    };
    let now = Timestamp::from_second(1_800_000_000).unwrap();
    let objects: Vec<(EdgeDeployment, Observed)> = (0..1000)
        .map(|i| {
            let mut ed: EdgeDeployment = serde_json::from_value(serde_json::json!({
                "apiVersion": "kasmina.dev/v1alpha1", "kind": "EdgeDeployment",
                "metadata": {"name": format!("model-{i}"), "namespace": "ml", "uid": format!("uid-{i}"), "generation": 2},
                "spec": {"model": {"name": "minilm", "version": "2.0.0", "source": {"uri": "s3://m/"}, "architecture": "bert"},
                         "optimization": {"profile": {"memoryMiB": 256}}, "replicas": 5,
                         "strategy": {"type": "Canary",
                                      "canary": {"steps": [{"setWeight": 20}, {"analysis": {"iterations": 2}}, {"setWeight": 50}, {"analysis": {"iterations": 2}}]},
                                      "analysis": {"checks": [{"metric": "errorRate", "max": 0.05}]}}},
            }))
            .unwrap();
            let target = plan::revision(&ed.spec, &Default::default());
            let artifact = ArtifactStatus {
                digest: "sha256:x".into(),
                ..ArtifactStatus::default()
            };
            let mut status = kasmina::api::edge_deployment::EdgeDeploymentStatus {
                revisions: ["0000000000000000".to_owned(), target.clone()]
                    .into_iter()
                    .map(|name| RevisionRecord {
                        name,
                        model_version: "2.0.0".into(),
                        artifact: artifact.clone(),
                        built_at: None,
                    })
                    .collect(),
                ..Default::default()
            };
            status.rollout = Some(RolloutState {
                stable: Some("0000000000000000".into()),
                candidate: Some(target),
                step: (i % 4) as u32,
                weight: if i % 4 >= 2 { 50 } else { 20 },
                ..RolloutState::default()
            });
            ed.status = Some(status);
            let first = plan::plan(&ed, &Observed::default(), &settings, now);
            ed.status = Some(first.status);
            let seen = Observed {
                deployments: first.deployments,
                services: first.services,
                ..Observed::default()
            };
            (ed, seen)
        })
        .collect();
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        for (ed, seen) in &objects {
            std::hint::black_box(plan::plan(ed, seen, &settings, now));
        }
    }
    let per = started.elapsed().as_secs_f64() * 1e6 / (rounds * objects.len()) as f64;
    println!(
        "full plan (decision + desired children + status) for 1,000 EdgeDeployments: {per:.1} µs per object ({:.1} ms per 1,000)",
        per
    );
}
