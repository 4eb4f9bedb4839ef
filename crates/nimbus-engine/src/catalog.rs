//! The in-memory view of the metadata the invoke path needs: functions, aliases and
//! versions, read from the store on a miss and kept for `cache_ttl`.
//!
//! Versions are immutable, so they are kept (and only re-checked for deletion after
//! `cache_ttl`) until they or their function go away. Functions and aliases are re-read
//! after `cache_ttl`, which bounds how stale a change made on
//! another server can look; changes made through this server invalidate at once. A read
//! that raced with an invalidation is not cached: it may predate the change.
//!
//! When the store does not answer a re-read, the cached entry is served while it is younger
//! than `stale_ttl` (counted in `nimbus_metadata_stale_total`, logged once per outage), so
//! warm invocations go on through an outage; past that, and for anything not cached, the
//! lookup fails with the store's error. A re-read (or [`Catalog::revalidate`]) that finds a
//! function, alias or version gone tells the engine ([`Gone`]), which drops what this
//! server holds for it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nimbus_core::FunctionConfig;
use nimbus_store::MetadataStore;
use tokio::sync::mpsc;

use crate::code_cache::CodeCache;
use crate::error::{EngineError, EngineResult};
use crate::metrics;
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

/// Something a re-read found deleted (on another server, or behind this one's back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// A function, with everything of it.
    Function {
        /// Its id.
        id: String,
        /// Its name.
        name: String,
    },
    /// An alias of a function.
    Alias {
        /// The function's id.
        function_id: String,
        /// The function's name.
        function: String,
        /// The alias.
        alias: String,
    },
    /// A version of a function.
    Version {
        /// The function's id.
        function_id: String,
        /// The function's name.
        function: String,
        /// The version.
        version: u32,
    },
}

struct Timed<T> {
    value: Arc<T>,
    /// When the store read began: the value is at least this fresh.
    fetched: Instant,
}

/// How long cached metadata is used.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// Re-read after this long.
    pub ttl: Duration,
    /// Served while the store does not answer, up to this old.
    pub stale_ttl: Duration,
}

/// Cached metadata in front of the store.
pub struct Catalog {
    store: Arc<dyn MetadataStore>,
    code: CodeCache,
    freshness: Freshness,
    /// By id and by name.
    functions: RwLock<HashMap<String, Timed<FunctionEntry>>>,
    /// By (function id, alias name).
    aliases: RwLock<HashMap<(String, String), Timed<Route>>>,
    /// By (function id, version).
    versions: RwLock<HashMap<(String, u32), Timed<VersionEntry>>>,
    /// Bumped by every invalidation; a store read started under an older generation is
    /// returned but not cached.
    generation: AtomicU64,
    /// Where what re-reads find gone is reported.
    gone: mpsc::UnboundedSender<Gone>,
    /// Stale entries are being served (the store did not answer the last re-read).
    serving_stale: AtomicBool,
}

impl Catalog {
    /// A catalog over `store`, unpacking code through `code`; what it finds gone arrives
    /// on the receiver.
    pub fn new(
        store: Arc<dyn MetadataStore>,
        code: CodeCache,
        freshness: Freshness,
    ) -> (Self, mpsc::UnboundedReceiver<Gone>) {
        let (gone, found) = mpsc::unbounded_channel();
        let catalog = Catalog {
            store,
            code,
            freshness,
            functions: RwLock::default(),
            aliases: RwLock::default(),
            versions: RwLock::default(),
            generation: AtomicU64::new(0),
            gone,
            serving_stale: AtomicBool::new(false),
        };
        (catalog, found)
    }

