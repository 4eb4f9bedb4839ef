//! Conformance suite of the metadata store, written once and run against every backend.
//!
//! Each check is an async fn taking `&dyn MetadataStore` (or, for checks that tamper with
//! rows, the store and its URL). `conformance!` turns each into one `#[tokio::test]` per
//! backend: SQLite on a file in a fresh temporary directory, and PostgreSQL at
//! `NIMBUS_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) in a fresh
//! schema per test, dropped afterwards. The PostgreSQL tests fail when the server is
//! unreachable; they are never skipped.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_core::{
    ids, CodeBundle, Function, FunctionAlias, FunctionConfig, FunctionStatus, FunctionVersion,
    Handler, Invocation, InvocationError, InvocationStatus, RoutingConfig, Runtime, StartType,
    Trigger,
};
use nimbus_store::{InvocationFilter, MetadataStore, Page, StoreError, DEFAULT_LIST_LIMIT};
use sqlx::Connection;
use time::OffsetDateTime;

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A store on a database that exists for one test only.
struct TestDb {
    store: Arc<dyn MetadataStore>,
    url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    /// The directory holding the SQLite file; removed when dropped.
    Dir(#[allow(dead_code)] tempfile::TempDir),
    /// The PostgreSQL schema, dropped through `admin_url`.
    Schema { admin_url: String, schema: String },
}

impl TestDb {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite:{}", dir.path().join("nimbus.db").display());
        let store = nimbus_store::open(&url).await.expect("open sqlite store");
        TestDb {
            store,
            url,
            cleanup: Cleanup::Dir(dir),
        }
    }

