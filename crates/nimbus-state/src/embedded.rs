//! The embedded backend (the default): one [redb] database file on local disk.
//!
//! Tables (keys are bytes laid out so that a function's rows, and a bucket's, are one
//! contiguous range):
//! - `state`: `function · scope · key` → `version · expires_at · JSON`. `function` is the
//!   function id after its length, `scope` is `f`, or `s` and the session key after its
//!   length (lengths make the layout unambiguous whatever the ids hold); `expires_at` is Unix
//!   ms, 0 for none.
//! - `state_seq`: `function · scope` → the bucket's last version. It outlives the bucket's
//!   keys, so versions never repeat; only [`StateStore::purge_function`] drops it.
//! - `sessions`: `function · session key` → created, last access, expires at, instance.
//! - `expiry`: `expires_at · kind · row` → (): every row that expires, in the order it does,
//!   so the sweeper finds due rows without scanning.
//!
//! Writes are queued to one writer thread, which runs whatever has queued up in one write
//! transaction and commits it with immediate durability (fsync) before answering any of them:
//! group commit, so concurrent writers share an fsync, and a write that returned survives a
//! crash. Once a second the same thread sweeps expired rows (a bounded number per pass); it
//! stops when the store is dropped. Reads run inline on the caller's thread: a redb read
//! transaction is a snapshot that never waits for the writer, and takes microseconds.
//!
//! An expired row is invisible to every operation from the moment it expires, whether or not
//! it has been swept yet.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use crate::{
    datetime_ms, not_an_integer, now_ms, parse_counter, session_timeout_ms, ttl_ms, would_overflow,
    Bucket, KeyInfo, Limits, Scope, Session, StateError, StateResult, StateStore, Versioned,
};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("state");
const SEQ: TableDefinition<&[u8], u64> = TableDefinition::new("state_seq");
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");

/// `expiry` rows name what expires: a key of a bucket or a session.
const KIND_DATA: u8 = b'd';
const KIND_SESSION: u8 = b's';

/// How often the writer thread sweeps, and at most how many rows one pass removes (so a
/// pass never holds up writes for long).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const SWEEP_LIMIT: usize = 1000;

/// Most writes committed together.
const MAX_BATCH: usize = 512;

/// The state store on local disk. See the [module docs](self).
pub struct EmbeddedStore {
    db: Arc<Database>,
    jobs: Sender<Job>,
    writer: Option<JoinHandle<()>>,
}

