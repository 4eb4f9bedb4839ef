-- The network a function's instances get: 'none' (an empty network namespace) or
-- 'outbound' (public addresses through NAT). Keep in step with the other dialect's 0003.
ALTER TABLE functions ADD COLUMN network TEXT NOT NULL DEFAULT 'none';
ALTER TABLE function_versions ADD COLUMN network TEXT NOT NULL DEFAULT 'none';
