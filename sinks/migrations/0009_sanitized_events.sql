-- webhook_events.sanitized: the row holds a form of the event Postgres accepts, not the event
-- itself. Postgres refuses U+0000 in text and jsonb (SQLSTATE 22P05), and an index entry past
-- the btree limit (about 2.7 KB, 54000): such an event was refused forever, `ingest dlq retry`
-- included. Now its U+0000 are stored as U+FFFD, and an indexed value (resource_type,
-- resource_id, contact_email) longer than 800 bytes as its start and the SHA-256 of the whole
-- (sinks/postgres.py, "storable"); webhook_deliveries.body still holds the exact bytes
-- received, and the CRM, Slack and plugins get the event as it was. A constant default:
-- recorded without rewriting the table.
ALTER TABLE webhook_events ADD COLUMN IF NOT EXISTS sanitized boolean NOT NULL DEFAULT false;
