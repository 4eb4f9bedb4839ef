//! [`MemoryStore`]: state kept in this process only.
//!
//! The state of one invocation (`state.invocation()`) lives here: it must behave like the
//! other scopes (versions, TTLs, limits) but ends with the invocation, so it never touches
//! disk or network. It passes the same conformance suite as the durable backends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::{
    not_an_integer, parse_counter, would_overflow, Bucket, KeyInfo, Limits, Session, StateError,
    StateResult, StateStore, Versioned,
};

/// An in-process [`StateStore`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    buckets: HashMap<Bucket, Keys>,
    sessions: HashMap<(String, String), Session>,
}

#[derive(Debug, Default)]
struct Keys {
    /// The bucket's version sequence: the last version handed out.
    seq: u64,
    items: BTreeMap<String, Item>,
}

#[derive(Debug)]
struct Item {
    value: String,
    version: u64,
    expires: Option<Instant>,
}

impl Item {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

impl Keys {
    /// Drops what expired; how many live keys remain.
    fn prune(&mut self, now: Instant) -> usize {
        self.items.retain(|_, item| item.live(now));
        self.items.len()
    }

    /// Room for `key` (an existing key always has room).
    fn admit(
        &mut self,
        bucket: &Bucket,
        key: &str,
        limits: Limits,
        now: Instant,
    ) -> StateResult<()> {
        let live = self.prune(now);
        if !self.items.contains_key(key) && live >= limits.max_keys as usize {
            return Err(StateError::TooManyKeys {
                scope: bucket.scope.kind(),
                max: limits.max_keys,
            });
        }
        Ok(())
    }

    fn next_version(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner, Instant) -> T) -> T {
        let mut inner = self.inner.lock().expect("memory store lock");
        f(&mut inner, Instant::now())
    }
}

fn expiry(now: Instant, ttl: Option<Duration>) -> Option<Instant> {
    ttl.map(|ttl| now + ttl)
}

