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
    ids, AliasAction, AliasRevision, CodeBundle, ErrorCode, Function, FunctionAlias,
    FunctionConfig, FunctionStatus, FunctionVersion, Handler, Invocation, InvocationError,
    InvocationStatus, Network, NewSnapshot, RoutingConfig, Runtime, Snapshot, SnapshotFailure,
    SnapshotFile, SnapshotStatus, SnapshotUse, StartType, StateConfig, Trigger, WeightedVersion,
};
use nimbus_store::{
    AliasChange, AliasWrite, InvocationFilter, MetadataStore, Page, Published, RollbackTarget,
    StoreError, DEFAULT_LIST_LIMIT,
};
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
        publish_without_changes_adds_no_version_but_saves_the_draft,
        publish_to_a_missing_alias_writes_nothing,
        concurrent_publishes_get_distinct_consecutive_numbers,
        publish_moves_latest_and_prod_in_one_call,
        publish_draft_publishes_the_stored_draft,
        has_version_tells_whether_a_version_exists,
        get_version_returns_the_saved_code,
        list_versions_is_newest_first_without_code,
        aliases_get_and_list,
        aliases_are_bounded_per_function_and_listed_in_pages,
        record_invocations_batch_then_get_and_list,
        record_invocations_crosses_statement_chunks,
        upsert_replaces_a_pending_record,
        a_finished_record_is_never_replaced,
        logs_with_nul_characters_are_stored,
        delete_cascades_to_versions_aliases_history_and_invocations,
        deleted_functions_keep_no_late_records,
        existing_functions_are_told_from_missing_ones,
        // Aliases and versions
        create_alias_returns_the_alias_as_stored,
        create_alias_refuses_taken_names_missing_versions_and_unknown_functions,
        update_alias_sets_routing_description_or_both,
        update_alias_refuses_unknown_aliases_and_missing_versions,
        rollback_alias_restores_earlier_routings,
        rollback_alias_refuses_what_it_cannot_do,
        rollback_to_a_deleted_version_is_refused,
        delete_alias_removes_it_with_its_history,
        alias_history_pages_newest_first_per_function,
        delete_version_refuses_versions_any_alias_names,
        deleted_version_numbers_are_never_reused,
        concurrent_alias_updates_get_consecutive_revisions,
        deleting_a_version_never_strands_an_alias,
        update_alias_that_changes_nothing_writes_no_revision,
        guarded_alias_changes_refuse_a_stale_revision,
        concurrent_guarded_updates_let_one_writer_through,
        rollback_to_previous_skips_description_only_changes,
        rollback_to_a_version_routes_all_traffic_to_it,
        deleting_a_function_while_its_aliases_change_never_deadlocks,
        // Snapshots
        begin_snapshot_claims_a_key_once_and_rebuilds_dead_ones,
        concurrent_begins_claim_a_key_once,
        finish_snapshot_stores_the_build_and_its_files,
        set_snapshot_status_changes_status_and_error_only,
        record_snapshot_use_keeps_a_running_mean,
        list_snapshots_is_newest_first_per_function_or_all,
        delete_snapshot_removes_only_its_row,
        snapshots_go_with_their_version_and_function,
        begin_snapshot_racing_delete_version_leaves_no_row,
        unknown_snapshots_are_false_or_none,
    ],
    with_url: [
        reopening_keeps_data_and_reapplies_nothing,
        records_that_raced_a_deletion_are_purged,
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
        network: Network::Outbound,
        state: StateConfig {
            enabled: true,
            default_ttl: 60,
            max_keys: 7,
            session_affinity: true,
            ..StateConfig::default()
        },
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

/// Gives the draft new code (and its hash), so that publishing it adds a version.
fn new_code(function: &mut Function, tag: &str) {
    function.code = python(&format!("def handle(event):\n    return {tag:?}\n"));
    function.config.code_hash = function.code.hash();
}

/// Publishes new code tagged `tag`, moving `aliases`; returns the version it added.
async fn publish_new(
    store: &dyn MetadataStore,
    function: &mut Function,
    tag: &str,
    aliases: &[&str],
) -> FunctionVersion {
    new_code(function, tag);
    let published = store
        .publish_version(function, tag, "alice", aliases)
        .await
        .expect("publish");
    assert!(published.created, "{tag}: new code added no version");
    // A new version is routed by no alias yet, so every alias listed moves.
    assert_eq!(published.moved, aliases, "{tag}");
    published.version
}

/// All traffic to `version`.
fn single(version: u32) -> RoutingConfig {
    RoutingConfig::single(version)
}

/// A routing table of (version, weight) pairs, in the order given.
fn table(pairs: &[(u32, u32)]) -> RoutingConfig {
    RoutingConfig {
        weights: pairs
            .iter()
            .map(|&(version, weight)| WeightedVersion { version, weight })
            .collect(),
    }
}

/// An alias of `function` as the store should hold it (empty description).
fn alias(
    function: &Function,
    name: &str,
    routing: RoutingConfig,
    revision: u32,
    created: OffsetDateTime,
    updated: OffsetDateTime,
) -> FunctionAlias {
    FunctionAlias {
        function_id: function.id.clone(),
        name: name.to_string(),
        description: String::new(),
        routing,
        revision,
        created_at: created,
        updated_at: updated,
    }
}

/// An alias to hand to `create_alias`. Revision and timestamps are the store's to set, so
/// they are deliberately wrong here.
fn new_alias(
    function: &Function,
    name: &str,
    routing: RoutingConfig,
    description: &str,
) -> FunctionAlias {
    FunctionAlias {
        description: description.to_string(),
        ..alias(
            function,
            name,
            routing,
            0,
            OffsetDateTime::UNIX_EPOCH,
            OffsetDateTime::UNIX_EPOCH,
        )
    }
}

/// Creates alias `name` of `function` (empty description) as `ops`; returns it as stored.
async fn create_alias(
    store: &dyn MetadataStore,
    function: &Function,
    name: &str,
    routing: RoutingConfig,
) -> FunctionAlias {
    store
        .create_alias(&new_alias(function, name, routing, ""), "ops")
        .await
        .expect("create alias")
}

/// An unguarded change (no expected revision).
fn change(routing: Option<RoutingConfig>, description: Option<&str>) -> AliasChange {
    AliasChange {
        routing,
        description: description.map(str::to_string),
        expected_revision: None,
    }
}

/// `change`, applied only if the alias is at revision `expected`.
fn guarded(change: AliasChange, expected: u32) -> AliasChange {
    AliasChange {
        expected_revision: Some(expected),
        ..change
    }
}

/// What a write that changed the alias to `alias` returns.
fn written(alias: &FunctionAlias, restored_revision: Option<u32>) -> AliasWrite {
    AliasWrite {
        alias: alias.clone(),
        changed: true,
        restored_revision,
    }
}

/// What a change that changed nothing returns: the alias as it is.
fn unchanged(alias: &FunctionAlias) -> AliasWrite {
    AliasWrite {
        alias: alias.clone(),
        changed: false,
        restored_revision: None,
    }
}

async fn get_alias(store: &dyn MetadataStore, function: &Function, name: &str) -> FunctionAlias {
    store
        .get_alias(&function.id, name)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("alias {name} is missing"))
}

/// The whole history of an alias, newest first.
async fn history(
    store: &dyn MetadataStore,
    function: &Function,
    name: &str,
) -> Page<AliasRevision> {
    store.alias_history(&function.id, name, 0, 0).await.unwrap()
}

/// The history entry of the change that left `alias` as it is (as the call returned it).
fn entry(
    alias: &FunctionAlias,
    action: AliasAction,
    previous_routing: Option<RoutingConfig>,
    restored_revision: Option<u32>,
    changed_by: &str,
) -> AliasRevision {
    AliasRevision {
        function_id: alias.function_id.clone(),
        alias: alias.name.clone(),
        revision: alias.revision,
        action,
        routing: alias.routing.clone(),
        previous_routing,
        description: alias.description.clone(),
        restored_revision,
        changed_by: changed_by.to_string(),
        changed_at: alias.updated_at,
    }
}

/// Fails unless `t` was set by the store during a call started at `before` (or later).
fn assert_set_since(t: OffsetDateTime, before: OffsetDateTime) {
    let after = nimbus_core::now();
    assert!(
        before <= t && t <= after,
        "{t} is not in {before}..={after}"
    );
}

/// Lets the clock pass a few milliseconds, so the next change has a later timestamp.
async fn pause() {
    tokio::time::sleep(Duration::from_millis(3)).await;
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
            code: ErrorCode::FunctionError,
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
        single(1),
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
        vec![latest.clone()]
    );
    // `latest`'s history starts with its creation, by the author of version 1.
    assert_eq!(
        history(store, &function, "latest").await,
        page(
            vec![entry(&latest, AliasAction::Create, None, None, "tester")],
            1
        )
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

    new_code(&mut function, "two");
    let v2 = store
        .publish_version(&function, "second", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        (v2.version.version, v2.created, v2.moved),
        (2, true, vec!["latest".to_string()])
    );
    // The caller's copy still says latest_version 1: the store allocates, not the caller.
    new_code(&mut function, "three");
    let v3 = store
        .publish_version(&function, "third", "bob", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        v3,
        Published {
            version: FunctionVersion {
                function_id: function.id.clone(),
                version: 3,
                description: "third".into(),
                config: function.config.clone(),
                code: function.code.clone(),
                created_at: v3.version.created_at,
                created_by: "bob".into(),
            },
            created: true,
            moved: vec!["latest".into()],
        }
    );
    assert!(v3.version.created_at >= v2.version.created_at);
    assert_eq!(
        store.get_version(&function.id, 2).await.unwrap(),
        Some(v2.version)
    );
    assert_eq!(
        store.get_version(&function.id, 3).await.unwrap(),
        Some(v3.version)
    );

    // Publishing saves the draft in the same call.
    function.description = "draft four".into();
    new_code(&mut function, "four");
    function.updated_at = nimbus_core::now();
    let v4 = store
        .publish_version(&function, "fourth", "carol", &[])
        .await
        .unwrap();
    assert_eq!(
        (v4.version.version, v4.created, v4.moved),
        (4, true, vec![])
    );
    assert_eq!(v4.version.code, function.code);
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
        get_alias(store, &function, "latest").await.routing,
        single(3)
    );

    let (ghost, _) = new_function("ghost");
    assert!(matches!(
        store.publish_version(&ghost, "", "x", &["latest"]).await,
        Err(StoreError::NotFound(_))
    ));
    // The failed publish consumed no number.
    let v5 = publish_new(store, &mut function, "five", &[]).await;
    assert_eq!(v5.version, 5);
}

async fn publish_without_changes_adds_no_version_but_saves_the_draft(store: &dyn MetadataStore) {
    let (mut function, first) = create(store, "steady").await;

    // Description, max_instances and status are the draft's own, not part of a version.
    function.description = "reworded".into();
    function.max_instances = 3;
    function.status = FunctionStatus::Building;
    function.updated_at = nimbus_core::now() + Duration::from_secs(1);
    let same = store
        .publish_version(&function, "no-op", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        same,
        Published {
            version: first.clone(),
            created: false,
            moved: vec![],
        }
    );
    assert_eq!(
        store.get_function(&function.id).await.unwrap(),
        Some(function.clone())
    );
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        1
    );
    // `latest` already routed to version 1 alone: no `publish` revision.
    assert_eq!(get_alias(store, &function, "latest").await.revision, 1);
    assert_eq!(history(store, &function, "latest").await.total, 1);

    // Each field of the configuration is a change of its own.
    type Edit = fn(&mut Function);
    let changes: [(&str, Edit); 6] = [
        ("runtime", |f| f.config.runtime = Runtime::NodeJs20),
        ("handler", |f| {
            f.config.handler = "main.run".parse().unwrap()
        }),
        ("code_hash", |f| new_code(f, "changed")),
        ("env_vars", |f| {
            f.config.env_vars.insert("MODE".into(), "fast".into());
        }),
        ("memory_mb", |f| f.config.memory_mb = 512),
        ("timeout_sec", |f| f.config.timeout_sec = 60),
    ];
    for (number, (field, apply)) in (2..).zip(changes) {
        apply(&mut function);
        let published = store
            .publish_version(&function, field, "alice", &[])
            .await
            .unwrap();
        assert!(published.created && published.moved.is_empty(), "{field}");
        assert_eq!(published.version.version, number, "{field}");
        assert_eq!(published.version.config, function.config, "{field}");
    }

    // The draft is compared with the newest version only: going back to version 1's
    // configuration is a change from version 7.
    function.config = first.config.clone();
    function.code = first.code.clone();
    let v8 = store
        .publish_version(&function, "back to one", "alice", &[])
        .await
        .unwrap();
    assert_eq!(
        (v8.version.version, v8.created, v8.moved),
        (8, true, vec![])
    );
    assert_eq!(v8.version.config, first.config);

    // Unchanged again: version 8 stands, and aliases still move to it.
    let prod = create_alias(store, &function, "prod", single(1)).await;
    let again = store
        .publish_version(&function, "again", "bob", &["prod"])
        .await
        .unwrap();
    assert_eq!(
        again,
        Published {
            version: v8.version.clone(),
            created: false,
            moved: vec!["prod".into()],
        }
    );
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        8
    );
    let moved = get_alias(store, &function, "prod").await;
    assert_eq!(
        moved,
        FunctionAlias {
            routing: single(8),
            revision: 2,
            updated_at: moved.updated_at,
            ..prod.clone()
        }
    );
    assert_eq!(
        history(store, &function, "prod").await.items[0],
        entry(&moved, AliasAction::Publish, Some(single(1)), None, "bob")
    );
}