impl EmbeddedStore {
    /// Opens the database at `path` (e.g. `<data_dir>/state.redb`), creating it and its
    /// directory if needed, and starts its writer thread.
    pub fn open(path: &Path) -> StateResult<EmbeddedStore> {
        let unavailable = |e: &dyn std::fmt::Display| {
            StateError::Unavailable(format!("cannot open state store {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(&e))?;
        }
        let db = Database::create(path).map_err(|e| unavailable(&e))?;
        // Read transactions cannot create tables: create them all up front.
        let txn = db.begin_write().map_err(|e| unavailable(&e))?;
        Tables::open(&txn).map_err(|e| unavailable(&e))?;
        txn.commit().map_err(|e| unavailable(&e))?;

        let db = Arc::new(db);
        let (jobs, queue) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("nimbus-state-writer".into())
            .spawn({
                let db = db.clone();
                move || run_writer(&db, &queue)
            })
            .map_err(|e| unavailable(&e))?;
        Ok(EmbeddedStore {
            db,
            jobs,
            writer: Some(writer),
        })
    }

    /// Runs `op` in the writer thread's next transaction and returns its result once that
    /// transaction is durably committed. `op` gets the time to judge expiry by; when it
    /// refuses (`Ok(Err(_))`) it must have written nothing, as its batch still commits.
    async fn write<T, F>(&self, op: F) -> StateResult<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut Tables<'t>, u64) -> Result<StateResult<T>, Failure> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |tables: Result<&mut Tables<'_>, StateError>| {
            let outcome = match tables {
                Ok(tables) => op(tables, now_ms()).map_err(storage_error),
                Err(e) => Err(e),
            };
            Done {
                failed: outcome.is_err(),
                reply: Box::new(move |committed: Result<(), StateError>| {
                    let result = match outcome {
                        Err(e) | Ok(Err(e)) => Err(e),
                        Ok(Ok(value)) => committed.map(|()| value),
                    };
                    // The caller may have gone (its future was dropped): nothing to tell.
                    let _ = reply.send(result);
                }),
            }
        });
        self.jobs.send(job).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    fn read(&self) -> StateResult<redb::ReadTransaction> {
        self.db.begin_read().map_err(storage_error)
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue stops the writer thread; waiting for it releases the database
        // file, so the store can be opened again at once.
        drop(std::mem::replace(&mut self.jobs, mpsc::channel().0));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait::async_trait]
impl StateStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, bucket: &Bucket, key: &str) -> StateResult<Option<Versioned>> {
        let row = row_key(&bucket_prefix(bucket), key);
        let txn = self.read()?;
        let table = txn.open_table(DATA).map_err(storage_error)?;
        let Some(entry) = live_entry(&table, &row, now_ms()).map_err(storage_error)? else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            value: utf8(entry.value)?,
            version: entry.version,
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
        let prefix = bucket_prefix(bucket);
        let row = row_key(&prefix, key);
        let value = value.as_bytes().to_vec();
        let ttl = ttl_ms(ttl);
        let scope = bucket.scope.kind();
        self.write(move |t, now| {
            let current = live_entry(&t.data, &row, now)?.map_or(0, |e| e.version);
            if let Some(expected) = expected.filter(|&v| v != current) {
                return Ok(Err(StateError::Conflict { expected, current }));
            }
            if current == 0
                && count_live(&t.data, &prefix, now, limits.max_keys)? >= limits.max_keys
            {
                return Ok(Err(too_many_keys(scope, limits)));
            }
            let version = t.next_version(&prefix)?;
            t.put_entry(&row, version, expires_at(now, ttl), &value)?;
            Ok(Ok(version))
        })
        .await
    }

    async fn incr(
        &self,
        bucket: &Bucket,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
        limits: Limits,
    ) -> StateResult<i64> {
        let prefix = bucket_prefix(bucket);
        let row = row_key(&prefix, key);
        let key = key.to_owned();
        let ttl = ttl_ms(ttl);
        let scope = bucket.scope.kind();
        self.write(move |t, now| {
            let (current, expires) = match live_entry(&t.data, &row, now)? {
                Some(entry) => match parse_counter(&entry.value) {
                    Some(n) => (n, entry.expires_at),
                    None => return Ok(Err(not_an_integer(&key))),
                },
                None if count_live(&t.data, &prefix, now, limits.max_keys)? >= limits.max_keys => {
                    return Ok(Err(too_many_keys(scope, limits)))
                }
                None => (0, expires_at(now, ttl)),
            };
            let Some(result) = current.checked_add(delta) else {
                return Ok(Err(would_overflow(&key, delta)));
            };
            let version = t.next_version(&prefix)?;
            t.put_entry(&row, version, expires, result.to_string().as_bytes())?;
            Ok(Ok(result))
        })
        .await
    }

    async fn delete(&self, bucket: &Bucket, key: &str) -> StateResult<bool> {
        let row = row_key(&bucket_prefix(bucket), key);
        self.write(move |t, now| {
            let removed = t.remove_entry(&row)?;
            Ok(Ok(removed.is_some_and(|e| e.is_live(now))))
        })
        .await
    }

    async fn expire(&self, bucket: &Bucket, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        let row = row_key(&bucket_prefix(bucket), key);
        let ttl = ttl_ms(ttl);
        self.write(move |t, now| {
            let Some(entry) = live_entry(&t.data, &row, now)? else {
                return Ok(Ok(false));
            };
            t.put_entry(&row, entry.version, expires_at(now, ttl), &entry.value)?;
            Ok(Ok(true))
        })
        .await
    }

