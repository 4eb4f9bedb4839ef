-- A function's state_config (SPEC §7) as JSON; '{}' reads as the defaults (state off).
-- Keep in step with the other dialect's 0005.
ALTER TABLE functions ADD COLUMN state_config TEXT NOT NULL DEFAULT '{}';
ALTER TABLE function_versions ADD COLUMN state_config TEXT NOT NULL DEFAULT '{}';
