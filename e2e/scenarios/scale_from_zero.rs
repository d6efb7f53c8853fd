//! Scale from zero through the gateway on the real control plane: an EdgeDeployment scaled to
//! 0 replicas (through its scale subresource, as `kubectl scale` does) keeps its gateway; the
//! next request is held, the gateway asks for a replica through the same subresource, and the
//! request is answered 200 once the pod is Ready: no error, the time to the answer measured.
//! Then eight requests at once at zero: one wake, all answered. Then a ScalingPolicy with
//! `minReplicas: 0`: under traffic the revision keeps its pod; once the gateway has seen no
//! request for the idle window the policy takes it to 0 pods, and the next request is answered.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kasmina::api::{EdgeDeployment, ScalingPolicy};
use kasmina::controller::edge_deployment::names::{COMPONENT_LABEL, NAME_LABEL, RUNTIME_COMPONENT};
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::scenarios::lifecycle::infer_url;
use crate::support::model::{healthy, infer_body, minilm};
use crate::support::traffic::{Load, Traffic, infer_once};
use crate::support::{Scenario, until, wait};

const NAME: &str = "wake";
const FIVE_MINUTES: Duration = Duration::from_secs(300);
const IDLE_SECONDS: u64 = 8;

fn gateway() -> Value {
    json!({"type": "Canary",
           "canary": {"trafficRouting": {"gateway": {}}, "steps": [{"setWeight": 50}]}})
}

