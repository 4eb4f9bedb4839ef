//! Recording invocations: durable before the answer, written to the store behind it.
//!
//! The hot path appends the record to the local journal ([`crate::journal`]: one write to a
//! file, so it survives the server being killed) and moves on. One task reads the journal
//! back in order and writes batches to the store (up to 512 records, lingering 20 ms for a
//! fuller one), deleting journal segments once everything in them is stored. A store that
//! fails is retried with backoff for as long as it takes, the records waiting on disk, not
//! in memory; only a record the store refuses for its data ([`StoreError::Rejected`]) is
//! dropped, since it would hold up every record after it. A server that died is replayed
//! from its journal at the next start. Writing a record twice stores it once (the store's
//! insert keeps a finished record as it is).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nimbus_core::Invocation;
use nimbus_store::{MetadataStore, StoreError, StoreResult};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::RetryPolicy;
use crate::journal::{self, Cursor, Journal, Position};
use crate::metrics;

/// Most records written in one transaction.
const MAX_BATCH: usize = 512;
/// Longest a record waits for a fuller batch.
const LINGER: Duration = Duration::from_millis(20);
/// How often the journal is synced to disk while it changes.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Most records kept in memory when the journal cannot be written (its disk failed);
/// past it, records are dropped (logged and counted).
const MAX_OVERFLOW: usize = 100_000;
/// How often a store failure that goes on is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Longest a read of records waits for pending ones to be stored (see
/// [`Recorder::flush_for_read`]).
pub const READ_WAIT: Duration = Duration::from_secs(2);

/// Where records go in the end: the metadata store (or, in tests, a stand-in).
#[async_trait]
pub trait RecordSink: Send + Sync + 'static {
    /// Writes a batch in one transaction; writing it again must change nothing.
    async fn write(&self, records: &[Invocation]) -> StoreResult<()>;
}

#[async_trait]
impl RecordSink for Arc<dyn MetadataStore> {
    async fn write(&self, records: &[Invocation]) -> StoreResult<()> {
        self.record_invocations(records).await
    }
}

/// What the writer has done.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Everything before this is in the store.
    stored: Position,
    /// Writes tried so far.
    attempts: u64,
    /// The last write failed.
    failing: bool,
}

struct Shared {
    journal: Journal,
    /// Records the journal could not take, written from memory.
    overflow: Mutex<Vec<Invocation>>,
    /// The last append failed (logged once per run of failures).
    journal_failing: AtomicBool,
    /// [`Recorder::close`] ran: nothing writes the journal to the store any more.
    closed: AtomicBool,
    /// Woken by every record.
    appended: Notify,
    /// Woken by a flush: write now, without lingering or waiting out a backoff.
    hurry: Notify,
    progress: watch::Sender<Progress>,
}

/// Handle to the recorder. Cloning is cheap.
#[derive(Clone)]
pub struct Recorder {
    shared: Arc<Shared>,
}

impl Recorder {
    /// Opens the journal in `dir` and starts the task writing it to `sink`, beginning
    /// with whatever an earlier run left in the journal.
    pub fn start(
        dir: &Path,
        sink: Arc<dyn RecordSink>,
        retry: RetryPolicy,
    ) -> std::io::Result<(Recorder, JoinHandle<()>)> {
        let journal = Journal::open(dir)?;
        let cursor = Cursor::new(dir)?;
        let shared = Arc::new(Shared {
            journal,
            overflow: Mutex::default(),
            journal_failing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            appended: Notify::new(),
            hurry: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
        });
        tokio::spawn(sync_journal(Arc::downgrade(&shared)));
        let task = tokio::spawn(write_behind(shared.clone(), sink, retry, cursor));
        Ok((Recorder { shared }, task))
    }

    /// Records an invocation: appended to the journal when this returns. Never waits on
    /// the store. After [`Recorder::close`] the record stays in the journal, and the next
    /// start of the server writes it to the store.
    pub fn record(&self, invocation: Invocation) {
        let shared = &self.shared;
        match shared.journal.append(&invocation) {
            Ok(_) => {
                if shared.journal_failing.load(Ordering::Relaxed)
                    && shared.journal_failing.swap(false, Ordering::Relaxed)
                {
                    tracing::info!("the invocation journal is written again");
                }
                if shared.closed.load(Ordering::Acquire) {
                    tracing::warn!(
                        request_id = %invocation.request_id,
                        "an invocation ended after its records were written for the last time: \
                         its record is kept in the journal and written at the next start"
                    );
                }
            }
            Err(e) => self.keep_in_memory(invocation, e),
        }
        shared.appended.notify_one();
    }

