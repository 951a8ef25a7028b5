-- The raw archive: one row per accepted delivery that produced a new event.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id          uuid PRIMARY KEY,
    provider    text        NOT NULL,
    received_at timestamptz NOT NULL,
    headers     jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- credentials removed
    body        bytea       NOT NULL                       -- the exact bytes received
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_provider_received
    ON webhook_deliveries (provider, received_at);

-- One row per normalized event, exactly once per (provider, dedup_key).
CREATE TABLE IF NOT EXISTS webhook_events (
    id            uuid        PRIMARY KEY,                  -- event id: uuid5(provider, dedup_key)
    provider      text        NOT NULL,
    dedup_key     text        NOT NULL,
    event_type    text        NOT NULL,
    kind          text        NOT NULL,
    resource_type text,
    resource_id   text,
    action        text,
    occurred_at   timestamptz NOT NULL,
    received_at   timestamptz NOT NULL,
    workspace_id  text,
    contact_email text,
    contact_name  text,
    contact_phone text,
    campaign_id   text,
    data          jsonb       NOT NULL,
    previous      jsonb,
    delivery_id   uuid REFERENCES webhook_deliveries (id) DEFERRABLE INITIALLY DEFERRED,
    stored_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_events_provider_dedup_key UNIQUE (provider, dedup_key)
);
CREATE INDEX IF NOT EXISTS webhook_events_kind_occurred ON webhook_events (kind, occurred_at);
CREATE INDEX IF NOT EXISTS webhook_events_received ON webhook_events (received_at);
CREATE INDEX IF NOT EXISTS webhook_events_delivery ON webhook_events (delivery_id);