async fn publish_to_a_missing_alias_writes_nothing(store: &dyn MetadataStore) {
    let (function, first) = create(store, "careful").await;
    let latest = get_alias(store, &function, "latest").await;
    let mut draft = function.clone();
    draft.description = "not saved".into();
    new_code(&mut draft, "two");

    let nothing_written = || async {
        assert_eq!(
            store.get_function(&function.id).await.unwrap(),
            Some(function.clone())
        );
        assert_eq!(
            store.list_versions(&function.id, 10, 0).await.unwrap(),
            page(vec![without_code(first.clone())], 1)
        );
        assert_eq!(get_alias(store, &function, "latest").await, latest);
        assert_eq!(history(store, &function, "latest").await.total, 1);
        assert_eq!(store.get_alias(&function.id, "prod").await.unwrap(), None);
    };

    // `latest` comes first in the list and exists: it must not move either.
    match store
        .publish_version(&draft, "v2", "alice", &["latest", "prod"])
        .await
    {
        Err(StoreError::AliasNotFound { alias }) => assert_eq!(alias, "prod"),
        other => panic!("expected AliasNotFound, got {other:?}"),
    }
    nothing_written().await;

    // Also when the draft would add no version: the draft is not saved.
    let mut unchanged = function.clone();
    unchanged.description = "not saved either".into();
    match store
        .publish_version(&unchanged, "none", "alice", &["prod"])
        .await
    {
        Err(StoreError::AliasNotFound { alias }) => assert_eq!(alias, "prod"),
        other => panic!("expected AliasNotFound, got {other:?}"),
    }
    nothing_written().await;

    // Once `prod` exists the same publish works, and the failures consumed no number.
    create_alias(store, &function, "prod", single(1)).await;
    let v2 = store
        .publish_version(&draft, "v2", "alice", &["latest", "prod"])
        .await
        .unwrap();
    assert_eq!(
        (v2.version.version, v2.created, v2.moved.clone()),
        (2, true, vec!["latest".to_string(), "prod".to_string()])
    );
    assert_eq!(get_alias(store, &function, "prod").await.routing, single(2));
    assert_eq!(
        get_alias(store, &function, "latest").await.routing,
        single(2)
    );
}

async fn concurrent_publishes_get_distinct_consecutive_numbers(store: &dyn MetadataStore) {
    let (function, _) = create(store, "racy").await;
    // Each racer's draft differs from every other, so every publish adds a version.
    let publishes = (0..10).map(|i| {
        let mut function = function.clone();
        function
            .config
            .env_vars
            .insert("RACER".into(), i.to_string());
        async move {
            store
                .publish_version(&function, &format!("racer {i}"), "racer", &["latest"])
                .await
                .expect("concurrent publish")
        }
    });
    let published = futures::future::join_all(publishes).await;
    assert!(published.iter().all(|p| p.created && p.moved == ["latest"]));
    let mut numbers: Vec<u32> = published.iter().map(|p| p.version.version).collect();
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
    // Publishes are serialized on the function row, so `latest` ends on the highest number,
    // after one `publish` revision per racer.
    let latest = get_alias(store, &function, "latest").await;
    assert_eq!((latest.routing, latest.revision), (single(11), 11));
    let revisions: Vec<u32> = history(store, &function, "latest")
        .await
        .items
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(revisions, (1..=11).rev().collect::<Vec<_>>());
}

async fn publish_moves_latest_and_prod_in_one_call(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "canary").await;
    let prod = store
        .create_alias(
            &new_alias(&function, "prod", single(1), "production"),
            "ops",
        )
        .await
        .unwrap();

    new_code(&mut function, "v2");
    let before = nimbus_core::now();
    // `prod` named twice is moved once.
    let v2 = store
        .publish_version(&function, "v2", "alice", &["latest", "prod", "prod"])
        .await
        .unwrap();
    assert_eq!(
        (v2.version.version, v2.created, v2.moved.clone()),
        (2, true, vec!["latest".to_string(), "prod".to_string()])
    );
    let latest2 = get_alias(store, &function, "latest").await;
    let prod2 = get_alias(store, &function, "prod").await;
    assert_set_since(v2.version.created_at, before);
    // One publish, one timestamp: the version and the aliases it moved agree.
    assert_eq!(latest2.updated_at, v2.version.created_at);
    assert_eq!(prod2.updated_at, v2.version.created_at);
    assert_eq!(
        store.list_aliases(&function.id).await.unwrap(),
        vec![
            alias(
                &function,
                "latest",
                single(2),
                2,
                function.created_at,
                latest2.updated_at
            ),
            // The description is kept.
            FunctionAlias {
                routing: single(2),
                revision: 2,
                updated_at: prod2.updated_at,
                ..prod.clone()
            },
        ]
    );
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![
                entry(&prod2, AliasAction::Publish, Some(single(1)), None, "alice"),
                entry(&prod, AliasAction::Create, None, None, "ops"),
            ],
            2
        )
    );
    assert_eq!(
        history(store, &function, "latest").await.items[0],
        entry(
            &latest2,
            AliasAction::Publish,
            Some(single(1)),
            None,
            "alice"
        )
    );

    new_code(&mut function, "v3");
    let v3 = store
        .publish_version(&function, "v3", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        (v3.version.version, v3.moved),
        (3, vec!["latest".to_string()])
    );
    let latest3 = get_alias(store, &function, "latest").await;
    assert_eq!((latest3.routing.clone(), latest3.revision), (single(3), 3));
    assert_eq!(get_alias(store, &function, "prod").await, prod2);

    // Unchanged: version 3 stands, and `latest` already routes to it alone, so no revision.
    let again = store
        .publish_version(&function, "again", "bob", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        (again.version.version, again.created, again.moved),
        (3, false, vec![])
    );
    assert_eq!(get_alias(store, &function, "latest").await, latest3);
    assert_eq!(history(store, &function, "latest").await.total, 3);
}

async fn publish_draft_publishes_the_stored_draft(store: &dyn MetadataStore) {
    let (function, first) = create(store, "staged").await;
    // Staged with `update_function`; the caller's copy is never handed to the publish.
    let mut draft = function.clone();
    draft.description = "staged words".into();
    new_code(&mut draft, "two");
    draft.config.memory_mb = 512;
    draft.updated_at = nimbus_core::now() + Duration::from_secs(1);
    store.update_function(&draft).await.unwrap();

    let before = nimbus_core::now();
    let v2 = store
        .publish_draft(&function.id, "v2", "alice", &["latest"])
        .await
        .unwrap();
    assert_set_since(v2.version.created_at, before);
    assert_eq!(
        v2,
        Published {
            version: FunctionVersion {
                function_id: function.id.clone(),
                version: 2,
                description: "v2".into(),
                config: draft.config.clone(),
                code: draft.code.clone(),
                created_at: v2.version.created_at,
                created_by: "alice".into(),
            },
            created: true,
            moved: vec!["latest".into()],
        }
    );
    assert_eq!(
        store.get_version(&function.id, 2).await.unwrap(),
        Some(v2.version.clone())
    );
    // The draft stays as staged; only the version counter moved.
    assert_eq!(
        store.get_function(&function.id).await.unwrap(),
        Some(Function {
            latest_version: 2,
            ..draft.clone()
        })
    );
    let latest = get_alias(store, &function, "latest").await;
    assert_eq!(
        latest,
        alias(
            &function,
            "latest",
            single(2),
            2,
            function.created_at,
            v2.version.created_at
        )
    );
    assert_eq!(
        history(store, &function, "latest").await.items[0],
        entry(
            &latest,
            AliasAction::Publish,
            Some(single(1)),
            None,
            "alice"
        )
    );

    // Nothing staged since: version 2 stands, and `latest` already routes to it alone.
    let again = store
        .publish_draft(&function.id, "again", "bob", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        again,
        Published {
            version: v2.version.clone(),
            created: false,
            moved: vec![],
        }
    );
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        2
    );
    assert_eq!(get_alias(store, &function, "latest").await, latest);
    assert_eq!(history(store, &function, "latest").await.total, 2);

    let ghost = ids::function_id();
    match store.publish_draft(&ghost, "v1", "alice", &[]).await {
        Err(StoreError::NotFound(message)) => {
            assert_eq!(message, format!("function {ghost:?} not found"))
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    // A missing alias, even listed after one that exists: nothing is written.
    new_code(&mut draft, "three");
    store.update_function(&draft).await.unwrap();
    let staged = store.get_function(&function.id).await.unwrap().unwrap();
    match store
        .publish_draft(&function.id, "v3", "alice", &["latest", "prod"])
        .await
    {
        Err(StoreError::AliasNotFound { alias }) => assert_eq!(alias, "prod"),
        other => panic!("expected AliasNotFound, got {other:?}"),
    }
    assert_eq!(
        store.get_function(&function.id).await.unwrap(),
        Some(staged)
    );
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        2
    );
    assert_eq!(get_alias(store, &function, "latest").await, latest);
    assert_eq!(history(store, &function, "latest").await.total, 2);

    // Once `prod` exists the same publish works, and the failure consumed no number.
    create_alias(store, &function, "prod", single(1)).await;
    let v3 = store
        .publish_draft(&function.id, "v3", "alice", &["latest", "prod"])
        .await
        .unwrap();
    assert_eq!(
        (v3.version.version, v3.created, v3.moved),
        (3, true, vec!["latest".to_string(), "prod".to_string()])
    );
    assert_eq!(
        (v3.version.config, v3.version.code),
        (draft.config.clone(), draft.code.clone())
    );
    assert_eq!(
        store.get_version(&function.id, 1).await.unwrap(),
        Some(first)
    );
}