/// The value of the gateway's `metric` series whose labels contain `labels`, summed.
fn metric(text: &str, metric: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn gateway_metrics(url: &str) -> String {
    let metrics = url.replace("/v2/models/minilm/infer", "/metrics");
    match reqwest::get(&metrics).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Scales the EdgeDeployment to zero and waits until its runtime pods are gone and the
/// gateway routes to none.
async fn to_zero(s: &Scenario, url: &str, stable: &str) {
    s.api::<EdgeDeployment>()
        .patch_scale(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("scaled to 0 through the scale subresource");
    at_zero(s, url, stable).await;
}

/// Waits until the runtime pods are gone and the gateway routes to none.
async fn at_zero(s: &Scenario, url: &str, stable: &str) {
    let pods = s.api::<Pod>();
    let selector = format!("{NAME_LABEL}={NAME},{COMPONENT_LABEL}={RUNTIME_COMPONENT}");
    until("no runtime pod left", FIVE_MINUTES, || async {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    let ready = format!("revision=\"{stable}\"");
    until(
        "the gateway routing to no pod",
        Duration::from_secs(30),
        || async {
            let text = gateway_metrics(url).await;
            (!text.is_empty() && metric(&text, "kasmina_gateway_ready_pods", &ready) == 0.0)
                .then_some(())
        },
    )
    .await;
}

pub async fn run_scenario() {
    let s = Scenario::begin("scale-from-zero").await;
    let eds = s.api::<EdgeDeployment>();
    s.apply::<EdgeDeployment>(minilm(NAME, "1.0.0", 1, gateway()))
        .await;
    let ed = healthy(&eds, NAME, "1.0.0", FIVE_MINUTES).await;
    let stable = ed
        .status
        .and_then(|st| st.stable_revision)
        .expect("a stable revision");
    let url = infer_url(&s, NAME).await;
    let body = infer_body("wake up");
    let (code, _) = infer_once(&url, &body, &[]).await.expect("an answer");
    assert_eq!(code, 200);

    // 1. At zero, one request: held, the revision woken, answered.
    to_zero(&s, &url, &stable).await;
    let at_zero = wait(&eds, NAME, "Healthy at 0 replicas", FIVE_MINUTES, |ed| {
        ed.spec.replicas == 0 && ed.status.as_ref().is_some_and(|st| st.phase.is_some())
    })
    .await;
    s.figure(
        "phase at 0 replicas",
        format!("{:?}", at_zero.status.and_then(|st| st.phase)),
    );
    let asked = Instant::now();
    let answer = infer_once(&url, &body, &[]).await;
    let took = asked.elapsed();
    let (code, text) = answer.expect("the request at zero answered");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("embedding"), "{text}");
    s.seconds("0 replicas: request → 200 answer", took);
    let woken = eds.get(NAME).await.expect("the EdgeDeployment");
    assert_eq!(
        woken.spec.replicas, 1,
        "woken through the scale subresource"
    );
    let text = gateway_metrics(&url).await;
    let scaled = metric(&text, "kasmina_gateway_wakes_total", "outcome=\"scaled\"");
    assert!(scaled >= 1.0, "{text}");

    // 2. At zero again, eight requests at once: each held, one wake, every one answered.
    to_zero(&s, &url, &stable).await;
    let asked = Instant::now();
    let answers = futures::future::join_all((0..8).map(|_| infer_once(&url, &body, &[]))).await;
    s.seconds(
        "0 replicas: 8 requests at once → all answered",
        asked.elapsed(),
    );
    for answer in answers {
        let (code, text) = answer.expect("answered");
        assert_eq!(code, 200, "{text}");
    }
    let text = gateway_metrics(&url).await;
    let again = metric(&text, "kasmina_gateway_wakes_total", "outcome=\"scaled\"");
    assert_eq!(again, scaled + 1.0, "one wake for the eight: {text}");
    assert_eq!(
        metric(&text, "kasmina_gateway_held_requests", ""),
        0.0,
        "{text}"
    );

    idle_window(&s, &url, &stable, &body).await;
    s.end().await;
}

/// 3. A ScalingPolicy that may go to zero: not while requests come, after the idle window.
async fn idle_window(s: &Scenario, url: &str, stable: &str, body: &[u8]) {
    let eds = s.api::<EdgeDeployment>();
    s.apply::<ScalingPolicy>(json!({
        "apiVersion": "kasmina.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": NAME},
        "spec": {
            "targetRef": {"kind": "EdgeDeployment", "name": NAME},
            "minReplicas": 0, "maxReplicas": 2,
            "scrapeInterval": "2s",
            "idleWindow": format!("{IDLE_SECONDS}s"),
            "metrics": [{"type": "CognitiveLoad", "target": 0.7}],
        }
    }))
    .await;
    // One slow client, for twice the window: the load is near zero, the gateway is not idle.
    let light = Load::kept_alive(
        1,
        Duration::from_millis(250),
        Duration::from_secs(2 * IDLE_SECONDS),
    );
    let tally = Traffic::start(url.to_owned(), body.to_vec(), light)
        .finish()
        .await;
    tally.assert_no_failures("light traffic under a minReplicas 0 policy");
    let last_request = Instant::now();
    let sp = s
        .api::<ScalingPolicy>()
        .get(NAME)
        .await
        .expect("the policy");
    let history = sp.status.map(|st| st.history).unwrap_or_default();
    assert!(
        history.iter().all(|h| h.to > 0),
        "no scale to zero while requests came: {history:?}"
    );
    assert!(
        eds.get(NAME)
            .await
            .expect("the EdgeDeployment")
            .spec
            .replicas
            >= 1
    );
    s.figure("requests during the window", tally.sent);

    let zero = wait(
        &eds,
        NAME,
        "0 replicas after the idle window",
        Duration::from_secs(120),
        |ed| ed.spec.replicas == 0,
    )
    .await;
    assert_eq!(zero.spec.replicas, 0);
    at_zero(s, url, stable).await;
    let idle = last_request.elapsed();
    s.seconds(
        &format!("idle window {IDLE_SECONDS}s: last request → 0 pods"),
        idle,
    );
    // The policy went to zero on the gateway's traffic, not earlier.
    assert!(idle >= Duration::from_secs(IDLE_SECONDS), "{idle:?}");
    let sp = s
        .api::<ScalingPolicy>()
        .get(NAME)
        .await
        .expect("the policy");
    let last = sp
        .status
        .as_ref()
        .and_then(|st| st.history.first())
        .cloned();
    assert!(
        last.as_ref()
            .is_some_and(|h| h.to == 0 && h.reason.starts_with("no request through the gateway")),
        "{last:?}"
    );

    let asked = Instant::now();
    let (code, text) = infer_once(url, body, &[])
        .await
        .expect("the request at zero answered");
    assert_eq!(code, 200, "{text}");
    s.seconds(
        "after the idle window at 0 pods: request → 200",
        asked.elapsed(),
    );
    until(
        "the policy scaling from 1 again",
        Duration::from_secs(30),
        || async {
            let sp = s.api::<ScalingPolicy>().get(NAME).await.ok()?;
            (sp.status?.current_replicas == Some(1)).then_some(())
        },
    )
    .await;
    s.api::<ScalingPolicy>()
        .delete(NAME, &Default::default())
        .await
        .expect("the policy deleted");
}
