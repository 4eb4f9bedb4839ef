//! Write-behind recording of invocations: the hot path hands a record to a channel and
//! moves on; one task writes them to the store in batches. A clean shutdown drains the
//! channel, so no record of a completed invocation is lost.

use std::sync::Arc;
use std::time::Duration;

use nimbus_core::Invocation;
use nimbus_store::MetadataStore;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Most records written in one transaction.
const MAX_BATCH: usize = 512;
/// Longest a record waits for a fuller batch.
const LINGER: Duration = Duration::from_millis(20);

enum Command {
    Record(Box<Invocation>),
    Flush(oneshot::Sender<()>),
}

/// Handle to the recorder task. Cloning is cheap.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Command>,
}

impl Recorder {
    /// Starts the recorder task writing to `store`.
    pub fn start(store: Arc<dyn MetadataStore>) -> (Recorder, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(store, rx));
        (Recorder { tx }, task)
    }

    /// Queues a record. Never blocks.
    pub fn record(&self, invocation: Invocation) {
        if self.tx.send(Command::Record(Box::new(invocation))).is_err() {
            tracing::error!("invocation recorder is gone; a record was dropped");
        }
    }

    /// Waits until everything queued before this call is written (or failed to write).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(store: Arc<dyn MetadataStore>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut batch: Vec<Invocation> = Vec::with_capacity(MAX_BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        accept(first, &mut batch, &mut flushes);
        // Linger briefly for a fuller batch unless someone waits on a flush.
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH && flushes.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(cmd)) => accept(cmd, &mut batch, &mut flushes),
                Ok(None) | Err(_) => break,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => accept(cmd, &mut batch, &mut flushes),
                Err(_) => break,
            }
        }
        write(&*store, &mut batch).await;
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

fn accept(cmd: Command, batch: &mut Vec<Invocation>, flushes: &mut Vec<oneshot::Sender<()>>) {
    match cmd {
        Command::Record(inv) => batch.push(*inv),
        Command::Flush(done) => flushes.push(done),
    }
}

async fn write(store: &dyn MetadataStore, batch: &mut Vec<Invocation>) {
    if batch.is_empty() {
        return;
    }
    // A store outage must not lose records: retry with backoff, keeping the batch.
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match store.record_invocations(batch).await {
            Ok(()) => {
                batch.clear();
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, records = batch.len(), error = %e, "writing invocation records failed");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    tracing::error!(
        records = batch.len(),
        "dropping invocation records after repeated store failures"
    );
    batch.clear();
}
