//! A Kubernetes-style duration (`15s`, `1m30s`, `500ms`, `2h`) as a typed field.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration as StdDuration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the CRD schema enforces; the parser below accepts exactly this language.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// A duration written the way Kubernetes users write them: `15s`, `1m30s`, `250ms`, `2h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }

    pub const fn as_std(&self) -> StdDuration {
        self.0
    }
}

/// Why a duration string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 15s, 1m30s, 500ms, 2h)")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let mut total = 0f64;
        let mut rest = input;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| err("missing unit"))?;
            if number_len == 0 {
                return Err(err("missing number"));
            }
            let value: f64 = rest[..number_len].parse().map_err(|_| err("bad number"))?;
            rest = &rest[number_len..];
            let (unit_secs, unit_len) = if rest.starts_with("ms") {
                (0.001, 2)
            } else if rest.starts_with('s') {
                (1.0, 1)
            } else if rest.starts_with('m') {
                (60.0, 1)
            } else if rest.starts_with('h') {
                (3600.0, 1)
            } else {
                return Err(err("unknown unit"));
            };
            total += value * unit_secs;
            rest = &rest[unit_len..];
        }
        // One year bounds every interval this API has; it also keeps the f64 conversion exact enough.
        if total > 365.0 * 24.0 * 3600.0 {
            return Err(err("longer than a year"));
        }
        Ok(Self(StdDuration::from_secs_f64(total)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        if !millis.is_multiple_of(1000) {
            return write!(f, "{millis}ms");
        }
        let mut secs = millis / 1000;
        let hours = secs / 3600;
        secs %= 3600;
        let minutes = secs / 60;
        secs %= 60;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        if secs > 0 {
            write!(f, "{secs}s")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Cow::<'de, str>::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_kubernetes_durations() {
        for (input, secs, printed) in [
            ("15s", 15.0, "15s"),
            ("1m30s", 90.0, "1m30s"),
            ("500ms", 0.5, "500ms"),
            ("2h", 7200.0, "2h"),
            ("1.5s", 1.5, "1500ms"),
        ] {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.0.as_secs_f64(), secs, "{input}");
            assert_eq!(d.to_string(), printed);
        }
    }

    #[test]
    fn rejects_malformed_durations() {
        for input in ["", "15", "s", "15x", "-1s", "1m 30s", "9999999h"] {
            assert!(
                input.parse::<Duration>().is_err(),
                "{input:?} should not parse"
            );
        }
    }

    #[test]
    fn schema_pattern_agrees_with_parser() {
        // The apiserver checks the pattern; the parser must accept everything the pattern accepts.
        for ok in ["1s", "10ms", "1h2m3s", "0.5m"] {
            assert!(ok.parse::<Duration>().is_ok(), "{ok}");
        }
    }
}