    /// A function by id or name.
    pub async fn function(&self, reference: &str) -> EngineResult<Arc<FunctionEntry>> {
        let cached = cached(&self.functions, reference);
        if let Some((entry, fetched)) = &cached {
            if fetched.elapsed() < self.freshness.ttl {
                return Ok(entry.clone());
            }
        }
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let read = match self.store.get_function(reference).await {
            Ok(read) => read,
            Err(e) => return self.stale(cached, "function", e.into()),
        };
        self.answered();
        let old = cached.map(|(entry, _)| entry);
        let function = match read {
            Some(function) => function,
            None => {
                if let Some(old) = old {
                    self.function_gone(&old);
                }
                return Err(EngineError::function_not_found(reference));
            }
        };
        // The name now belongs to another function: the one cached is gone.
        if let Some(old) = old.filter(|old| old.id != function.id) {
            self.function_gone(&old);
        }
        let entry = Arc::new(FunctionEntry {
            id: function.id.clone(),
            name: function.name.clone(),
            max_instances: function.max_instances,
        });
        let mut map = self.functions.write().expect("catalog lock");
        if self.generation.load(Ordering::Acquire) == generation {
            // Not for a read that raced a change here: it may predate a deletion.
            metrics::function_live(&function.name, &function.id);
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
        let cached = cached(&self.aliases, &key);
        if let Some((route, fetched)) = &cached {
            if fetched.elapsed() < self.freshness.ttl {
                return Ok(route.clone());
            }
        }
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let read = match self.store.get_alias(&function.id, name).await {
            Ok(read) => read,
            Err(e) => return self.stale(cached, "alias", e.into()),
        };
        self.answered();
        let Some(alias) = read else {
            if cached.is_some() {
                self.aliases.write().expect("catalog lock").remove(&key);
                self.report(Gone::Alias {
                    function_id: function.id.clone(),
                    function: function.name.clone(),
                    alias: name.to_owned(),
                });
            }
            return Err(EngineError::alias_not_found(&function.name, name));
        };
        let mut map = self.aliases.write().expect("catalog lock");
        let route = match map.get(&key) {
            Some(old) if old.value.routing == alias.routing => old.value.clone(),
            _ => Arc::new(Route::new(alias.routing)),
        };
        if self.generation.load(Ordering::Acquire) == generation {
            metrics::alias_live(&function.id, name);
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
        let cached = cached(&self.versions, &key);
        let (generation, fetched) = (self.generation.load(Ordering::Acquire), Instant::now());
        let entry = match cached {
            Some((entry, at)) if at.elapsed() < self.freshness.ttl => return Ok(entry),
            Some((entry, at)) => match self.store.has_version(&function.id, version).await {
                Ok(true) => {
                    self.answered();
                    entry
                }
                Ok(false) => {
                    self.answered();
                    self.version_gone(&function.id, &function.name, version);
                    return Err(EngineError::version_not_found(&function.name, version));
                }
                Err(e) => return self.stale(Some((entry, at)), "version", e.into()),
            },
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

    /// Checks every entry older than the TTL against the store, so that what was deleted
    /// elsewhere is found gone (and reported) even if this server is not asked for it
    /// again: one query for the functions, one per alias and version cached.
    pub async fn revalidate(&self) -> EngineResult<()> {
        let ttl = self.freshness.ttl;
        let functions: HashMap<String, Arc<FunctionEntry>> = {
            let map = self.functions.read().expect("catalog lock");
            map.values()
                .filter(|e| e.fetched.elapsed() >= ttl)
                .map(|e| (e.value.id.clone(), e.value.clone()))
                .collect()
        };
        let ids: Vec<String> = functions.keys().cloned().collect();
        let existing = self.store.existing_functions(&ids).await?;
        for (id, entry) in &functions {
            if !existing.contains(id) {
                self.function_gone(entry);
            }
        }
        let names: HashMap<String, String> = {
            let map = self.functions.read().expect("catalog lock");
            map.values()
                .map(|e| (e.value.id.clone(), e.value.name.clone()))
                .collect()
        };
        let aliases: Vec<(String, String)> = {
            let map = self.aliases.read().expect("catalog lock");
            map.iter()
                .filter(|(_, e)| e.fetched.elapsed() >= ttl)
                .map(|(key, _)| key.clone())
                .collect()
        };
        for (function_id, alias) in aliases {
            if self.store.get_alias(&function_id, &alias).await?.is_none() {
                self.aliases
                    .write()
                    .expect("catalog lock")
                    .remove(&(function_id.clone(), alias.clone()));
                if let Some(function) = names.get(&function_id) {
                    self.report(Gone::Alias {
                        function_id,
                        function: function.clone(),
                        alias,
                    });
                }
            }
        }
        let versions: Vec<(String, String, u32)> = {
            let map = self.versions.read().expect("catalog lock");
            map.iter()
                .filter(|(_, e)| e.fetched.elapsed() >= ttl)
                .map(|((id, n), e)| (id.clone(), e.value.function_name.clone(), *n))
                .collect()
        };
        for (function_id, function, version) in versions {
            if !self.store.has_version(&function_id, version).await? {
                self.version_gone(&function_id, &function, version);
            }
        }
        Ok(())
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

    /// A cached function found deleted: forgotten here, and reported.
    fn function_gone(&self, function: &FunctionEntry) {
        self.remove(&function.id);
        self.report(Gone::Function {
            id: function.id.clone(),
            name: function.name.clone(),
        });
    }

    /// A cached version found deleted: forgotten here, and reported.
    fn version_gone(&self, function_id: &str, function: &str, version: u32) {
        self.forget_version(function_id, version);
        self.report(Gone::Version {
            function_id: function_id.to_owned(),
            function: function.to_owned(),
            version,
        });
    }

    fn report(&self, gone: Gone) {
        // The engine may be gone itself (shutting down): nothing is left to drop then.
        let _ = self.gone.send(gone);
    }

    /// The cached entry, if the store did not answer and it is younger than `stale_ttl`;
    /// else `error`.
    fn stale<T>(
        &self,
        cached: Option<(Arc<T>, Instant)>,
        kind: &'static str,
        error: EngineError,
    ) -> EngineResult<Arc<T>> {
        let EngineError::Unavailable(why) = &error else {
            return Err(error);
        };
        let Some((entry, fetched)) = cached else {
            return Err(error);
        };
        if fetched.elapsed() >= self.freshness.stale_ttl {
            return Err(error);
        }
        metrics::metadata_stale(kind);
        if !self.serving_stale.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{why}: invocations of functions known here go on with cached metadata up to \
                 stale_ttl ({} s) old",
                self.freshness.stale_ttl.as_secs()
            );
        }
        Ok(entry)
    }

    /// The store answered a re-read.
    fn answered(&self) {
        if self.serving_stale.load(Ordering::Relaxed)
            && self.serving_stale.swap(false, Ordering::Relaxed)
        {
            tracing::info!("the metadata store answers again: cached metadata is fresh again");
        }
    }
}

/// An entry and when it was read, however old.
fn cached<K, Q, T>(map: &RwLock<HashMap<K, Timed<T>>>, key: &Q) -> Option<(Arc<T>, Instant)>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let map = map.read().expect("catalog lock");
    map.get(key).map(|e| (e.value.clone(), e.fetched))
}
