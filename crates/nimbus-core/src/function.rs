//! Functions and their immutable versions.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::code::CodeBundle;
use crate::echo::echo;
use crate::error::ValidationError;
use crate::limits;
use crate::runtime::{is_identifier, Handler, Runtime};

/// Lifecycle status of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionStatus {
    /// Being prepared; not invocable yet.
    Building,
    /// Invocable.
    Active,
    /// Preparation failed.
    Failed,
}

impl FunctionStatus {
    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionStatus::Building => "building",
            FunctionStatus::Active => "active",
            FunctionStatus::Failed => "failed",
        }
    }
}

impl FromStr for FunctionStatus {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "building" => Ok(Self::Building),
            "active" => Ok(Self::Active),
            "failed" => Ok(Self::Failed),
            other => Err(ValidationError::new(
                "status",
                format!("unknown function status {}", echo(other)),
            )),
        }
    }
}

/// Everything a version freezes: what decides how the code runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionConfig {
    /// Runtime the code runs on.
    pub runtime: Runtime,
    /// Entry point.
    pub handler: Handler,
    /// `sha256:<hex>` of the normalized code bundle.
    pub code_hash: String,
    /// Environment variables visible to the function.
    pub env_vars: BTreeMap<String, String>,
    /// Memory limit per instance, MiB.
    pub memory_mb: u32,
    /// Invocation timeout, seconds.
    pub timeout_sec: u32,
    /// What network its instances get.
    pub network: Network,
    /// Whether and how it keeps state between invocations.
    pub state: StateConfig,
}

/// How a function keeps state between invocations (SPEC §7), `state_config` in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Whether the function may use the state API at all.
    pub enabled: bool,
    /// TTL, seconds, of values written without one (0: none).
    pub default_ttl: u32,
    /// Largest value, bytes of JSON.
    pub max_state_size: u32,
    /// Most keys per bucket (a session's state, the function's state).
    pub max_keys: u32,
    /// Whether invocations with the same session key go to the same instance.
    pub session_affinity: bool,
    /// Seconds a session binding lasts after its last invocation.
    pub session_timeout: u32,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            enabled: false,
            default_ttl: 0,
            max_state_size: limits::STATE_VALUE_BYTES.2,
            max_keys: limits::STATE_KEYS.2,
            session_affinity: false,
            session_timeout: limits::SESSION_TIMEOUT_SEC.2,
        }
    }
}

impl StateConfig {
    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_range(
            "state_config.max_state_size",
            self.max_state_size,
            limits::STATE_VALUE_BYTES,
        )?;
        check_range("state_config.max_keys", self.max_keys, limits::STATE_KEYS)?;
        check_range(
            "state_config.session_timeout",
            self.session_timeout,
            limits::SESSION_TIMEOUT_SEC,
        )?;
        check_range(
            "state_config.default_ttl",
            self.default_ttl,
            (0, limits::MAX_STATE_TTL_SEC, 0),
        )
    }

    /// `self` with the fields `patch` gives replaced (a partial `state_config`).
    pub fn patched(&self, patch: &StateConfigPatch) -> StateConfig {
        StateConfig {
            enabled: patch.enabled.unwrap_or(self.enabled),
            default_ttl: patch.default_ttl.unwrap_or(self.default_ttl),
            max_state_size: patch.max_state_size.unwrap_or(self.max_state_size),
            max_keys: patch.max_keys.unwrap_or(self.max_keys),
            session_affinity: patch.session_affinity.unwrap_or(self.session_affinity),
            session_timeout: patch.session_timeout.unwrap_or(self.session_timeout),
        }
    }
}

/// A partial [`StateConfig`]: the fields to change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfigPatch {
    /// See [`StateConfig::enabled`].
    pub enabled: Option<bool>,
    /// See [`StateConfig::default_ttl`].
    pub default_ttl: Option<u32>,
    /// See [`StateConfig::max_state_size`].
    pub max_state_size: Option<u32>,
    /// See [`StateConfig::max_keys`].
    pub max_keys: Option<u32>,
    /// See [`StateConfig::session_affinity`].
    pub session_affinity: Option<bool>,
    /// See [`StateConfig::session_timeout`].
    pub session_timeout: Option<u32>,
}

string_enum!(
    /// What network a function's instances get.
    #[derive(Default)]
    Network {
        /// None at all: an empty network namespace (the default).
        #[default]
        Isolated => "none",
        /// Outbound connections to public addresses, through NAT; nothing on the host or on
        /// private networks.
        Outbound => "outbound",
    }
);

impl FunctionConfig {
    /// Checks every field against its documented rule.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_range("memory_mb", self.memory_mb, limits::MEMORY_MB)?;
        check_range("timeout_sec", self.timeout_sec, limits::TIMEOUT_SEC)?;
        self.state.validate()?;
        validate_env_vars(&self.env_vars)
    }
}

/// Checks `value` against `(min, max, _default)`.
pub fn check_range(
    field: &str,
    value: u32,
    (min, max, _): (u32, u32, u32),
) -> Result<(), ValidationError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{value} is out of range; allowed {min}..={max}"),
        ))
    }
}

