//! What runs a function's code: the language runtime and the handler it calls.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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

pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
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
