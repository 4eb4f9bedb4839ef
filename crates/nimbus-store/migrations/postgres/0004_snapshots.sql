-- Index of function-level snapshots (an initialized instance of one version, saved by a
-- sandbox driver). Keep in step with the other dialect's 0004: same table, columns and
-- indexes. Timestamps are unix milliseconds.

-- One row per key (function, version, code, environment, driver): building a snapshot
-- claims the key, so concurrent builders of the same snapshot find each other's row.
-- Rows go with their version, and so with their function.
CREATE TABLE snapshots (
    id             TEXT   NOT NULL PRIMARY KEY,
    function_id    TEXT   NOT NULL,
    version        BIGINT NOT NULL,
    code_hash      TEXT   NOT NULL,
    runtime        TEXT   NOT NULL,
    memory_mb      BIGINT NOT NULL,
    env_vars_hash  TEXT   NOT NULL,
    driver         TEXT   NOT NULL,
    path           TEXT,             -- directory of the on-disk tier, if any
    files          TEXT   NOT NULL,  -- JSON [{"name":…,"size":…,"sha256":…}]
    size_bytes     BIGINT NOT NULL,
    status         TEXT   NOT NULL,  -- building | ready | failed | expired | corrupt
    error_message  TEXT,
    restore_count  BIGINT NOT NULL,  -- kept across rebuilds under the same key
    avg_restore_ms DOUBLE PRECISION NOT NULL,
    created_at     BIGINT NOT NULL,  -- start of the current build
    last_used_at   BIGINT,
    expires_at     BIGINT,
    CONSTRAINT snapshots_key UNIQUE (function_id, version, code_hash, env_vars_hash, driver),
    FOREIGN KEY (function_id, version)
        REFERENCES function_versions (function_id, version) ON DELETE CASCADE
);

CREATE INDEX snapshots_function_created ON snapshots (function_id, created_at DESC);
