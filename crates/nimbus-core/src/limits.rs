//! Documented limits and defaults of the platform (see `docs/LIMITS.md`).

/// Largest invocation event accepted (bytes).
pub const MAX_EVENT_BYTES: usize = 6 * 1024 * 1024;
/// Largest management request body (function create/update with code), bytes.
pub const MAX_API_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Largest unpacked code bundle (sum of file sizes), bytes.
pub const MAX_CODE_BYTES: usize = 50 * 1024 * 1024;
/// Most files in one code bundle.
pub const MAX_CODE_FILES: usize = 5_000;
/// Logs kept per invocation record (tail of stdout/stderr), bytes.
pub const MAX_LOG_BYTES: usize = 4 * 1024;
/// Memory limit bounds and default (MiB).
pub const MEMORY_MB: (u32, u32, u32) = (64, 4096, 256);
/// Timeout bounds and default (seconds).
pub const TIMEOUT_SEC: (u32, u32, u32) = (1, 900, 30);
/// Max instances bounds and default.
pub const MAX_INSTANCES: (u32, u32, u32) = (1, 1000, 50);
/// A state value's size bounds and default (`state_config.max_state_size`, bytes of JSON).
pub const STATE_VALUE_BYTES: (u32, u32, u32) = (1, 1024 * 1024, 65_536);
/// Keys per state bucket (a session's or the function's): bounds and default
/// (`state_config.max_keys`).
pub const STATE_KEYS: (u32, u32, u32) = (1, 10_000, 100);
/// A session binding's lifetime after its last invocation, seconds: bounds and default
/// (`state_config.session_timeout`).
pub const SESSION_TIMEOUT_SEC: (u32, u32, u32) = (1, 30 * 24 * 3600, 3600);
/// Longest default TTL of state values, seconds (`state_config.default_ttl`; 0 = none).
pub const MAX_STATE_TTL_SEC: u32 = 365 * 24 * 3600;
/// Longest session key, bytes.
pub const MAX_SESSION_KEY_BYTES: usize = 256;
/// Longest description, characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;
/// Most environment variables per function.
pub const MAX_ENV_VARS: usize = 128;
/// Largest environment variable value, bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
/// Deepest nesting of arrays and objects in a JSON body the server accepts (invocation
/// events and management bodies). Below serde_json's own recursion limit (128), so the
/// server can always read back what it stored and clients built on it can parse an
/// answer that wraps such a value, and far below what the Python (≈ 990) and Node.js
/// workers decode.
pub const MAX_JSON_DEPTH: usize = 100;
/// Most modules in a handler's module path (`a.b.c.handle`: 3). CPython imports nested
/// namespace packages in time that doubles with each level past about a dozen (20 levels:
/// about a second; 26: over a minute); real package paths stay well under this.
pub const MAX_HANDLER_MODULE_DEPTH: usize = 10;
/// Most aliases of one function, `latest` included.
pub const MAX_ALIASES_PER_FUNCTION: usize = 100;
/// Longest name of one file or directory in a code bundle, bytes (Linux's `NAME_MAX`).
pub const MAX_CODE_NAME_BYTES: usize = 255;
/// Longest relative path of a file in a code bundle, bytes (leaves room in Linux's
/// `PATH_MAX`, 4096, for the data directory the code is unpacked in).
pub const MAX_CODE_PATH_BYTES: usize = 1024;