#[async_trait::async_trait]
impl StateStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, bucket: &Bucket, key: &str) -> StateResult<Option<Versioned>> {
        Ok(self.with(|inner, now| {
            let item = inner.buckets.get(bucket)?.items.get(key)?;
            item.live(now).then(|| Versioned {
                value: item.value.clone(),
                version: item.version,
            })
        }))
    }

    async fn set(
        &self,
        bucket: &Bucket,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
        expected: Option<u64>,
        limits: Limits,
    ) -> StateResult<u64> {
        self.with(|inner, now| {
            let keys = inner.buckets.entry(bucket.clone()).or_default();
            keys.prune(now);
            if let Some(expected) = expected {
                let current = keys.items.get(key).map_or(0, |i| i.version);
                if current != expected {
                    return Err(StateError::Conflict { expected, current });
                }
            }
            keys.admit(bucket, key, limits, now)?;
            let version = keys.next_version();
            keys.items.insert(
                key.to_owned(),
                Item {
                    value: value.to_owned(),
                    version,
                    expires: expiry(now, ttl),
                },
            );
            Ok(version)
        })
    }

    async fn incr(
        &self,
        bucket: &Bucket,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
        limits: Limits,
    ) -> StateResult<i64> {
        self.with(|inner, now| {
            let keys = inner.buckets.entry(bucket.clone()).or_default();
            keys.admit(bucket, key, limits, now)?;
            let (current, expires) = match keys.items.get(key) {
                Some(item) => match parse_counter(item.value.as_bytes()) {
                    Some(n) => (n, item.expires),
                    None => return Err(not_an_integer(key)),
                },
                None => (0, expiry(now, ttl)),
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| would_overflow(key, delta))?;
            let version = keys.next_version();
            keys.items.insert(
                key.to_owned(),
                Item {
                    value: next.to_string(),
                    version,
                    expires,
                },
            );
            Ok(next)
        })
    }

    async fn delete(&self, bucket: &Bucket, key: &str) -> StateResult<bool> {
        Ok(self.with(|inner, now| {
            inner
                .buckets
                .get_mut(bucket)
                .and_then(|keys| keys.items.remove(key))
                .is_some_and(|item| item.live(now))
        }))
    }

    async fn expire(&self, bucket: &Bucket, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        Ok(self.with(|inner, now| {
            match inner
                .buckets
                .get_mut(bucket)
                .and_then(|k| k.items.get_mut(key))
            {
                Some(item) if item.live(now) => {
                    item.expires = expiry(now, ttl);
                    true
                }
                _ => false,
            }
        }))
    }

    async fn list(&self, bucket: &Bucket) -> StateResult<Vec<KeyInfo>> {
        Ok(self.with(|inner, now| {
            let Some(keys) = inner.buckets.get_mut(bucket) else {
                return Vec::new();
            };
            keys.prune(now);
            keys.items
                .iter()
                .map(|(key, item)| KeyInfo {
                    key: key.clone(),
                    size: item.value.len(),
                    ttl_ms: item
                        .expires
                        .map(|at| at.saturating_duration_since(now).as_millis() as u64),
                    version: item.version,
                })
                .collect()
        }))
    }

    async fn clear(&self, bucket: &Bucket) -> StateResult<u64> {
        Ok(self.with(|inner, now| {
            inner.buckets.get_mut(bucket).map_or(0, |keys| {
                let live = keys.prune(now);
                keys.items.clear();
                live as u64
            })
        }))
    }

    async fn touch_session(
        &self,
        function_id: &str,
        session_key: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> StateResult<Session> {
        let now = wall_clock();
        Ok(self.with(|inner, _| {
            let fresh = || Session {
                function_id: function_id.to_owned(),
                session_key: session_key.to_owned(),
                instance_id: None,
                created_at: now,
                last_access: now,
                expires_at: now,
            };
            let entry = inner
                .sessions
                .entry((function_id.to_owned(), session_key.to_owned()))
                .or_insert_with(fresh);
            if entry.expires_at <= now {
                // Lapsed: a new session under the same key.
                *entry = fresh();
            }
            if let Some(instance) = instance_id {
                entry.instance_id = Some(instance.to_owned());
            }
            entry.last_access = now;
            entry.expires_at = now + timeout;
            entry.clone()
        }))
    }

    async fn session(&self, function_id: &str, session_key: &str) -> StateResult<Option<Session>> {
        let now = wall_clock();
        Ok(self.with(|inner, _| {
            inner
                .sessions
                .get(&(function_id.to_owned(), session_key.to_owned()))
                .filter(|s| s.expires_at > now)
                .cloned()
        }))
    }

    async fn sessions(&self, function_id: &str, limit: usize) -> StateResult<Vec<Session>> {
        let now = wall_clock();
        Ok(self.with(|inner, _| {
            let mut live: Vec<Session> = inner
                .sessions
                .values()
                .filter(|s| s.function_id == function_id && s.expires_at > now)
                .cloned()
                .collect();
            // Most recent first; ties in reverse key order, as the other backends.
            live.sort_by(|a, b| {
                (b.last_access, &b.session_key).cmp(&(a.last_access, &a.session_key))
            });
            live.truncate(limit);
            live
        }))
    }

    async fn delete_session(&self, function_id: &str, session_key: &str) -> StateResult<bool> {
        let now = wall_clock();
        Ok(self.with(|inner, _| {
            inner
                .sessions
                .remove(&(function_id.to_owned(), session_key.to_owned()))
                .is_some_and(|s| s.expires_at > now)
        }))
    }

    async fn purge_function(&self, function_id: &str) -> StateResult<()> {
        self.with(|inner, _| {
            inner.buckets.retain(|b, _| b.function_id != function_id);
            inner.sessions.retain(|(f, _), _| f != function_id);
        });
        Ok(())
    }
}

/// Now, to the millisecond (what the durable backends keep).
fn wall_clock() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}
