//! Output agreement on the real control plane: all-MiniLM at F32 serves through the gateway;
//! a Q4_0 canary of the same model, whose answers drift from F32's, is rolled back by an
//! `outputAgreement` check on the answers the gateway mirrors to it, while a Q8_0 canary is
//! promoted. Traffic through the gateway meets no failure, and no mirrored answer reaches it.

use std::time::{Duration, Instant};

use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::{Phase, RolloutOutcome};
use serde_json::{Value, json};

use crate::scenarios::lifecycle::infer_url;
use crate::support::model::{healthy, infer_body, minilm, rolled_back_for};
use crate::support::traffic::{Load, Traffic};
use crate::support::{Scenario, wait};

const NAME: &str = "agree";
const FIVE_MINUTES: Duration = Duration::from_secs(300);
/// The check the issue names: a canary whose answers agree less than this is rolled back.
const MIN_AGREEMENT: f64 = 0.995;

fn strategy() -> Value {
    json!({
        "type": "Canary",
        "canary": {"trafficRouting": {"gateway": {"mirrorPercent": 50}},
                   "steps": [{"setWeight": 10}, {"analysis": {}}]},
        "analysis": {"interval": "5s", "failureLimit": 0, "checks": [
            {"metric": "errorRate", "max": 0.01},
            {"metric": "outputAgreement", "min": MIN_AGREEMENT}]},
    })
}

/// all-MiniLM at `version`, its weights kept at `quantization`.
/// The build's own quality gate (1 − min cosine on its samples, 0.02 by default) would refuse
/// Q4_0 (~0.10 here); it is loosened so the canary's answers are what judges it.
fn model(version: &str, quantization: &str) -> Value {
    let mut ed = minilm(NAME, version, 1, strategy());
    ed["spec"]["optimization"] = json!({
        "profile": {"memoryMiB": 512}, "quantization": quantization, "maxQualityLoss": 0.2});
    ed
}

/// The outputAgreement value of the last measurement of the rollout's candidate.
fn agreement(ed: &EdgeDeployment) -> Option<f64> {
    let analysis = ed.status.as_ref()?.analysis.as_ref()?;
    analysis.values.get("outputAgreement").copied()
}

pub async fn run_scenario() {
    let s = Scenario::begin("output-agreement").await;
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(model("1.0.0", "none")).await;
    healthy(&eds, NAME, "1.0.0", FIVE_MINUTES).await;
    let url = infer_url(&s, NAME).await;
    // Callers through the whole story: several sentences, so agreement is not one sentence's.
    let sentences = [
        "the canary must answer like stable",
        "quantization trades accuracy for memory",
        "edge devices have little memory to spare",
    ];
    let callers: Vec<Traffic> = sentences
        .iter()
        .map(|text| {
            Traffic::start(
                url.clone(),
                infer_body(text),
                Load::kept_alive(1, Duration::from_millis(10), Duration::from_secs(600)),
            )
        })
        .collect();

    // 1. Q4_0: its answers drift; the first measurement fails the check and rolls it back.
    s.apply::<EdgeDeployment>(model("2.0.0", "q4_0")).await;
    // Serving, or (if the first interval ended between two looks) already rolled back.
    let started = wait(&eds, NAME, "the Q4_0 canary serving", FIVE_MINUTES, |ed| {
        ed.status.as_ref().is_some_and(|st| {
            (st.canary_revision.is_some() && st.canary_weight.unwrap_or(0) > 0)
                || st.phase == Some(Phase::RolledBack)
        })
    })
    .await;
    let q4 = started.status.and_then(|st| {
        st.canary_revision
            .or_else(|| st.history.first().map(|h| h.revision.clone()))
    });
    let serving = Instant::now();
    let ed = wait(
        &eds,
        NAME,
        "the Q4_0 canary rolled back",
        FIVE_MINUTES,
        |ed| {
            ed.status.as_ref().is_some_and(|st| {
                st.phase == Some(Phase::RolledBack) && st.canary_revision.is_none()
            })
        },
    )
    .await;
    s.seconds("Q4_0 canary serving → rolled back", serving.elapsed());
    rolled_back_for(&s, &ed, q4.as_deref(), "outputAgreement").await;
    let q4_agreement = agreement(&ed).expect("the Q4_0 canary's measured agreement");
    s.figure(
        "Q4_0 canary: agreement with F32",
        format!("{q4_agreement:.4}"),
    );
    assert!(q4_agreement < MIN_AGREEMENT, "{q4_agreement}");

    // 2. Q8_0: its answers agree; it passes the analysis step and is promoted.
    s.apply::<EdgeDeployment>(model("3.0.0", "q8_0")).await;
    let promoting = Instant::now();
    let ed = healthy(&eds, NAME, "3.0.0", FIVE_MINUTES).await;
    s.seconds("Q8_0 update → promoted", promoting.elapsed());
    let status = ed.status.clone().unwrap_or_default();
    assert_eq!(
        status.history[0].outcome,
        RolloutOutcome::Promoted,
        "{:?}",
        status.history
    );
    // The analysis that let it through stays in status, naming the revision it measured.
    let analysis = status.analysis.clone().unwrap_or_default();
    assert_eq!(Some(&analysis.revision), status.stable_revision.as_ref());
    let q8_agreement = agreement(&ed).expect("the Q8_0 canary's measured agreement");
    s.figure(
        "Q8_0 canary: agreement with F32",
        format!("{q8_agreement:.4}"),
    );
    assert!(q8_agreement >= MIN_AGREEMENT, "{q8_agreement}");

    // 3. Every caller was answered, by F32 or by a canary's share, never by a failure.
    for (text, caller) in sentences.iter().zip(callers) {
        let tally = caller.stop().await;
        s.traffic(&format!("caller {text:?}"), &tally);
        tally.assert_no_failures("callers through both canaries");
    }
    s.end().await;
}
