-- (provider, dedup_key) stays unique through the primary key alone.
--
-- Every event's id is uuid5 of "provider:dedup_key" (ingest.events.event_id): the same
-- provider and key always give the same id, so the primary key already refuses a second row
-- for them, and the sink's ON CONFLICT DO NOTHING skips it. The digest index (migration 0003)
-- enforced the same thing a second time. It is the largest index of the table (about 85
-- bytes an event, at a random place), and every insert paid for it: on a large table its
-- pages no longer fit in memory and each insert read and dirtied one more of them.
-- On a large, busy table, drop it first with DROP INDEX CONCURRENTLY under the same name
-- (docs/operations.md): this migration then finds nothing to drop and takes no lock.
DROP INDEX IF EXISTS webhook_events_provider_dedup_digest;
DROP FUNCTION IF EXISTS webhook_ingest_key_digest(text);
