-- Finding any event fast (sinks/browse.py: the console's search), newest first.
--
-- Each search is one filter (a contact, a record id, a provider, or none) over a time range,
-- newest first by (received_at, id), a page at a time from a cursor. An index that starts
-- with the filter and goes on with (received_at, id) hands Postgres the rows already in that
-- order: a page reads its 50 entries and stops, at any depth, whatever the filter matches
-- (a contact with thousands of events, a provider with millions).
--
-- Two of them replace narrower indexes of migration 0005 that only found the rows (and then
-- every match had to be read and sorted): the contact index serves `ingest erase` as the old
-- one did (the same leading expression), the record index serves it by resource id (then the
-- provider and type from the row). So the sink's inserts pay for one index more than before
-- (provider), not three (docs/performance.md, "Console search").
--
-- On a large, busy table, build these first with CREATE INDEX CONCURRENTLY under the same
-- names and drop the old ones with DROP INDEX CONCURRENTLY (docs/operations.md): this
-- migration then finds them and takes no lock. Run as it is, it blocks writes to
-- webhook_events while it builds them (the acceptor spools meanwhile; workers retry).
CREATE INDEX IF NOT EXISTS webhook_events_contact_received
    ON webhook_events (lower(contact_email), received_at, id) WHERE contact_email IS NOT NULL;
CREATE INDEX IF NOT EXISTS webhook_events_resource_received
    ON webhook_events (resource_id, received_at, id) WHERE resource_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS webhook_events_provider_received
    ON webhook_events (provider, received_at, id);

DROP INDEX IF EXISTS webhook_events_contact_email;
DROP INDEX IF EXISTS webhook_events_resource;