/// Environment variable names are `[A-Za-z_][A-Za-z0-9_]*`, not reserved (`NIMBUS_*`), and bounded in size.
pub fn validate_env_vars(env: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if env.len() > limits::MAX_ENV_VARS {
        return Err(ValidationError::new(
            "env_vars",
            format!(
                "{} variables; at most {} allowed",
                env.len(),
                limits::MAX_ENV_VARS
            ),
        ));
    }
    for (name, value) in env {
        if !is_identifier(name) {
            return Err(ValidationError::new(
                "env_vars",
                format!(
                    "{} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    echo(name)
                ),
            ));
        }
        if name.starts_with("NIMBUS_") {
            return Err(ValidationError::new(
                "env_vars",
                format!(
                    "{}: the NIMBUS_ prefix is reserved for the platform",
                    echo(name)
                ),
            ));
        }
        if value.len() > limits::MAX_ENV_VALUE_BYTES || value.contains('\0') {
            return Err(ValidationError::new(
                "env_vars",
                format!(
                    "value of {} must be at most {} bytes and contain no NUL",
                    echo(name),
                    limits::MAX_ENV_VALUE_BYTES
                ),
            ));
        }
    }
    Ok(())
}

/// Function names are `[a-z0-9][a-z0-9-_]{0,63}` and never look like a function id.
pub fn validate_function_name(name: &str) -> Result<(), ValidationError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64;
    if !ok {
        return Err(ValidationError::new(
            "name",
            format!("{} is not a valid function name: 1-64 characters of a-z, 0-9, '-', '_', starting with a letter or digit", echo(name)),
        ));
    }
    if name.starts_with("fn_") {
        return Err(ValidationError::new(
            "name",
            "names starting with \"fn_\" are reserved for function ids",
        ));
    }
    Ok(())
}

/// Descriptions are bounded in length.
pub fn validate_description(description: &str) -> Result<(), ValidationError> {
    if description.chars().count() > limits::MAX_DESCRIPTION_CHARS {
        return Err(ValidationError::new(
            "description",
            format!("longer than {} characters", limits::MAX_DESCRIPTION_CHARS),
        ));
    }
    Ok(())
}

/// A deployed function: its identity, its current (draft) configuration and code, and scaling settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// `fn_<ulid>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The draft configuration; published versions freeze a copy.
    pub config: FunctionConfig,
    /// The draft code.
    pub code: CodeBundle,
    /// Most instances of this function alive at once, across versions.
    pub max_instances: u32,
    /// Lifecycle status.
    pub status: FunctionStatus,
    /// Highest version number ever published (never reused, even after deletion).
    pub latest_version: u32,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

/// An immutable published version of a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionVersion {
    /// The function it belongs to.
    pub function_id: String,
    /// 1, 2, … per function.
    pub version: u32,
    /// Free text given at publish time.
    pub description: String,
    /// Frozen configuration.
    pub config: FunctionConfig,
    /// Frozen code.
    pub code: CodeBundle,
    /// Publish time.
    pub created_at: OffsetDateTime,
    /// Who published it (API key name, or `anonymous`).
    pub created_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_follow_the_rule() {
        for good in ["a", "0", "hello-world_2", &"x".repeat(64)] {
            validate_function_name(good).unwrap();
        }
        for bad in ["", "-a", "A", "a.b", "a b", &"x".repeat(65), "fn_abc"] {
            assert!(validate_function_name(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn config_ranges_and_env_names_are_checked() {
        let mut c = FunctionConfig {
            runtime: Runtime::Python311,
            handler: Handler::default(),
            code_hash: "sha256:00".into(),
            env_vars: BTreeMap::new(),
            memory_mb: 256,
            timeout_sec: 30,
            network: Network::Outbound,
            state: StateConfig::default(),
        };
        c.validate().unwrap();
        c.memory_mb = 32;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "memory_mb");
        c.memory_mb = 128;
        c.timeout_sec = 901;
        assert_eq!(c.validate().unwrap_err().field, "timeout_sec");
        c.timeout_sec = 1;
        c.env_vars.insert("NIMBUS_X".into(), "1".into());
        assert!(c.validate().unwrap_err().message.contains("reserved"));
        c.env_vars.clear();
        c.env_vars.insert("1BAD".into(), "1".into());
        assert!(c.validate().is_err());
        c.env_vars.clear();
        c.state.max_keys = 0;
        assert_eq!(c.validate().unwrap_err().field, "state_config.max_keys");
        c.state = c.state.patched(&StateConfigPatch {
            max_keys: Some(10),
            enabled: Some(true),
            ..Default::default()
        });
        c.validate().unwrap();
        assert!(c.state.enabled && c.state.max_keys == 10 && c.state.session_timeout == 3600);
    }

    #[test]
    fn state_config_takes_defaults_and_refuses_unknown_fields() {
        let c: StateConfig = serde_json::from_str(r#"{"enabled": true}"#).unwrap();
        assert_eq!(
            c,
            StateConfig {
                enabled: true,
                ..StateConfig::default()
            }
        );
        assert_eq!(c.max_state_size, 65_536);
        assert!(serde_json::from_str::<StateConfig>(r#"{"enabld": true}"#).is_err());
    }
}