    async fn list(&self, bucket: &Bucket) -> StateResult<Vec<KeyInfo>> {
        let prefix = bucket_prefix(bucket);
        let txn = self.read()?;
        let table = txn.open_table(DATA).map_err(storage_error)?;
        let now = now_ms();
        let mut keys = Vec::new();
        for row in table.range(prefix.as_slice()..).map_err(storage_error)? {
            let (row, entry) = row.map_err(storage_error)?;
            let Some(key) = row.value().strip_prefix(prefix.as_slice()) else {
                break;
            };
            let entry = EntryRef::parse(entry.value()).map_err(storage_error)?;
            if entry.is_live(now) {
                keys.push(KeyInfo {
                    key: utf8(key.to_vec())?,
                    size: entry.value.len(),
                    ttl_ms: (entry.expires_at != 0).then(|| entry.expires_at - now),
                    version: entry.version,
                });
            }
        }
        Ok(keys)
    }

    async fn clear(&self, bucket: &Bucket) -> StateResult<u64> {
        let prefix = bucket_prefix(bucket);
        self.write(move |t, now| {
            let mut live = 0;
            for row in rows_with_prefix(&t.data, &prefix)? {
                if t.remove_entry(&row)?.is_some_and(|e| e.is_live(now)) {
                    live += 1;
                }
            }
            Ok(Ok(live))
        })
        .await
    }

    async fn touch_session(
        &self,
        function_id: &str,
        session_key: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> StateResult<Session> {
        let row = session_row(function_id, session_key);
        let (function_id, session_key) = (function_id.to_owned(), session_key.to_owned());
        let instance_id = instance_id.map(str::to_owned);
        let timeout = session_timeout_ms(timeout);
        self.write(move |t, now| {
            let live = live_session(&t.sessions, &row, now)?;
            let record = SessionRecord {
                created: live.as_ref().map_or(now, |s| s.created),
                last_access: now,
                expires_at: now + timeout,
                instance_id: instance_id.or(live.and_then(|s| s.instance_id)),
            };
            t.put_session(&row, &record)?;
            Ok(Ok(record.into_session(function_id, session_key)))
        })
        .await
    }

    async fn session(&self, function_id: &str, session_key: &str) -> StateResult<Option<Session>> {
        let txn = self.read()?;
        let table = txn.open_table(SESSIONS).map_err(storage_error)?;
        let row = session_row(function_id, session_key);
        Ok(live_session(&table, &row, now_ms())
            .map_err(storage_error)?
            .map(|s| s.into_session(function_id.to_owned(), session_key.to_owned())))
    }

    async fn sessions(&self, function_id: &str, limit: usize) -> StateResult<Vec<Session>> {
        let prefix = function_prefix(function_id);
        let txn = self.read()?;
        let table = txn.open_table(SESSIONS).map_err(storage_error)?;
        let now = now_ms();
        let mut live = Vec::new();
        for row in table.range(prefix.as_slice()..).map_err(storage_error)? {
            let (row, record) = row.map_err(storage_error)?;
            let Some(key) = row.value().strip_prefix(prefix.as_slice()) else {
                break;
            };
            let record = SessionRecord::parse(record.value()).map_err(storage_error)?;
            if record.expires_at > now {
                live.push((utf8(key.to_vec())?, record));
            }
        }
        // Most recent first; ties in reverse key order, as Redis's ZREVRANGE has them.
        live.sort_by(|(ka, a), (kb, b)| (b.last_access, kb).cmp(&(a.last_access, ka)));
        Ok(live
            .into_iter()
            .take(limit)
            .map(|(key, record)| record.into_session(function_id.to_owned(), key))
            .collect())
    }

    async fn delete_session(&self, function_id: &str, session_key: &str) -> StateResult<bool> {
        let row = session_row(function_id, session_key);
        self.write(move |t, now| {
            let removed = t.remove_session(&row)?;
            Ok(Ok(removed.is_some_and(|s| s.expires_at > now)))
        })
        .await
    }

    async fn purge_function(&self, function_id: &str) -> StateResult<()> {
        let prefix = function_prefix(function_id);
        self.write(move |t, _| {
            for row in rows_with_prefix(&t.data, &prefix)? {
                t.remove_entry(&row)?;
            }
            for row in rows_with_prefix(&t.seq, &prefix)? {
                t.seq.remove(row.as_slice())?;
            }
            for row in rows_with_prefix(&t.sessions, &prefix)? {
                t.remove_session(&row)?;
            }
            Ok(Ok(()))
        })
        .await
    }
}

/// A queued write: runs in the writer's transaction (or is told why there is none).
type Job = Box<dyn for<'t> FnOnce(Result<&mut Tables<'t>, StateError>) -> Done + Send>;

