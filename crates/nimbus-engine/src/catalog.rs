//! The in-memory view of the metadata the invoke path needs: functions, aliases and
//! versions, read from the store on a miss and kept for `cache_ttl`.
//!
//! Versions are immutable, so they are kept until they or their function go away. Functions
//! and aliases are re-read after `cache_ttl`, which bounds how stale a change made on
//! another server can look; changes made through this server invalidate at once. A read
//! that raced with an invalidation is not cached: it may predate the change.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nimbus_core::{FunctionConfig, RoutingConfig};
use nimbus_store::MetadataStore;

use crate::code_cache::CodeCache;
use crate::error::{EngineError, EngineResult};

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
    aliases: RwLock<HashMap<(String, String), Timed<RoutingConfig>>>,
    /// By (function id, version).
    versions: RwLock<HashMap<(String, u32), Arc<VersionEntry>>>,
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

    /// An alias's routing table.
    pub async fn alias(
        &self,
        function: &FunctionEntry,
        name: &str,
    ) -> EngineResult<Arc<RoutingConfig>> {
        let key = (function.id.clone(), name.to_owned());
        if let Some(hit) = fresh(&self.aliases, &key, self.ttl) {
            return Ok(hit);
        }
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let alias = self
            .store
            .get_alias(&function.id, name)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                code: "alias_not_found",
                message: format!("function {:?} has no alias {name:?}", function.name),
            })?;
        let routing = Arc::new(alias.routing);
        let mut map = self.aliases.write().expect("catalog lock");
        if self.generation.load(Ordering::Acquire) == generation {
            map.insert(
                key,
                Timed {
                    value: routing.clone(),
                    fetched,
                },
            );
        }
        Ok(routing)
    }

    /// A version, with its code unpacked on disk.
    pub async fn version(
        &self,
        function: &FunctionEntry,
        version: u32,
    ) -> EngineResult<Arc<VersionEntry>> {
        let key = (function.id.clone(), version);
        if let Some(hit) = self.versions.read().expect("catalog lock").get(&key) {
            return Ok(hit.clone());
        }
        let stored = self
            .store
            .get_version(&function.id, version)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                code: "version_not_found",
                message: format!("function {:?} has no version {version}", function.name),
            })?;
        let code = self.code.clone();
        let code_dir = tokio::task::spawn_blocking(move || {
            code.materialize(&stored.code).map(|dir| (dir, stored))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("unpacking code: {e}")))?
        .map_err(|e| EngineError::Internal(format!("unpacking code: {e}")))?;
        let (code_dir, stored) = code_dir;
        let entry = Arc::new(VersionEntry {
            function_id: function.id.clone(),
            function_name: function.name.clone(),
            version,
            config: stored.config,
            code_dir,
        });
        self.versions
            .write()
            .expect("catalog lock")
            .insert(key, entry.clone());
        Ok(entry)
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