async fn has_version_tells_whether_a_version_exists(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "present").await;
    let (other, _) = create(store, "absent").await;
    let has = |function_id: String, version: u32| async move {
        store.has_version(&function_id, version).await.unwrap()
    };

    assert!(has(function.id.clone(), 1).await);
    assert!(!has(function.id.clone(), 0).await);
    assert!(!has(function.id.clone(), 2).await);
    publish_new(store, &mut function, "v2", &[]).await;
    publish_new(store, &mut function, "v3", &["latest"]).await;
    assert!(has(function.id.clone(), 2).await);
    assert!(has(function.id.clone(), 3).await);
    // Another function's numbers are its own.
    assert!(!has(other.id.clone(), 2).await);
    assert!(!has(ids::function_id(), 1).await);

    assert!(store.delete_version(&function.id, 2).await.unwrap());
    assert!(!has(function.id.clone(), 2).await);
    assert!(has(function.id.clone(), 1).await);
    assert!(has(function.id.clone(), 3).await);

    assert!(store.delete_function(&function.id).await.unwrap());
    assert!(!has(function.id.clone(), 1).await);
    assert!(!has(function.id.clone(), 3).await);
    assert!(has(other.id.clone(), 1).await);
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
        .unwrap()
        .version;
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
    let (mut function, first) = create(store, "history").await;
    let mut versions = vec![first];
    for n in 2..=4 {
        versions.push(publish_new(store, &mut function, &format!("v{n}"), &["latest"]).await);
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
    let staging = create_alias(store, &b, "staging", single(1)).await;
    let beta = create_alias(store, &b, "beta", single(1)).await;

    assert_eq!(store.get_alias(&a.id, "staging").await.unwrap(), None);
    assert_eq!(store.get_alias("fn_unknown", "latest").await.unwrap(), None);
    assert_eq!(store.list_aliases("fn_unknown").await.unwrap(), vec![]);
    assert_eq!(
        store.list_aliases(&a.id).await.unwrap(),
        vec![alias(
            &a,
            "latest",
            single(1),
            1,
            a.created_at,
            a.created_at
        )]
    );
    // By name.
    assert_eq!(
        store.list_aliases(&b.id).await.unwrap(),
        vec![
            beta,
            alias(&b, "latest", single(1), 1, b.created_at, b.created_at),
            staging.clone(),
        ]
    );
    assert_eq!(
        store.get_alias(&b.id, "staging").await.unwrap(),
        Some(staging)
    );
}

async fn aliases_are_bounded_per_function_and_listed_in_pages(store: &dyn MetadataStore) {
    let limit = nimbus_core::limits::MAX_ALIASES_PER_FUNCTION;
    let (f, _) = create(store, "many").await;
    let (other, _) = create(store, "other").await;
    // `latest` counts: room for `limit - 1` more, created concurrently so that only the
    // function's lock keeps the count.
    let aliases: Vec<FunctionAlias> = (1..=limit + 4)
        .map(|i| new_alias(&f, &format!("a{i:03}"), single(1), ""))
        .collect();
    let results =
        futures::future::join_all(aliases.iter().map(|a| store.create_alias(a, "ops"))).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, limit - 1);
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(refused, StoreError::TooManyAliases { limit: l } if *l == limit),
            "{refused:?}"
        );
    }
    assert_eq!(store.list_aliases(&f.id).await.unwrap().len(), limit);
    // Another function has its own count.
    create_alias(store, &other, "prod", single(1)).await;

    let page = store.list_aliases_page(&f.id, 30, 0).await.unwrap();
    assert_eq!((page.items.len(), page.total), (30, limit as u64));
    let mut names: Vec<String> = Vec::new();
    for offset in (0..limit).step_by(30) {
        let page = store
            .list_aliases_page(&f.id, 30, offset as u32)
            .await
            .unwrap();
        names.extend(page.items.into_iter().map(|a| a.name));
    }
    let all: Vec<String> = store
        .list_aliases(&f.id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(
        names, all,
        "pages are disjoint, in name order, and cover every alias"
    );
    let past = store
        .list_aliases_page(&f.id, 30, limit as u32)
        .await
        .unwrap();
    assert!(past.items.is_empty() && past.total == limit as u64);
    // A deletion makes room again.
    assert!(store.delete_alias(&f.id, "a001").await.unwrap());
    create_alias(store, &f, "again", single(1)).await;
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
            code: ErrorCode::FunctionTimeout,
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

/// Writing a batch again (a journal replayed after a crash) changes nothing: a record that
/// is finished stays as it was stored, even if a pending state of it comes after.
async fn a_finished_record_is_never_replaced(store: &dyn MetadataStore) {
    let (function, _) = create(store, "replayed").await;
    let base = nimbus_core::now();
    let pending = invocation(&function, 3, base);
    let done = Invocation {
        status: InvocationStatus::Success,
        completed_at: Some(pending.started_at + Duration::from_millis(5)),
        duration_ms: Some(5.0),
        ..pending.clone()
    };
    store
        .record_invocations(&[pending.clone(), done.clone()])
        .await
        .unwrap();
    store
        .record_invocations(std::slice::from_ref(&pending))
        .await
        .unwrap();
    let other_end = Invocation {
        status: InvocationStatus::Error,
        ..done.clone()
    };
    store
        .record_invocations(&[pending.clone(), other_end])
        .await
        .unwrap();
    assert_eq!(
        store.get_invocation(&pending.request_id).await.unwrap(),
        Some(done)
    );
}

/// A function may print anything; PostgreSQL takes no NUL in text, so a record whose logs
/// hold one was refused (and, retried, held up every record after it).
async fn logs_with_nul_characters_are_stored(store: &dyn MetadataStore) {
    let (function, _) = create(store, "binary-output").await;
    let record = Invocation {
        logs: "before\0after\n".into(),
        ..invocation(&function, 0, nimbus_core::now())
    };
    store
        .record_invocations(std::slice::from_ref(&record))
        .await
        .unwrap();
    let stored = store.get_invocation(&record.request_id).await.unwrap();
    assert_eq!(
        stored.map(|r| r.logs),
        Some("before\u{FFFD}after\n".to_owned())
    );
}

async fn delete_cascades_to_versions_aliases_history_and_invocations(store: &dyn MetadataStore) {
    let (mut doomed, _) = create(store, "doomed").await;
    let (kept, kept_v1) = create(store, "kept").await;
    create_alias(store, &doomed, "prod", single(1)).await;
    publish_new(store, &mut doomed, "v2", &["latest", "prod"]).await;
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
    assert_eq!(history(store, &doomed, "prod").await, page(vec![], 0));
    assert_eq!(history(store, &doomed, "latest").await, page(vec![], 0));
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
    assert!(!store.delete_function(&ids::function_id()).await.unwrap());

    // The other function is untouched.
    assert_eq!(
        store.get_function(&kept.id).await.unwrap(),
        Some(kept.clone())
    );
    assert_eq!(store.get_version(&kept.id, 1).await.unwrap(), Some(kept_v1));
    assert_eq!(store.list_aliases(&kept.id).await.unwrap().len(), 1);
    assert_eq!(history(store, &kept, "latest").await.total, 1);
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
    let (mut reborn, _) = create(store, "doomed").await;
    let v2 = publish_new(store, &mut reborn, "v2", &["latest"]).await;
    assert_eq!(v2.version, 2);
}

// ---------------------------------------------------------------------------------------
// Checks: aliases, their history, and deleting versions
// ---------------------------------------------------------------------------------------

async fn create_alias_returns_the_alias_as_stored(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "aliased").await;
    publish_new(store, &mut function, "v2", &[]).await;

    let wanted = new_alias(&function, "prod", table(&[(1, 90), (2, 10)]), "production");
    let before = nimbus_core::now();
    let prod = store.create_alias(&wanted, "ops").await.unwrap();
    // Revision and timestamps are set by the store, whatever the caller passed.
    assert_set_since(prod.created_at, before);
    assert_eq!(
        prod,
        FunctionAlias {
            revision: 1,
            created_at: prod.created_at,
            updated_at: prod.created_at,
            ..wanted
        }
    );
    assert_eq!(
        store.get_alias(&function.id, "prod").await.unwrap(),
        Some(prod.clone())
    );
    assert_eq!(
        store.list_aliases(&function.id).await.unwrap(),
        vec![
            alias(
                &function,
                "latest",
                single(1),
                1,
                function.created_at,
                function.created_at
            ),
            prod.clone(),
        ]
    );
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![entry(&prod, AliasAction::Create, None, None, "ops")],
            1
        )
    );

    // Normalizing the table is the caller's job: the store keeps the order it is given.
    let unsorted = table(&[(2, 10), (1, 90)]);
    create_alias(store, &function, "unsorted", unsorted.clone()).await;
    assert_eq!(
        get_alias(store, &function, "unsorted").await.routing,
        unsorted
    );
}

async fn create_alias_refuses_taken_names_missing_versions_and_unknown_functions(
    store: &dyn MetadataStore,
) {
    let (mut function, _) = create(store, "picky").await;
    publish_new(store, &mut function, "v2", &[]).await;
    let prod = create_alias(store, &function, "prod", single(1)).await;

    // A taken name, even with another table; `latest` is taken from the start.
    for name in ["prod", "latest"] {
        let again = new_alias(&function, name, single(2), "second");
        match store.create_alias(&again, "mallory").await {
            Err(StoreError::Conflict(message)) => {
                assert_eq!(message, format!("alias {name:?} already exists"))
            }
            other => panic!("{name}: expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(get_alias(store, &function, "prod").await, prod);
    assert_eq!(history(store, &function, "prod").await.total, 1);
    assert_eq!(history(store, &function, "latest").await.total, 1);

    // Versions that do not exist, listed in table order; existing ones are not named.
    let cases = [
        (single(7), vec![7], "version 7 does not exist"),
        (
            table(&[(7, 50), (9, 50)]),
            vec![7, 9],
            "versions 7, 9 do not exist",
        ),
        (
            table(&[(1, 50), (3, 50)]),
            vec![3],
            "version 3 does not exist",
        ),
    ];
    for (routing, missing, message) in cases {
        let canary = new_alias(&function, "canary", routing, "");
        let error = store.create_alias(&canary, "ops").await.unwrap_err();
        assert_eq!(error.to_string(), message);
        assert!(
            matches!(&error, StoreError::MissingVersions(v) if *v == missing),
            "{error:?}"
        );
    }
    assert_eq!(store.get_alias(&function.id, "canary").await.unwrap(), None);
    assert_eq!(history(store, &function, "canary").await, page(vec![], 0));

    let orphan = FunctionAlias {
        function_id: ids::function_id(),
        ..new_alias(&function, "prod", single(1), "")
    };
    assert!(matches!(
        store.create_alias(&orphan, "ops").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn update_alias_sets_routing_description_or_both(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "tuned").await;
    publish_new(store, &mut function, "v2", &[]).await;
    publish_new(store, &mut function, "v3", &[]).await;
    let r1 = store
        .create_alias(&new_alias(&function, "prod", single(1), "stable"), "ops")
        .await
        .unwrap();
    let update = |change: AliasChange, by: &'static str| {
        let id = function.id.clone();
        async move { store.update_alias(&id, "prod", &change, by).await.unwrap() }
    };

    pause().await;
    let w2 = update(change(Some(single(2)), None), "alice").await;
    let r2 = w2.alias.clone();
    let expected = FunctionAlias {
        routing: single(2),
        revision: 2,
        updated_at: r2.updated_at,
        ..r1.clone()
    };
    assert_eq!(w2, written(&expected, None));
    assert!(r2.updated_at > r1.updated_at);

    pause().await;
    let w3 = update(change(None, Some("bumped")), "bob").await;
    let r3 = w3.alias.clone();
    let expected = FunctionAlias {
        description: "bumped".into(),
        revision: 3,
        updated_at: r3.updated_at,
        ..r2.clone()
    };
    assert_eq!(w3, written(&expected, None));
    assert!(r3.updated_at > r2.updated_at);

    pause().await;
    let canary = table(&[(2, 80), (3, 20)]);
    let w4 = update(change(Some(canary.clone()), Some("canary")), "carol").await;
    let r4 = w4.alias.clone();
    let expected = FunctionAlias {
        routing: canary,
        description: "canary".into(),
        revision: 4,
        updated_at: r4.updated_at,
        ..r3.clone()
    };
    assert_eq!(w4, written(&expected, None));
    assert!(r4.updated_at > r3.updated_at);
    assert_eq!(r4.created_at, r1.created_at);

    // Setting what is already there changes nothing and writes no revision.
    let same = update(
        change(Some(table(&[(2, 80), (3, 20)])), Some("canary")),
        "dave",
    )
    .await;
    assert_eq!(same, unchanged(&r4));

    assert_eq!(get_alias(store, &function, "prod").await, r4);
    use AliasAction::{Create, Update};
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![
                entry(&r4, Update, Some(single(2)), None, "carol"),
                entry(&r3, Update, Some(single(2)), None, "bob"),
                entry(&r2, Update, Some(single(1)), None, "alice"),
                entry(&r1, Create, None, None, "ops"),
            ],
            4
        )
    );
}

async fn update_alias_refuses_unknown_aliases_and_missing_versions(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "guarded").await;
    publish_new(store, &mut function, "v2", &[]).await;
    let prod = create_alias(store, &function, "prod", single(1)).await;

    match store
        .update_alias(
            &function.id,
            "nope",
            &change(Some(single(1)), None),
            "alice",
        )
        .await
    {
        Err(error @ StoreError::AliasNotFound { .. }) => {
            assert_eq!(error.to_string(), "alias \"nope\" not found")
        }
        other => panic!("expected AliasNotFound, got {other:?}"),
    }
    assert_eq!(store.get_alias(&function.id, "nope").await.unwrap(), None);

    // The description is not applied either: the change is refused whole.
    let broken = change(Some(table(&[(2, 50), (4, 50)])), Some("broken"));
    match store
        .update_alias(&function.id, "prod", &broken, "alice")
        .await
    {
        Err(StoreError::MissingVersions(missing)) => assert_eq!(missing, vec![4]),
        other => panic!("expected MissingVersions, got {other:?}"),
    }
    assert_eq!(get_alias(store, &function, "prod").await, prod);
    assert_eq!(history(store, &function, "prod").await.total, 1);

    let ghost = ids::function_id();
    match store
        .update_alias(&ghost, "prod", &change(Some(single(1)), None), "alice")
        .await
    {
        Err(StoreError::NotFound(message)) => {
            assert_eq!(message, format!("function {ghost:?} not found"))
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn rollback_alias_restores_earlier_routings(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "undoable").await;
    publish_new(store, &mut function, "v2", &[]).await;
    publish_new(store, &mut function, "v3", &[]).await;
    let half = table(&[(2, 50), (3, 50)]);
    let r1 = store
        .create_alias(&new_alias(&function, "prod", single(1), "stable"), "ops")
        .await
        .unwrap();
    let r2 = store
        .update_alias(
            &function.id,
            "prod",
            &change(Some(single(2)), None),
            "alice",
        )
        .await
        .unwrap()
        .alias;
    let r3 = store
        .update_alias(
            &function.id,
            "prod",
            &change(Some(half.clone()), Some("half")),
            "bob",
        )
        .await
        .unwrap()
        .alias;
    let rollback = |to: RollbackTarget, by: &'static str| {
        let id = function.id.clone();
        async move {
            store
                .rollback_alias(&id, "prod", to, None, by)
                .await
                .unwrap()
        }
    };

    // `Previous`: the routing of the revision before the current one (it routes
    // differently); the description stays as it is now.
    let w4 = rollback(RollbackTarget::Previous, "carol").await;
    let r4 = w4.alias.clone();
    let expected = FunctionAlias {
        routing: single(2),
        revision: 4,
        updated_at: r4.updated_at,
        ..r3.clone()
    };
    assert_eq!(w4, written(&expected, Some(2)));
    // Rolling back the rollback undoes it: revision 3's table again.
    let w5 = rollback(RollbackTarget::Previous, "carol").await;
    let r5 = w5.alias.clone();
    assert_eq!(
        (
            r5.routing.clone(),
            r5.revision,
            w5.changed,
            w5.restored_revision
        ),
        (half.clone(), 5, true, Some(3))
    );
    // An explicit revision, however far back.
    let w6 = rollback(RollbackTarget::Revision(1), "dave").await;
    let r6 = w6.alias.clone();
    let expected = FunctionAlias {
        routing: single(1),
        revision: 6,
        updated_at: r6.updated_at,
        ..r5.clone()
    };
    assert_eq!(w6, written(&expected, Some(1)));
    assert_eq!(r6.description, "half");

    assert_eq!(get_alias(store, &function, "prod").await, r6);
    use AliasAction::{Create, Rollback, Update};
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![
                entry(&r6, Rollback, Some(half.clone()), Some(1), "dave"),
                entry(&r5, Rollback, Some(single(2)), Some(3), "carol"),
                entry(&r4, Rollback, Some(half), Some(2), "carol"),
                entry(&r3, Update, Some(single(2)), None, "bob"),
                entry(&r2, Update, Some(single(1)), None, "alice"),
                entry(&r1, Create, None, None, "ops"),
            ],
            6
        )
    );
}

