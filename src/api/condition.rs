//! Kubernetes-convention conditions shared by all three kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The status of a condition, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One aspect of an object's state, following the Kubernetes API conventions
/// (the same shape as `metav1.Condition`, so `kubectl wait --for=condition=...` works).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The aspect this condition describes, in CamelCase, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether the condition holds: True, False or Unknown.
    pub status: ConditionStatus,
    /// A CamelCase, machine-readable reason for the last transition.
    pub reason: String,
    /// A human-readable explanation of the current state.
    #[serde(default)]
    pub message: String,
    /// The `.metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed from one value to another.
    pub last_transition_time: Time,
}

impl Condition {
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Find a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Insert or update `new` in `conditions`. The transition time moves only when the status
/// changes, so a steady object keeps a stable status and the controller writes nothing.
/// Returns true when the status of the condition changed (a transition worth an Event).
pub fn upsert(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transitioned = existing.status != new.status;
            if !transitioned {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
            transitioned
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The schema of a conditions list: a list-map keyed by `type`, so that under server-side
/// apply several controllers can each own their own condition in the same list.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn cond(status: ConditionStatus, at: i64, msg: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status,
            reason: "Test".into(),
            message: msg.into(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(at).unwrap()),
        }
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conditions = vec![];
        assert!(upsert(
            &mut conditions,
            cond(ConditionStatus::False, 10, "a")
        ));
        assert!(!upsert(
            &mut conditions,
            cond(ConditionStatus::False, 20, "b")
        ));
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 10);
        assert_eq!(conditions[0].message, "b");
        assert!(upsert(
            &mut conditions,
            cond(ConditionStatus::True, 30, "c")
        ));
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 30);
        assert_eq!(conditions.len(), 1);
    }
}