    /// Keeps a record the journal could not take (bounded; see [`MAX_OVERFLOW`]).
    fn keep_in_memory(&self, invocation: Invocation, e: std::io::Error) {
        if !self.shared.journal_failing.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "the invocation journal cannot be written ({e}): records are kept in memory \
                 until they are stored, and are lost if the server stops first"
            );
        }
        let mut overflow = self.shared.overflow.lock().expect("overflow lock");
        if overflow.len() < MAX_OVERFLOW {
            overflow.push(invocation);
        } else {
            tracing::error!(
                request_id = %invocation.request_id,
                "an invocation record was dropped: the journal cannot be written ({e}) \
                 and {MAX_OVERFLOW} records already wait in memory"
            );
            metrics::record_dropped();
        }
    }

    /// Waits until everything recorded before this call is in the store, or a write tried
    /// after this call failed.
    pub async fn flush(&self) {
        let target = self.shared.journal.end();
        let mut progress = self.shared.progress.subscribe();
        let tried = progress.borrow_and_update().attempts;
        self.shared.hurry.notify_one();
        let _ = progress
            .wait_for(|p| {
                let overflow_empty = self
                    .shared
                    .overflow
                    .lock()
                    .expect("overflow lock")
                    .is_empty();
                (p.stored >= target && overflow_empty) || (p.failing && p.attempts > tried)
            })
            .await;
    }

    /// [`Recorder::flush`] for a read of records, waiting at most [`READ_WAIT`]: after an
    /// outage the journal may hold a backlog that takes long to store, and a read then
    /// answers from what the store has rather than wait for all of it.
    pub async fn flush_for_read(&self) {
        let _ = tokio::time::timeout(READ_WAIT, self.flush()).await;
    }

    /// Flushes, stops writing to the store, syncs the journal and deletes the segments
    /// whose records are all stored. What the store did not take stays in the journal and
    /// is written at the next start, and so does a record made after this (an invocation
    /// that ended late): the segment it is appended to is never one deleted here.
    pub async fn close(&self, writer: JoinHandle<()>) {
        self.flush().await;
        writer.abort();
        let _ = writer.await;
        self.shared.closed.store(true, Ordering::Release);
        let stored = self.shared.progress.borrow().stored;
        if let Err(e) = self.shared.journal.sync() {
            tracing::error!("syncing the invocation journal: {e}");
        }
        match self.shared.journal.delete_stored(stored) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "the metadata store did not take every invocation record before the server \
                 stopped: the rest are kept in the journal and written at the next start"
            ),
            Err(e) => tracing::warn!("deleting the stored part of the invocation journal: {e}"),
        }
        let unwritten = self.shared.overflow.lock().expect("overflow lock").len();
        if unwritten > 0 {
            tracing::error!(
                records = unwritten,
                "invocation records lost: neither the journal nor the store took them \
                 before the server stopped"
            );
            for _ in 0..unwritten {
                metrics::record_dropped();
            }
        }
    }
}

/// Syncs the journal every [`SYNC_EVERY`] while it changes, off the async threads.
async fn sync_journal(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let synced = tokio::task::spawn_blocking(move || shared.journal.sync()).await;
        if let Ok(Err(e)) = synced {
            tracing::error!("syncing the invocation journal: {e}");
        }
    }
}

/// Reads the journal in order and writes it to the sink (see the module docs).
async fn write_behind(
    shared: Arc<Shared>,
    sink: Arc<dyn RecordSink>,
    retry: RetryPolicy,
    mut cursor: Cursor,
) {
    let mut batch: Vec<Invocation> = Vec::with_capacity(MAX_BATCH);
    // Segments read to their end: deleted once the batch holding their last records is
    // stored.
    let mut finished: Vec<u64> = Vec::new();
    let mut outage = Outage::default();
    let mut delay = retry.first;
    loop {
        if batch.is_empty() {
            let hurried = fill(&shared, &mut cursor, &mut batch, &mut finished).await;
            if batch.len() < MAX_BATCH && !hurried {
                tokio::select! {
                    _ = tokio::time::sleep(LINGER) => {}
                    _ = shared.hurry.notified() => {}
                }
                read(&shared, &mut cursor, &mut batch, &mut finished);
            }
        }
        let result = match sink.write(&batch).await {
            // Some record of it is refused for its data.
            Err(StoreError::Rejected(_)) => isolate(&*sink, &mut batch).await,
            other => other,
        };
        let stored = cursor.position();
        match result {
            Ok(()) => {
                outage.over(batch.len());
                batch.clear();
                for segment in finished.drain(..) {
                    journal::delete_segment(shared.journal.dir(), segment);
                }
                delay = retry.first;
                shared.progress.send_modify(|p| {
                    p.stored = stored;
                    p.attempts += 1;
                    p.failing = false;
                });
            }
            Err(e) => {
                metrics::record_write_failed();
                outage.failed(&e, batch.len());
                shared.progress.send_modify(|p| {
                    p.attempts += 1;
                    p.failing = true;
                });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.hurry.notified() => {}
                }
                delay = (delay * 2).min(retry.max);
            }
        }
    }
}

