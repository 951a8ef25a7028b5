"""The one event vocabulary, and how a provider's own event names are looked up in it.

A ``kind`` is ``<subject>.<what happened>``. The vocabulary below is what sinks filter on
(``SLACK_EVENTS=email.replied,meeting.*``). Anything a table does not map becomes ``unknown``:
it is still stored and delivered, and counted per provider and event type
(``ingest_unknown_events_total``) so a new event name from a provider shows up on a dashboard.

Each provider module holds its own table (``kinds``, a class attribute: built-ins and plugins
alike). Tables are plain data on purpose: adding an event is adding a line. A key ending in ``.*``
matches any action of that resource; a value ending in ``.*`` keeps the provider's action
(``call.*`` -> ``call.*`` turns ``call.completed`` into ``call.completed``).

Every kind is also **state** or **activity**:

- *state*: the event is a new version of its record (``contact.updated``, ``task.completed``,
  a sequence membership paused, any delete). Of two state events about one record, the older
  one is stale once the newer one was processed, and only the newest lands in
  ``webhook_records``.
- *activity*: the event is a fact of its own (``email.opened``, ``email.replied``,
  ``call.completed``, ``meeting.booked``, a note). It is never stale, never moves its record's
  mark, and leaves ``webhook_records`` alone: a CRM timeline needs every open, not the newest.

:func:`kind_class` decides for the vocabulary; a provider whose event the vocabulary cannot
judge (Mailstand reports a campaign pause against the contact, not against a membership) says
so in its ``kind_classes`` table, by its own event type. An event nobody classified is treated
as activity: delivered always, never skipped, and kept out of ``webhook_records``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ACTIVITY",
    "STATE",
    "UNKNOWN",
    "VOCABULARY",
    "VOCABULARY_CLASSES",
    "is_activity",
    "is_known_kind",
    "kind_class",
    "lookup",
]

UNKNOWN = "unknown"
STATE = "state"
ACTIVITY = "activity"

# The closed part of the vocabulary, each kind with its class. Kinds outside it follow
# "<resource>.<action>" (account, opportunity, user, note, ...) and are accepted by
# is_known_kind; kind_class judges them by subject and action below.
VOCABULARY_CLASSES: Mapping[str, str] = {
    "email.sent": ACTIVITY, "email.delivered": ACTIVITY, "email.opened": ACTIVITY,
    "email.clicked": ACTIVITY, "email.replied": ACTIVITY, "email.bounced": ACTIVITY,
    "email.unsubscribed": ACTIVITY,
    "email.updated": STATE,  # the email record itself (Salesloft: status, counts)
    "linkedin.invite_sent": ACTIVITY, "linkedin.invite_accepted": ACTIVITY,
    "linkedin.message_sent": ACTIVITY, "linkedin.message_replied": ACTIVITY,
    "linkedin.inmail_sent": ACTIVITY, "linkedin.inmail_replied": ACTIVITY,
    "contact.created": STATE, "contact.updated": STATE, "contact.deleted": STATE,
    "contact.stage_changed": STATE,
    # A membership (Outreach sequenceState, Salesloft cadence_membership) and its status.
    "campaign.added": STATE, "campaign.removed": STATE, "campaign.paused": STATE,
    "campaign.resumed": STATE, "campaign.finished": STATE, "campaign.updated": STATE,
    "meeting.booked": ACTIVITY, "meeting.updated": STATE,
    # Nobody knows what it is: deliver it always, never let it replace a record's state.
    UNKNOWN: ACTIVITY,
}
VOCABULARY = frozenset(VOCABULARY_CLASSES.keys() - {UNKNOWN})

# Open kinds: subjects whose events are things that happened (a call, a note, a recording),
# except for the actions that change such a record in place (STATE_ACTIONS' updated, deleted).
ACTIVITY_SUBJECTS = frozenset(
    {"email", "linkedin", "call", "conversation", "note", "recording", "success", "meeting"})
# Actions that give a record a new version, whatever its subject.
STATE_ACTIONS = frozenset(
    {"created", "updated", "deleted", "completed", "finished", "advanced", "stage_changed"})
_CHANGE_ACTIONS = frozenset({"updated", "deleted"})


def lookup(table: Mapping[str, str], event_type: str) -> str:
    """The kind of ``event_type`` in ``table``, or ``unknown``."""
    kind = table.get(event_type)
    if kind is not None:
        return kind
    resource, dot, action = event_type.partition(".")
    if dot and action:
        wildcard = table.get(f"{resource}.*")
        if wildcard is not None:
            return wildcard[:-1] + action if wildcard.endswith(".*") else wildcard
    return UNKNOWN


def kind_class(kind: str) -> str | None:
    """``state`` or ``activity`` for a kind the vocabulary can judge, else None."""
    known = VOCABULARY_CLASSES.get(kind)
    if known is not None:
        return known
    subject, dot, action = kind.partition(".")
    if not dot:
        return None
    changes = action in _CHANGE_ACTIONS or action.endswith("_updated")
    if subject in ACTIVITY_SUBJECTS:
        return STATE if changes else ACTIVITY
    return STATE if changes or action in STATE_ACTIONS else None


def is_activity(kind: str, event_type: str = "",
                overrides: Mapping[str, str] | None = None) -> bool:
    """True when an event of this kind (the provider's ``event_type``, with its table of
    ``kind_classes``, keyed like ``kinds``: ``task.*`` for every task event) is activity; an
    event nobody classified counts as activity."""
    chosen = None
    if overrides:
        chosen = overrides.get(event_type)
        if chosen is None:
            resource, dot, _ = event_type.partition(".")
            chosen = overrides.get(f"{resource}.*") if dot else None
    return (chosen or kind_class(kind) or ACTIVITY) == ACTIVITY


def is_known_kind(kind: str) -> bool:
    """True for vocabulary kinds and well-formed ``<resource>.<action>`` kinds."""
    if kind in VOCABULARY:
        return True
    subject, dot, action = kind.partition(".")
    return bool(dot) and subject.replace("_", "").isalpha() and action.replace("_", "").isalpha()
