-- Functions deleted recently. A server that has not learned of a deletion yet may still run
-- the function and write records and state for it: records of these functions are not
-- kept when written, and a periodic purge removes late ones (and late state) until the row
-- is forgotten (see docs/ARCHITECTURE.md, "Deletion converges").
CREATE TABLE deleted_functions (
    function_id TEXT   NOT NULL PRIMARY KEY,
    deleted_at  BIGINT NOT NULL  -- unix milliseconds
);

CREATE INDEX deleted_functions_deleted_at ON deleted_functions (deleted_at);
