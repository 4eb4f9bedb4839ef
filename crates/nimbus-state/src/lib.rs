//! The state of stateful functions (SPEC §7) and the registry of their sessions.
//!
//! A function's state is JSON values under string keys, in *buckets*: one per session
//! (`state` / `state.session()`: the invocation's session key, `_default` without one) and
//! one for the whole function (`state.function()`). The invocation scope lives only as long
//! as one invocation and is kept by the engine, never here.
//!
//! Every value carries a **version**: a number from the bucket's own sequence, taken by each
//! write, so it never repeats within the bucket (a key deleted and written again gets a
//! higher one, so an optimistic writer holding an old version always fails). A key that is
//! absent has version 0.
//!
//! [`StateStore`] is what a backend implements; [`State`] wraps one with the checks that do
//! not depend on it (key and value sizes), so every backend refuses bad input alike. Two
//! durable backends, one behaviour, proven by one conformance suite (`tests/conformance.rs`):
//! [`embedded`] (the default: durable on local disk, [`EmbeddedStore`]) and [`redis`]
//! (a Redis server, Sentinel or Cluster, [`RedisStore`]). The suite holds [`memory`] (the
//! in-process [`MemoryStore`] of invocation state) to the same behaviour.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nimbus_core::ErrorCode;
use serde::Serialize;
use time::OffsetDateTime;

pub mod embedded;
pub mod memory;
pub mod redis;

pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;
pub use redis::RedisStore;

/// Longest key, bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// The session key of invocations that come without one.
pub const DEFAULT_SESSION: &str = "_default";

/// Which state of a function: a session's or the function's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One session's state (`state` / `state.session()`).
    Session(String),
    /// Shared by every invocation of the function (`state.function()`).
    Function,
}

impl Scope {
    /// The scope's name in the API and in metrics: `session` or `function`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Session(_) => "session",
            Scope::Function => "function",
        }
    }
}

/// One bucket of keys: a function's scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// The function's id (`fn_…`): state survives renames and belongs to all versions.
    pub function_id: String,
    /// The scope.
    pub scope: Scope,
}

impl Bucket {
    /// A session's bucket.
    pub fn session(function_id: &str, session_key: &str) -> Bucket {
        Bucket {
            function_id: function_id.to_owned(),
            scope: Scope::Session(session_key.to_owned()),
        }
    }

    /// The function's own bucket.
    pub fn function(function_id: &str) -> Bucket {
        Bucket {
            function_id: function_id.to_owned(),
            scope: Scope::Function,
        }
    }
}

/// The limits of one function's state (from its `state_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value, bytes of JSON.
    pub max_value_bytes: usize,
    /// Most keys in one bucket.
    pub max_keys: u32,
}

/// A stored value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value, JSON text.
    pub value: String,
    /// Its version (≥ 1).
    pub version: u64,
}

/// A key as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// Size of its value, bytes of JSON.
    pub size: usize,
    /// Time left to live, ms (`None`: no expiry).
    pub ttl_ms: Option<u64>,
    /// Its version.
    pub version: u64,
}

/// A session: where its invocations go, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Session {
    /// The function's id.
    pub function_id: String,
    /// The session key.
    pub session_key: String,
    /// The instance the session is bound to, if any.
    pub instance_id: Option<String>,
    /// First seen.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last invocation (or binding).
    #[serde(with = "time::serde::rfc3339")]
    pub last_access: OffsetDateTime,
    /// When the binding lapses unless used again (`last_access + session_timeout`).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Why a state operation failed. Each has a stable code ([`StateError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key is over [`MAX_KEY_BYTES`].
    #[error("key of {len} bytes is too long; the limit is {MAX_KEY_BYTES} bytes")]
    KeyTooLong {
        /// Its length, bytes.
        len: usize,
    },
    /// The key is empty or holds a control character.
    #[error("invalid key {0:?}: keys are 1-256 bytes without control characters")]
    InvalidKey(String),
    /// The value is over the function's `max_state_size`.
    #[error(
        "value of {size} bytes is too large; this function's limit (max_state_size) is {max} bytes"
    )]
    ValueTooLarge {
        /// Its size, bytes of JSON.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Writing a new key would exceed the function's `max_keys` in this bucket.
    #[error("too many keys: this {scope} state holds {max} keys already, the limit of this function (max_keys)")]
    TooManyKeys {
        /// `session` or `function`.
        scope: &'static str,
        /// The limit.
        max: u32,
    },
    /// An optimistic write's version is not the key's current one.
    #[error("version conflict: the key is at version {current}, not {expected}")]
    Conflict {
        /// The version the writer held.
        expected: u64,
        /// The key's current version (0: absent).
        current: u64,
    },
    /// `incr`/`decr` on a value that is not an integer, or past the 64-bit range.
    #[error("{0}")]
    NotAnInteger(String),
    /// A TTL or pattern the store cannot take.
    #[error("{0}")]
    InvalidArgument(String),
    /// The backend cannot be reached (or did not answer in time).
    #[error("state is unavailable: {0}")]
    Unavailable(String),
}

