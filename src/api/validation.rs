//! Semantic validation that a CRD schema cannot express. The controller, the admission webhook
//! and `kasmina validate` all run these same checks, so a user sees one message everywhere.

use std::fmt;

/// One problem with one field, named by its path in the object (`spec.strategy.canary.steps[2]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems found in one object; empty means valid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Checks that a Kubernetes label selector is well formed: operators known, and `values`
/// present exactly for `In`/`NotIn`.
pub fn validate_label_selector(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    field: &str,
    errors: &mut FieldErrors,
) {
    for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
        let path = format!("{field}.matchExpressions[{i}]");
        let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
        match expr.operator.as_str() {
            "In" | "NotIn" if !has_values => errors.push(
                format!("{path}.values"),
                format!("operator {} needs at least one value", expr.operator),
            ),
            "Exists" | "DoesNotExist" if has_values => errors.push(
                format!("{path}.values"),
                format!("operator {} takes no values", expr.operator),
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errors.push(
                format!("{path}.operator"),
                format!("unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}
