//! Autoscaling: under bounded load a ScalingPolicy on cognitive load scales the EdgeDeployment
//! up within two scrape intervals of the load being scraped, and back down after its
//! stabilization window once the load stops; the scale-down loses no request.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kasmina::api::{EdgeDeployment, ScalingPolicy};
use kube::api::ListParams;
use serde_json::json;

use super::lifecycle::infer_url;
use crate::support::model::{healthy, infer_body, minilm};
use crate::support::traffic::{Load, Traffic};
use crate::support::{Scenario, until, wait};

const NAME: &str = "minilm";
const SCRAPE_SECONDS: u64 = 2;
const WINDOW_SECONDS: u64 = 10;

pub async fn run_scenario() {
    let s = Scenario::begin("autoscaling").await;
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(NAME, "1.0.0", 1, json!({"type": "Rolling"})))
        .await;
    healthy(&eds, NAME, "1.0.0", Duration::from_secs(300)).await;
    s.apply::<ScalingPolicy>(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": NAME},
        "spec": {
            "targetRef": {"kind": "EdgeDeployment", "name": NAME},
            "minReplicas": 1, "maxReplicas": 3,
            "scrapeInterval": format!("{SCRAPE_SECONDS}s"),
            "metrics": [{"type": "CognitiveLoad", "target": 0.6}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0, "cooldownSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": WINDOW_SECONDS, "cooldownSeconds": 0},
            },
        }
    }))
    .await;
    let sps = s.api::<ScalingPolicy>();
    wait(
        &sps,
        NAME,
        "the policy scraping",
        Duration::from_secs(60),
        |sp| {
            sp.status
                .as_ref()
                .is_some_and(|st| st.cognitive_load.is_some() && st.current_replicas == Some(1))
        },
    )
    .await;
    let url = infer_url(&s, NAME).await;

    // Load: more clients than one replica's workers, back to back, bounded.
    let heavy = Load::kept_alive(8, Duration::ZERO, Duration::from_secs(90));
    let loaded = Instant::now();
    let traffic = Traffic::start(
        url.clone(),
        infer_body("a sentence to keep the model busy"),
        heavy,
    );
    let sp = wait(&sps, NAME, "a scale-up", Duration::from_secs(60), |sp| {
        sp.status
            .as_ref()
            .is_some_and(|st| st.desired_replicas.unwrap_or(1) > 1)
    })
    .await;
    let reaction = loaded.elapsed();
    s.seconds("scale-up reaction from load start", reaction);
    let status = sp.status.unwrap_or_default();
    s.figure(
        "cognitive load seen",
        format!("{:.2}", status.cognitive_load.unwrap_or_default()),
    );
    s.figure(
        "replicas after scale-up",
        status.desired_replicas.unwrap_or_default(),
    );
    // The first scrape after the load starts sees it; the decision is that scrape's.
    assert!(
        reaction <= Duration::from_secs(2 * SCRAPE_SECONDS + 1),
        "scaled up {reaction:?} after the load started; the scrape interval is {SCRAPE_SECONDS} s"
    );
    let ed = wait(
        &eds,
        NAME,
        "the new replicas ready",
        Duration::from_secs(60),
        |ed| {
            ed.spec.replicas > 1
                && ed
                    .status
                    .as_ref()
                    .is_some_and(|st| st.ready_replicas == Some(ed.spec.replicas))
        },
    )
    .await;
    s.seconds("load start → new replicas ready", loaded.elapsed());
    assert!(ed.spec.replicas <= 3, "maxReplicas holds");
    let tally = traffic.stop().await;
    s.traffic("load", &tally);
    tally.assert_no_failures("load during the scale-up");

    // Load stops; a light probe keeps going through the scale-down.
    let probe = Traffic::start(
        url,
        infer_body("light probe"),
        Load {
            clients: 1,
            pause: Duration::from_millis(200),
            ..Load::probe()
        },
    );
    let quiet = Instant::now();
    wait(
        &eds,
        NAME,
        "scaled back to one replica",
        Duration::from_secs(WINDOW_SECONDS + 60),
        |ed| ed.spec.replicas == 1,
    )
    .await;
    let down = quiet.elapsed();
    s.seconds("scale-down after the load stopped", down);
    s.figure("scaleDown stabilizationWindowSeconds", WINDOW_SECONDS);
    assert!(
        down >= Duration::from_secs(WINDOW_SECONDS - SCRAPE_SECONDS),
        "not before the window: {down:?}"
    );
    // Until the removed pods have drained and gone, and a little past it.
    let pods = s.api::<Pod>();
    let runtime = ListParams::default().labels(&format!(
        "kasmina.dev/edge-deployment={NAME},app.kubernetes.io/component=runtime"
    ));
    until("one runtime pod left", Duration::from_secs(90), || async {
        (pods.list(&runtime).await.ok()?.items.len() == 1).then_some(())
    })
    .await;
    let answered = probe.answered_by("1.0.0");
    until(
        "the probe answered on the one pod left",
        Duration::from_secs(30),
        || async { (probe.answered_by("1.0.0") >= answered + 10).then_some(()) },
    )
    .await;
    let tally = probe.stop().await;
    s.traffic("probe through the scale-down", &tally);
    tally.assert_no_failures("the scale-down");
    s.end().await;
}
