-- Snapshots keep the history of their failures across rebuilds (a rebuild resets status
-- and error_message), and count the instances started from them by tier: forked from the
-- resident template, or restored from the checkpoint on disk. Keep in step with the other
-- dialect's 0006.
ALTER TABLE snapshots ADD COLUMN failure_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN last_failure_status TEXT;   -- failed | corrupt
ALTER TABLE snapshots ADD COLUMN last_failure TEXT;          -- its error message
ALTER TABLE snapshots ADD COLUMN last_failure_at BIGINT;
ALTER TABLE snapshots ADD COLUMN fork_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN avg_fork_ms DOUBLE PRECISION NOT NULL DEFAULT 0;

-- Until now restore_count counted forks and disk restores alike, and forks were nearly
-- all of them: the counts so far become fork counts.
UPDATE snapshots SET fork_count = restore_count, avg_fork_ms = avg_restore_ms,
    restore_count = 0, avg_restore_ms = 0;
UPDATE snapshots SET failure_count = 1, last_failure_status = status,
    last_failure = error_message, last_failure_at = created_at
    WHERE status IN ('failed', 'corrupt');
