//! End-to-end scenarios on a real cluster: the operator installed from the Helm chart runs in
//! the cluster, and each scenario drives it as a user would (kubectl, YAML, real traffic to
//! ClusterIPs and pod IPs), asserting on status, conditions, Events, children and answers.
//!
//! `just e2e-local` starts the real control plane of `../shared/k8s/` (Kubernetes 1.19: etcd,
//! kube-apiserver, controller-manager, scheduler; pods as local processes) with the release
//! binary, runs this suite and stops it; CI does the same. `just e2e` runs the suite against the
//! cluster in KUBECONFIG (kind, k3s). `cargo test` leaves this target out (`test = false`); run
//! on purpose, a scenario that cannot run fails (no cluster, no `KASMINA_E2E=1`): it never
//! skips.
//!
//! Each scenario has its own namespace and prints `FIGURE` lines (also appended to
//! `target/e2e-figures.txt`), which docs/benchmarks.md records.

mod scenarios;
mod support;

/// One test per scenario, on a runtime of its own.
macro_rules! scenarios {
    ($($(#[$doc:meta])* $test:ident => $module:ident;)*) => {$(
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            scenarios::$module::run_scenario().await;
        }
    )*};
}

scenarios! {
    install => install;
    lifecycle => lifecycle;
    blue_green => blue_green;
    autoscaling => autoscaling;
    compliance => compliance;
    gateway_route => gateway_route;
    gateway => gateway;
    output_agreement => output_agreement;
    scale_from_zero => scale_from_zero;
    bad_input => bad_input;
    /// Kills and restarts operator replicas: `just e2e` runs it alone, after the others.
    operator_faults => faults;
}
