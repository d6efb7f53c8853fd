//! Blue-green: the preview Service answers the new revision while the active one serves the
//! old; promotion (`kubectl kasmina promote`) switches the active Service under continuous
//! load with no failed request; the old revision goes after `scaleDownDelaySeconds`.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::Phase;
use serde_json::json;

use super::lifecycle::infer_url;
use crate::support::model::{healthy, infer_body, minilm};
use crate::support::traffic::{Load, Traffic, infer_once};
use crate::support::{Scenario, kubectl, until, wait, wait_gone};

const NAME: &str = "minilm";
const DELAY_SECONDS: u64 = 10;
const FIVE_MINUTES: Duration = Duration::from_secs(300);

fn blue_green() -> serde_json::Value {
    json!({"type": "BlueGreen",
           "blueGreen": {"autoPromote": false, "scaleDownDelaySeconds": DELAY_SECONDS}})
}

async fn version_at(url: &str) -> Option<String> {
    let (code, body) = infer_once(url, &infer_body("which version?"), &[])
        .await
        .ok()?;
    (code == 200).then_some(())?;
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    answer["model_version"].as_str().map(str::to_owned)
}

pub async fn run_scenario() {
    let s = Scenario::begin("blue-green").await;
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(NAME, "1.0.0", 2, blue_green()))
        .await;
    let ed = healthy(&eds, NAME, "1.0.0", FIVE_MINUTES).await;
    let blue = ed
        .status
        .and_then(|st| st.stable_revision)
        .unwrap_or_default();
    let active = infer_url(&s, NAME).await;
    let preview = infer_url(&s, &format!("{NAME}-preview")).await;

    // Keep-alive clients: the hard case for a switch (a Service moves new connections only).
    let load = Load::kept_alive(4, Duration::from_millis(20), Duration::from_secs(400));
    let traffic = Traffic::start(active.clone(), infer_body("continuous load"), load);

    // The green revision: built, previewed, waiting for a promotion.
    s.apply::<EdgeDeployment>(minilm(NAME, "2.0.0", 2, blue_green()))
        .await;
    let ed = wait(
        &eds,
        NAME,
        "green waiting for promotion",
        FIVE_MINUTES,
        |ed| {
            ed.status.as_ref().is_some_and(|st| {
                st.phase == Some(Phase::Paused)
                    && st.canary_revision.is_some()
                    && st.canary_revision != st.stable_revision
            })
        },
    )
    .await;
    let green = ed
        .status
        .and_then(|st| st.canary_revision)
        .unwrap_or_default();
    until(
        "the preview Service answering 2.0.0",
        Duration::from_secs(60),
        || async { (version_at(&preview).await.as_deref() == Some("2.0.0")).then_some(()) },
    )
    .await;
    assert_eq!(
        version_at(&active).await.as_deref(),
        Some("1.0.0"),
        "active still serves blue"
    );

    // Promote as a user does, and time the switch as the traffic sees it.
    let promoted = Instant::now();
    kubectl(&["kasmina", "promote", NAME, "-n", &s.ns], None);
    until(
        "the active Service answering 2.0.0",
        Duration::from_secs(60),
        || async { (version_at(&active).await.as_deref() == Some("2.0.0")).then_some(()) },
    )
    .await;
    s.seconds("promotion → active answers green", promoted.elapsed());
    let ed = healthy(&eds, NAME, "2.0.0", Duration::from_secs(60)).await;
    assert_eq!(
        ed.status.and_then(|st| st.stable_revision),
        Some(green.clone())
    );

    // Blue stays for the delay (a quick roll back), then goes.
    let blue_deployment = format!("{NAME}-{}", &blue[..8]);
    assert!(
        s.api::<Deployment>()
            .get_opt(&blue_deployment)
            .await
            .ok()
            .flatten()
            .is_some(),
        "blue is kept during scaleDownDelaySeconds"
    );
    wait_gone(
        s.api::<Deployment>(),
        &blue_deployment,
        Duration::from_secs(DELAY_SECONDS + 60),
    )
    .await;
    s.seconds("promotion → blue deleted", promoted.elapsed());
    s.figure("scaleDownDelaySeconds", DELAY_SECONDS);
    assert!(
        promoted.elapsed() >= Duration::from_secs(DELAY_SECONDS),
        "not before the delay"
    );

    // Keep-alive clients stay on blue's pods until blue drains and closes their connections
    // (a Service change moves new connections only); then they reach green.
    let before = traffic.answered_by("2.0.0");
    until(
        "the load's clients answered by green",
        Duration::from_secs(60),
        || async { (traffic.answered_by("2.0.0") > before + 100).then_some(()) },
    )
    .await;
    s.seconds("promotion → the load answered by green", promoted.elapsed());
    let tally = traffic.stop().await;
    s.traffic("keep-alive load", &tally);
    tally.assert_no_failures("continuous load through the blue-green switch");
    tally.assert_answered_by(&["1.0.0", "2.0.0"]);
    s.end().await;
}