    async fn postgres() -> Self {
        let admin_url = std::env::var("NIMBUS_TEST_DATABASE_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string());
        let schema = format!(
            "nimbus_test_{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {admin_url} is unreachable ({e}); start it or point \
                 NIMBUS_TEST_DATABASE_URL at a server"
                )
            });
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .expect("create test schema");
        admin.close().await.expect("close admin connection");
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{sep}options=-c%20search_path%3D{schema}");
        let store = nimbus_store::open(&url).await.expect("open postgres store");
        TestDb {
            store,
            url,
            cleanup: Cleanup::Schema { admin_url, schema },
        }
    }

    /// Runs `test` on this database, then removes the database, then fails if `test` did.
    async fn run<Fut>(self, test: impl FnOnce(Arc<dyn MetadataStore>, String) -> Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let TestDb {
            store,
            url,
            cleanup,
        } = self;
        let outcome = tokio::spawn(test(store, url)).await;
        if let Cleanup::Schema { admin_url, schema } = cleanup {
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("reconnect");
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut admin)
                .await
                .expect("drop test schema");
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// One `#[tokio::test]` per backend for each check. Checks listed under `plain` take the
/// store; those under `with_url` also take the database URL.
macro_rules! conformance {
    (plain: [$($plain:ident),* $(,)?], with_url: [$($raw:ident),* $(,)?] $(,)?) => {
        conformance!(@backend sqlite, sqlite, [$($plain),*], [$($raw),*]);
        conformance!(@backend postgres, postgres, [$($plain),*], [$($raw),*]);
    };
    (@backend $module:ident, $open:ident, [$($plain:ident),*], [$($raw:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $plain() {
                    crate::TestDb::$open()
                        .await
                        .run(|store, _url| async move { crate::$plain(&*store).await })
                        .await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $raw() {
                    crate::TestDb::$open()
                        .await
                        .run(|store, url| async move { crate::$raw(&*store, &url).await })
                        .await;
                }
            )*
        }
    };
}

conformance!(
    plain: [
        backend_name_and_ping,
        create_then_get_by_id_and_by_name,
        list_functions_pages_by_name_with_total,
        duplicate_name_is_a_conflict,
        update_replaces_the_draft_only,
        publish_numbers_versions_monotonically,
        concurrent_publishes_get_distinct_consecutive_numbers,
        publish_moves_latest_and_prod_in_one_call,
        get_version_returns_the_saved_code,
        list_versions_is_newest_first_without_code,
        aliases_get_and_list,
        record_invocations_batch_then_get_and_list,
        record_invocations_crosses_statement_chunks,
        upsert_replaces_a_pending_record,
        delete_cascades_to_versions_aliases_and_invocations,
    ],
    with_url: [
        reopening_keeps_data_and_reapplies_nothing,
        corrupt_rows_are_reported_as_corrupt,
    ],
);

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

fn python(source: &str) -> CodeBundle {
    CodeBundle::from_inline(source, &Handler::default(), Runtime::Python311).expect("inline code")
}

/// A new function named `name` with its version 1, as the API would build them.
fn new_function(name: &str) -> (Function, FunctionVersion) {
    let code = python("def handle(event):\n    return {'echo': event}\n");
    let config = FunctionConfig {
        runtime: Runtime::Python311,
        handler: Handler::default(),
        code_hash: code.hash(),
        env_vars: BTreeMap::from([("GREETING".to_string(), "héllo \"world\"".to_string())]),
        memory_mb: 256,
        timeout_sec: 30,
    };
    let now = nimbus_core::now();
    let function = Function {
        id: ids::function_id(),
        name: name.to_string(),
        description: format!("{name} under test"),
        config,
        code,
        max_instances: 50,
        status: FunctionStatus::Active,
        latest_version: 1,
        created_at: now,
        updated_at: now,
    };
    let first = FunctionVersion {
        function_id: function.id.clone(),
        version: 1,
        description: function.description.clone(),
        config: function.config.clone(),
        code: function.code.clone(),
        created_at: now,
        created_by: "tester".to_string(),
    };
    (function, first)
}

async fn create(store: &dyn MetadataStore, name: &str) -> (Function, FunctionVersion) {
    let (function, first) = new_function(name);
    store
        .create_function(&function, &first)
        .await
        .expect("create function");
    (function, first)
}

fn alias(
    function: &Function,
    name: &str,
    version: u32,
    created: OffsetDateTime,
    updated: OffsetDateTime,
) -> FunctionAlias {
    FunctionAlias {
        function_id: function.id.clone(),
        name: name.to_string(),
        description: String::new(),
        routing: RoutingConfig::single(version),
        created_at: created,
        updated_at: updated,
    }
}

fn page<T>(items: Vec<T>, total: u64) -> Page<T> {
    Page { items, total }
}

fn without_code(mut version: FunctionVersion) -> FunctionVersion {
    version.code = CodeBundle::default();
    version
}

/// The `i`-th of a series of records of `function`, started `i` ms after `base`; statuses
/// rotate through success, error, timeout and pending, and the optional fields vary.
fn invocation(function: &Function, i: u32, base: OffsetDateTime) -> Invocation {
    let started_at = base + Duration::from_millis(u64::from(i));
    let status = [
        InvocationStatus::Success,
        InvocationStatus::Error,
        InvocationStatus::Timeout,
        InvocationStatus::Pending,
    ][i as usize % 4];
    let finished = status != InvocationStatus::Pending;
    Invocation {
        request_id: ids::request_id(),
        function_id: function.id.clone(),
        function_name: function.name.clone(),
        version: 1 + i % 3,
        alias_used: (i % 2 == 0).then(|| "latest".to_string()),
        session_key: (i % 5 == 0).then(|| format!("session-{i}")),
        trigger: [Trigger::Http, Trigger::Async, Trigger::Cron][i as usize % 3],
        status,
        input: Some(format!("{{\"n\":{i},\"text\":\"ünïcode ✓\"}}")),
        output: (status == InvocationStatus::Success).then(|| format!("{{\"result\":{}}}", i * 2)),
        error: (status == InvocationStatus::Error).then(|| InvocationError {
            code: "function_error".to_string(),
            message: format!("boom {i}"),
            error_type: Some("ValueError".to_string()),
            traceback: Some("Traceback (most recent call last):\n  ...".to_string()),
        }),
        start_type: finished.then_some(
            [
                StartType::Warm,
                StartType::Template,
                StartType::Snapshot,
                StartType::Cold,
            ][i as usize % 4],
        ),
        instance_id: finished.then(ids::instance_id),
        started_at,
        completed_at: finished.then(|| started_at + Duration::from_millis(7)),
        duration_ms: finished.then_some(6.75 + f64::from(i)),
        memory_used_mb: finished.then_some(40 + i),
        logs: if finished {
            format!("line {i}\nstderr: ok\n")
        } else {
            String::new()
        },
    }
}

fn newest_first(records: &[Invocation]) -> Vec<Invocation> {
    let mut sorted = records.to_vec();
    sorted.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then(b.request_id.cmp(&a.request_id))
    });
    sorted
}