/// What a queued write did: whether it failed in storage (which aborts its whole batch, as it
/// may have written part of its rows), and how to answer its caller once the commit is known.
struct Done {
    failed: bool,
    reply: Box<dyn FnOnce(Result<(), StateError>) + Send>,
}

/// The writer thread: commits queued writes in batches and sweeps expired rows, until the
/// store is dropped.
fn run_writer(db: &Database, queue: &Receiver<Job>) {
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        match queue.recv_timeout(next_sweep.saturating_duration_since(Instant::now())) {
            Ok(first) => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                commit_batch(db, batch);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_sweep {
            if let Err(e) = sweep(db, now_ms()) {
                tracing::warn!(error = %e, "sweeping expired state failed");
            }
            next_sweep = Instant::now() + SWEEP_EVERY;
        }
    }
}

fn commit_batch(db: &Database, batch: Vec<Job>) {
    let mut txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => {
            let e = storage_error(e);
            for job in batch {
                (job(Err(e.clone())).reply)(Err(e.clone()));
            }
            return;
        }
    };
    txn.set_durability(Durability::Immediate);
    let done: Vec<Done> = match Tables::open(&txn) {
        Ok(mut tables) => batch.into_iter().map(|job| job(Ok(&mut tables))).collect(),
        Err(e) => {
            let e = storage_error(e);
            batch.into_iter().map(|job| job(Err(e.clone()))).collect()
        }
    };
    let committed = if done.iter().any(|d| d.failed) {
        let _ = txn.abort();
        Err(StateError::Unavailable(
            "embedded state store: the write was rolled back with a failed one it was committed with"
                .into(),
        ))
    } else {
        txn.commit().map_err(storage_error)
    };
    for d in done {
        (d.reply)(committed.clone());
    }
}

