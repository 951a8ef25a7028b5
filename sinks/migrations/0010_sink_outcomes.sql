-- What each sink did with each event: one row per (event, sink) once the sink's delivery of it
-- reached a state; "pending" is the absence of a row for a sink that takes the event. Written
-- by the workers (sinks.outcomes), read by the console.
--
-- No foreign key to webhook_events: a CRM may take an event before the Postgres sink stores
-- it, or Postgres may not be a sink at all. Retention and `ingest erase` remove the rows with
-- their events (sinks.postgres_data). The Postgres sink's own "delivered" is not written here:
-- it is webhook_events.stored_at (docs/sinks.md, "Outcomes").
CREATE TABLE IF NOT EXISTS webhook_sink_outcomes (
    event_id        uuid        NOT NULL,
    sink            text        NOT NULL,
    state           text        NOT NULL
        CHECK (state IN ('delivered', 'stale', 'retrying', 'dead')),
    attempts        integer     NOT NULL DEFAULT 1,
    at              timestamptz NOT NULL,  -- when the state was reached
    next_attempt_at timestamptz,           -- retrying: when RQ runs the job again
    reason          text,                  -- retrying, dead: one redacted line
    PRIMARY KEY (event_id, sink)
);
-- Retention removes rows by when their state was reached, a batch at a time.
CREATE INDEX IF NOT EXISTS webhook_sink_outcomes_at ON webhook_sink_outcomes (at);