/// Writes a batch the store refused for the data of some record one record at a time: a
/// record refused so ([`StoreError::Rejected`]: PostgreSQL's data exceptions, say) can
/// never be stored, and would hold up every record after it, so it is dropped, logged with
/// its request id and counted in `nimbus_records_dropped_total`. Any other failure (the
/// store went down meanwhile, its disk filled) affects every record alike: the records
/// not yet written stay in `batch` and the failure is returned, to be retried as usual.
async fn isolate(sink: &dyn RecordSink, batch: &mut Vec<Invocation>) -> StoreResult<()> {
    let mut done = 0;
    let result = loop {
        let Some(record) = batch.get(done) else {
            break Ok(());
        };
        match sink.write(std::slice::from_ref(record)).await {
            Ok(()) => {}
            Err(StoreError::Rejected(e)) => {
                tracing::error!(
                    request_id = %record.request_id,
                    function = %record.function_name,
                    "an invocation record was dropped: the store refuses its data ({e})"
                );
                metrics::record_dropped();
            }
            Err(e) => break Err(e),
        }
        done += 1;
    };
    batch.drain(..done);
    result
}

/// Waits until there is something to write and reads it; whether a flush asked for it.
async fn fill(
    shared: &Shared,
    cursor: &mut Cursor,
    batch: &mut Vec<Invocation>,
    finished: &mut Vec<u64>,
) -> bool {
    loop {
        read(shared, cursor, batch, finished);
        if !batch.is_empty() {
            return false;
        }
        // Nothing pending: everything up to here is stored.
        let stored = cursor.position();
        shared.progress.send_if_modified(|p| {
            let moved = p.stored < stored || p.failing;
            p.stored = p.stored.max(stored);
            p.failing = false;
            moved
        });
        for segment in finished.drain(..) {
            journal::delete_segment(shared.journal.dir(), segment);
        }
        tokio::select! {
            _ = shared.appended.notified() => {}
            _ = shared.hurry.notified() => {
                read(shared, cursor, batch, finished);
                if !batch.is_empty() {
                    return true;
                }
            }
        }
    }
}

/// Moves what waits in memory, then what the journal holds, into `batch` (up to
/// [`MAX_BATCH`]).
fn read(
    shared: &Shared,
    cursor: &mut Cursor,
    batch: &mut Vec<Invocation>,
    finished: &mut Vec<u64>,
) {
    {
        let mut overflow = shared.overflow.lock().expect("overflow lock");
        let take = overflow.len().min(MAX_BATCH.saturating_sub(batch.len()));
        batch.extend(overflow.drain(..take));
    }
    let room = MAX_BATCH.saturating_sub(batch.len());
    if room == 0 {
        return;
    }
    match cursor.read(shared.journal.end(), room) {
        Ok(read) => {
            batch.extend(read.records);
            finished.extend(read.finished);
        }
        Err(e) => tracing::error!("reading the invocation journal: {e}"),
    }
}

/// A run of failed writes, for the log.
#[derive(Default)]
struct Outage {
    /// When the first write of the run failed, and when it was last reported.
    since: Option<(Instant, Instant)>,
}

impl Outage {
    fn failed(&mut self, error: &nimbus_store::StoreError, waiting: usize) {
        match &mut self.since {
            None => {
                tracing::warn!(
                    records = waiting,
                    "writing invocation records failed ({error}): they wait in the journal and \
                     are written when the store takes them"
                );
                self.since = Some((Instant::now(), Instant::now()));
            }
            Some((since, reported)) if reported.elapsed() >= REPORT_EVERY => {
                tracing::warn!(
                    seconds = since.elapsed().as_secs(),
                    "invocation records still cannot be written ({error}); they wait in the journal"
                );
                *reported = Instant::now();
            }
            Some(_) => {}
        }
    }