/// Removes up to [`SWEEP_LIMIT`] rows that expired by `now`; how many.
fn sweep(db: &Database, now: u64) -> Result<usize, Failure> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    let swept = {
        let mut t = Tables::open(&txn)?;
        let end = now.saturating_add(1).to_be_bytes();
        let due = t
            .expiry
            .range(..end.as_slice())?
            .take(SWEEP_LIMIT)
            .map(|r| r.map(|(key, _)| key.value().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        for key in &due {
            let (expires_at, rest) = split_u64(key)?;
            let (&kind, row) = rest
                .split_first()
                .ok_or_else(|| corrupt("bad expiry key"))?;
            // The index follows every change of a row's expiry, so the row should be due
            // too; should it not be, only the stray entry goes.
            let row_expires_at = match kind {
                KIND_DATA => t
                    .data
                    .get(row)?
                    .map(|r| EntryRef::parse(r.value()).map(|e| e.expires_at)),
                KIND_SESSION => t
                    .sessions
                    .get(row)?
                    .map(|r| SessionRecord::parse(r.value()).map(|s| s.expires_at)),
                _ => None,
            }
            .transpose()?;
            match kind {
                _ if row_expires_at != Some(expires_at) => drop(t.expiry.remove(key.as_slice())?),
                // Removing the row removes its index entry.
                KIND_DATA => drop(t.remove_entry(row)?),
                _ => drop(t.remove_session(row)?),
            }
        }
        due.len()
    };
    if swept == 0 {
        txn.abort()?;
    } else {
        txn.commit()?;
    }
    Ok(swept)
}

/// The tables, open in one write transaction.
struct Tables<'t> {
    data: Table<'t, &'static [u8], &'static [u8]>,
    seq: Table<'t, &'static [u8], u64>,
    sessions: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, &'static [u8], ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, Failure> {
        Ok(Tables {
            data: txn.open_table(DATA)?,
            seq: txn.open_table(SEQ)?,
            sessions: txn.open_table(SESSIONS)?,
            expiry: txn.open_table(EXPIRY)?,
        })
    }

    /// The bucket's next version.
    fn next_version(&mut self, bucket: &[u8]) -> Result<u64, Failure> {
        let next = self.seq.get(bucket)?.map_or(0, |v| v.value()) + 1;
        self.seq.insert(bucket, next)?;
        Ok(next)
    }

    /// Writes a key's row over whatever was there (live or expired), keeping the expiry
    /// index in step.
    fn put_entry(
        &mut self,
        row: &[u8],
        version: u64,
        expires_at: u64,
        value: &[u8],
    ) -> Result<(), Failure> {
        let record = EntryRef {
            version,
            expires_at,
            value,
        }
        .encode();
        let old = match self.data.insert(row, record.as_slice())? {
            Some(old) => EntryRef::parse(old.value())?.expires_at,
            None => 0,
        };
        self.reindex(KIND_DATA, row, old, expires_at)
    }

    /// Removes a key's row (and its index entry); what it held, expired or not.
    fn remove_entry(&mut self, row: &[u8]) -> Result<Option<Entry>, Failure> {
        let Some(old) = self
            .data
            .remove(row)?
            .map(|g| Entry::parse(g.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        self.reindex(KIND_DATA, row, old.expires_at, 0)?;
        Ok(Some(old))
    }

    fn put_session(&mut self, row: &[u8], record: &SessionRecord) -> Result<(), Failure> {
        let old = match self.sessions.insert(row, record.encode().as_slice())? {
            Some(old) => SessionRecord::parse(old.value())?.expires_at,
            None => 0,
        };
        self.reindex(KIND_SESSION, row, old, record.expires_at)
    }

    /// Removes a session's row (and its index entry); what it held, expired or not.
    fn remove_session(&mut self, row: &[u8]) -> Result<Option<SessionRecord>, Failure> {
        let Some(old) = self
            .sessions
            .remove(row)?
            .map(|g| SessionRecord::parse(g.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        self.reindex(KIND_SESSION, row, old.expires_at, 0)?;
        Ok(Some(old))
    }

    /// Moves a row's expiry index entry from `old` to `new` (0: none).
    fn reindex(&mut self, kind: u8, row: &[u8], old: u64, new: u64) -> Result<(), Failure> {
        if old == new {
            return Ok(());
        }
        if old != 0 {
            self.expiry.remove(expiry_key(old, kind, row).as_slice())?;
        }
        if new != 0 {
            self.expiry
                .insert(expiry_key(new, kind, row).as_slice(), ())?;
        }
        Ok(())
    }
}

/// The live entry at `row`.
fn live_entry(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    row: &[u8],
    now: u64,
) -> Result<Option<Entry>, Failure> {
    Ok(match table.get(row)? {
        Some(record) => Some(Entry::parse(record.value())?).filter(|e| e.is_live(now)),
        None => None,
    })
}

/// The live session at `row`.
fn live_session(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    row: &[u8],
    now: u64,
) -> Result<Option<SessionRecord>, Failure> {
    Ok(match table.get(row)? {
        Some(record) => Some(SessionRecord::parse(record.value())?).filter(|s| s.expires_at > now),
        None => None,
    })
}

/// How many live keys the bucket at `prefix` has, counting no further than `max` (all a
/// limit check needs to know).
fn count_live(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    now: u64,
    max: u32,
) -> Result<u32, Failure> {
    let mut live = 0;
    for row in table.range(prefix..)? {
        let (row, entry) = row?;
        if !row.value().starts_with(prefix) || live >= max {
            break;
        }
        if EntryRef::parse(entry.value())?.is_live(now) {
            live += 1;
        }
    }
    Ok(live)
}

/// The keys of every row under `prefix`.
fn rows_with_prefix<V: redb::Value + 'static>(
    table: &impl ReadableTable<&'static [u8], V>,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>, Failure> {
    let mut rows = Vec::new();
    for row in table.range(prefix..)? {
        let row = row?.0.value().to_vec();
        if !row.starts_with(prefix) {
            break;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// A key's row, borrowed from the table.
struct EntryRef<'a> {
    version: u64,
    /// Unix ms; 0: never.
    expires_at: u64,
    /// JSON text.
    value: &'a [u8],
}

impl<'a> EntryRef<'a> {
    fn parse(record: &'a [u8]) -> Result<EntryRef<'a>, redb::StorageError> {
        let (version, rest) = split_u64(record)?;
        let (expires_at, value) = split_u64(rest)?;
        Ok(EntryRef {
            version,
            expires_at,
            value,
        })
    }

    fn encode(&self) -> Vec<u8> {
        [
            &self.version.to_be_bytes()[..],
            &self.expires_at.to_be_bytes(),
            self.value,
        ]
        .concat()
    }

    fn is_live(&self, now: u64) -> bool {
        is_live(self.expires_at, now)
    }
}

/// A key's row, owned.
struct Entry {
    version: u64,
    expires_at: u64,
    value: Vec<u8>,
}

impl Entry {
    fn parse(record: &[u8]) -> Result<Entry, redb::StorageError> {
        let entry = EntryRef::parse(record)?;
        Ok(Entry {
            version: entry.version,
            expires_at: entry.expires_at,
            value: entry.value.to_vec(),
        })
    }

    fn is_live(&self, now: u64) -> bool {
        is_live(self.expires_at, now)
    }
}

/// A session's row.
struct SessionRecord {
    created: u64,
    last_access: u64,
    expires_at: u64,
    instance_id: Option<String>,
}

impl SessionRecord {
    fn parse(record: &[u8]) -> Result<SessionRecord, redb::StorageError> {
        let (created, rest) = split_u64(record)?;
        let (last_access, rest) = split_u64(rest)?;
        let (expires_at, rest) = split_u64(rest)?;
        let instance_id = match rest.split_first() {
            Some((1, id)) => Some(String::from_utf8(id.to_vec()).map_err(corrupt)?),
            Some((0, [])) => None,
            _ => return Err(corrupt("bad session record")),
        };
        Ok(SessionRecord {
            created,
            last_access,
            expires_at,
            instance_id,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut record = Vec::with_capacity(25 + self.instance_id.as_ref().map_or(0, String::len));
        record.extend_from_slice(&self.created.to_be_bytes());
        record.extend_from_slice(&self.last_access.to_be_bytes());
        record.extend_from_slice(&self.expires_at.to_be_bytes());
        match &self.instance_id {
            Some(id) => {
                record.push(1);
                record.extend_from_slice(id.as_bytes());
            }
            None => record.push(0),
        }
        record
    }

    fn into_session(self, function_id: String, session_key: String) -> Session {
        Session {
            function_id,
            session_key,
            instance_id: self.instance_id,
            created_at: datetime_ms(self.created),
            last_access: datetime_ms(self.last_access),
            expires_at: datetime_ms(self.expires_at),
        }
    }
}

fn is_live(expires_at: u64, now: u64) -> bool {
    expires_at == 0 || expires_at > now
}

fn expires_at(now: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now + ttl_ms
    }
}

fn too_many_keys(scope: &'static str, limits: Limits) -> StateError {
    StateError::TooManyKeys {
        scope,
        max: limits.max_keys,
    }
}

fn push_len_prefixed(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn function_prefix(function_id: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(4 + function_id.len() + 64);
    push_len_prefixed(&mut prefix, function_id);
    prefix
}

fn bucket_prefix(bucket: &Bucket) -> Vec<u8> {
    let mut prefix = function_prefix(&bucket.function_id);
    match &bucket.scope {
        Scope::Function => prefix.push(b'f'),
        Scope::Session(session_key) => {
            prefix.push(b's');
            push_len_prefixed(&mut prefix, session_key);
        }
    }
    prefix
}

fn row_key(bucket_prefix: &[u8], key: &str) -> Vec<u8> {
    [bucket_prefix, key.as_bytes()].concat()
}

fn session_row(function_id: &str, session_key: &str) -> Vec<u8> {
    row_key(&function_prefix(function_id), session_key)
}

fn expiry_key(expires_at: u64, kind: u8, row: &[u8]) -> Vec<u8> {
    [&expires_at.to_be_bytes()[..], &[kind], row].concat()
}

fn split_u64(bytes: &[u8]) -> Result<(u64, &[u8]), redb::StorageError> {
    let (head, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("record too short"))?;
    Ok((u64::from_be_bytes(*head), rest))
}

fn corrupt(e: impl std::fmt::Display) -> redb::StorageError {
    redb::StorageError::Corrupted(format!("state record: {e}"))
}

fn utf8(bytes: Vec<u8>) -> StateResult<String> {
    String::from_utf8(bytes).map_err(|e| storage_error(corrupt(e)))
}

/// A failure of the database itself (I/O, corruption). Boxed: redb's error is large, and
/// travels through every write's result.
#[derive(Debug)]
struct Failure(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(Box::new(e.into()))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn storage_error(e: impl Into<Failure>) -> StateError {
    StateError::Unavailable(format!("embedded state store: {}", e.into()))
}

fn writer_gone() -> StateError {
    StateError::Unavailable("embedded state store: its writer thread has stopped".into())
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    const LIMITS: Limits = Limits {
        max_value_bytes: 1024,
        max_keys: 100,
    };

    #[test]
    fn rows_of_different_buckets_never_collide() {
        let a = row_key(&bucket_prefix(&Bucket::session("fn_1", "a")), "bc");
        let b = row_key(&bucket_prefix(&Bucket::session("fn_1", "ab")), "c");
        let c = row_key(&bucket_prefix(&Bucket::function("fn_1")), "sab");
        let d = row_key(&bucket_prefix(&Bucket::function("fn_1s")), "ab");
        assert_eq!(
            [&a, &b, &c, &d]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            4
        );
        let function = function_prefix("fn_1");
        assert!([&a, &b, &c].iter().all(|r| r.starts_with(&function)));
        assert!(!d.starts_with(&function));
    }

    #[tokio::test]
    async fn the_sweeper_removes_expired_rows_and_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let bucket = Bucket::function("fn_1");
        let ttl = Some(Duration::from_millis(50));
        store
            .set(&bucket, "short", "1", ttl, None, LIMITS)
            .await
            .unwrap();
        store
            .set(&bucket, "kept", "2", None, None, LIMITS)
            .await
            .unwrap();
        store
            .touch_session("fn_1", "s", None, Duration::from_millis(50))
            .await
            .unwrap();
        let rows = |store: &EmbeddedStore| {
            let txn = store.db.begin_read().unwrap();
            let count = |def| txn.open_table(def).unwrap().len().unwrap();
            let expiry = txn.open_table(EXPIRY).unwrap().len().unwrap();
            (count(DATA), count(SESSIONS), expiry)
        };
        assert_eq!(rows(&store), (2, 1, 2));
        let deadline = Instant::now() + Duration::from_secs(5);
        while rows(&store) != (1, 0, 0) {
            assert!(Instant::now() < deadline, "not swept: {:?}", rows(&store));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn a_stray_expiry_entry_never_removes_a_live_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let bucket = Bucket::function("fn_1");
        store
            .set(&bucket, "k", "1", None, None, LIMITS)
            .await
            .unwrap();
        let txn = store.db.begin_write().unwrap();
        let row = row_key(&bucket_prefix(&bucket), "k");
        txn.open_table(EXPIRY)
            .unwrap()
            .insert(expiry_key(1, KIND_DATA, &row).as_slice(), ())
            .unwrap();
        txn.commit().unwrap();
        sweep(&store.db, now_ms()).unwrap();
        let txn = store.db.begin_read().unwrap();
        assert!(txn.open_table(EXPIRY).unwrap().is_empty().unwrap());
        assert_eq!(store.get(&bucket, "k").await.unwrap().unwrap().value, "1");
    }

    #[tokio::test]
    async fn a_dropped_store_releases_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.redb");
        let bucket = Bucket::function("fn_1");
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .set(&bucket, "k", "\"v\"", None, None, LIMITS)
            .await
            .unwrap();
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            store.get(&bucket, "k").await.unwrap(),
            Some(Versioned {
                value: "\"v\"".into(),
                version: 1
            })
        );
    }
}