impl StateError {
    /// The stable error code: `key_too_long`, `invalid_key`, `value_too_large`,
    /// `too_many_keys`, `state_conflict`, `not_an_integer`, `invalid_argument`,
    /// `state_unavailable`.
    pub fn code(&self) -> ErrorCode {
        match self {
            StateError::KeyTooLong { .. } => ErrorCode::KeyTooLong,
            StateError::InvalidKey(_) => ErrorCode::InvalidKey,
            StateError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            StateError::TooManyKeys { .. } => ErrorCode::TooManyKeys,
            StateError::Conflict { .. } => ErrorCode::StateConflict,
            StateError::NotAnInteger(_) => ErrorCode::NotAnInteger,
            StateError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            StateError::Unavailable(_) => ErrorCode::StateUnavailable,
        }
    }
}

/// The result of a state operation.
pub type StateResult<T> = Result<T, StateError>;

/// What a backend implements. Every write is atomic and durable once it returns; limits
/// that depend on what is stored (`max_keys`) are checked in the same atomic step as the
/// write, so concurrent writers cannot overshoot them. Keys and values arrive checked
/// ([`State`] checks them).
///
/// TTLs: `None` keeps a value forever. A key past its TTL is gone for every operation
/// (and does not count against `max_keys`), whenever the backend reclaims its space.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// `embedded` or `redis`, for logs and `/ready`.
    fn backend(&self) -> &'static str;

    /// The value of `key` and its version, if present.
    async fn get(&self, bucket: &Bucket, key: &str) -> StateResult<Option<Versioned>>;

    /// Writes `value` (JSON text) with `ttl` (replacing any TTL the key had); with
    /// `expected`, only if the key's current version is that one (0: only if absent),
    /// else [`StateError::Conflict`]. Returns the new version.
    async fn set(
        &self,
        bucket: &Bucket,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
        expected: Option<u64>,
        limits: Limits,
    ) -> StateResult<u64>;

    /// Adds `delta` to the integer at `key` (absent counts as 0; a new key gets `ttl`, an
    /// existing one keeps its own) and returns the result.
    async fn incr(
        &self,
        bucket: &Bucket,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
        limits: Limits,
    ) -> StateResult<i64>;

    /// Removes `key`; whether it was there.
    async fn delete(&self, bucket: &Bucket, key: &str) -> StateResult<bool>;

    /// Sets the TTL of `key` (`None`: no expiry); whether it was there.
    async fn expire(&self, bucket: &Bucket, key: &str, ttl: Option<Duration>) -> StateResult<bool>;

    /// Every key of the bucket with its size, TTL left and version, sorted by key.
    async fn list(&self, bucket: &Bucket) -> StateResult<Vec<KeyInfo>>;

    /// Removes every key of the bucket; how many there were.
    async fn clear(&self, bucket: &Bucket) -> StateResult<u64>;

    /// Records an invocation of a session: creates it if new, binds it to `instance_id`
    /// (`None` keeps its binding), sets `last_access` to now and `expires_at` to now +
    /// `timeout`. Returns the session as it is now.
    async fn touch_session(
        &self,
        function_id: &str,
        session_key: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> StateResult<Session>;

    /// The session, unless it expired.
    async fn session(&self, function_id: &str, session_key: &str) -> StateResult<Option<Session>>;

    /// The function's live sessions, most recently used first, at most `limit`.
    async fn sessions(&self, function_id: &str, limit: usize) -> StateResult<Vec<Session>>;

    /// Forgets the session (its binding; not its state); whether it existed.
    async fn delete_session(&self, function_id: &str, session_key: &str) -> StateResult<bool>;

    /// Removes everything of the function: every bucket and session (the function was
    /// deleted).
    async fn purge_function(&self, function_id: &str) -> StateResult<()>;
}

