-- The latest state of every record, and two more columns on every event.
--
-- webhook_events.stale: an event about the same record that happened later had already been
-- processed when this one was (decided in Redis by the worker). webhook_events.changes:
-- {field: {"from": old, "to": new}} from the provider's previous values, else null. Both are
-- added with constant defaults, which Postgres records without rewriting the table, so this
-- is quick on a large archive; rows stored before read stale = false and changes = null.
ALTER TABLE webhook_events ADD COLUMN IF NOT EXISTS stale boolean NOT NULL DEFAULT false;
ALTER TABLE webhook_events ADD COLUMN IF NOT EXISTS changes jsonb;

-- One row per (provider, resource_type, resource_id): the newest event applied to it. The
-- Postgres sink writes it in the same transaction as the events, and only with an event newer
-- than the stored one by (occurred_at, event_id): the same order on every worker, so late and
-- concurrent deliveries never put older data back.
CREATE TABLE IF NOT EXISTS webhook_records (
    provider      text        NOT NULL,
    resource_type text        NOT NULL,
    resource_id   text        NOT NULL,
    occurred_at   timestamptz NOT NULL,  -- of the newest event applied
    kind          text        NOT NULL,
    event_id      uuid        NOT NULL,  -- webhook_events.id of that event
    data          jsonb       NOT NULL,  -- its resource object
    deleted       boolean     NOT NULL DEFAULT false,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, resource_type, resource_id)
);

-- The records of the events stored before this migration, from the newest event of each. The
-- delete rule is ingest.events.Event.deletes: a *.deleted kind, or a delete action.
INSERT INTO webhook_records AS r (provider, resource_type, resource_id, occurred_at, kind,
                                  event_id, data, deleted)
SELECT DISTINCT ON (provider, resource_type, resource_id)
       provider, resource_type, resource_id, occurred_at, kind, id, data,
       kind LIKE '%.deleted' OR coalesce(action, '') IN ('deleted', 'destroyed', 'bulk_deleted')
FROM webhook_events
WHERE resource_type IS NOT NULL AND resource_type <> ''
  AND resource_id IS NOT NULL AND resource_id <> ''
ORDER BY provider, resource_type, resource_id, occurred_at DESC, id DESC
ON CONFLICT (provider, resource_type, resource_id) DO NOTHING;
