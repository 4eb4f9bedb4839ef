//! The in-memory view of the metadata the invoke path needs: functions, aliases and
//! versions, read from the store on a miss and kept for `cache_ttl`.
//!
//! Versions are immutable, so they are kept (and only re-checked for deletion after
//! `cache_ttl`) until they or their function go away. Functions and aliases are re-read
//! after `cache_ttl`, which bounds how stale a change made on
//! another server can look; changes made through this server invalidate at once. A read
//! that raced with an invalidation is not cached: it may predate the change.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nimbus_core::FunctionConfig;
use nimbus_store::MetadataStore;

use crate::code_cache::CodeCache;
use crate::error::{EngineError, EngineResult};
use crate::router::Route;

/// What the invoke path needs of a function.
#[derive(Debug)]
pub struct FunctionEntry {
    /// Function id.
    pub id: String,
    /// Function name.
    pub name: String,
    /// Most instances alive at once.
    pub max_instances: u32,
}

/// A published version, ready to start instances from.
#[derive(Debug)]
pub struct VersionEntry {
    /// Function id.
    pub function_id: String,
    /// Function name (for the worker's environment).
    pub function_name: String,
    /// Version number.
    pub version: u32,
    /// Frozen configuration.
    pub config: FunctionConfig,
    /// Directory with the unpacked code.
    pub code_dir: PathBuf,
}

struct Timed<T> {
    value: Arc<T>,
    /// When the store read began: the value is at least this fresh.
    fetched: Instant,
}

/// Cached metadata in front of the store.
pub struct Catalog {
    store: Arc<dyn MetadataStore>,
    code: CodeCache,
    ttl: Duration,
    /// By id and by name.
    functions: RwLock<HashMap<String, Timed<FunctionEntry>>>,
    /// By (function id, alias name).
    aliases: RwLock<HashMap<(String, String), Timed<Route>>>,
    /// By (function id, version).
    versions: RwLock<HashMap<(String, u32), Timed<VersionEntry>>>,
    /// Bumped by every invalidation; a store read started under an older generation is
    /// returned but not cached.
    generation: AtomicU64,
}

impl Catalog {
    /// A catalog over `store`, unpacking code through `code`.
    pub fn new(store: Arc<dyn MetadataStore>, code: CodeCache, ttl: Duration) -> Self {
        Catalog {
            store,
            code,
            ttl,
            functions: RwLock::default(),
            aliases: RwLock::default(),
            versions: RwLock::default(),
            generation: AtomicU64::new(0),
        }
    }

    /// A function by id or name.
    pub async fn function(&self, reference: &str) -> EngineResult<Arc<FunctionEntry>> {
        if let Some(hit) = fresh(&self.functions, reference, self.ttl) {
            return Ok(hit);
        }
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let function = self
            .store
            .get_function(reference)
            .await?
            .ok_or_else(|| EngineError::function_not_found(reference))?;
        let entry = Arc::new(FunctionEntry {
            id: function.id.clone(),
            name: function.name.clone(),
            max_instances: function.max_instances,
        });
        let mut map = self.functions.write().expect("catalog lock");
        if self.generation.load(Ordering::Acquire) == generation {
            let timed = || Timed {
                value: entry.clone(),
                fetched,
            };
            map.insert(function.id, timed());
            map.insert(function.name, timed());
        }
        Ok(entry)
    }

    /// An alias's routing table. A re-read that finds the routing unchanged keeps the
    /// route's deck, so its rounds of draws stay whole.
    pub async fn alias(&self, function: &FunctionEntry, name: &str) -> EngineResult<Arc<Route>> {
        let key = (function.id.clone(), name.to_owned());
        if let Some(hit) = fresh(&self.aliases, &key, self.ttl) {
            return Ok(hit);
        }
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let alias = self
            .store
            .get_alias(&function.id, name)
            .await?
            .ok_or_else(|| EngineError::alias_not_found(&function.name, name))?;
        let mut map = self.aliases.write().expect("catalog lock");
        let route = match map.get(&key) {
            Some(old) if old.value.routing == alias.routing => old.value.clone(),
            _ => Arc::new(Route::new(alias.routing)),
        };
        if self.generation.load(Ordering::Acquire) == generation {
            map.insert(
                key,
                Timed {
                    value: route.clone(),
                    fetched,
                },
            );
        }
        Ok(route)
    }

    /// A version, with its code unpacked on disk.
    ///
    /// Versions never change, but they can be deleted (on another server too), so a cached
    /// one is re-checked with a cheap existence query once it is older than the TTL.
    pub async fn version(
        &self,
        function: &FunctionEntry,
        version: u32,
    ) -> EngineResult<Arc<VersionEntry>> {
        let key = (function.id.clone(), version);
        let cached = self
            .versions
            .read()
            .expect("catalog lock")
            .get(&key)
            .map(|e| (e.value.clone(), e.fetched.elapsed() < self.ttl));
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let entry = match cached {
            Some((entry, true)) => return Ok(entry),
            Some((entry, false)) if self.store.has_version(&function.id, version).await? => entry,
            Some((_, false)) => {
                self.versions.write().expect("catalog lock").remove(&key);
                return Err(EngineError::version_not_found(&function.name, version));
            }
            None => self.load_version(function, version).await?,
        };
        let mut map = self.versions.write().expect("catalog lock");
        if self.generation.load(Ordering::Acquire) == generation {
            map.insert(
                key,
                Timed {
                    value: entry.clone(),
                    fetched,
                },
            );
        }
        Ok(entry)
    }

    /// Reads a version from the store and unpacks its code.
    async fn load_version(
        &self,
        function: &FunctionEntry,
        version: u32,
    ) -> EngineResult<Arc<VersionEntry>> {
        let stored = self
            .store
            .get_version(&function.id, version)
            .await?
            .ok_or_else(|| EngineError::version_not_found(&function.name, version))?;
        let code = self.code.clone();
        let (code_dir, stored) = tokio::task::spawn_blocking(move || {
            code.materialize(&stored.code).map(|dir| (dir, stored))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("unpacking code: {e}")))?
        .map_err(|e| EngineError::Internal(format!("unpacking code: {e}")))?;
        Ok(Arc::new(VersionEntry {
            function_id: function.id.clone(),
            function_name: function.name.clone(),
            version,
            config: stored.config,
            code_dir,
        }))
    }

    /// Forgets everything cached about a function's draft and aliases (after a change).
    pub fn invalidate(&self, function_id: &str) {
        // Bumped before the entries go: a read that began earlier either sees the new
        // generation (and does not cache) or cached before the removal below.
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.functions
            .write()
            .expect("catalog lock")
            .retain(|_, e| e.value.id != function_id);
        self.aliases
            .write()
            .expect("catalog lock")
            .retain(|(id, _), _| id != function_id);
    }

    /// Forgets a deleted version.
    pub fn forget_version(&self, function_id: &str, version: u32) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.versions
            .write()
            .expect("catalog lock")
            .remove(&(function_id.to_owned(), version));
    }

    /// Forgets a deleted function's versions too.
    pub fn remove(&self, function_id: &str) {
        self.invalidate(function_id);
        self.versions
            .write()
            .expect("catalog lock")
            .retain(|(id, _), _| id != function_id);
    }
}

fn fresh<K, Q, T>(map: &RwLock<HashMap<K, Timed<T>>>, key: &Q, ttl: Duration) -> Option<Arc<T>>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let map = map.read().expect("catalog lock");
    let entry = map.get(key)?;
    (entry.fetched.elapsed() < ttl).then(|| entry.value.clone())
}
