"""The Slack sink: a readable Block Kit message per event, posted to an incoming webhook.

A message says who (the contact's name and email), what (the kind, and the provider's own
event name), the campaign, and links to the record where the payload has a link. By default
only replies and booked meetings are posted (``SLACK_EVENTS`` changes that).

Slack allows about one message per second per webhook, and every worker posts to the same
one, so messages go through a paced outbox in Redis (:mod:`sinks.outbox`): all workers
together post at most one message per ``SLACK_MIN_INTERVAL`` to one webhook (counted from
Slack's answer to the previous one), and when more than a few events wait, the next message is
one digest of them instead of a flood. A job that finds the slot busy while more Slack jobs
are queued behind it leaves its events parked and steps aside (a transient error, retried in
a few seconds), so even one worker turns a backlog into a digest rather than blocking on it.
A 429 is honoured for every worker: a short ``Retry-After`` is waited out inside the job, a
long one ends the attempt with a transient error whose retry is scheduled after it.

``invalid_payload``, ``no_service`` and other 4xx answers (and 3xx: redirects are never
followed) are permanent: the events of that message land in the failed registry with
Slack's answer as the reason; a refused digest is first re-sent event by event, so only the
event at fault fails. The webhook URL is a secret: no log line or error shows it.

Settings (``SLACK_*`` or ``[sinks.slack]``): ``WEBHOOK_URL`` (required), ``EVENTS``,
``TIMEOUT``. The outbox needs ``REDIS_URL`` (workers always have it).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from redis import Redis

from ingest import constants, safejson
from ingest.config import Settings
from ingest.constants import Names
from ingest.events import Event
from ingest.exceptions import PermanentSinkError, TransientSinkError
from ingest.redaction import reason
from sinks._http import ProcessClient, check_url, parse_retry_after, parse_timeout, short_body
from sinks.outbox import Outbox, erase_waiting

if TYPE_CHECKING:
    from ingest.subjects import Erasure

__all__ = ["SlackSink", "render_digest", "render_event"]

# Least seconds between two messages to one incoming webhook, shared by all workers.
SLACK_MIN_INTERVAL = 1.0
# When more events than this wait for one webhook, the next message is a digest of them.
SLACK_DIGEST_AFTER = 3
# Most events one digest message lists (Block Kit allows 50 blocks of 3000 chars).
SLACK_DIGEST_MAX = 100
# Seconds a deliver job waits for its events to be posted (slots, short Retry-After) before it
# gives up this attempt with a transient error, to be retried by RQ.
SLACK_MAX_WAIT = 30.0
# A 429 Retry-After up to this many seconds is waited out inside the job.
SLACK_SHORT_RETRY_AFTER = 10.0
# How often a waiting job looks again whether its events went out (seconds).
_POLL = 0.25
# Human titles of the kinds people most want to see; others are derived from the kind.
_TITLES = {
    "email.replied": "Email reply",
    "linkedin.message_replied": "LinkedIn reply",
    "linkedin.inmail_replied": "LinkedIn InMail reply",
    "meeting.booked": "Meeting booked",
    "meeting.updated": "Meeting updated",
}
_EMOJI = {"email.replied": ":speech_balloon:", "linkedin.message_replied": ":speech_balloon:",
          "linkedin.inmail_replied": ":speech_balloon:", "meeting.booked": ":calendar:",
          "meeting.updated": ":calendar:"}
# Where payloads keep a human-facing link, best first (searched in data and one level down).
_LINK_KEYS = ("html_url", "permalink", "web_url", "app_url", "url", "meeting_url",
              "recording_url", "profile_url", "link")
# Where payloads keep the text of a reply or the subject of a meeting.
_EXCERPT_PATHS = (("actionData", "message"), ("text",), ("message",), ("snippet",),
                  ("body_text",))
_SUBJECT_PATHS = (("subject",), ("title",), ("attributes", "subject"), ("attributes", "title"))
_CAMPAIGN_PATHS = (("campaign", "name"), ("campaign_name",), ("campaignName",),
                   ("cadence", "name"), ("sequence", "name"))


# -- rendering ------------------------------------------------------------------------------

def _esc(value: object) -> str:
    """Text safe inside Slack mrkdwn (only &, < and > are special)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int, one_line: bool = True) -> str:
    if one_line:
        text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dig(data: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    if isinstance(node, (str, int, float)) and not isinstance(node, bool) and str(node).strip():
        return str(node).strip()
    return None


def _first(data: Mapping[str, Any], paths: Iterable[tuple[str, ...]]) -> str | None:
    for path in paths:
        found = _dig(data, path)
        if found:
            return found
    return None


def find_link(data: Mapping[str, Any]) -> str | None:
    """The first http(s) link a payload offers a human, if any."""
    layers: list[Mapping[str, Any]] = [data]
    layers += [v for v in data.values() if isinstance(v, Mapping)]
    for key in _LINK_KEYS:
        for layer in layers:
            value = layer.get(key)
            if (isinstance(value, str) and value.startswith(("https://", "http://"))
                    and len(value) <= 2000 and not any(c.isspace() for c in value)):
                return value
    return None


def _link(url: str, label: str) -> str:
    safe = url.replace("|", "%7C").replace(">", "%3E").replace("<", "%3C")
    return f"<{safe}|{_esc(label)}>"


def _title(event: Event) -> str:
    if event.kind in _TITLES:
        return _TITLES[event.kind]
    subject, _, action = event.kind.partition(".")
    return f"{subject.replace('_', ' ').capitalize()} {action.replace('_', ' ')}".strip()


def _who(event: Event) -> str | None:
    c = event.contact
    if not c:
        return None
    if c.email and c.name:
        return f"{_esc(c.name)} {_link('mailto:' + c.email, c.email)}"
    if c.email:
        return _link("mailto:" + c.email, c.email)
    return _esc(c.name or c.phone or "")


def _campaign(event: Event) -> str | None:
    name = _first(event.data, _CAMPAIGN_PATHS)
    if name and event.campaign_id and name != event.campaign_id:
        return f"{_esc(_clip(name, 150))} ({_esc(event.campaign_id)})"
    return _esc(_clip(name or event.campaign_id or "", 150)) or None


def _when(value: datetime) -> str:
    # Slack shows <!date^...> in each reader's own time zone; the fallback text is UTC.
    iso = value.isoformat(timespec="seconds")
    return f"<!date^{int(value.timestamp())}^{{date_short_pretty}} {{time}}|{iso}>"


def _provider_label(event: Event) -> str:
    return f"{event.provider.capitalize()} `{_esc(event.event_type)}`"


def render_event(event: Event) -> dict[str, Any]:
    """One event as an incoming-webhook payload: fallback ``text`` plus Block Kit ``blocks``."""
    who = _who(event)
    contact = event.contact
    who_plain = (contact.name or contact.email or contact.phone) if contact else None
    title = _title(event) + (f" from {who_plain}" if who_plain else "")
    header = f"{_EMOJI.get(event.kind, ':bell:')} {title}"
    fields = [
        {"type": "mrkdwn", "text": _clip(f"*Who*\n{who or '_unknown_'}", 2000, one_line=False)},
        {"type": "mrkdwn",
         "text": _clip(f"*What*\n`{_esc(event.kind)}` ({_provider_label(event)})", 2000,
                      one_line=False)},
    ]
    campaign = _campaign(event)
    if campaign:
        fields.append({"type": "mrkdwn", "text": f"*Campaign*\n{campaign}"})
    fields.append({"type": "mrkdwn", "text": f"*When*\n{_when(event.occurred_at)}"})
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(header, 150),
                                    "emoji": True}},
        {"type": "section", "fields": fields},
    ]
    subject = _first(event.data, _SUBJECT_PATHS)
    excerpt = _first(event.data, _EXCERPT_PATHS)
    if subject or excerpt:
        lines = ([f"*{_esc(_clip(subject, 200))}*"] if subject else []) + (
            [">" + _esc(_clip(excerpt, 1500))] if excerpt else [])
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}})
    link = find_link(event.data)
    if link:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Open"}, "url": link,
             "action_id": "open"}]})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"event `{event.id}` · webhook-ingest"}]})
    # The top-level text is mrkdwn (notifications use it): escaped like every mrkdwn field.
    return {"text": _clip(_esc(f"{title} ({event.kind})"), 3000), "blocks": blocks}


