//! The one error type of domain validation.

/// Input that breaks a rule of the domain model. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field, as named in the API (`name`, `routing_config.weights[1].weight`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error reported against `field` (a rule shared by several fields).
    pub fn in_field(self, field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            ..self
        }
    }
}
