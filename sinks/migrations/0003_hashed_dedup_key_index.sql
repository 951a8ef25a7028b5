-- Uniqueness of (provider, dedup_key) through a digest of the key, not the key itself.
--
-- A btree index entry holds at most about 2.7 KB, so a dedup key longer than that (a provider
-- that keys events on a long text, or a hostile sender) could not be stored at all: the
-- insert failed, and with it every event batched alongside. The digest is 32 bytes whatever
-- the key's length, and the guarantee is the same: one row per provider and dedup key
-- (SHA-256 has no known collisions). Existing rows are kept; the new index is built before
-- the old constraint goes, in the same transaction, so uniqueness never lapses.
CREATE OR REPLACE FUNCTION webhook_ingest_key_digest(value text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT sha256(convert_to(value, 'UTF8')) $$;

CREATE UNIQUE INDEX IF NOT EXISTS webhook_events_provider_dedup_digest
    ON webhook_events (provider, webhook_ingest_key_digest(dedup_key));

ALTER TABLE webhook_events DROP CONSTRAINT IF EXISTS webhook_events_provider_dedup_key;
