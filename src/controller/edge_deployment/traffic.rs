//! Traffic routers, pure: how a canary weight becomes replica counts (no mesh needed; the
//! weight actually achieved is reported) or Gateway API HTTPRoute backend weights.

use serde_json::{Value, json};

/// Replicas of each revision behind the one Service, and the weight that split achieves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaSplit {
    pub stable: i32,
    pub canary: i32,
    /// Percent of traffic the canary gets with these counts (round-robin across pods).
    pub achieved_weight: i32,
}

/// Splits `replicas` for a canary `weight` (0–100). A non-zero weight gets at least one canary
/// pod; below 100 the stable revision keeps at least one, so the total may exceed `replicas`
/// by one when `replicas` is 1 (a canary always needs a pod of its own).
pub fn replica_ratio(replicas: i32, weight: i32) -> ReplicaSplit {
    let replicas = replicas.max(0);
    let weight = weight.clamp(0, 100);
    let (stable, canary) = match weight {
        0 => (replicas, 0),
        100 => (0, replicas.max(1)),
        w => {
            let canary = ((replicas * w) as f64 / 100.0).ceil().max(1.0) as i32;
            let stable = (replicas - canary).max(1);
            (stable, canary)
        }
    };
    let total = stable + canary;
    let achieved_weight = if total == 0 {
        0
    } else {
        ((100 * canary) as f64 / total as f64).round() as i32
    };
    ReplicaSplit {
        stable,
        canary,
        achieved_weight,
    }
}

/// The `backendRefs` of an HTTPRoute rule sending `weight` percent to the canary Service.
pub fn http_route_backends(
    stable_service: &str,
    canary_service: &str,
    port: i32,
    weight: i32,
) -> Value {
    let weight = weight.clamp(0, 100);
    json!([
        { "name": stable_service, "port": port, "weight": 100 - weight },
        { "name": canary_service, "port": port, "weight": weight },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ratio_reports_what_it_achieves() {
        let cases = [
            // (replicas, weight) → (stable, canary, achieved)
            ((4, 0), (4, 0, 0)),
            ((4, 25), (3, 1, 25)),
            ((4, 20), (3, 1, 25)),
            ((10, 20), (8, 2, 20)),
            ((10, 55), (4, 6, 60)),
            ((3, 50), (1, 2, 67)),
            ((1, 10), (1, 1, 50)),
            ((4, 100), (0, 4, 100)),
            ((0, 0), (0, 0, 0)),
        ];
        for ((replicas, weight), (stable, canary, achieved)) in cases {
            assert_eq!(
                replica_ratio(replicas, weight),
                ReplicaSplit {
                    stable,
                    canary,
                    achieved_weight: achieved
                },
                "{replicas} replicas at {weight}%"
            );
        }
    }

    #[test]
    fn backend_weights_sum_to_100() {
        for w in [-5, 0, 30, 100, 250] {
            let v = http_route_backends("m", "m-canary", 8080, w);
            let sum: i64 = v
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["weight"].as_i64().unwrap())
                .sum();
            assert_eq!(sum, 100);
        }
        assert_eq!(
            http_route_backends("m", "m-canary", 8080, 30)[1]["weight"],
            30
        );
    }
}