async fn rollback_alias_refuses_what_it_cannot_do(store: &dyn MetadataStore) {
    use RollbackTarget::{Previous, Revision, Version};
    let (mut function, _) = create(store, "stubborn").await;
    publish_new(store, &mut function, "v2", &[]).await;
    create_alias(store, &function, "prod", single(1)).await;
    let rollback = |name: &'static str, to: RollbackTarget| {
        let id = function.id.clone();
        async move { store.rollback_alias(&id, name, to, None, "alice").await }
    };
    let no_earlier_routing = "alias \"prod\" has routed the same way since it was created; \
                              there is no earlier routing to restore";

    // Nothing before the creation.
    match rollback("prod", Previous).await {
        Err(StoreError::NothingToRollBack(message)) => assert_eq!(message, no_earlier_routing),
        other => panic!("expected NothingToRollBack, got {other:?}"),
    }

    // Revision 1 routes as revision 2 does (only the description changed), and revision 2
    // is the current one: nothing to restore, whichever way it is asked for.
    let r2 = store
        .update_alias(&function.id, "prod", &change(None, Some("renamed")), "bob")
        .await
        .unwrap()
        .alias;
    let cases = [
        (Previous, no_earlier_routing.to_string()),
        (
            Revision(1),
            "alias \"prod\" already routes as it did at revision 1".to_string(),
        ),
        (
            Revision(2),
            "alias \"prod\" already routes as it did at revision 2".to_string(),
        ),
        (
            Version(1),
            "alias \"prod\" already sends all traffic to version 1".to_string(),
        ),
    ];
    for (to, expected) in cases {
        match rollback("prod", to).await {
            Err(StoreError::NothingToRollBack(message)) => assert_eq!(message, expected),
            other => panic!("{to:?}: expected NothingToRollBack, got {other:?}"),
        }
    }

    for revision in [0, 3, 99] {
        match rollback("prod", Revision(revision)).await {
            Err(error @ StoreError::RevisionNotFound { .. }) => assert_eq!(
                error.to_string(),
                format!("alias \"prod\" has no revision {revision}")
            ),
            other => panic!("{revision}: expected RevisionNotFound, got {other:?}"),
        }
    }

    // A version that was never published.
    match rollback("prod", Version(9)).await {
        Err(error @ StoreError::MissingVersions(_)) => {
            assert_eq!(error.to_string(), "version 9 does not exist");
            assert!(matches!(&error, StoreError::MissingVersions(v) if *v == [9]));
        }
        other => panic!("expected MissingVersions, got {other:?}"),
    }

    for to in [Previous, Revision(1), Version(2)] {
        match rollback("nope", to).await {
            Err(StoreError::AliasNotFound { alias }) => assert_eq!(alias, "nope"),
            other => panic!("{to:?}: expected AliasNotFound, got {other:?}"),
        }
    }

    let ghost = ids::function_id();
    match store
        .rollback_alias(&ghost, "prod", Version(2), None, "alice")
        .await
    {
        Err(StoreError::NotFound(message)) => {
            assert_eq!(message, format!("function {ghost:?} not found"))
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Nothing was written by any of the refusals.
    assert_eq!(get_alias(store, &function, "prod").await, r2);
    assert_eq!(history(store, &function, "prod").await.total, 2);
}

async fn rollback_to_a_deleted_version_is_refused(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "pruned").await;
    publish_new(store, &mut function, "v2", &[]).await;
    // `latest` moves past 2, so once `prod` does too, no alias routes to 2.
    publish_new(store, &mut function, "v3", &["latest"]).await;
    create_alias(store, &function, "prod", single(2)).await;
    let r2 = store
        .update_alias(
            &function.id,
            "prod",
            &change(Some(single(3)), None),
            "alice",
        )
        .await
        .unwrap()
        .alias;
    assert!(store.delete_version(&function.id, 2).await.unwrap());

    // Revision 1 routed to the deleted version 2; `Version(2)` names it directly.
    for to in [
        RollbackTarget::Previous,
        RollbackTarget::Revision(1),
        RollbackTarget::Version(2),
    ] {
        match store
            .rollback_alias(&function.id, "prod", to, None, "bob")
            .await
        {
            Err(error @ StoreError::MissingVersions(_)) => {
                assert_eq!(error.to_string(), "version 2 does not exist");
                assert!(matches!(&error, StoreError::MissingVersions(v) if *v == [2]));
            }
            other => panic!("{to:?}: expected MissingVersions, got {other:?}"),
        }
    }
    assert_eq!(get_alias(store, &function, "prod").await, r2);
    assert_eq!(history(store, &function, "prod").await.total, 2);
}

async fn delete_alias_removes_it_with_its_history(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "trimmed").await;
    publish_new(store, &mut function, "v2", &[]).await;
    create_alias(store, &function, "prod", single(1)).await;
    store
        .update_alias(
            &function.id,
            "prod",
            &change(Some(single(2)), None),
            "alice",
        )
        .await
        .unwrap();
    let latest = get_alias(store, &function, "latest").await;

    assert!(store.delete_alias(&function.id, "prod").await.unwrap());
    assert_eq!(store.get_alias(&function.id, "prod").await.unwrap(), None);
    assert_eq!(
        store.list_aliases(&function.id).await.unwrap(),
        vec![latest]
    );
    assert_eq!(history(store, &function, "prod").await, page(vec![], 0));
    assert!(!store.delete_alias(&function.id, "prod").await.unwrap());
    assert!(!store.delete_alias(&function.id, "never").await.unwrap());
    // Other aliases keep their history.
    assert_eq!(history(store, &function, "latest").await.total, 1);

    // Re-created, it starts over at revision 1 with a history of one entry.
    let again = create_alias(store, &function, "prod", single(2)).await;
    assert_eq!((again.revision, again.routing.clone()), (1, single(2)));
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![entry(&again, AliasAction::Create, None, None, "ops")],
            1
        )
    );
}

async fn alias_history_pages_newest_first_per_function(store: &dyn MetadataStore) {
    let (function, _) = create(store, "chronicle").await;
    let (other, _) = create(store, "bystander").await;
    let created = create_alias(store, &function, "prod", single(1)).await;
    let mut entries = vec![entry(&created, AliasAction::Create, None, None, "ops")];
    for n in 2..=5 {
        let by = format!("user{n}");
        let description = format!("change {n}");
        let changed = store
            .update_alias(&function.id, "prod", &change(None, Some(&description)), &by)
            .await
            .unwrap()
            .alias;
        entries.push(entry(
            &changed,
            AliasAction::Update,
            Some(single(1)),
            None,
            &by,
        ));
    }
    entries.reverse();

    let id = function.id.as_str();
    let listed = |limit: u32, offset: u32| async move {
        store
            .alias_history(id, "prod", limit, offset)
            .await
            .unwrap()
    };
    assert_eq!(listed(2, 0).await, page(entries[0..2].to_vec(), 5));
    assert_eq!(listed(2, 2).await, page(entries[2..4].to_vec(), 5));
    assert_eq!(listed(2, 4).await, page(entries[4..].to_vec(), 5));
    assert_eq!(listed(2, 10).await, page(vec![], 5));
    // A limit of 0 means the default page size.
    assert_eq!(listed(0, 0).await, page(entries.clone(), 5));

    // Another function's alias of the same name has a history of its own.
    let theirs = create_alias(store, &other, "prod", single(1)).await;
    assert_eq!(
        history(store, &other, "prod").await,
        page(
            vec![entry(&theirs, AliasAction::Create, None, None, "ops")],
            1
        )
    );
    assert_eq!(history(store, &function, "prod").await, page(entries, 5));

    assert_eq!(history(store, &function, "nope").await, page(vec![], 0));
    assert_eq!(
        store
            .alias_history("fn_unknown", "prod", 0, 0)
            .await
            .unwrap(),
        page(vec![], 0)
    );
}