/// A backend with the checks every backend shares. Cheap to clone.
#[derive(Clone)]
pub struct State {
    store: Arc<dyn StateStore>,
}

impl State {
    /// Wraps a backend.
    pub fn new(store: Arc<dyn StateStore>) -> State {
        State { store }
    }

    /// The backend, for operations that take no key or value (sessions, admin).
    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    /// See [`StateStore::get`].
    pub async fn get(&self, bucket: &Bucket, key: &str) -> StateResult<Option<Versioned>> {
        check_key(key)?;
        self.store.get(bucket, key).await
    }

    /// See [`StateStore::set`]; refuses a key or value over its limit, writing nothing.
    pub async fn set(
        &self,
        bucket: &Bucket,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
        expected: Option<u64>,
        limits: Limits,
    ) -> StateResult<u64> {
        check_key(key)?;
        check_ttl(ttl)?;
        if value.len() > limits.max_value_bytes {
            return Err(StateError::ValueTooLarge {
                size: value.len(),
                max: limits.max_value_bytes,
            });
        }
        self.store
            .set(bucket, key, value, ttl, expected, limits)
            .await
    }

    /// See [`StateStore::incr`].
    pub async fn incr(
        &self,
        bucket: &Bucket,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
        limits: Limits,
    ) -> StateResult<i64> {
        check_key(key)?;
        check_ttl(ttl)?;
        self.store.incr(bucket, key, delta, ttl, limits).await
    }

    /// See [`StateStore::delete`].
    pub async fn delete(&self, bucket: &Bucket, key: &str) -> StateResult<bool> {
        check_key(key)?;
        self.store.delete(bucket, key).await
    }

    /// Whether `key` is present.
    pub async fn exists(&self, bucket: &Bucket, key: &str) -> StateResult<bool> {
        Ok(self.get(bucket, key).await?.is_some())
    }

    /// See [`StateStore::expire`].
    pub async fn expire(
        &self,
        bucket: &Bucket,
        key: &str,
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        check_key(key)?;
        check_ttl(ttl)?;
        self.store.expire(bucket, key, ttl).await
    }

    /// The bucket's keys matching the glob `pattern` (`*` any run, `?` one character,
    /// `\` escapes), sorted.
    pub async fn keys(&self, bucket: &Bucket, pattern: &str) -> StateResult<Vec<String>> {
        let pattern = Glob::parse(pattern)?;
        Ok(self
            .store
            .list(bucket)
            .await?
            .into_iter()
            .map(|k| k.key)
            .filter(|k| pattern.matches(k))
            .collect())
    }
}

/// Checks a key: 1–[`MAX_KEY_BYTES`] bytes, no control characters.
pub fn check_key(key: &str) -> StateResult<()> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StateError::KeyTooLong { len: key.len() });
    }
    if key.is_empty() || key.chars().any(char::is_control) {
        return Err(StateError::InvalidKey(key.chars().take(64).collect()));
    }
    Ok(())
}

/// Longest TTL: ten years.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn check_ttl(ttl: Option<Duration>) -> StateResult<()> {
    match ttl {
        Some(ttl) if ttl.is_zero() || ttl > MAX_TTL => Err(StateError::InvalidArgument(format!(
            "ttl must be between 1 ms and {} s",
            MAX_TTL.as_secs()
        ))),
        _ => Ok(()),
    }
}

/// A TTL as the backends store it: whole milliseconds, at least 1 (so a sub-millisecond TTL
/// still lets the value be written), 0 for none.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |ttl| (ttl.as_millis() as u64).max(1))
}