def _digest_line(event: Event) -> str:
    parts = [f"*{_esc(_title(event))}*"]
    who = _who(event)
    if who:
        parts.append(who)
    campaign = _campaign(event)
    if campaign:
        parts.append(f"_{campaign}_")
    link = find_link(event.data)
    if link:
        parts.append(_link(link, "open"))
    return _clip("• " + " · ".join(parts), 900)


def render_digest(events: Sequence[Event]) -> dict[str, Any]:
    """Many events as one message: a count per kind, then one line per event."""
    counts = Counter(e.kind for e in events)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                    "text": _clip(f":inbox_tray: {len(events)} new events", 150)}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(_esc(summary), 3000)}]},
    ]
    chunk = ""
    for line in (_digest_line(e) for e in events):
        if chunk and len(chunk) + 1 + len(line) > 2900:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": chunk}})
            chunk = ""
        chunk = f"{chunk}\n{line}" if chunk else line
    if chunk:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": chunk}})
    if len(blocks) > 50:  # Block Kit's limit; SLACK_DIGEST_MAX keeps far below it
        raise ValueError(f"a digest of {len(events)} events needs {len(blocks)} blocks")
    return {"text": _clip(_esc(f"{len(events)} new events: {summary}"), 3000), "blocks": blocks}


# -- the sink -------------------------------------------------------------------------------

