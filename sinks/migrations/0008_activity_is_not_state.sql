-- Kinds are state or activity (ingest.kinds). Releases before this one judged every event a
-- new version of its record, so activity (an open, a click, a reply, a call) could be stored
-- as stale and could be a record's "latest state". This migration brings stored rows to the
-- new rule: activity is never stale, and webhook_records holds state events only.
--
-- The function is the vocabulary's rule as this release ships it (kind_class and the built-in
-- providers' kind_classes); it lives in this session only. Plugin providers' own overrides
-- are not known here: `ingest replay` applies them (docs: CHANGELOG, "Upgrading").
CREATE FUNCTION pg_temp.webhook_ingest_is_activity(provider text, event_type text, kind text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        -- The built-in providers' kind_classes, by their own event types.
        WHEN provider = 'mailstand'
         AND event_type IN ('pause', 'resume', 'added_to_campaign', 'removed_from_campaign')
            THEN true
        WHEN provider = 'outcaller' AND event_type LIKE 'task.%' THEN false
        -- The vocabulary.
        WHEN kind IN ('contact.created', 'contact.updated', 'contact.deleted',
                      'contact.stage_changed', 'email.updated', 'meeting.updated',
                      'campaign.added', 'campaign.removed', 'campaign.paused',
                      'campaign.resumed', 'campaign.finished', 'campaign.updated')
            THEN false
        WHEN dot = 0 THEN true  -- unknown, and anything else without an action
        WHEN action IN ('updated', 'deleted') OR action LIKE '%\_updated' THEN false
        WHEN subject IN ('email', 'linkedin', 'call', 'conversation', 'note', 'recording',
                         'success', 'meeting') THEN true
        WHEN action IN ('created', 'completed', 'finished', 'advanced', 'stage_changed')
            THEN false
        ELSE true  -- nobody classified it
    END
    FROM (SELECT strpos(kind, '.') AS dot,
                 split_part(kind, '.', 1) AS subject,
                 substr(kind, strpos(kind, '.') + 1) AS action) AS parts
$$;

-- Activity is never stale.
UPDATE webhook_events SET stale = false
WHERE stale AND pg_temp.webhook_ingest_is_activity(provider, event_type, kind);

-- Records whose newest event was activity take their newest state event instead (the
-- delete rule is ingest.events.Event.deletes, as in 0004), or go when they have none.
CREATE TEMPORARY TABLE webhook_ingest_activity_records ON COMMIT DROP AS
SELECT r.provider, r.resource_type, r.resource_id
FROM webhook_records r JOIN webhook_events e ON e.id = r.event_id
WHERE pg_temp.webhook_ingest_is_activity(e.provider, e.event_type, e.kind);

DELETE FROM webhook_records r USING webhook_ingest_activity_records a
WHERE r.provider = a.provider AND r.resource_type = a.resource_type
  AND r.resource_id = a.resource_id;

INSERT INTO webhook_records (provider, resource_type, resource_id, occurred_at, kind, event_id,
                             data, deleted)
SELECT DISTINCT ON (e.provider, e.resource_type, e.resource_id)
       e.provider, e.resource_type, e.resource_id, e.occurred_at, e.kind, e.id, e.data,
       e.kind LIKE '%.deleted' OR coalesce(e.action, '') IN ('deleted', 'destroyed', 'bulk_deleted')
FROM webhook_events e
JOIN webhook_ingest_activity_records a
  ON e.provider = a.provider AND e.resource_type = a.resource_type
 AND e.resource_id = a.resource_id
WHERE NOT pg_temp.webhook_ingest_is_activity(e.provider, e.event_type, e.kind)
ORDER BY e.provider, e.resource_type, e.resource_id, e.occurred_at DESC, e.id DESC;

DROP FUNCTION pg_temp.webhook_ingest_is_activity(text, text, text);
