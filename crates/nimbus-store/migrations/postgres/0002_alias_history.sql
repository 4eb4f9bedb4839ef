-- Alias revisions and history (versions and aliases feature).
-- Keep in step with the other dialect's 0002: same tables, columns and indexes.

-- Number of the alias's latest change; bumped under the row lock by every change.
ALTER TABLE function_aliases ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;

-- Every change of every alias: the routing after it and before it, who and when, so any
-- earlier routing can be restored. Removed with the alias.
CREATE TABLE alias_history (
    function_id             TEXT   NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    alias                   TEXT   NOT NULL,
    revision                BIGINT NOT NULL,
    action                  TEXT   NOT NULL,  -- create | update | publish | rollback
    routing_config          TEXT   NOT NULL,  -- JSON, after the change
    previous_routing_config TEXT,             -- JSON, before the change (NULL at creation)
    description             TEXT   NOT NULL,
    restored_revision       BIGINT,           -- for a rollback, the revision restored
    changed_by              TEXT   NOT NULL,
    changed_at              BIGINT NOT NULL,
    PRIMARY KEY (function_id, alias, revision)
);

-- Aliases that existed before history was kept start it with their current routing.
INSERT INTO alias_history (function_id, alias, revision, action, routing_config,
    previous_routing_config, description, restored_revision, changed_by, changed_at)
SELECT function_id, name, 1, 'create', routing_config, NULL, description, NULL, 'migration',
    updated_at
FROM function_aliases;
