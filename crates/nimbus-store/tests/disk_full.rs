//! SQLite on a disk that fills up and frees again: a tmpfs of 4 MiB mounted for the test
//! (we are root; the test says so and passes without checking when it cannot mount one).
//!
//! A full disk refuses every write alike: the store must say so in a way that does not
//! read as "this record is refused for itself" (the recorder drops records refused so),
//! and a transaction whose COMMIT failed must not stay open on a pooled connection, where
//! later writes would land in a transaction that never commits: readable through that one
//! connection, invisible to the others, gone when the server stops.

mod common;

use common::tmpfs::Tmpfs;
use futures::future::join_all;
use nimbus_core::{ids, Invocation, InvocationStatus, StartType, Trigger};
use nimbus_store::{MetadataStore, StoreError};

/// A finished record with `bytes` of input (enough records need more room than the
/// database's write-ahead log has left over).
fn record(bytes: usize) -> Invocation {
    let now = nimbus_core::now();
    Invocation {
        request_id: ids::request_id(),
        function_id: "fn_disk".into(),
        function_name: "disk".into(),
        version: 1,
        alias_used: Some("latest".into()),
        session_key: None,
        trigger: Trigger::Http,
        status: InvocationStatus::Success,
        input: Some(format!("\"{}\"", "x".repeat(bytes))),
        output: Some("1".into()),
        error: None,
        start_type: Some(StartType::Warm),
        instance_id: Some("i_1".into()),
        started_at: now,
        completed_at: Some(now),
        duration_ms: Some(1.0),
        memory_used_mb: None,
        logs: String::new(),
    }
}

/// How many of `records` each of `rounds` concurrent reads through `store` finds.
async fn found(store: &dyn MetadataStore, records: &[Invocation]) -> Vec<usize> {
    let mut counts = Vec::new();
    for _ in 0..4 {
        let reads = records.iter().map(|r| store.get_invocation(&r.request_id));
        let hits = join_all(reads)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(Some(_))))
            .count();
        counts.push(hits);
    }
    counts
}

#[tokio::test]
async fn a_full_disk_refuses_every_record_alike_and_once_freed_every_record_is_stored() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let url = format!("sqlite:{}", disk.path().join("nimbus.db").display());
    let store = nimbus_store::open(&url).await.unwrap();
    let records: Vec<Invocation> = (0..10).map(|_| record(60_000)).collect();
    store.record_invocations(&records[..1]).await.unwrap();

    let filler = disk.fill();
    let refused = store.record_invocations(&records[1..]).await.unwrap_err();
    assert!(
        !matches!(refused, StoreError::Rejected(_)),
        "a full disk is not a refusal of the records: {refused}"
    );
    // What the recorder used to do with a batch refused twice: write each record alone;
    // and as it does, the batch again (a write that "succeeds" now went into a transaction
    // left open on its connection).
    for _ in 0..2 {
        if let Err(e) = store.record_invocations(&records[1..]).await {
            assert!(!matches!(e, StoreError::Rejected(_)), "{e}");
        }
        for record in &records[1..] {
            if let Err(e) = store.record_invocations(std::slice::from_ref(record)).await {
                assert!(!matches!(e, StoreError::Rejected(_)), "{e}");
            }
        }
    }
    std::fs::remove_file(filler).unwrap();

    store.record_invocations(&records).await.unwrap();
    // Every read finds every record, whichever pooled connection serves it ...
    assert_eq!(found(&*store, &records).await, [10; 4]);
    // ... and so does another server's store: they are committed.
    let other = nimbus_store::open(&url).await.unwrap();
    assert_eq!(found(&*other, &records).await, [10; 4]);
    drop((store, other));
}
