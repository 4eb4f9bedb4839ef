-- Nimbus metadata store, initial schema (SQLite dialect).
-- Keep in step with migrations/postgres/0001_init.sql: same tables, columns and indexes.
-- Timestamps are unix milliseconds. Declared types are the ones sqlx's Any driver maps
-- (TEXT, BIGINT, REAL, BLOB).

CREATE TABLE functions (
    id             TEXT   NOT NULL PRIMARY KEY,
    name           TEXT   NOT NULL,
    description    TEXT   NOT NULL,
    runtime        TEXT   NOT NULL,
    handler        TEXT   NOT NULL,
    code_hash      TEXT   NOT NULL,
    env_vars       TEXT   NOT NULL,  -- JSON object
    memory_mb      BIGINT NOT NULL,
    timeout_sec    BIGINT NOT NULL,
    code           BLOB   NOT NULL,  -- CodeBundle::encode()
    max_instances  BIGINT NOT NULL,
    status         TEXT   NOT NULL,
    latest_version BIGINT NOT NULL,  -- highest number ever published, never decremented
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    CONSTRAINT functions_name_key UNIQUE (name)
);

CREATE TABLE function_versions (
    function_id TEXT   NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    version     BIGINT NOT NULL,
    description TEXT   NOT NULL,
    runtime     TEXT   NOT NULL,
    handler     TEXT   NOT NULL,
    code_hash   TEXT   NOT NULL,
    env_vars    TEXT   NOT NULL,
    memory_mb   BIGINT NOT NULL,
    timeout_sec BIGINT NOT NULL,
    code        BLOB   NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT   NOT NULL,
    PRIMARY KEY (function_id, version)
);

CREATE TABLE function_aliases (
    function_id    TEXT   NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    name           TEXT   NOT NULL,
    description    TEXT   NOT NULL,
    routing_config TEXT   NOT NULL,  -- JSON {"weights":[{"version":…,"weight":…}]}
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (function_id, name)
);

-- No foreign key to functions: records are written behind the invocation, and a batch must
-- not fail because one of its functions was deleted meanwhile. delete_function removes them.
CREATE TABLE invocations (
    request_id     TEXT   NOT NULL PRIMARY KEY,
    function_id    TEXT   NOT NULL,
    function_name  TEXT   NOT NULL,
    version        BIGINT NOT NULL,
    alias_used     TEXT,
    session_key    TEXT,
    trigger_kind   TEXT   NOT NULL,
    status         TEXT   NOT NULL,
    input          TEXT,             -- JSON text
    output         TEXT,             -- JSON text
    error          TEXT,             -- JSON InvocationError
    start_type     TEXT,
    instance_id    TEXT,
    started_at     BIGINT NOT NULL,
    completed_at   BIGINT,
    duration_ms    REAL,
    memory_used_mb BIGINT,
    logs           TEXT   NOT NULL
);

CREATE INDEX invocations_function_started ON invocations (function_id, started_at DESC);