fn filter(status: Option<InvocationStatus>, limit: u32) -> InvocationFilter {
    InvocationFilter { status, limit }
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

async fn backend_name_and_ping(store: &dyn MetadataStore) {
    assert!(
        ["sqlite", "postgres"].contains(&store.backend()),
        "{}",
        store.backend()
    );
    store.ping().await.expect("ping");
}

async fn create_then_get_by_id_and_by_name(store: &dyn MetadataStore) {
    let (function, first) = create(store, "hello").await;

    assert_eq!(
        store.get_function(&function.id).await.unwrap(),
        Some(function.clone())
    );
    assert_eq!(
        store.get_function("hello").await.unwrap(),
        Some(function.clone())
    );
    assert_eq!(store.get_function("missing").await.unwrap(), None);
    assert_eq!(store.get_function(&ids::function_id()).await.unwrap(), None);

    assert_eq!(
        store.get_version(&function.id, 1).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.get_version(&function.id, 2).await.unwrap(), None);
    assert_eq!(
        store.list_versions(&function.id, 10, 0).await.unwrap(),
        page(vec![without_code(first)], 1)
    );

    let latest = alias(
        &function,
        "latest",
        1,
        function.created_at,
        function.created_at,
    );
    assert_eq!(
        store.get_alias(&function.id, "latest").await.unwrap(),
        Some(latest.clone())
    );
    assert_eq!(
        store.list_aliases(&function.id).await.unwrap(),
        vec![latest]
    );
}

async fn list_functions_pages_by_name_with_total(store: &dyn MetadataStore) {
    let mut created = Vec::new();
    for name in ["delta", "alpha", "echo", "charlie", "bravo"] {
        created.push(create(store, name).await.0);
    }
    created.sort_by(|a, b| a.name.cmp(&b.name));

    let listed = store.list_functions(2, 0).await.unwrap();
    assert_eq!(listed, page(created[0..2].to_vec(), 5));
    let listed = store.list_functions(2, 2).await.unwrap();
    assert_eq!(listed, page(created[2..4].to_vec(), 5));
    let listed = store.list_functions(2, 4).await.unwrap();
    assert_eq!(listed, page(created[4..].to_vec(), 5));
    let listed = store.list_functions(2, 10).await.unwrap();
    assert_eq!(listed, page(vec![], 5));
    // A limit of 0 means the default page size, which holds all five.
    let listed = store.list_functions(0, 0).await.unwrap();
    assert_eq!(listed, page(created.clone(), 5));
}

async fn duplicate_name_is_a_conflict(store: &dyn MetadataStore) {
    let (original, _) = create(store, "dup").await;
    let (mut again, mut first) = new_function("dup");
    again.description = "second attempt".into();
    first.description = "second attempt".into();

    match store.create_function(&again, &first).await {
        Err(StoreError::Conflict(message)) => {
            assert_eq!(message, "function name \"dup\" already exists")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Nothing of the failed attempt is left behind.
    assert_eq!(store.get_function("dup").await.unwrap(), Some(original));
    assert_eq!(store.get_function(&again.id).await.unwrap(), None);
    assert_eq!(store.get_version(&again.id, 1).await.unwrap(), None);
    assert_eq!(store.list_aliases(&again.id).await.unwrap(), vec![]);
    assert_eq!(store.list_functions(10, 0).await.unwrap().total, 1);
}

async fn update_replaces_the_draft_only(store: &dyn MetadataStore) {
    let (function, first) = create(store, "drafty").await;

    let mut draft = function.clone();
    draft.description = "new words".into();
    draft.code = python("def handle(event):\n    return 42\n");
    draft.config.code_hash = draft.code.hash();
    draft.config.memory_mb = 1024;
    draft.config.timeout_sec = 900;
    draft.config.env_vars.insert("EXTRA".into(), "1".into());
    draft.max_instances = 7;
    draft.status = FunctionStatus::Building;
    draft.updated_at = nimbus_core::now() + Duration::from_secs(1);
    store.update_function(&draft).await.unwrap();

    assert_eq!(
        store.get_function(&function.id).await.unwrap(),
        Some(draft.clone())
    );
    // Not published: version 1 and `latest` are as they were.
    assert_eq!(
        store.get_version(&function.id, 1).await.unwrap(),
        Some(first)
    );
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        1
    );
    assert_eq!(
        store
            .get_alias(&function.id, "latest")
            .await
            .unwrap()
            .unwrap()
            .routing,
        RoutingConfig::single(1)
    );

    let (ghost, _) = new_function("ghost");
    assert!(matches!(
        store.update_function(&ghost).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn publish_numbers_versions_monotonically(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "counter").await;

    let v2 = store
        .publish_version(&function, "second", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    // The caller's copy still says latest_version 1: the store allocates, not the caller.
    let v3 = store
        .publish_version(&function, "third", "bob", &["latest"])
        .await
        .unwrap();
    assert_eq!(v3.version, 3);

    assert_eq!(
        v3,
        FunctionVersion {
            function_id: function.id.clone(),
            version: 3,
            description: "third".into(),
            config: function.config.clone(),
            code: function.code.clone(),
            created_at: v3.created_at,
            created_by: "bob".into(),
        }
    );
    assert!(v3.created_at >= v2.created_at);
    assert_eq!(store.get_version(&function.id, 2).await.unwrap(), Some(v2));
    assert_eq!(store.get_version(&function.id, 3).await.unwrap(), Some(v3));

    // Publishing saves the draft in the same call.
    function.description = "draft four".into();
    function.code = python("def handle(event):\n    return 4\n");
    function.config.code_hash = function.code.hash();
    function.updated_at = nimbus_core::now();
    let v4 = store
        .publish_version(&function, "fourth", "carol", &[])
        .await
        .unwrap();
    assert_eq!(v4.version, 4);
    assert_eq!(v4.code, function.code);
    let stored = store.get_function(&function.id).await.unwrap().unwrap();
    assert_eq!(
        stored,
        Function {
            latest_version: 4,
            ..function.clone()
        }
    );
    // No alias listed: none moved.
    assert_eq!(
        store
            .get_alias(&function.id, "latest")
            .await
            .unwrap()
            .unwrap()
            .routing,
        RoutingConfig::single(3)
    );

    let (ghost, _) = new_function("ghost");
    assert!(matches!(
        store.publish_version(&ghost, "", "x", &["latest"]).await,
        Err(StoreError::NotFound(_))
    ));
    // The failed publish consumed no number.
    let v5 = store
        .publish_version(&function, "fifth", "dave", &[])
        .await
        .unwrap();
    assert_eq!(v5.version, 5);
}

async fn concurrent_publishes_get_distinct_consecutive_numbers(store: &dyn MetadataStore) {
    let (function, _) = create(store, "racy").await;
    let publishes = (0..10).map(|i| {
        let function = function.clone();
        async move {
            store
                .publish_version(&function, &format!("racer {i}"), "racer", &["latest"])
                .await
                .expect("concurrent publish")
        }
    });
    let mut numbers: Vec<u32> = futures::future::join_all(publishes)
        .await
        .into_iter()
        .map(|v| v.version)
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (2..=11).collect::<Vec<_>>());

    let listed = store.list_versions(&function.id, 100, 0).await.unwrap();
    assert_eq!(listed.total, 11);
    let listed: Vec<u32> = listed.items.iter().map(|v| v.version).collect();
    assert_eq!(listed, (1..=11).rev().collect::<Vec<_>>());
    assert_eq!(
        store
            .get_function(&function.id)
            .await
            .unwrap()
            .unwrap()
            .latest_version,
        11
    );
    // Publishes are serialized on the function row, so `latest` ends on the highest number.
    assert_eq!(
        store
            .get_alias(&function.id, "latest")
            .await
            .unwrap()
            .unwrap()
            .routing,
        RoutingConfig::single(11)
    );
}

async fn publish_moves_latest_and_prod_in_one_call(store: &dyn MetadataStore) {
    let (function, _) = create(store, "canary").await;
    let v2 = store
        .publish_version(&function, "v2", "alice", &["latest", "prod", "prod"])
        .await
        .unwrap();
    let t2 = v2.created_at;
    assert_eq!(
        store.list_aliases(&function.id).await.unwrap(),
        vec![
            alias(&function, "latest", 2, function.created_at, t2),
            alias(&function, "prod", 2, t2, t2),
        ]
    );

    let v3 = store
        .publish_version(&function, "v3", "alice", &["latest"])
        .await
        .unwrap();
    let t3 = v3.created_at;
    assert_eq!(
        store.get_alias(&function.id, "latest").await.unwrap(),
        Some(alias(&function, "latest", 3, function.created_at, t3))
    );
    assert_eq!(
        store.get_alias(&function.id, "prod").await.unwrap(),
        Some(alias(&function, "prod", 2, t2, t2))
    );
}

async fn get_version_returns_the_saved_code(store: &dyn MetadataStore) {
    let (mut function, first) = create(store, "bulky").await;
    // ~600 KiB of source with multi-byte characters and every byte value in a comment.
    let filler: String = (0..20_000)
        .map(|i| format!("# line {i} ✓ ünïcode\n"))
        .collect();
    let bytes: String = (1u8..=127).map(char::from).filter(|c| *c != '\r').collect();
    function.code = python(&format!(
        "{filler}# {bytes:?}\ndef handle(event):\n    return 1\n"
    ));
    function.config.code_hash = function.code.hash();

    let v2 = store
        .publish_version(&function, "big", "alice", &["latest"])
        .await
        .unwrap();
    let stored = store.get_version(&function.id, 2).await.unwrap().unwrap();
    assert_eq!(stored.code, function.code);
    assert_eq!(stored.code.hash(), function.config.code_hash);
    assert_eq!(stored, v2);
    // Version 1 keeps its own code.
    assert_eq!(
        store
            .get_version(&function.id, 1)
            .await
            .unwrap()
            .unwrap()
            .code,
        first.code
    );
    assert_eq!(
        store
            .get_function(&function.id)
            .await
            .unwrap()
            .unwrap()
            .code,
        function.code
    );
}

async fn list_versions_is_newest_first_without_code(store: &dyn MetadataStore) {
    let (function, first) = create(store, "history").await;
    let mut versions = vec![first];
    for n in 2..=4 {
        let v = store
            .publish_version(&function, &format!("v{n}"), "alice", &["latest"])
            .await
            .unwrap();
        versions.push(v);
    }
    let expect = |range: std::ops::Range<usize>| -> Vec<FunctionVersion> {
        range
            .rev()
            .map(|i| without_code(versions[i].clone()))
            .collect()
    };

    let listed = store.list_versions(&function.id, 2, 0).await.unwrap();
    assert_eq!(listed, page(expect(2..4), 4));
    assert!(listed.items.iter().all(|v| v.code.files().is_empty()));
    let listed = store.list_versions(&function.id, 2, 2).await.unwrap();
    assert_eq!(listed, page(expect(0..2), 4));
    let listed = store.list_versions(&function.id, 0, 0).await.unwrap();
    assert_eq!(listed, page(expect(0..4), 4));
    let listed = store.list_versions(&function.id, 5, 9).await.unwrap();
    assert_eq!(listed, page(vec![], 4));
    let listed = store.list_versions("fn_unknown", 5, 0).await.unwrap();
    assert_eq!(listed, page(vec![], 0));
}

async fn aliases_get_and_list(store: &dyn MetadataStore) {
    let (a, _) = create(store, "first").await;
    let (b, _) = create(store, "second").await;
    let v2 = store
        .publish_version(&b, "v2", "alice", &["staging", "beta"])
        .await
        .unwrap();

    assert_eq!(store.get_alias(&a.id, "staging").await.unwrap(), None);
    assert_eq!(store.get_alias("fn_unknown", "latest").await.unwrap(), None);
    assert_eq!(store.list_aliases("fn_unknown").await.unwrap(), vec![]);
    assert_eq!(
        store.list_aliases(&a.id).await.unwrap(),
        vec![alias(&a, "latest", 1, a.created_at, a.created_at)]
    );
    // By name.
    let t = v2.created_at;
    assert_eq!(
        store.list_aliases(&b.id).await.unwrap(),
        vec![
            alias(&b, "beta", 2, t, t),
            alias(&b, "latest", 1, b.created_at, b.created_at),
            alias(&b, "staging", 2, t, t),
        ]
    );
    assert_eq!(
        store.get_alias(&b.id, "staging").await.unwrap(),
        Some(alias(&b, "staging", 2, t, t))
    );
}

async fn record_invocations_batch_then_get_and_list(store: &dyn MetadataStore) {
    let (function, _) = create(store, "busy").await;
    let (other, _) = create(store, "quiet").await;
    let base = nimbus_core::now();
    let records: Vec<Invocation> = (0..1000).map(|i| invocation(&function, i, base)).collect();
    let others: Vec<Invocation> = (0..3).map(|i| invocation(&other, i, base)).collect();

    let started = Instant::now();
    store.record_invocations(&records).await.unwrap();
    eprintln!(
        "{}: recorded 1000 invocations in {:?}",
        store.backend(),
        started.elapsed()
    );
    store.record_invocations(&others).await.unwrap();
    store.record_invocations(&[]).await.unwrap();

    for record in records.iter().step_by(97).chain(records.last()) {
        assert_eq!(
            store
                .get_invocation(&record.request_id)
                .await
                .unwrap()
                .as_ref(),
            Some(record)
        );
    }
    assert_eq!(store.get_invocation("inv_missing").await.unwrap(), None);

    let all = newest_first(&records);
    let listed = store
        .list_invocations(&function.id, &filter(None, 10))
        .await
        .unwrap();
    assert_eq!(listed, all[..10].to_vec());
    let listed = store
        .list_invocations(&function.id, &filter(None, 0))
        .await
        .unwrap();
    assert_eq!(listed, all[..DEFAULT_LIST_LIMIT as usize].to_vec());
    let listed = store
        .list_invocations(&function.id, &filter(None, 5000))
        .await
        .unwrap();
    assert_eq!(listed, all);

    let errors: Vec<Invocation> = all
        .iter()
        .filter(|r| r.status == InvocationStatus::Error)
        .cloned()
        .collect();
    assert_eq!(errors.len(), 250);
    let listed = store
        .list_invocations(&function.id, &filter(Some(InvocationStatus::Error), 5))
        .await
        .unwrap();
    assert_eq!(listed, errors[..5].to_vec());
    let listed = store
        .list_invocations(&function.id, &filter(Some(InvocationStatus::Running), 5))
        .await
        .unwrap();
    assert_eq!(listed, vec![]);

    assert_eq!(
        store
            .list_invocations(&other.id, &filter(None, 10))
            .await
            .unwrap(),
        newest_first(&others)
    );
}

async fn record_invocations_crosses_statement_chunks(store: &dyn MetadataStore) {
    // More rows than one statement can bind on either backend (1820 on SQLite, 3640 on PG).
    let (function, _) = create(store, "flood").await;
    let base = nimbus_core::now();
    let records: Vec<Invocation> = (0..4000).map(|i| invocation(&function, i, base)).collect();
    let started = Instant::now();
    store.record_invocations(&records).await.unwrap();
    eprintln!(
        "{}: recorded 4000 invocations in {:?}",
        store.backend(),
        started.elapsed()
    );
    let listed = store
        .list_invocations(&function.id, &filter(None, 10_000))
        .await
        .unwrap();
    assert_eq!(listed, newest_first(&records));
}

async fn upsert_replaces_a_pending_record(store: &dyn MetadataStore) {
    let (function, _) = create(store, "async-job").await;
    let base = nimbus_core::now();
    let pending = invocation(&function, 3, base);
    assert_eq!(pending.status, InvocationStatus::Pending);
    store
        .record_invocations(std::slice::from_ref(&pending))
        .await
        .unwrap();
    assert_eq!(
        store.get_invocation(&pending.request_id).await.unwrap(),
        Some(pending.clone())
    );

    let done = Invocation {
        status: InvocationStatus::Success,
        output: Some("{\"ok\":true}".into()),
        start_type: Some(StartType::Cold),
        instance_id: Some(ids::instance_id()),
        completed_at: Some(pending.started_at + Duration::from_millis(120)),
        duration_ms: Some(119.5),
        memory_used_mb: Some(64),
        logs: "done\n".into(),
        ..pending.clone()
    };
    store
        .record_invocations(std::slice::from_ref(&done))
        .await
        .unwrap();
    assert_eq!(
        store.get_invocation(&pending.request_id).await.unwrap(),
        Some(done.clone())
    );

    // Both states of one request in one batch: the later one wins, stored once.
    let queued = invocation(&function, 7, base);
    let failed = Invocation {
        status: InvocationStatus::Timeout,
        error: Some(InvocationError {
            code: "function_timeout".into(),
            message: "ran past 30 s".into(),
            error_type: None,
            traceback: None,
        }),
        ..queued.clone()
    };
    store
        .record_invocations(&[queued.clone(), failed.clone()])
        .await
        .unwrap();
    assert_eq!(
        store.get_invocation(&queued.request_id).await.unwrap(),
        Some(failed.clone())
    );
    assert_eq!(
        store
            .list_invocations(&function.id, &filter(None, 10))
            .await
            .unwrap(),
        newest_first(&[done, failed])
    );
}

async fn delete_cascades_to_versions_aliases_and_invocations(store: &dyn MetadataStore) {
    let (doomed, _) = create(store, "doomed").await;
    let (kept, kept_v1) = create(store, "kept").await;
    store
        .publish_version(&doomed, "v2", "alice", &["latest", "prod"])
        .await
        .unwrap();
    let base = nimbus_core::now();
    let doomed_calls: Vec<Invocation> = (0..10).map(|i| invocation(&doomed, i, base)).collect();
    let kept_calls: Vec<Invocation> = (0..4).map(|i| invocation(&kept, i, base)).collect();
    store.record_invocations(&doomed_calls).await.unwrap();
    store.record_invocations(&kept_calls).await.unwrap();

    assert!(store.delete_function(&doomed.id).await.unwrap());

    assert_eq!(store.get_function(&doomed.id).await.unwrap(), None);
    assert_eq!(store.get_function("doomed").await.unwrap(), None);
    assert_eq!(store.get_version(&doomed.id, 1).await.unwrap(), None);
    assert_eq!(store.get_version(&doomed.id, 2).await.unwrap(), None);
    assert_eq!(
        store.list_versions(&doomed.id, 10, 0).await.unwrap(),
        page(vec![], 0)
    );
    assert_eq!(store.get_alias(&doomed.id, "prod").await.unwrap(), None);
    assert_eq!(store.list_aliases(&doomed.id).await.unwrap(), vec![]);
    assert_eq!(
        store
            .get_invocation(&doomed_calls[0].request_id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .list_invocations(&doomed.id, &filter(None, 100))
            .await
            .unwrap(),
        vec![]
    );

    assert!(!store.delete_function(&doomed.id).await.unwrap());

    // The other function is untouched.
    assert_eq!(
        store.get_function(&kept.id).await.unwrap(),
        Some(kept.clone())
    );
    assert_eq!(store.get_version(&kept.id, 1).await.unwrap(), Some(kept_v1));
    assert_eq!(store.list_aliases(&kept.id).await.unwrap().len(), 1);
    assert_eq!(
        store
            .list_invocations(&kept.id, &filter(None, 100))
            .await
            .unwrap(),
        newest_first(&kept_calls)
    );
    assert_eq!(
        store.list_functions(10, 0).await.unwrap(),
        page(vec![kept], 1)
    );

    // The name is free again; the new function starts its own numbering at 1.
    let (reborn, _) = create(store, "doomed").await;
    let v2 = store
        .publish_version(&reborn, "v2", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
}

async fn reopening_keeps_data_and_reapplies_nothing(store: &dyn MetadataStore, url: &str) {
    let (function, first) = create(store, "durable").await;
    let v2 = store
        .publish_version(&function, "v2", "alice", &["latest"])
        .await
        .unwrap();

    let reopened = nimbus_store::open(url).await.expect("reopen");
    assert_eq!(reopened.backend(), store.backend());
    let expected = Function {
        latest_version: 2,
        ..function.clone()
    };
    assert_eq!(
        reopened.get_function(&function.id).await.unwrap(),
        Some(expected)
    );
    assert_eq!(
        reopened.get_version(&function.id, 1).await.unwrap(),
        Some(first)
    );
    assert_eq!(
        reopened.get_version(&function.id, 2).await.unwrap(),
        Some(v2)
    );

    let mut conn = raw_connection(url).await;
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, 1);
}

async fn corrupt_rows_are_reported_as_corrupt(store: &dyn MetadataStore, url: &str) {
    let (function, _) = create(store, "fragile").await;
    let call = invocation(&function, 0, nimbus_core::now());
    store
        .record_invocations(std::slice::from_ref(&call))
        .await
        .unwrap();
    let mut conn = raw_connection(url).await;

    let get_function = || async { store.get_function(&function.id).await.map(drop) };
    tamper(
        &mut conn,
        "UPDATE functions SET status = 'melted' WHERE id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(get_function().await, "status");
    tamper(
        &mut conn,
        "UPDATE functions SET status = 'active', env_vars = 'not json' WHERE id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(get_function().await, "env_vars");
    tamper(
        &mut conn,
        "UPDATE functions SET env_vars = '{}', runtime = 'cobol85' WHERE id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(get_function().await, "runtime");

    tamper(
        &mut conn,
        "UPDATE function_aliases SET routing_config = '{\"weights\":7}' WHERE function_id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(
        store.get_alias(&function.id, "latest").await.map(drop),
        "routing_config",
    );

    tamper(
        &mut conn,
        "UPDATE invocations SET trigger_kind = 'pigeon' WHERE function_id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(
        store.get_invocation(&call.request_id).await.map(drop),
        "trigger_kind",
    );
    expect_corrupt_result(
        store
            .list_invocations(&function.id, &filter(None, 10))
            .await
            .map(drop),
        "trigger_kind",
    );
}

async fn tamper(conn: &mut sqlx::AnyConnection, sql: &str, function_id: &str) {
    let done = sqlx::query(sql)
        .bind(function_id)
        .execute(conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1, "{sql}");
}

fn expect_corrupt_result(outcome: Result<(), StoreError>, column: &str) {
    match outcome {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains(column), "{column}: {message}")
        }
        other => panic!("{column}: expected Corrupt, got {other:?}"),
    }
}

async fn raw_connection(url: &str) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url)
        .await
        .expect("raw connection")
}

// ---------------------------------------------------------------------------------------
// Backend-specific checks
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn open_rejects_unknown_schemes_naming_the_accepted_ones() {
    for url in [
        "mysql://root:hunter2@localhost/nimbus",
        "redis://localhost",
        "nimbus.db",
        "",
    ] {
        match nimbus_store::open(url).await {
            Err(StoreError::Backend(message)) => {
                for accepted in [
                    "sqlite:<path>",
                    "sqlite://<path>",
                    "postgres://",
                    "postgresql://",
                ] {
                    assert!(message.contains(accepted), "{url}: {message}");
                }
                assert!(!message.contains("hunter2"), "{message}");
            }
            Err(other) => panic!("{url}: expected a Backend error, got {other:?}"),
            Ok(_) => panic!("{url}: opened"),
        }
    }
}

#[tokio::test]
async fn sqlite_creates_the_file_and_its_directory_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/data/nimbus.db");
    for url in [
        format!("sqlite:{}", path.display()),
        format!("sqlite://{}", path.display()),
    ] {
        let store = nimbus_store::open(&url).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        store.ping().await.unwrap();
        assert!(path.is_file());
    }
    let mut conn = raw_connection(&format!("sqlite:{}", path.display())).await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn sqlite_in_memory_works() {
    let store = nimbus_store::open("sqlite::memory:").await.unwrap();
    let (function, _) = create(&*store, "ephemeral").await;
    store
        .publish_version(&function, "v2", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        2
    );
}

#[tokio::test]
async fn postgres_unreachable_is_a_backend_error() {
    match nimbus_store::open("postgres://postgres@127.0.0.1:1/test").await {
        Err(StoreError::Backend(message)) => {
            assert!(
                message.contains("cannot connect to PostgreSQL"),
                "{message}"
            )
        }
        Err(other) => panic!("expected a Backend error, got {other:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}
