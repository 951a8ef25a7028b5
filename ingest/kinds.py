"""The one event vocabulary, and how a provider's own event names are looked up in it.

A ``kind`` is ``<subject>.<what happened>``. The vocabulary below is what sinks filter on
(``SLACK_EVENTS=email.replied,meeting.*``). Anything a table does not map becomes ``unknown``:
it is still stored and delivered, and counted per provider and event type
(``ingest_unknown_events_total``) so a new event name from a provider shows up on a dashboard.

Each provider module holds its own table (``kinds``, a class attribute: built-ins and plugins
alike). Tables are plain data on purpose: adding an event is adding a line. A key ending in ``.*``
matches any action of that resource; a value ending in ``.*`` keeps the provider's action
(``call.*`` -> ``call.*`` turns ``call.completed`` into ``call.completed``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["UNKNOWN", "VOCABULARY", "is_known_kind", "lookup"]

UNKNOWN = "unknown"

# The closed part of the vocabulary. Kinds outside it follow "<resource>.<action>" (account,
# opportunity, user, note, ...) and are accepted by is_known_kind.
VOCABULARY = frozenset(
    {
        "email.sent", "email.delivered", "email.opened", "email.clicked", "email.replied",
        "email.bounced", "email.unsubscribed", "email.updated",
        "linkedin.invite_sent", "linkedin.invite_accepted", "linkedin.message_sent",
        "linkedin.message_replied", "linkedin.inmail_sent", "linkedin.inmail_replied",
        "contact.created", "contact.updated", "contact.deleted", "contact.stage_changed",
        "campaign.added", "campaign.removed", "campaign.paused", "campaign.resumed",
        "campaign.finished", "campaign.updated",
        "meeting.booked", "meeting.updated",
    }
)

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


def is_known_kind(kind: str) -> bool:
    """True for vocabulary kinds and well-formed ``<resource>.<action>`` kinds."""
    if kind in VOCABULARY:
        return True
    subject, dot, action = kind.partition(".")
    return bool(dot) and subject.replace("_", "").isalpha() and action.replace("_", "").isalpha()