async fn delete_version_refuses_versions_any_alias_names(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "referenced").await;
    publish_new(store, &mut function, "v2", &[]).await;
    publish_new(store, &mut function, "v3", &["latest"]).await;
    // Weight 0 still names version 1: `prod` could be shifted back to it at any time.
    create_alias(store, &function, "prod", table(&[(1, 0), (2, 100)])).await;
    create_alias(store, &function, "beta", single(1)).await;
    create_alias(store, &function, "alpha", table(&[(1, 50), (3, 50)])).await;

    assert!(!store.delete_version(&function.id, 9).await.unwrap());

    // Every alias naming the version, by name.
    let cases: [(u32, &[&str], &str); 3] = [
        (
            1,
            &["alpha", "beta", "prod"],
            "version 1 is routed by alias(es) alpha, beta, prod",
        ),
        (2, &["prod"], "version 2 is routed by alias(es) prod"),
        (
            3,
            &["alpha", "latest"],
            "version 3 is routed by alias(es) alpha, latest",
        ),
    ];
    for (version, aliases, message) in cases {
        let error = store
            .delete_version(&function.id, version)
            .await
            .unwrap_err();
        assert_eq!(error.to_string(), message);
        match error {
            StoreError::VersionInUse {
                version: refused,
                aliases: named,
            } => assert_eq!(
                (refused, named),
                (version, aliases.iter().map(|a| a.to_string()).collect())
            ),
            other => panic!("{version}: expected VersionInUse, got {other:?}"),
        }
    }
    assert_eq!(
        store
            .list_versions(&function.id, 10, 0)
            .await
            .unwrap()
            .total,
        3
    );

    // Once `prod` routes to 2 only, version 1 is still named by alpha and beta; once they
    // are gone it can be deleted.
    store
        .update_alias(
            &function.id,
            "prod",
            &change(Some(single(2)), None),
            "alice",
        )
        .await
        .unwrap();
    match store.delete_version(&function.id, 1).await {
        Err(StoreError::VersionInUse { aliases, .. }) => assert_eq!(aliases, ["alpha", "beta"]),
        other => panic!("expected VersionInUse, got {other:?}"),
    }
    assert!(store.delete_alias(&function.id, "alpha").await.unwrap());
    assert!(store.delete_alias(&function.id, "beta").await.unwrap());
    assert!(store.delete_version(&function.id, 1).await.unwrap());
    assert_eq!(store.get_version(&function.id, 1).await.unwrap(), None);
    let listed = store.list_versions(&function.id, 10, 0).await.unwrap();
    let numbers: Vec<u32> = listed.items.iter().map(|v| v.version).collect();
    assert_eq!((numbers, listed.total), (vec![3, 2], 2));
    assert!(!store.delete_version(&function.id, 1).await.unwrap());
    // A deleted version cannot be routed to again.
    let revived = new_alias(&function, "revived", single(1), "");
    match store.create_alias(&revived, "ops").await {
        Err(StoreError::MissingVersions(missing)) => assert_eq!(missing, vec![1]),
        other => panic!("expected MissingVersions, got {other:?}"),
    }
}

async fn deleted_version_numbers_are_never_reused(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "renumbered").await;
    publish_new(store, &mut function, "v2", &["latest"]).await;
    publish_new(store, &mut function, "v3", &[]).await;

    // The highest number, routed by no alias.
    assert!(store.delete_version(&function.id, 3).await.unwrap());
    assert_eq!(store.get_version(&function.id, 3).await.unwrap(), None);
    let listed = store.list_versions(&function.id, 10, 0).await.unwrap();
    let numbers: Vec<u32> = listed.items.iter().map(|v| v.version).collect();
    assert_eq!((numbers, listed.total), (vec![2, 1], 2));

    // The draft is still version 3's, which differs from version 2, now the newest: the
    // publish adds a version, numbered after the deleted one.
    let republished = store
        .publish_version(&function, "again", "alice", &["latest"])
        .await
        .unwrap();
    assert_eq!(
        (
            republished.version.version,
            republished.created,
            republished.moved
        ),
        (4, true, vec!["latest".to_string()])
    );
    assert_eq!(republished.version.config, function.config);
    assert_eq!(
        store
            .get_function(&function.id)
            .await
            .unwrap()
            .unwrap()
            .latest_version,
        4
    );
    let v5 = publish_new(store, &mut function, "v5", &[]).await;
    assert_eq!(v5.version, 5);
}

async fn concurrent_alias_updates_get_consecutive_revisions(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "contended").await;
    publish_new(store, &mut function, "v2", &[]).await;
    create_alias(store, &function, "prod", single(1)).await;

    // Writers alternate between two tables, so each entry's previous routing shows which
    // state the writer saw.
    let updates = (0..20u32).map(|i| {
        let id = function.id.clone();
        let routing = single(1 + i % 2);
        async move {
            let change = change(Some(routing), Some(&format!("writer {i}")));
            store
                .update_alias(&id, "prod", &change, &format!("writer{i}"))
                .await
                .expect("concurrent update")
        }
    });
    let results = futures::future::join_all(updates).await;
    // Every writer's description differs from the one before it, so each one wrote.
    assert!(results
        .iter()
        .all(|w| w.changed && w.restored_revision.is_none()));
    let results: Vec<FunctionAlias> = results.into_iter().map(|w| w.alias).collect();
    let mut revisions: Vec<u32> = results.iter().map(|a| a.revision).collect();
    revisions.sort_unstable();
    assert_eq!(revisions, (2..=21).collect::<Vec<_>>());

    let listed = history(store, &function, "prod").await;
    assert_eq!(listed.total, 21);
    let numbers: Vec<u32> = listed.items.iter().map(|r| r.revision).collect();
    assert_eq!(numbers, (1..=21).rev().collect::<Vec<_>>());
    // Each change saw the one before it.
    for pair in listed.items.windows(2) {
        assert_eq!(
            pair[0].previous_routing.as_ref(),
            Some(&pair[1].routing),
            "revision {}",
            pair[0].revision
        );
    }
    // What each writer got back is what its history entry records.
    for (i, changed) in results.iter().enumerate() {
        let recorded = &listed.items[21 - changed.revision as usize];
        assert_eq!(
            recorded,
            &entry(
                changed,
                AliasAction::Update,
                recorded.previous_routing.clone(),
                None,
                &format!("writer{i}")
            )
        );
        assert_eq!(changed.description, format!("writer {i}"));
    }
    let last = results.iter().find(|a| a.revision == 21).unwrap();
    assert_eq!(&get_alias(store, &function, "prod").await, last);
}

async fn deleting_a_version_never_strands_an_alias(store: &dyn MetadataStore) {
    for round in 0..10 {
        let (mut function, _) = create(store, &format!("race-{round}")).await;
        publish_new(store, &mut function, "v2", &[]).await;
        create_alias(store, &function, "prod", single(1)).await;

        let to_two = change(Some(single(2)), None);
        let (deleted, updated) = tokio::join!(
            store.delete_version(&function.id, 2),
            store.update_alias(&function.id, "prod", &to_two, "alice"),
        );
        match (deleted, updated) {
            // The delete went first; the update found version 2 gone.
            (Ok(true), Err(StoreError::MissingVersions(missing))) => {
                assert_eq!(missing, vec![2], "round {round}");
                assert_eq!(get_alias(store, &function, "prod").await.routing, single(1));
            }
            // The update went first; the delete found `prod` routing to 2.
            (Err(StoreError::VersionInUse { version, aliases }), Ok(prod)) => {
                assert_eq!((version, aliases), (2, vec!["prod".to_string()]));
                assert_eq!((prod.alias.routing, prod.changed), (single(2), true));
            }
            other => panic!("round {round}: {other:?}"),
        }
        // Whatever the order: version 2 exists, or no alias names it.
        let exists = store.get_version(&function.id, 2).await.unwrap().is_some();
        let named: Vec<String> = store
            .list_aliases(&function.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.routing.versions().any(|v| v == 2))
            .map(|a| a.name)
            .collect();
        assert!(
            exists || named.is_empty(),
            "round {round}: {named:?} route to deleted version 2"
        );
    }
}

async fn update_alias_that_changes_nothing_writes_no_revision(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "idle").await;
    publish_new(store, &mut function, "v2", &[]).await;
    let canary = table(&[(1, 90), (2, 10)]);
    let r1 = store
        .create_alias(
            &new_alias(&function, "prod", canary.clone(), "canary"),
            "ops",
        )
        .await
        .unwrap();
    let created = history(store, &function, "prod").await;
    let update = |change: AliasChange, by: &'static str| {
        let id = function.id.clone();
        async move { store.update_alias(&id, "prod", &change, by).await.unwrap() }
    };

    // What is there already, field by field, both, guarded, or nothing at all.
    pause().await;
    for same in [
        change(None, None),
        change(Some(table(&[(1, 90), (2, 10)])), None),
        change(None, Some("canary")),
        change(Some(canary.clone()), Some("canary")),
        guarded(change(Some(canary.clone()), Some("canary")), 1),
    ] {
        assert_eq!(
            update(same.clone(), "alice").await,
            unchanged(&r1),
            "{same:?}"
        );
    }
    // Revision and timestamp stay, and the history lists no change.
    assert_eq!(get_alias(store, &function, "prod").await, r1);
    assert_eq!(history(store, &function, "prod").await, created);

    // The same routing with a new description is a change.
    pause().await;
    let w2 = update(change(Some(canary.clone()), Some("steady")), "bob").await;
    let r2 = FunctionAlias {
        description: "steady".into(),
        revision: 2,
        updated_at: w2.alias.updated_at,
        ..r1.clone()
    };
    assert_eq!(w2, written(&r2, None));
    assert!(r2.updated_at > r1.updated_at);
    assert_eq!(get_alias(store, &function, "prod").await, r2);
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![
                entry(&r2, AliasAction::Update, Some(canary), None, "bob"),
                created.items[0].clone(),
            ],
            2
        )
    );
}

/// Fails unless `outcome` is the `RevisionMismatch` of alias `prod`, which the caller
/// expected at revision `expected` but is at `current`.
fn expect_mismatch(
    outcome: Result<AliasWrite, StoreError>,
    expected: u32,
    current: u32,
    what: &str,
) {
    let error = match outcome {
        Err(error) => error,
        Ok(write) => panic!("{what}: expected RevisionMismatch, got {write:?}"),
    };
    match &error {
        StoreError::RevisionMismatch {
            alias,
            expected: e,
            current: c,
        } => assert_eq!(
            (alias.as_str(), *e, *c),
            ("prod", expected, current),
            "{what}"
        ),
        other => panic!("{what}: expected RevisionMismatch, got {other:?}"),
    }
    assert_eq!(
        error.to_string(),
        format!("alias \"prod\" is at revision {current}, not {expected}: it changed meanwhile"),
        "{what}"
    );
}

async fn guarded_alias_changes_refuse_a_stale_revision(store: &dyn MetadataStore) {
    use RollbackTarget::{Previous, Revision, Version};
    let (mut function, _) = create(store, "optimistic").await;
    publish_new(store, &mut function, "v2", &[]).await;
    publish_new(store, &mut function, "v3", &[]).await;
    let r1 = create_alias(store, &function, "prod", single(1)).await;
    let id = function.id.as_str();

    // At the expected revision, the change applies.
    let w2 = store
        .update_alias(
            id,
            "prod",
            &guarded(change(Some(single(2)), None), 1),
            "alice",
        )
        .await
        .unwrap();
    let r2 = FunctionAlias {
        routing: single(2),
        revision: 2,
        updated_at: w2.alias.updated_at,
        ..r1.clone()
    };
    assert_eq!(w2, written(&r2, None));
    let at_r2 = history(store, &function, "prod").await;

    // A writer that last saw revision 1 (or one not yet written) is refused, even when its
    // change would change nothing, so it learns that it acted on a stale view.
    let stale_updates = [
        (change(Some(single(3)), Some("mine")), 1),
        (change(Some(single(2)), None), 1),
        (change(None, Some("ahead")), 3),
    ];
    for (stale, expected) in stale_updates {
        let outcome = store
            .update_alias(id, "prod", &guarded(stale.clone(), expected), "bob")
            .await;
        expect_mismatch(outcome, expected, 2, &format!("update {stale:?}"));
    }
    for target in [Previous, Revision(1), Version(3)] {
        let outcome = store
            .rollback_alias(id, "prod", target, Some(1), "bob")
            .await;
        expect_mismatch(outcome, 1, 2, &format!("rollback {target:?}"));
    }
    // Nothing was written by any of the refusals.
    assert_eq!(get_alias(store, &function, "prod").await, r2);
    assert_eq!(history(store, &function, "prod").await, at_r2);

    // A rollback guarded by the current revision applies, and then guards on 2 are stale.
    let w3 = store
        .rollback_alias(id, "prod", Previous, Some(2), "carol")
        .await
        .unwrap();
    let r3 = FunctionAlias {
        routing: single(1),
        revision: 3,
        updated_at: w3.alias.updated_at,
        ..r2.clone()
    };
    assert_eq!(w3, written(&r3, Some(1)));
    let outcome = store
        .update_alias(id, "prod", &guarded(change(None, Some("late")), 2), "dave")
        .await;
    expect_mismatch(outcome, 2, 3, "update after the rollback");
    assert_eq!(get_alias(store, &function, "prod").await, r3);
    assert_eq!(history(store, &function, "prod").await.total, 3);
}

