//! Pure: which revision a request goes to. Weights are exact, not sampled: of every 100
//! requests a gateway routes, exactly `weight` go to the canary, spread evenly, whatever the
//! replica counts. A request header pins a revision for testing.

use super::routes::Table;

/// The request header that pins a revision: `stable`, `canary`, a revision or its first 8
/// characters (the suffix of its Deployment's name).
pub const PIN_HEADER: &str = "kasmina-revision";

/// Why no revision takes a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no revision is serving yet")]
    NoRevision,
    #[error(
        "header {PIN_HEADER}: {0:?} is none of stable, canary or a revision this gateway routes to"
    )]
    UnknownPin(String),
}

/// Whether the `n`-th request (counting from 0) goes to the canary at `weight` percent: the
/// canary's share of the first n+1 requests rounds down to exactly n+1 × weight / 100.
pub fn takes_canary(n: u64, weight: u8) -> bool {
    let w = u64::from(weight.min(100));
    (n % 100 + 1) * w / 100 > (n % 100) * w / 100
}

/// The revision of the `n`-th request, or of the one `pin` names. A canary with no ready pod
/// yet (starting, or crashed) takes no share: its requests stay on stable rather than fail.
pub fn choose<'a>(table: &'a Table, pin: Option<&str>, n: u64) -> Result<&'a str, Refusal> {
    let split = &table.split;
    if let Some(pin) = pin {
        let pin = pin.trim();
        let named = match pin {
            "stable" => split.stable.as_deref(),
            "canary" => split.canary.as_deref(),
            _ => table
                .revisions
                .keys()
                .chain(split.stable.iter())
                .chain(split.canary.iter())
                .find(|rev| *rev == pin || (pin.len() >= 8 && rev.starts_with(pin)))
                .map(String::as_str),
        };
        return named.ok_or_else(|| Refusal::UnknownPin(pin.to_owned()));
    }
    match (split.stable.as_deref(), split.canary.as_deref()) {
        (Some(stable), Some(canary))
            if table.pods(stable).is_empty() && !table.pods(canary).is_empty() =>
        {
            Ok(canary)
        }
        (Some(_), Some(canary))
            if takes_canary(n, split.weight) && !table.pods(canary).is_empty() =>
        {
            Ok(canary)
        }
        (Some(stable), _) => Ok(stable),
        (None, Some(canary)) => Ok(canary),
        (None, None) => Err(Refusal::NoRevision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::Split;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    fn pods(revisions: &[&str]) -> BTreeMap<String, Vec<(String, SocketAddr)>> {
        revisions
            .iter()
            .map(|r| {
                (
                    (*r).to_owned(),
                    vec![(format!("{r}-pod"), SocketAddr::from(([10, 0, 0, 1], 80)))],
                )
            })
            .collect()
    }

    fn table(weight: u8) -> Table {
        let split = Split {
            stable: Some("aaaaaaaa11".into()),
            canary: Some("bbbbbbbb22".into()),
            weight,
            mirror: 0,
        };
        Table::default().next(split, pods(&["aaaaaaaa11", "bbbbbbbb22"]))
    }

    #[test]
    fn every_hundred_requests_carry_the_weight_exactly_and_evenly() {
        for weight in [0u8, 1, 5, 10, 33, 50, 99, 100] {
            let t = table(weight);
            let canary: Vec<u64> = (0..2_000)
                .filter(|&n| choose(&t, None, n) == Ok("bbbbbbbb22"))
                .collect();
            assert_eq!(canary.len() as u64, 20 * u64::from(weight), "{weight}%");
            // Spread out: no two canary requests closer than 100 / weight - 1 apart.
            if (1..=50).contains(&weight) {
                let gap = 100 / u64::from(weight) - 1;
                assert!(canary.windows(2).all(|w| w[1] - w[0] >= gap), "{weight}%");
            }
        }
        // Past 100 is 100.
        assert!((0..100).all(|n| takes_canary(n, 250)));
    }

    #[test]
    fn a_pin_names_stable_canary_or_a_revision() {
        let t = table(0);
        assert_eq!(choose(&t, Some("canary"), 0), Ok("bbbbbbbb22"));
        assert_eq!(choose(&t, Some(" stable "), 0), Ok("aaaaaaaa11"));
        assert_eq!(choose(&t, Some("bbbbbbbb"), 0), Ok("bbbbbbbb22"));
        assert_eq!(choose(&t, Some("bbbbbbbb22"), 0), Ok("bbbbbbbb22"));
        // A short prefix is ambiguous in principle: refused, naming the header.
        let err = choose(&t, Some("bbb"), 0).unwrap_err();
        assert!(err.to_string().contains(PIN_HEADER), "{err}");
        let mut no_canary = table(0);
        no_canary.split.canary = None;
        assert_eq!(
            choose(&no_canary, Some("canary"), 0),
            Err(Refusal::UnknownPin("canary".into()))
        );
    }

    #[test]
    fn a_canary_without_a_ready_pod_leaves_its_share_on_stable_and_the_reverse() {
        let split = table(50).split.clone();
        let starting = Table::default().next(split.clone(), pods(&["aaaaaaaa11"]));
        assert!((0..100).all(|n| choose(&starting, None, n) == Ok("aaaaaaaa11")));
        // Pinned, the canary is asked for by name: its own (no-pod) answer, not stable's.
        assert_eq!(choose(&starting, Some("canary"), 0), Ok("bbbbbbbb22"));
        let stable_down = Table::default().next(split, pods(&["bbbbbbbb22"]));
        assert!((0..100).all(|n| choose(&stable_down, None, n) == Ok("bbbbbbbb22")));
    }

    #[test]
    fn before_a_stable_revision_the_candidate_serves_and_before_any_nothing_does() {
        let mut t = table(10);
        t.split.stable = None;
        assert_eq!(choose(&t, None, 0), Ok("bbbbbbbb22"));
        t.split.canary = None;
        assert_eq!(choose(&t, None, 0), Err(Refusal::NoRevision));
    }
}