    fn over(&mut self, written: usize) {
        if let Some((since, _)) = self.since.take() {
            tracing::info!(
                records = written,
                "invocation records are written again, after {:.1} s of failures",
                since.elapsed().as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nimbus_core::{ids, now, InvocationStatus, StartType, Trigger};
    use nimbus_store::StoreError;

    use super::*;

    /// A store that fails its first `failures` writes, then keeps what it is given.
    struct Flaky {
        failures: usize,
        attempts: AtomicUsize,
        stored: Mutex<Vec<Invocation>>,
    }

    #[async_trait]
    impl RecordSink for Flaky {
        async fn write(&self, records: &[Invocation]) -> StoreResult<()> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(StoreError::Unavailable("down".into()));
            }
            self.stored.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
    }

    fn flaky(failures: usize) -> Arc<Flaky> {
        Arc::new(Flaky {
            failures,
            attempts: AtomicUsize::new(0),
            stored: Mutex::default(),
        })
    }

    fn stored_ids(sink: &Flaky) -> HashSet<String> {
        let stored = sink.stored.lock().unwrap();
        stored.iter().map(|r| r.request_id.clone()).collect()
    }

    fn record() -> Invocation {
        Invocation {
            request_id: ids::request_id(),
            function_id: "fn_1".into(),
            function_name: "f".into(),
            version: 1,
            alias_used: None,
            session_key: None,
            trigger: Trigger::Http,
            status: InvocationStatus::Success,
            input: None,
            output: None,
            error: None,
            start_type: Some(StartType::Warm),
            instance_id: None,
            started_at: now(),
            completed_at: Some(now()),
            duration_ms: Some(1.0),
            memory_used_mb: None,
            logs: String::new(),
        }
    }

    const FAST: RetryPolicy = RetryPolicy {
        first: Duration::from_millis(1),
        max: Duration::from_millis(5),
    };

    /// The recorder used to give up after 5 failed writes and drop the batch ("dropping
    /// invocation records after repeated store failures"); now a store that fails 40 times
    /// in a row still gets every record, in order, once it takes them.
    #[tokio::test]
    async fn records_wait_out_a_store_that_fails_longer_than_any_retry_budget() {
        let dir = tempfile::tempdir().unwrap();
        let sink = flaky(40);
        let (recorder, writer) = Recorder::start(dir.path(), sink.clone(), FAST).unwrap();
        let records: Vec<Invocation> = (0..1500).map(|_| record()).collect();
        for r in &records {
            recorder.record(r.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while stored_ids(&sink).len() < records.len() {
            assert!(Instant::now() < deadline, "records were not all stored");
            recorder.flush().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(sink.attempts.load(Ordering::SeqCst) > 40);
        assert_eq!(*sink.stored.lock().unwrap(), records, "each once, in order");
        recorder.close(writer).await;
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(
            left, 0,
            "a stopped recorder with everything stored leaves no journal"
        );
    }

    /// What a recorder took but had not stored when it died is stored by the next one.
    #[tokio::test]
    async fn a_new_recorder_writes_what_the_last_one_left_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let down = flaky(usize::MAX);
        let (recorder, writer) = Recorder::start(dir.path(), down, FAST).unwrap();
        let records: Vec<Invocation> = (0..50).map(|_| record()).collect();
        for r in &records {
            recorder.record(r.clone());
        }
        // Died: no close, no flush.
        writer.abort();
        drop(recorder);

        let sink = flaky(0);
        let (recorder, writer) = Recorder::start(dir.path(), sink.clone(), FAST).unwrap();
        recorder.flush().await;
        assert_eq!(*sink.stored.lock().unwrap(), records);
        recorder.close(writer).await;
    }

    /// A store that refuses one record for itself (not for being down).
    struct Picky {
        poison: String,
        stored: Mutex<Vec<Invocation>>,
    }

    #[async_trait]
    impl RecordSink for Picky {
        async fn write(&self, records: &[Invocation]) -> StoreResult<()> {
            if records.iter().any(|r| r.request_id == self.poison) {
                return Err(StoreError::Rejected("invalid byte sequence".into()));
            }
            self.stored.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
    }

    /// A record the store refuses for itself is dropped (logged, counted) instead of holding
    /// up every record after it, or taking its batch down with it.
    #[tokio::test]
    async fn a_record_the_store_refuses_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Invocation> = (0..100).map(|_| record()).collect();
        let sink = Arc::new(Picky {
            poison: records[40].request_id.clone(),
            stored: Mutex::default(),
        });
        let (recorder, writer) = Recorder::start(dir.path(), sink.clone(), FAST).unwrap();
        for r in &records {
            recorder.record(r.clone());
        }
        let later = record();
        recorder.record(later.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink.stored.lock().unwrap().len() < records.len() {
            assert!(Instant::now() < deadline, "records were held up");
            recorder.flush().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut expected = records.clone();
        expected.remove(40);
        expected.push(later);
        assert_eq!(*sink.stored.lock().unwrap(), expected);
        recorder.close(writer).await;
    }

    /// A store that refuses every write alike for a while (its disk is full, it is
    /// read-only during a failover), as a `Backend` error, not `Unavailable`.
    struct Full {
        refusals: usize,
        attempts: AtomicUsize,
        stored: Mutex<Vec<Invocation>>,
    }

    #[async_trait]
    impl RecordSink for Full {
        async fn write(&self, records: &[Invocation]) -> StoreResult<()> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) < self.refusals {
                return Err(StoreError::Backend(
                    "error returned from database: (code: 13) database or disk is full".into(),
                ));
            }
            self.stored.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
    }

    /// A failure that affects every record is waited out, not taken for records refused
    /// for themselves: the recorder used to write a batch refused twice one record at a
    /// time and drop each record the (full) store refused.
    #[tokio::test]
    async fn a_store_refusing_every_record_alike_drops_none() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Full {
            refusals: 30,
            attempts: AtomicUsize::new(0),
            stored: Mutex::default(),
        });
        let (recorder, writer) = Recorder::start(dir.path(), sink.clone(), FAST).unwrap();
        let records: Vec<Invocation> = (0..10).map(|_| record()).collect();
        for r in &records {
            recorder.record(r.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink.stored.lock().unwrap().len() < records.len() {
            assert!(
                Instant::now() < deadline,
                "stored {:?} of 10 after {} attempts",
                sink.stored.lock().unwrap().len(),
                sink.attempts.load(Ordering::SeqCst)
            );
            recorder.flush().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(sink.attempts.load(Ordering::SeqCst) > 30);
        assert_eq!(*sink.stored.lock().unwrap(), records);
        recorder.close(writer).await;
    }

    /// A record made after the recorder closed (an invocation that ended late at
    /// shutdown) is kept in the journal, and so is whatever the store had not taken:
    /// the next recorder writes them. Closing used to delete every segment once the store
    /// held what was there, the one being appended to included.
    #[tokio::test]
    async fn records_made_after_close_are_written_by_the_next_recorder() {
        let dir = tempfile::tempdir().unwrap();
        let sink = flaky(0);
        let (recorder, writer) = Recorder::start(dir.path(), sink.clone(), FAST).unwrap();
        let early = record();
        recorder.record(early.clone());
        recorder.close(writer).await;
        assert_eq!(*sink.stored.lock().unwrap(), vec![early]);
        let late = record();
        recorder.record(late.clone());
        drop(recorder);

        let next = flaky(0);
        let (recorder, writer) = Recorder::start(dir.path(), next.clone(), FAST).unwrap();
        recorder.flush().await;
        assert_eq!(*next.stored.lock().unwrap(), vec![late]);
        recorder.close(writer).await;
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 0, "everything stored: no journal left");
    }

    /// A store that takes its time over each write.
    struct Slow {
        per_write: Duration,
        stored: Mutex<Vec<Invocation>>,
    }

    #[async_trait]
    impl RecordSink for Slow {
        async fn write(&self, records: &[Invocation]) -> StoreResult<()> {
            tokio::time::sleep(self.per_write).await;
            self.stored.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
    }

    /// A read does not wait for a long backlog to be stored (after an outage): it answers
    /// from what the store has after [`READ_WAIT`]. (`flush`, which reads used to wait on,
    /// returns only once the whole backlog is stored.)
    #[tokio::test]
    async fn a_read_waits_for_a_backlog_at_most_read_wait() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Slow {
            per_write: Duration::from_millis(250),
            stored: Mutex::default(),
        });
        let (recorder, writer) = Recorder::start(dir.path(), sink.clone(), FAST).unwrap();
        // 40 batches of 250 ms each: at least 10 s to store.
        let total = MAX_BATCH * 40;
        for _ in 0..total {
            recorder.record(record());
        }
        recorder.flush_for_read().await;
        let stored = sink.stored.lock().unwrap().len();
        assert!(stored < total, "the read waited for the whole backlog");
        writer.abort();
    }

    /// A flush while the store is down returns once a write tried after it failed.
    #[tokio::test]
    async fn a_flush_does_not_wait_for_a_store_that_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let down = flaky(usize::MAX);
        let slow = RetryPolicy {
            first: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
        };
        let (recorder, _writer) = Recorder::start(dir.path(), down, slow).unwrap();
        recorder.record(record());
        tokio::time::timeout(Duration::from_secs(10), recorder.flush())
            .await
            .expect("the flush returned");
        tokio::time::timeout(Duration::from_secs(10), recorder.flush())
            .await
            .expect("the second flush cut the backoff short");
    }
}
