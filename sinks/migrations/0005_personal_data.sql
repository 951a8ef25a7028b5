-- Erasure on request, retention, and the indexes both need.
--
-- webhook_erasures records that an erasure happened and how much it removed, never whom: the
-- subject is the hex SHA-256 of the lower-cased address (or of PROVIDER:TYPE:ID).
CREATE TABLE IF NOT EXISTS webhook_erasures (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    erased_at      timestamptz NOT NULL DEFAULT now(),
    subject_sha256 text        NOT NULL,
    counts         jsonb       NOT NULL
);

-- Lookups and erasure by contact, case-insensitively. On a large table, build these first
-- with CREATE INDEX CONCURRENTLY under the same names (docs/operations.md): this migration
-- then finds them and skips them instead of blocking writes while it builds them.
CREATE INDEX IF NOT EXISTS webhook_events_contact_email
    ON webhook_events (lower(contact_email)) WHERE contact_email IS NOT NULL;
-- Lookups by record: every event about one provider's resource.
CREATE INDEX IF NOT EXISTS webhook_events_resource
    ON webhook_events (provider, resource_type, resource_id);
-- Retention removes the archive by age, oldest first, a few thousand rows at a time.
CREATE INDEX IF NOT EXISTS webhook_deliveries_received ON webhook_deliveries (received_at);