class _RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"Slack answered 429; Retry-After {retry_after:g} s")


class SlackSink:
    name: ClassVar[str] = "slack"
    default_events: ClassVar[tuple[str, ...]] = (
        "email.replied", "linkedin.*_replied", "meeting.booked")
    # Nobody needs to read about a change that a newer one already replaced.
    skip_stale_default: ClassVar[bool] = True

    # One deliver job holds at most one digest's worth of events (workers.fanout).
    job_events: ClassVar[int] = SLACK_DIGEST_MAX

    def __init__(self, url: str, redis_url: str, names: Names,
                 done_ttl: int = constants.DEFAULT_DEDUP_TTL,
                 timeout: float = constants.SINK_HTTP_TIMEOUT,
                 interval: float = SLACK_MIN_INTERVAL,
                 max_wait: float = SLACK_MAX_WAIT) -> None:
        self.url = url
        self.redis_url = redis_url
        self.names = names
        self.done_ttl = done_ttl
        self.timeout = timeout
        self.interval = interval
        self.max_wait = max_wait
        # Keys name the webhook by a digest: the URL itself is a secret.
        self.target = hashlib.sha256(url.encode()).hexdigest()[:16]
        self._redis: Redis | None = None
        self._outbox: Outbox | None = None
        self._client = ProcessClient(timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> SlackSink:
        section = settings.section("SLACK")
        url = check_url("SLACK_WEBHOOK_URL", section.get("WEBHOOK_URL"))
        return cls(url, settings.require_redis(), settings.names, done_ttl=settings.dedup_ttl,
                   timeout=parse_timeout(section.get("TIMEOUT"), "SLACK_TIMEOUT"))

    # -- the events waiting in its outboxes, for `ingest erase` -----------------------------

    title: ClassVar[str] = "Slack outbox"
    erases: ClassVar[tuple[str, ...]] = ("slack outbox",)
    # Its data waits to be posted: erased with the queued jobs, before any of it goes out.
    erase_in_flight: ClassVar[bool] = True

    @classmethod
    def for_stored_data(cls, settings: Settings) -> SlackSink:
        """The sink for erasing what waits in its outboxes (every webhook's, enabled or not):
        Redis only; it never posts."""
        return cls("", settings.require_redis(), settings.names)

    def erase(self, erasure: Erasure) -> dict[str, int]:
        """Remove the subject's events waiting in every Slack webhook's outbox."""
        from ingest.redis_conn import worker_redis

        redis = worker_redis(self.redis_url)
        try:
            return {"slack outbox": erase_waiting(redis, self.names.key("slack:*:"),
                                                  erasure.subject, erasure.dry_run)}
        finally:
            redis.close()

    def __repr__(self) -> str:
        return f"<SlackSink webhook #{self.target}>"

    def outbox(self) -> Outbox:
        if self._outbox is None:
            from ingest.redis_conn import worker_redis

            self._redis = worker_redis(self.redis_url)
            self._outbox = Outbox(
                self._redis, self.names.key(f"slack:{self.target}:"), interval=self.interval,
                digest_after=SLACK_DIGEST_AFTER, digest_max=SLACK_DIGEST_MAX,
                done_ttl=self.done_ttl, claim_seconds=2 * self.timeout + 5)
        return self._outbox

    def send(self, events: Sequence[Event]) -> None:
        box = self.outbox()
        ids = [e.id for e in events]
        # An event no serializer can write fails alone; the others are parked without it.
        unwritable: dict[str, str] = {}
        for event in events:
            try:
                safejson.dumps(event.to_job())
            except safejson.Unserializable as exc:
                unwritable[event.id] = f"event {event.id} {exc}"
        box.park([e for e in events if e.id not in unwritable])
        ids = [i for i in ids if i not in unwritable]
        deadline = time.monotonic() + self.max_wait
        while True:
            sent, failed = box.status(ids)
            if len(sent) + len(failed) == len(ids):
                break
            if time.monotonic() >= deadline:
                waiting = len(ids) - len(sent) - len(failed)
                raise TransientSinkError(
                    f"{waiting} of {len(ids)} events still wait for their Slack message after "
                    f"{self.max_wait:g} s", retry_after=box.slot_wait() or None)
            wait = box.try_slot()
            if wait > 0:
                behind = self._backlog()
                if behind:
                    # A burst: more Slack jobs wait behind this one. Blocking this worker until
                    # the next slot would keep their events out of the outbox, so the next
                    # message could carry only ours. Leave ours parked and come back later:
                    # meanwhile the jobs behind park theirs and one digest carries them all.
                    raise TransientSinkError(
                        f"{len(ids) - len(sent) - len(failed)} events parked for the next Slack "
                        f"message; {behind} more Slack jobs are queued, so they go out together",
                        retry_after=wait)
                time.sleep(min(wait, _POLL) + random.uniform(0, 0.02))
                continue
            if not self._post_next(box):
                box.release_slot()  # ours are in flight with another worker: look again soon
                time.sleep(_POLL)
        failed = {**unwritable, **failed}
        if failed:
            first = next(iter(failed.values()))
            raise PermanentSinkError(first, event_ids=list(failed))

    def _backlog(self) -> int:
        """Slack deliver jobs queued behind the running one (all workers share the queue)."""
        from rq import Queue

        assert self._redis is not None
        return int(Queue(self.names.sink_queue(self.name), connection=self._redis).count)

    def _post_next(self, box: Outbox) -> bool:
        """Holding the slot: post one message of what waits. False when nothing waited."""
        claimed = [Event.from_job(d) for d in box.claim()]
        if not claimed:
            return False
        ids = [e.id for e in claimed]
        try:
            payload = render_event(claimed[0]) if len(claimed) == 1 else render_digest(claimed)
        except Exception as exc:
            # The events' own content cannot be rendered: retrying cannot help. Which one?
            # Each goes alone next; one alone fails with the reason. Nothing was posted.
            if len(ids) > 1:
                box.isolate(ids)
            else:
                box.fail(ids, reason(f"cannot render the Slack message: "
                                     f"{type(exc).__name__}: {exc}"))
            box.release_slot()
            return True
        try:
            self._post(payload)
        except _RateLimited as exc:
            box.give_back(ids)
            box.hold(exc.retry_after)  # every worker waits, not only this one
            if exc.retry_after > SLACK_SHORT_RETRY_AFTER:
                raise TransientSinkError(str(exc), retry_after=exc.retry_after) from None
            return True
        except PermanentSinkError as exc:
            if len(ids) > 1:
                box.isolate(ids)  # which event is at fault? Each goes alone next.
            else:
                box.fail(ids, str(exc))
        except BaseException:
            box.give_back(ids)  # transient trouble, a bug, or the job's timeout: post later
            box.hold(self.interval)
            raise
        else:
            box.done(ids)
        # The slot counted from when this request was sent; count it again from its answer,
        # so the next message arrives a full interval after this one however long it took.
        box.hold(self.interval)
        return True

    def _post(self, payload: dict[str, Any]) -> None:
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.TransportError as exc:
            raise TransientSinkError(f"Slack webhook unreachable: {type(exc).__name__}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        answer = short_body(response, limit=100, redact=(self.url,))  # no webhook path
        said = f"Slack answered {status}" + (f" {answer}" if answer else "")
        if status == 429:
            raise _RateLimited(parse_retry_after(response.headers.get("retry-after")) or 1.0)
        if status >= 500 or status == 408:
            raise TransientSinkError(said)
        if 300 <= status < 400:
            raise PermanentSinkError(f"{said}: a redirect, which is not followed; "
                                     "check SLACK_WEBHOOK_URL")
        raise PermanentSinkError(said)

    def close(self) -> None:
        self._client.close()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
            self._outbox = None
