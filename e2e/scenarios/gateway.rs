//! `trafficRouting.gateway` on the real control plane: the operator runs `kasmina gateway`
//! in front of the revisions (its Deployment, ServiceAccount and RoleBinding, the
//! EdgeDeployment's Service pointing at it); a 5 % canary with 2 stable replicas gets 5 % of
//! 2,000 requests (the replica ratio could give it 33 % at best); a header pins the canary;
//! promotion moves every request to the new revision under keep-alive traffic, none lost.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kasmina::api::EdgeDeployment;
use kasmina::api::edge_deployment::Phase;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::scenarios::lifecycle::infer_url;
use crate::support::model::{healthy, infer_body, minilm};
use crate::support::traffic::{Load, Traffic};
use crate::support::{Scenario, kubectl, wait};

const NAME: &str = "gw";
const FIVE_MINUTES: Duration = Duration::from_secs(300);

fn canary() -> Value {
    json!({"type": "Canary",
           "canary": {"trafficRouting": {"gateway": {"balancing": "PowerOfTwoChoices"}},
                      "steps": [{"setWeight": 5}, {"pause": {}}]}})
}

pub async fn run_scenario() {
    let s = Scenario::begin("gateway").await;
    let eds = s.api::<EdgeDeployment>();
    let started = Instant::now();
    s.apply::<EdgeDeployment>(minilm(NAME, "1.0.0", 2, canary()))
        .await;
    healthy(&eds, NAME, "1.0.0", FIVE_MINUTES).await;
    s.seconds("apply → Healthy with its gateway", started.elapsed());

    // The gateway's children, owned by the EdgeDeployment; the Service selects the gateway.
    let gateway = format!("{NAME}-gateway");
    let deployment = s
        .api::<Deployment>()
        .get(&gateway)
        .await
        .expect("the gateway Deployment");
    assert!(
        deployment
            .owner_references()
            .iter()
            .any(|o| o.kind == "EdgeDeployment")
    );
    s.api::<ServiceAccount>()
        .get(&gateway)
        .await
        .expect("the gateway's ServiceAccount");
    let binding = s
        .api::<RoleBinding>()
        .get(&gateway)
        .await
        .expect("the gateway's RoleBinding");
    assert!(
        binding.role_ref.name.ends_with("-gateway"),
        "{:?}",
        binding.role_ref
    );
    let service = s.api::<Service>().get(NAME).await.expect("the Service");
    let selector = service.spec.and_then(|sp| sp.selector).unwrap_or_default();
    assert_eq!(
        selector
            .get("app.kubernetes.io/component")
            .map(String::as_str),
        Some("gateway"),
        "{selector:?}"
    );
    let url = infer_url(&s, NAME).await;

    // The next version at 5 %, paused there.
    s.apply::<EdgeDeployment>(minilm(NAME, "2.0.0", 2, canary()))
        .await;
    let paused = wait(&eds, NAME, "the canary paused at 5 %", FIVE_MINUTES, |ed| {
        ed.status
            .as_ref()
            .is_some_and(|st| st.canary_weight == Some(5) && st.phase == Some(Phase::Paused))
    })
    .await;
    let canary = paused
        .status
        .as_ref()
        .and_then(|st| st.canary_revision.clone())
        .expect("a canary revision");
    // Its pod is Ready, so the gateway routes to it (a canary without one takes no share).
    wait(
        &s.api::<Deployment>(),
        &format!("{NAME}-{}", &canary[..8.min(canary.len())]),
        "the canary's pod Ready",
        FIVE_MINUTES,
        |d: &Deployment| d.status.as_ref().and_then(|st| st.ready_replicas) == Some(1),
    )
    .await;
    // The gateway sees the pod within a watch event; give it a moment with pinned probes.
    let pinned = Load {
        headers: vec![("kasmina-revision".into(), "canary".into())],
        max_requests: 20,
        ..Load::kept_alive(1, Duration::ZERO, Duration::from_secs(60))
    };
    let until_routed = Instant::now();
    loop {
        let tally = Traffic::start(
            url.clone(),
            infer_body("pinned"),
            Load {
                max_requests: 1,
                ..pinned.clone()
            },
        )
        .finish()
        .await;
        if tally.ok == 1 || until_routed.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tally = Traffic::start(url.clone(), infer_body("pinned"), pinned)
        .finish()
        .await;
    tally.assert_no_failures("requests pinned to the canary");
    tally.assert_answered_by(&["2.0.0"]);

    let load = Load {
        max_requests: 2_000,
        ..Load::kept_alive(4, Duration::ZERO, Duration::from_secs(180))
    };
    let tally = Traffic::start(url.clone(), infer_body("a 5 % canary"), load)
        .finish()
        .await;
    s.traffic("2,000 requests at 5 %", &tally);
    tally.assert_no_failures("the 5 % split");
    let to_canary = tally.versions.get("2.0.0").copied().unwrap_or(0);
    s.figure(
        "canary share of 2,000 requests (%)",
        format!("{:.2}", 100.0 * to_canary as f64 / tally.ok as f64),
    );
    assert_eq!(tally.ok, 2_000);
    assert!(
        (80..=120).contains(&to_canary),
        "a 5 % canary answered {to_canary} of 2,000 (5 % ± 1 point is 80–120): {}",
        tally.summary()
    );

    // Promotion under keep-alive traffic: every request answered, then all by 2.0.0.
    let during = Traffic::start(
        url.clone(),
        infer_body("promotion"),
        Load::kept_alive(2, Duration::from_millis(20), Duration::from_secs(240)),
    );
    let promoted = Instant::now();
    kubectl(&["kasmina", "promote", NAME, "-n", &s.ns], None);
    healthy(&eds, NAME, "2.0.0", FIVE_MINUTES).await;
    let until_all = Instant::now();
    while during.answered_by("1.0.0") > 0 && until_all.elapsed() < Duration::from_secs(30) {
        let before = during.answered_by("1.0.0");
        tokio::time::sleep(Duration::from_secs(2)).await;
        if during.answered_by("1.0.0") == before {
            break;
        }
    }
    s.seconds("promote → Healthy on 2.0.0", promoted.elapsed());
    let tally = during.stop().await;
    s.traffic("keep-alive traffic through the promotion", &tally);
    tally.assert_no_failures("the promotion through the gateway");
    let after = Traffic::start(
        url,
        infer_body("after"),
        Load {
            max_requests: 50,
            ..Load::kept_alive(2, Duration::ZERO, Duration::from_secs(60))
        },
    )
    .finish()
    .await;
    after.assert_no_failures("after the promotion");
    after.assert_answered_by(&["2.0.0"]);
    s.end().await;
}
