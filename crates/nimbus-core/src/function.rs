//! Functions and their immutable versions.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::code::CodeBundle;
use crate::echo::echo;
use crate::error::ValidationError;
use crate::limits;

/// A language runtime a function runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Runtime {
    /// CPython 3.11.
    #[serde(rename = "python3.11")]
    Python311,
    /// Node.js 20.
    #[serde(rename = "nodejs20")]
    NodeJs20,
}

impl Runtime {
    /// Every runtime, in the order they are documented.
    pub const ALL: [Runtime; 2] = [Runtime::Python311, Runtime::NodeJs20];

    /// The runtime's name in the API (`python3.11`).
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python311 => "python3.11",
            Runtime::NodeJs20 => "nodejs20",
        }
    }

    /// Whether its worker has a template mode: an initialized worker that forks new
    /// instances (function-level snapshots). Node.js is multi-threaded and is not forked.
    pub fn forks_templates(self) -> bool {
        matches!(self, Runtime::Python311)
    }

    /// File extension of a handler module written in this runtime's language.
    pub fn source_extension(self) -> &'static str {
        match self {
            Runtime::Python311 => "py",
            Runtime::NodeJs20 => "js",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Runtime {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Runtime::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(
                    "runtime",
                    format!(
                        "unknown runtime {}; expected one of python3.11, nodejs20",
                        echo(s)
                    ),
                )
            })
    }
}

/// A handler reference `module.function`; the module may be dotted (`pkg.mod.fn`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Handler {
    module: String,
    function: String,
}

impl Handler {
    /// The default handler, `handler.handle`.
    pub fn default_handler() -> Self {
        Handler {
            module: "handler".into(),
            function: "handle".into(),
        }
    }

    /// The dotted module path (`pkg.mod`).
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The function name inside the module.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// Checks the rules a handler of new code must meet besides its syntax: at most
    /// [`limits::MAX_HANDLER_MODULE_DEPTH`] modules in the module path. Parsing does not
    /// apply them, so a version stored before a rule existed still reads back and runs.
    pub fn check_new(&self) -> Result<(), ValidationError> {
        let depth = self.module.split('.').count();
        if depth > limits::MAX_HANDLER_MODULE_DEPTH {
            return Err(ValidationError::new(
                "handler",
                format!(
                    "{} has {depth} modules in its module path; at most {} are allowed",
                    echo(&self.to_string()),
                    limits::MAX_HANDLER_MODULE_DEPTH
                ),
            ));
        }
        Ok(())
    }

    /// Path of the module's source file inside a code bundle (`pkg/mod.py`).
    pub fn module_file(&self, runtime: Runtime) -> String {
        format!(
            "{}.{}",
            self.module.replace('.', "/"),
            runtime.source_extension()
        )
    }
}

impl Default for Handler {
    fn default() -> Self {
        Self::default_handler()
    }
}

impl fmt::Display for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.function)
    }
}

impl FromStr for Handler {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ValidationError::new(
                "handler",
                format!("{} is not a valid handler: {why} (expected module.function, e.g. handler.handle)", echo(s)),
            )
        };
        let (module, function) = s.rsplit_once('.').ok_or_else(|| bad("no '.'"))?;
        if !module.split('.').all(is_identifier) {
            return Err(bad("the module path must be identifiers separated by '.'"));
        }
        if !is_identifier(function) {
            return Err(bad("the function name must be an identifier"));
        }
        Ok(Handler {
            module: module.into(),
            function: function.into(),
        })
    }
}

impl TryFrom<String> for Handler {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Handler> for String {
    fn from(h: Handler) -> String {
        h.to_string()
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
}

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
    fn handler_parses_module_and_function() {
        let h: Handler = "pkg.mod.run".parse().unwrap();
        assert_eq!(h.module(), "pkg.mod");
        assert_eq!(h.function(), "run");
        assert_eq!(h.module_file(Runtime::Python311), "pkg/mod.py");
        assert_eq!(h.to_string(), "pkg.mod.run");
        for bad in [
            "handle",
            ".handle",
            "handler.",
            "a-b.handle",
            "1a.handle",
            "a..b",
        ] {
            assert!(bad.parse::<Handler>().is_err(), "{bad} accepted");
        }
        // New handlers have module paths as deep as the limit, not deeper; a deeper one
        // still parses, as a version stored before the limit must read back.
        let path = |depth: usize| {
            let modules: Vec<String> = (0..depth).map(|i| format!("m{i}")).collect();
            format!("{}.handle", modules.join("."))
        };
        let deepest: Handler = path(limits::MAX_HANDLER_MODULE_DEPTH).parse().unwrap();
        assert_eq!(deepest.module().split('.').count(), 10);
        deepest.check_new().unwrap();
        let deeper: Handler = path(limits::MAX_HANDLER_MODULE_DEPTH + 1).parse().unwrap();
        assert_eq!(deeper.to_string(), path(11));
        let error = deeper.check_new().unwrap_err();
        assert_eq!(error.field, "handler");
        assert!(
            error
                .message
                .contains("has 11 modules in its module path; at most 10"),
            "{error}"
        );
    }

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

    #[test]
    fn runtime_round_trips_through_its_name() {
        for r in Runtime::ALL {
            assert_eq!(r.as_str().parse::<Runtime>().unwrap(), r);
        }
        assert!("python2"
            .parse::<Runtime>()
            .unwrap_err()
            .message
            .contains("python3.11"));
    }
}