/// A session timeout as the backends store it: whole milliseconds, at most [`MAX_TTL`].
fn session_timeout_ms(timeout: Duration) -> u64 {
    timeout.min(MAX_TTL).as_millis() as u64
}

/// Now, in milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time in milliseconds since the Unix epoch, as the API shows it.
fn datetime_ms(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The integer a value holds, if it is one written the canonical way (`-?(0|[1-9][0-9]*)`,
/// within 64 bits): exactly the texts Redis's `HINCRBY` takes, so every backend accepts the
/// same values.
fn parse_counter(value: &[u8]) -> Option<i64> {
    let digits = value.strip_prefix(b"-").unwrap_or(value);
    let canonical = match digits {
        [b'0'] => digits.len() == value.len(),
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// `incr` on a value that is not an integer (every backend says it alike).
fn not_an_integer(key: &str) -> StateError {
    StateError::NotAnInteger(format!(
        "the value of key {key:?} is not an integer, so it cannot be incremented"
    ))
}

/// `incr` past the 64-bit range (every backend says it alike).
fn would_overflow(key: &str, delta: i64) -> StateError {
    StateError::NotAnInteger(format!(
        "adding {delta} to key {key:?} would overflow a 64-bit integer"
    ))
}

/// A `keys()` pattern.
#[derive(Debug)]
struct Glob(Vec<GlobToken>);

#[derive(Debug, PartialEq)]
enum GlobToken {
    Any,
    One,
    Char(char),
}

impl Glob {
    fn parse(pattern: &str) -> StateResult<Glob> {
        if pattern.len() > MAX_KEY_BYTES {
            return Err(StateError::InvalidArgument(format!(
                "pattern of {} bytes is longer than a key can be ({MAX_KEY_BYTES})",
                pattern.len()
            )));
        }
        let mut tokens = Vec::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => GlobToken::Any,
                '?' => GlobToken::One,
                '\\' => GlobToken::Char(chars.next().unwrap_or('\\')),
                c => GlobToken::Char(c),
            });
        }
        Ok(Glob(tokens))
    }

    /// Iterative matching with one backtrack point: linear in practice, never exponential.
    fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut p) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.0.get(p) {
                Some(GlobToken::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(GlobToken::One) => {
                    t += 1;
                    p += 1;
                }
                Some(GlobToken::Char(c)) if *c == text[t] => {
                    t += 1;
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.0[p..].iter().all(|t| *t == GlobToken::Any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_redis_keys_patterns() {
        let m = |p: &str, t: &str| Glob::parse(p).unwrap().matches(t);
        assert!(m("*", ""));
        assert!(m("*", "cart"));
        assert!(m("cart:*", "cart:1"));
        assert!(!m("cart:*", "car"));
        assert!(m("c?rt", "cart"));
        assert!(!m("c?rt", "crt"));
        assert!(m("*:*:x", "a:b:c:x"));
        assert!(m(r"a\*", "a*"));
        assert!(!m(r"a\*", "ab"));
        assert!(m("ünï*", "ünïcode"));
        assert!(!m("a*b", "a"));
    }

    #[test]
    fn counters_are_the_integers_redis_can_increment() {
        assert_eq!(parse_counter(b"0"), Some(0));
        assert_eq!(parse_counter(b"42"), Some(42));
        assert_eq!(parse_counter(b"-7"), Some(-7));
        assert_eq!(parse_counter(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_counter(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"007",
            b"+1",
            b" 1",
            b"1.0",
            b"1e3",
            b"\"1\"",
            b"9223372036854775808",
        ] {
            assert_eq!(
                parse_counter(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn keys_are_checked_before_any_backend_sees_them() {
        assert_eq!(check_key(&"k".repeat(256)), Ok(()));
        assert_eq!(
            check_key(&"k".repeat(257)),
            Err(StateError::KeyTooLong { len: 257 })
        );
        assert_eq!(check_key("").unwrap_err().code(), ErrorCode::InvalidKey);
        assert_eq!(check_key("a\nb").unwrap_err().code(), ErrorCode::InvalidKey);
        assert_eq!(check_key("cart:1 ü").unwrap(), ());
    }
}