async fn concurrent_guarded_updates_let_one_writer_through(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "contested").await;
    publish_new(store, &mut function, "v2", &[]).await;
    create_alias(store, &function, "prod", single(1)).await;
    // Every writer saw revision 1. The guard is checked under the function's lock, so the
    // first to get it writes revision 2 and every other one finds revision 2.
    let writers = (0..6u32).map(|i| {
        let id = function.id.clone();
        async move {
            let routing = single(1 + i % 2);
            let change = guarded(change(Some(routing), Some(&format!("writer {i}"))), 1);
            store
                .update_alias(&id, "prod", &change, &format!("writer{i}"))
                .await
        }
    });
    let mut winners = Vec::new();
    for (i, outcome) in futures::future::join_all(writers)
        .await
        .into_iter()
        .enumerate()
    {
        match outcome {
            Ok(write) => winners.push((i, write)),
            refused => expect_mismatch(refused, 1, 2, &format!("writer {i}")),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (i, write) = &winners[0];
    assert_eq!(
        (
            write.changed,
            write.alias.revision,
            write.alias.description.as_str()
        ),
        (true, 2, format!("writer {i}").as_str())
    );
    assert_eq!(get_alias(store, &function, "prod").await, write.alias);
    assert_eq!(history(store, &function, "prod").await.total, 2);
}

async fn rollback_to_previous_skips_description_only_changes(store: &dyn MetadataStore) {
    let (mut function, _) = create(store, "reworded").await;
    publish_new(store, &mut function, "v2", &[]).await;
    create_alias(store, &function, "prod", single(1)).await;
    let update = |change: AliasChange| {
        let id = function.id.clone();
        async move {
            let write = store.update_alias(&id, "prod", &change, "alice").await;
            write.unwrap().alias
        }
    };
    let previous = |by: &'static str| {
        let id = function.id.clone();
        async move {
            store
                .rollback_alias(&id, "prod", RollbackTarget::Previous, None, by)
                .await
                .unwrap()
        }
    };
    update(change(Some(single(2)), Some("moved"))).await;
    update(change(None, Some("reworded"))).await;
    let r4 = update(change(None, Some("reworded again"))).await;

    // Revisions 3 and 2 route as revision 4 does: the last change of routing was revision
    // 2's, so `Previous` restores revision 1's routing (keeping the current description).
    let w5 = previous("bob").await;
    let r5 = FunctionAlias {
        routing: single(1),
        revision: 5,
        updated_at: w5.alias.updated_at,
        ..r4.clone()
    };
    assert_eq!(w5, written(&r5, Some(1)));
    assert_eq!(
        history(store, &function, "prod").await.items[0],
        entry(&r5, AliasAction::Rollback, Some(single(2)), Some(1), "bob")
    );

    // A description-only change after the rollback is passed over too: `Previous` now
    // undoes the rollback, restoring revision 4's routing.
    let r6 = update(change(None, Some("after the rollback"))).await;
    let w7 = previous("carol").await;
    let r7 = FunctionAlias {
        routing: single(2),
        revision: 7,
        updated_at: w7.alias.updated_at,
        ..r6.clone()
    };
    assert_eq!(w7, written(&r7, Some(4)));
    assert_eq!(get_alias(store, &function, "prod").await, r7);
    assert_eq!(
        history(store, &function, "prod").await.items[0],
        entry(
            &r7,
            AliasAction::Rollback,
            Some(single(1)),
            Some(4),
            "carol"
        )
    );
    assert_eq!(history(store, &function, "prod").await.total, 7);
}

async fn rollback_to_a_version_routes_all_traffic_to_it(store: &dyn MetadataStore) {
    use RollbackTarget::Version;
    let (mut function, _) = create(store, "pinned").await;
    publish_new(store, &mut function, "v2", &[]).await;
    publish_new(store, &mut function, "v3", &[]).await;
    let canary = table(&[(1, 90), (2, 10)]);
    let r1 = store
        .create_alias(
            &new_alias(&function, "prod", canary.clone(), "canary"),
            "ops",
        )
        .await
        .unwrap();
    let rollback = |to: RollbackTarget, expected: Option<u32>, by: &'static str| {
        let id = function.id.clone();
        async move { store.rollback_alias(&id, "prod", to, expected, by).await }
    };

    // Out of a canary, all traffic to one of its versions; the description stays. The
    // routing is named, not taken from the history, so no revision is restored.
    pause().await;
    let w2 = rollback(Version(1), Some(1), "carol").await.unwrap();
    let r2 = FunctionAlias {
        routing: single(1),
        revision: 2,
        updated_at: w2.alias.updated_at,
        ..r1.clone()
    };
    assert_eq!(w2, written(&r2, None));
    assert!(r2.updated_at > r1.updated_at);
    // Also to a version the alias never routed to.
    let w3 = rollback(Version(3), None, "dave").await.unwrap();
    let r3 = FunctionAlias {
        routing: single(3),
        revision: 3,
        updated_at: w3.alias.updated_at,
        ..r2.clone()
    };
    assert_eq!(w3, written(&r3, None));

    match rollback(Version(3), None, "erin").await {
        Err(StoreError::NothingToRollBack(message)) => assert_eq!(
            message,
            "alias \"prod\" already sends all traffic to version 3"
        ),
        other => panic!("expected NothingToRollBack, got {other:?}"),
    }
    // Never published (9), or deleted since (2: only the history still names it).
    assert!(store.delete_version(&function.id, 2).await.unwrap());
    for version in [9, 2] {
        match rollback(Version(version), None, "erin").await {
            Err(error @ StoreError::MissingVersions(_)) => {
                assert_eq!(
                    error.to_string(),
                    format!("version {version} does not exist")
                );
                assert!(matches!(&error, StoreError::MissingVersions(v) if *v == [version]));
            }
            other => panic!("{version}: expected MissingVersions, got {other:?}"),
        }
    }

    assert_eq!(get_alias(store, &function, "prod").await, r3);
    use AliasAction::{Create, Rollback};
    assert_eq!(
        history(store, &function, "prod").await,
        page(
            vec![
                entry(&r3, Rollback, Some(single(1)), None, "dave"),
                entry(&r2, Rollback, Some(canary), None, "carol"),
                entry(&r1, Create, None, None, "ops"),
            ],
            3
        )
    );
}

