-- webhook_deliveries.erased_at: when `ingest erase` rewrote this delivery's body without one
-- person's events (a Salesloft array that held several people's), keeping the others'. Null:
-- the body is the exact bytes received. A set value says the body is no longer what the
-- provider signed; it still normalizes into the events that remain (replay uses it as is).
-- A nullable column without a default is recorded without rewriting the table: quick on a
-- large archive.
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS erased_at timestamptz;