async fn deleting_a_function_while_its_aliases_change_never_deadlocks(store: &dyn MetadataStore) {
    // Before `delete_function` locked the function row first, it took the alias rows before
    // the function row while alias changes take them the other way round: on PostgreSQL
    // the two deadlocked, and one failed with a `Backend` error.
    for round in 0..10 {
        let (mut function, _) = create(store, &format!("doomed-{round}")).await;
        publish_new(store, &mut function, "v2", &[]).await;
        create_alias(store, &function, "prod", single(1)).await;
        let updates = (0..4u32).map(|i| {
            let id = function.id.clone();
            async move {
                let name = if i % 2 == 0 { "prod" } else { "latest" };
                let change = change(Some(single(1 + i % 2)), Some(&format!("writer {i}")));
                store.update_alias(&id, name, &change, "alice").await
            }
        });
        let (updated, deleted) = tokio::join!(
            futures::future::join_all(updates),
            store.delete_function(&function.id),
        );
        match deleted {
            Ok(true) => {}
            other => panic!("round {round}: delete_function: {other:?}"),
        }
        for (i, outcome) in updated.into_iter().enumerate() {
            match outcome {
                // Before the delete: each writer's description is new, so it wrote.
                Ok(write) => assert!(write.changed, "round {round}, writer {i}"),
                // After it.
                Err(StoreError::NotFound(_) | StoreError::AliasNotFound { .. }) => {}
                Err(other) => panic!("round {round}, writer {i}: {other:?}"),
            }
        }
        // Nothing of the function is left, whatever the order.
        assert_eq!(store.get_function(&function.id).await.unwrap(), None);
        assert_eq!(store.list_aliases(&function.id).await.unwrap(), vec![]);
        for name in ["prod", "latest"] {
            assert_eq!(history(store, &function, name).await, page(vec![], 0));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checks: snapshots
// ---------------------------------------------------------------------------------------

/// The files of a built snapshot: a name beyond ASCII and a size beyond 32 bits.
fn snapshot_files() -> Vec<SnapshotFile> {
    vec![
        SnapshotFile {
            name: "memory.img".to_string(),
            size: 5 << 30,
            checksum: format!("blake3:{}", "ab".repeat(32)),
        },
        SnapshotFile {
            name: "état \"vm\".json".to_string(),
            size: 1234,
            checksum: format!("blake3:{}", "0f".repeat(32)),
        },
    ]
}

/// The row `begin_snapshot` writes for `new` with id `id` at `created_at`: building, with
/// nothing built and never restored.
fn building(id: &str, new: &NewSnapshot, created_at: OffsetDateTime) -> Snapshot {
    Snapshot {
        id: id.to_string(),
        function_id: new.key.function_id.clone(),
        version: new.key.version,
        code_hash: new.key.code_hash.clone(),
        runtime: new.runtime,
        memory_mb: new.memory_mb,
        env_vars_hash: new.key.env_vars_hash.clone(),
        driver: new.key.driver.clone(),
        path: None,
        files: vec![],
        size_bytes: 0,
        status: SnapshotStatus::Building,
        error_message: None,
        failure_count: 0,
        last_failure: None,
        fork_count: 0,
        avg_fork_ms: 0.0,
        restore_count: 0,
        avg_restore_ms: 0.0,
        created_at,
        last_used_at: None,
        expires_at: None,
    }
}

/// Claims `new`, failing unless this call created or rebuilt the row.
async fn begin_new(store: &dyn MetadataStore, new: &NewSnapshot) -> Snapshot {
    let (snapshot, created) = store.begin_snapshot(new).await.expect("begin snapshot");
    assert!(created, "{:?} was not claimable", new.key);
    snapshot
}

async fn get_snapshot(store: &dyn MetadataStore, id: &str) -> Snapshot {
    store
        .get_snapshot(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("snapshot {id} is missing"))
}

/// Marks the snapshot built: ready, with [`snapshot_files`] under `/snapshots/<id>`.
async fn finish_ready(store: &dyn MetadataStore, id: &str, expires_at: OffsetDateTime) {
    let files = snapshot_files();
    let size = files.iter().map(|f| f.size).sum();
    let path = format!("/snapshots/{id}");
    assert!(store
        .finish_snapshot(
            id,
            SnapshotStatus::Ready,
            None,
            Some(&path),
            &files,
            size,
            Some(expires_at)
        )
        .await
        .unwrap());
}

async fn begin_snapshot_claims_a_key_once_and_rebuilds_dead_ones(store: &dyn MetadataStore) {
    let (mut function, v1) = create(store, "snappy").await;
    let new = NewSnapshot::for_version(&v1, "process");
    assert_eq!(
        new.key.env_vars_hash,
        nimbus_core::env_vars_hash(&v1.config.env_vars)
    );

    let before = nimbus_core::now();
    let first = begin_new(store, &new).await;
    assert!(first.id.starts_with("snap_"), "{}", first.id);
    assert_set_since(first.created_at, before);
    assert_eq!(first, building(&first.id, &new, first.created_at));
    assert_eq!(first.key(), new.key);
    assert_eq!(
        store.find_snapshot(&new.key).await.unwrap(),
        Some(first.clone())
    );

    // Building: a second claim changes nothing.
    pause().await;
    assert_eq!(
        store.begin_snapshot(&new).await.unwrap(),
        (first.clone(), false)
    );
    // Ready: nor does a claim then.
    let expires = nimbus_core::now() + Duration::from_secs(3600);
    finish_ready(store, &first.id, expires).await;
    let used = nimbus_core::now();
    assert!(store
        .record_snapshot_use(&first.id, SnapshotUse::Restore, 12.5, used, Some(expires))
        .await
        .unwrap());
    let ready = get_snapshot(store, &first.id).await;
    assert_eq!(ready.status, SnapshotStatus::Ready);
    assert_eq!(store.begin_snapshot(&new).await.unwrap(), (ready, false));

    // Every part of the key tells snapshots apart.
    let mut others = Vec::new();
    for change in 0..4 {
        let mut other = new.clone();
        match change {
            0 => other.key.driver = "firecracker".to_string(),
            1 => other.key.env_vars_hash = nimbus_core::env_vars_hash(&BTreeMap::new()),
            2 => other.key.code_hash = "sha256:other".to_string(),
            _ => other.key.version = 2,
        }
        others.push(other);
    }
    publish_new(store, &mut function, "v2", &[]).await;
    let mut seen = vec![first.id.clone()];
    for other in &others {
        let snapshot = begin_new(store, other).await;
        assert_eq!(snapshot.key(), other.key);
        assert!(!seen.contains(&snapshot.id));
        seen.push(snapshot.id);
    }

    // Dead rows are rebuilt in place: same id, nothing of the old build left, the start
    // statistics and the failure history kept.
    let mut last_build = first.created_at;
    let (mut failures, mut last_failure) = (0, None);
    for dead in [
        SnapshotStatus::Failed,
        SnapshotStatus::Expired,
        SnapshotStatus::Corrupt,
    ] {
        let before = nimbus_core::now();
        assert!(store
            .set_snapshot_status(&first.id, dead, Some("went wrong"))
            .await
            .unwrap());
        if dead != SnapshotStatus::Expired {
            failures += 1;
            let at = get_snapshot(store, &first.id)
                .await
                .last_failure
                .expect("a failure is kept")
                .at;
            assert_set_since(at, before);
            last_failure = Some(SnapshotFailure {
                status: dead,
                message: Some("went wrong".to_string()),
                at,
            });
        }
        pause().await;
        let before = nimbus_core::now();
        let rebuilt = begin_new(store, &new).await;
        assert_set_since(rebuilt.created_at, before);
        assert!(rebuilt.created_at > last_build, "{dead}");
        last_build = rebuilt.created_at;
        assert_eq!(
            rebuilt,
            Snapshot {
                restore_count: 1,
                avg_restore_ms: 12.5,
                last_used_at: Some(used),
                failure_count: failures,
                last_failure: last_failure.clone(),
                ..building(&first.id, &new, rebuilt.created_at)
            },
            "{dead}"
        );
        assert_eq!(get_snapshot(store, &first.id).await, rebuilt);
        // Claimed again: building, so not claimable.
        assert_eq!(
            store.begin_snapshot(&new).await.unwrap(),
            (rebuilt, false),
            "{dead}"
        );
        finish_ready(store, &first.id, expires).await;
    }
    assert_eq!(
        store
            .list_snapshots(Some(&v1.function_id))
            .await
            .unwrap()
            .len(),
        5
    );
}

async fn concurrent_begins_claim_a_key_once(store: &dyn MetadataStore) {
    let (mut function, v1) = create(store, "stampede").await;
    let v2 = publish_new(store, &mut function, "v2", &[]).await;
    for round in 0..5 {
        let version = if round % 2 == 0 { &v1 } else { &v2 };
        let new = NewSnapshot::for_version(version, format!("driver-{round}"));
        // The first pass claims a new key; the second one a failed row.
        for pass in ["new", "failed"] {
            let claims = (0..10).map(|_| store.begin_snapshot(&new));
            let results: Vec<(Snapshot, bool)> = futures::future::join_all(claims)
                .await
                .into_iter()
                .map(|r| r.expect("concurrent begin"))
                .collect();
            let winners = results.iter().filter(|(_, created)| *created).count();
            assert_eq!(winners, 1, "round {round}, {pass}: {results:?}");
            let id = &results[0].0.id;
            for (snapshot, _) in &results {
                assert_eq!(&snapshot.id, id, "round {round}, {pass}");
                assert_eq!(snapshot.status, SnapshotStatus::Building);
            }
            assert!(store
                .set_snapshot_status(id, SnapshotStatus::Failed, Some("crashed"))
                .await
                .unwrap());
        }
    }
    assert_eq!(
        store
            .list_snapshots(Some(&function.id))
            .await
            .unwrap()
            .len(),
        5
    );
}

async fn finish_snapshot_stores_the_build_and_its_files(store: &dyn MetadataStore) {
    let (_, v1) = create(store, "built").await;
    let new = NewSnapshot::for_version(&v1, "process");
    let started = begin_new(store, &new).await;

    let files = snapshot_files();
    let expires = nimbus_core::now() + Duration::from_secs(86_400);
    let path = "/var/lib/nimbus/snapshots/ünïcode dir";
    assert!(store
        .finish_snapshot(
            &started.id,
            SnapshotStatus::Ready,
            None,
            Some(path),
            &files,
            (5 << 30) + 1234,
            Some(expires),
        )
        .await
        .unwrap());
    let ready = Snapshot {
        path: Some(path.to_string()),
        files: files.clone(),
        size_bytes: (5 << 30) + 1234,
        status: SnapshotStatus::Ready,
        expires_at: Some(expires),
        ..started.clone()
    };
    assert_eq!(get_snapshot(store, &started.id).await, ready);
    assert_eq!(
        store.find_snapshot(&new.key).await.unwrap(),
        Some(ready.clone())
    );
    assert_eq!(
        store.list_snapshots(Some(&v1.function_id)).await.unwrap(),
        vec![ready]
    );

    // A failed build: everything replaced, the files included; the failure kept in the
    // history.
    let before = nimbus_core::now();
    assert!(store
        .finish_snapshot(
            &started.id,
            SnapshotStatus::Failed,
            Some("driver said: no space left on device"),
            None,
            &[],
            0,
            None,
        )
        .await
        .unwrap());
    let failed = get_snapshot(store, &started.id).await;
    let at = failed
        .last_failure
        .as_ref()
        .expect("the failure is kept")
        .at;
    assert_set_since(at, before);
    assert_eq!(
        failed,
        Snapshot {
            status: SnapshotStatus::Failed,
            error_message: Some("driver said: no space left on device".to_string()),
            failure_count: 1,
            last_failure: Some(SnapshotFailure {
                status: SnapshotStatus::Failed,
                message: Some("driver said: no space left on device".to_string()),
                at,
            }),
            ..started.clone()
        }
    );
    // Built again: ready, with the history as it was.
    finish_ready(store, &started.id, expires).await;
    let ready = get_snapshot(store, &started.id).await;
    assert_eq!(ready.status, SnapshotStatus::Ready);
    assert_eq!(ready.error_message, None);
    assert_eq!(
        (ready.failure_count, ready.last_failure),
        (1, failed.last_failure)
    );
}

async fn set_snapshot_status_changes_status_and_error_only(store: &dyn MetadataStore) {
    let (_, v1) = create(store, "flaky").await;
    let started = begin_new(store, &NewSnapshot::for_version(&v1, "process")).await;
    let expires = nimbus_core::now() + Duration::from_secs(60);
    finish_ready(store, &started.id, expires).await;
    let ready = get_snapshot(store, &started.id).await;

    let before = nimbus_core::now();
    assert!(store
        .set_snapshot_status(
            &started.id,
            SnapshotStatus::Corrupt,
            Some("memory.img does not match its checksum")
        )
        .await
        .unwrap());
    let corrupt = get_snapshot(store, &started.id).await;
    let at = corrupt
        .last_failure
        .as_ref()
        .expect("the failure is kept")
        .at;
    assert_set_since(at, before);
    let history = Some(SnapshotFailure {
        status: SnapshotStatus::Corrupt,
        message: Some("memory.img does not match its checksum".to_string()),
        at,
    });
    assert_eq!(
        corrupt,
        Snapshot {
            status: SnapshotStatus::Corrupt,
            error_message: Some("memory.img does not match its checksum".to_string()),
            failure_count: 1,
            last_failure: history.clone(),
            ..ready.clone()
        }
    );
    // No message clears it; an expiry is no failure: the history stays.
    assert!(store
        .set_snapshot_status(&started.id, SnapshotStatus::Expired, None)
        .await
        .unwrap());
    assert_eq!(
        get_snapshot(store, &started.id).await,
        Snapshot {
            status: SnapshotStatus::Expired,
            failure_count: 1,
            last_failure: history,
            ..ready
        }
    );
}

async fn record_snapshot_use_keeps_a_running_mean(store: &dyn MetadataStore) {
    let (_, v1) = create(store, "restored").await;
    let started = begin_new(store, &NewSnapshot::for_version(&v1, "process")).await;
    let expires = nimbus_core::now() + Duration::from_secs(60);
    finish_ready(store, &started.id, expires).await;
    let ready = get_snapshot(store, &started.id).await;

    let first_use = nimbus_core::now();
    let later = first_use + Duration::from_secs(600);
    assert!(store
        .record_snapshot_use(
            &started.id,
            SnapshotUse::Restore,
            10.0,
            first_use,
            Some(later)
        )
        .await
        .unwrap());
    let second_use = first_use + Duration::from_millis(5);
    let latest = second_use + Duration::from_secs(600);
    assert!(store
        .record_snapshot_use(
            &started.id,
            SnapshotUse::Restore,
            20.0,
            second_use,
            Some(latest)
        )
        .await
        .unwrap());
    assert_eq!(
        get_snapshot(store, &started.id).await,
        Snapshot {
            restore_count: 2,
            avg_restore_ms: 15.0,
            last_used_at: Some(second_use),
            expires_at: Some(latest),
            ..ready.clone()
        }
    );

    // Concurrent restores all count, and all fold into the mean.
    let third_use = second_use + Duration::from_millis(5);
    let uses = (1..=40u32).map(|ms| {
        let id = started.id.clone();
        async move {
            store
                .record_snapshot_use(&id, SnapshotUse::Restore, f64::from(ms), third_use, None)
                .await
                .expect("concurrent use")
        }
    });
    let recorded = futures::future::join_all(uses).await;
    assert!(recorded.into_iter().all(|found| found));
    let after = get_snapshot(store, &started.id).await;
    assert_eq!(after.restore_count, 42);
    let mean = (10.0 + 20.0 + f64::from((1..=40u32).sum::<u32>())) / 42.0;
    assert!(
        (after.avg_restore_ms - mean).abs() < 1e-9,
        "{} != {mean}",
        after.avg_restore_ms
    );
    // No expiry given: none set.
    assert_eq!(
        (after.last_used_at, after.expires_at),
        (Some(third_use), None)
    );
    assert_eq!((after.status, &after.files), (ready.status, &ready.files));

    // Forks count apart from restores.
    assert_eq!((after.fork_count, after.avg_fork_ms), (0, 0.0));
    for ms in [3.0, 5.0] {
        assert!(store
            .record_snapshot_use(&started.id, SnapshotUse::Fork, ms, third_use, None)
            .await
            .unwrap());
    }
    let forked = get_snapshot(store, &started.id).await;
    assert_eq!(
        forked,
        Snapshot {
            fork_count: 2,
            avg_fork_ms: 4.0,
            ..after
        }
    );
}

async fn list_snapshots_is_newest_first_per_function_or_all(store: &dyn MetadataStore) {
    let (mut a, a1) = create(store, "lister-a").await;
    let a2 = publish_new(store, &mut a, "v2", &[]).await;
    let (_, b1) = create(store, "lister-b").await;

    let mut built = Vec::new();
    for (version, driver) in [
        (&a1, "process"),
        (&b1, "process"),
        (&a2, "process"),
        (&a1, "firecracker"),
    ] {
        built.push(begin_new(store, &NewSnapshot::for_version(version, driver)).await);
        pause().await;
    }
    let ids_of =
        |snapshots: Vec<Snapshot>| -> Vec<String> { snapshots.into_iter().map(|s| s.id).collect() };
    let id = |i: usize| built[i].id.clone();

    assert_eq!(
        ids_of(store.list_snapshots(Some(&a.id)).await.unwrap()),
        vec![id(3), id(2), id(0)]
    );
    assert_eq!(
        ids_of(store.list_snapshots(Some(&b1.function_id)).await.unwrap()),
        vec![id(1)]
    );
    assert_eq!(
        ids_of(store.list_snapshots(None).await.unwrap()),
        vec![id(3), id(2), id(1), id(0)]
    );
    assert_eq!(
        store
            .list_snapshots(Some(&ids::function_id()))
            .await
            .unwrap(),
        vec![]
    );
    // The listing carries whole rows.
    assert_eq!(store.list_snapshots(None).await.unwrap()[3], built[0]);

    // A rebuild is the newest build.
    assert!(store
        .set_snapshot_status(&id(0), SnapshotStatus::Failed, Some("oom"))
        .await
        .unwrap());
    begin_new(store, &NewSnapshot::for_version(&a1, "process")).await;
    assert_eq!(
        ids_of(store.list_snapshots(Some(&a.id)).await.unwrap()),
        vec![id(0), id(3), id(2)]
    );
}

async fn delete_snapshot_removes_only_its_row(store: &dyn MetadataStore) {
    let (_, v1) = create(store, "pruned").await;
    let new = NewSnapshot::for_version(&v1, "process");
    let doomed = begin_new(store, &new).await;
    let kept = begin_new(store, &NewSnapshot::for_version(&v1, "firecracker")).await;

    assert!(store.delete_snapshot(&doomed.id).await.unwrap());
    assert_eq!(store.get_snapshot(&doomed.id).await.unwrap(), None);
    assert_eq!(store.find_snapshot(&new.key).await.unwrap(), None);
    assert!(!store.delete_snapshot(&doomed.id).await.unwrap());
    assert_eq!(
        store.list_snapshots(Some(&v1.function_id)).await.unwrap(),
        vec![kept]
    );

    // The key is free again: a new row, with a new id.
    let again = begin_new(store, &new).await;
    assert_ne!(again.id, doomed.id);
}

async fn snapshots_go_with_their_version_and_function(store: &dyn MetadataStore) {
    let (mut doomed, v1) = create(store, "snap-doomed").await;
    let v2 = publish_new(store, &mut doomed, "v2", &["latest"]).await;
    let (_, kept_v1) = create(store, "snap-kept").await;
    let mut of_v1 = Vec::new();
    for driver in ["process", "firecracker"] {
        of_v1.push(begin_new(store, &NewSnapshot::for_version(&v1, driver)).await);
    }
    let of_v2 = begin_new(store, &NewSnapshot::for_version(&v2, "process")).await;
    let kept = begin_new(store, &NewSnapshot::for_version(&kept_v1, "process")).await;

    // Deleting a version takes its snapshots, and only them.
    assert!(store.delete_version(&doomed.id, 1).await.unwrap());
    for snapshot in &of_v1 {
        assert_eq!(store.get_snapshot(&snapshot.id).await.unwrap(), None);
    }
    assert_eq!(
        store.list_snapshots(Some(&doomed.id)).await.unwrap(),
        vec![of_v2.clone()]
    );
    // A deleted version, or a function that does not exist, cannot be snapshotted.
    for new in [
        NewSnapshot::for_version(&v1, "process"),
        NewSnapshot::for_version(
            &FunctionVersion {
                function_id: ids::function_id(),
                ..v1.clone()
            },
            "process",
        ),
    ] {
        match store.begin_snapshot(&new).await {
            Err(StoreError::NotFound(message)) => {
                assert!(message.contains("version 1"), "{message}")
            }
            other => panic!("{:?}: expected NotFound, got {other:?}", new.key),
        }
    }

    // Deleting the function takes the rest.
    assert!(store.delete_function(&doomed.id).await.unwrap());
    assert_eq!(store.get_snapshot(&of_v2.id).await.unwrap(), None);
    assert_eq!(
        store.list_snapshots(Some(&doomed.id)).await.unwrap(),
        vec![]
    );
    assert_eq!(store.list_snapshots(None).await.unwrap(), vec![kept]);
}

async fn begin_snapshot_racing_delete_version_leaves_no_row(store: &dyn MetadataStore) {
    for round in 0..10 {
        let (mut function, _) = create(store, &format!("snap-race-{round}")).await;
        let v2 = publish_new(store, &mut function, "v2", &[]).await;
        let new = NewSnapshot::for_version(&v2, "process");
        let (begun, deleted) = tokio::join!(
            store.begin_snapshot(&new),
            store.delete_version(&function.id, 2),
        );
        match (begun, deleted) {
            // The claim went first; the delete took its row.
            (Ok((_, true)), Ok(true)) => {}
            // The delete went first; the claim found no version.
            (Err(StoreError::NotFound(_)), Ok(true)) => {}
            other => panic!("round {round}: {other:?}"),
        }
        assert_eq!(
            store.find_snapshot(&new.key).await.unwrap(),
            None,
            "round {round}"
        );
        assert_eq!(
            store.list_snapshots(Some(&function.id)).await.unwrap(),
            vec![],
            "round {round}"
        );
    }
}

async fn unknown_snapshots_are_false_or_none(store: &dyn MetadataStore) {
    let (_, v1) = create(store, "nothing-here").await;
    let unknown = ids::snapshot_id();
    assert_eq!(store.get_snapshot(&unknown).await.unwrap(), None);
    let new = NewSnapshot::for_version(&v1, "process");
    assert_eq!(store.find_snapshot(&new.key).await.unwrap(), None);
    let at = nimbus_core::now();
    assert!(!store
        .finish_snapshot(
            &unknown,
            SnapshotStatus::Ready,
            None,
            None,
            &[],
            0,
            Some(at)
        )
        .await
        .unwrap());
    assert!(!store
        .set_snapshot_status(&unknown, SnapshotStatus::Expired, None)
        .await
        .unwrap());
    assert!(!store
        .record_snapshot_use(&unknown, SnapshotUse::Fork, 1.0, at, None)
        .await
        .unwrap());
    assert!(!store.delete_snapshot(&unknown).await.unwrap());
    assert_eq!(store.list_snapshots(None).await.unwrap(), vec![]);
}

// ---------------------------------------------------------------------------------------
// Checks on the database itself (with its URL)
// ---------------------------------------------------------------------------------------

async fn reopening_keeps_data_and_reapplies_nothing(store: &dyn MetadataStore, url: &str) {
    let (mut function, first) = create(store, "durable").await;
    let v2 = publish_new(store, &mut function, "v2", &["latest"]).await;
    let latest_history = history(store, &function, "latest").await;
    assert_eq!(latest_history.total, 2);

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
    assert_eq!(
        reopened
            .alias_history(&function.id, "latest", 0, 0)
            .await
            .unwrap(),
        latest_history
    );

    let mut conn = raw_connection(url).await;
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    // 0001_init, 0002_alias_history, 0003_network, 0004_snapshots, 0005_state_config,
    // 0006_snapshot_history and 0007_deleted_functions, each once.
    assert_eq!(applied, 7);
}

async fn corrupt_rows_are_reported_as_corrupt(store: &dyn MetadataStore, url: &str) {
    let (function, first) = create(store, "fragile").await;
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
        "UPDATE function_aliases SET routing_config = '{\"weights\":[]}', revision = -1 \
         WHERE function_id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(
        store.get_alias(&function.id, "latest").await.map(drop),
        "revision",
    );
    tamper(
        &mut conn,
        "UPDATE alias_history SET action = 'renamed' WHERE function_id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(
        store
            .alias_history(&function.id, "latest", 10, 0)
            .await
            .map(drop),
        "action",
    );

    let (snapshot, _) = store
        .begin_snapshot(&NewSnapshot::for_version(&first, "process"))
        .await
        .unwrap();
    let get_snapshot = || async { store.get_snapshot(&snapshot.id).await.map(drop) };
    tamper(
        &mut conn,
        "UPDATE snapshots SET files = 'not json' WHERE function_id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(get_snapshot().await, "files");
    tamper(
        &mut conn,
        "UPDATE snapshots SET files = '[]', status = 'stale' WHERE function_id = $1",
        &function.id,
    )
    .await;
    expect_corrupt_result(get_snapshot().await, "status");
    expect_corrupt_result(
        store.list_snapshots(Some(&function.id)).await.map(drop),
        "status",
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

/// A deleted function is remembered: records written for it afterwards (by a server that
/// ran it meanwhile, or replayed from a journal) are not kept, in a batch with others that
/// are; and it is forgotten when asked.
async fn deleted_functions_keep_no_late_records(store: &dyn MetadataStore) {
    let (doomed, _) = create(store, "doomed").await;
    let (kept, _) = create(store, "kept").await;
    let before = nimbus_core::now();
    assert!(store.delete_function(&doomed.id).await.unwrap());
    let deleted = store.deleted_functions().await.unwrap();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].function_id, doomed.id);
    let at = deleted[0].deleted_at;
    assert!(at >= before - Duration::from_secs(1), "{at} vs {before}");
    assert!(at <= nimbus_core::now() + Duration::from_secs(1), "{at}");

    let late = invocation(&doomed, 0, before);
    let live = invocation(&kept, 0, before);
    store
        .record_invocations(&[late.clone(), live.clone()])
        .await
        .unwrap();
    assert_eq!(store.get_invocation(&late.request_id).await.unwrap(), None);
    assert_eq!(
        store.get_invocation(&live.request_id).await.unwrap(),
        Some(live.clone())
    );
    // Purging a function that is not deleted removes nothing.
    assert_eq!(store.purge_deleted_function(&kept.id).await.unwrap(), 0);
    assert!(store
        .get_invocation(&live.request_id)
        .await
        .unwrap()
        .is_some());

    assert_eq!(
        store
            .forget_deleted_functions(at - Duration::from_secs(1))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .forget_deleted_functions(at + Duration::from_secs(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.deleted_functions().await.unwrap(), vec![]);
}

async fn existing_functions_are_told_from_missing_ones(store: &dyn MetadataStore) {
    let (a, _) = create(store, "here").await;
    let (b, _) = create(store, "also-here").await;
    let (gone, _) = create(store, "gone").await;
    assert!(store.delete_function(&gone.id).await.unwrap());
    let asked = [
        a.id.clone(),
        gone.id.clone(),
        "fn_never".into(),
        b.id.clone(),
    ];
    let existing = store.existing_functions(&asked).await.unwrap();
    assert_eq!(existing, [a.id, b.id].into_iter().collect());
    assert!(store.existing_functions(&[]).await.unwrap().is_empty());
}

/// A record that was written as its function was being deleted on another connection (a
/// race the insert's check cannot close) is removed by the purge.
async fn records_that_raced_a_deletion_are_purged(store: &dyn MetadataStore, url: &str) {
    let (doomed, _) = create(store, "raced").await;
    let (kept, _) = create(store, "bystander").await;
    let base = nimbus_core::now();
    let raced = invocation(&doomed, 0, base);
    let live = invocation(&kept, 0, base);
    assert!(store.delete_function(&doomed.id).await.unwrap());
    // Written as if the check ran before the deletion committed.
    let mut conn = raw_connection(url).await;
    sqlx::query(
        "INSERT INTO invocations (request_id, function_id, function_name, version, \
         trigger_kind, status, started_at, logs) VALUES ($1, $2, 'raced', 1, 'http', \
         'success', 0, '')",
    )
    .bind(&raced.request_id)
    .bind(&doomed.id)
    .execute(&mut conn)
    .await
    .unwrap();
    store
        .record_invocations(std::slice::from_ref(&live))
        .await
        .unwrap();
    assert!(store
        .get_invocation(&raced.request_id)
        .await
        .unwrap()
        .is_some());

    assert_eq!(store.purge_deleted_function(&doomed.id).await.unwrap(), 1);
    assert_eq!(store.get_invocation(&raced.request_id).await.unwrap(), None);
    assert!(store
        .get_invocation(&live.request_id)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.purge_deleted_function(&doomed.id).await.unwrap(), 0);
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
    let (mut function, _) = create(&*store, "ephemeral").await;
    publish_new(&*store, &mut function, "v2", &["latest"]).await;
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
