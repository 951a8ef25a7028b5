"""The one event vocabulary, and how each provider's own event names map onto it.

A ``kind`` is ``<subject>.<what happened>``. The vocabulary below is what sinks filter on
(``SLACK_EVENTS=email.replied,meeting.*``). Anything a table does not map becomes ``unknown``:
it is still stored and delivered, and counted per provider and event type
(``ingest_unknown_events_total``) so a new event name from a provider shows up on a dashboard.

Tables are plain data on purpose: adding an event is adding a line. A key ending in ``.*``
matches any action of that resource; a value ending in ``.*`` keeps the provider's action
(``call.*`` -> ``call.*`` turns ``call.completed`` into ``call.completed``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["KIND_TABLES", "UNKNOWN", "VOCABULARY", "is_known_kind", "lookup"]

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

KIND_TABLES: dict[str, dict[str, str]] = {
    # Outreach: meta.eventName, "<resource>.<action>" in camelCase.
    "outreach": {
        "prospect.created": "contact.created",
        "prospect.updated": "contact.updated",
        "prospect.destroyed": "contact.deleted",
        "mailing.created": "mailing.created",
        "mailing.updated": "mailing.updated",
        "mailing.destroyed": "mailing.deleted",
        "mailing.delivered": "email.delivered",
        "mailing.opened": "email.opened",
        "mailing.replied": "email.replied",
        "mailing.bounced": "email.bounced",
        "sequenceState.created": "campaign.added",
        "sequenceState.updated": "campaign.updated",
        "sequenceState.destroyed": "campaign.removed",
        "sequenceState.advanced": "campaign.advanced",
        "sequenceState.finished": "campaign.finished",
        "sequence.created": "sequence.created",
        "sequence.updated": "sequence.updated",
        "sequence.destroyed": "sequence.deleted",
        "call.created": "call.created",
        "call.updated": "call.updated",
        "call.destroyed": "call.deleted",
        "task.created": "task.created",
        "task.updated": "task.updated",
        "task.destroyed": "task.deleted",
        "task.completed": "task.completed",
        "account.created": "account.created",
        "account.updated": "account.updated",
        "account.destroyed": "account.deleted",
        "opportunity.created": "opportunity.created",
        "opportunity.updated": "opportunity.updated",
        "opportunity.destroyed": "opportunity.deleted",
        "opportunityProspectRole.created": "opportunity_prospect_role.created",
        "opportunityProspectRole.updated": "opportunity_prospect_role.updated",
        "opportunityProspectRole.destroyed": "opportunity_prospect_role.deleted",
        "emailAddress.created": "email_address.created",
        "emailAddress.updated": "email_address.updated",
        "emailAddress.destroyed": "email_address.deleted",
        "import.created": "import.created",
        "import.finished": "import.finished",
        "kaiaRecording.created": "recording.created",
        "user.created": "user.created",
        "user.updated": "user.updated",
    },
    # Salesloft: the x-salesloft-event header, snake_case.
    "salesloft": {
        "person_created": "contact.created",
        "person_updated": "contact.updated",
        "person_deleted": "contact.deleted",
        "cadence_membership_created": "campaign.added",
        "cadence_membership_updated": "campaign.updated",
        "cadence_created": "cadence.created",
        "cadence_updated": "cadence.updated",
        "cadence_deleted": "cadence.deleted",
        "email_updated": "email.updated",
        "email_with_body_and_subject_updated": "email.updated",
        "link_swap": "email.link_swapped",
        "meeting_booked": "meeting.booked",
        "meeting_updated": "meeting.updated",
        "call_created": "call.created",
        "call_updated": "call.updated",
        "call_data_record_created": "call.recorded",
        "call_data_record_updated": "call.record_updated",
        "conversation_created": "conversation.created",
        "conversation_recording_created": "conversation.recording_created",
        "conversation_transcript_created": "conversation.transcript_created",
        "task_created": "task.created",
        "task_updated": "task.updated",
        "task_completed": "task.completed",
        "task_deleted": "task.deleted",
        "account_created": "account.created",
        "account_updated": "account.updated",
        "account_deleted": "account.deleted",
        "note_created": "note.created",
        "note_updated": "note.updated",
        "note_deleted": "note.deleted",
        "step_created": "step.created",
        "step_updated": "step.updated",
        "step_deleted": "step.deleted",
        "user_created": "user.created",
        "user_updated": "user.updated",
        "success_created": "success.created",
        "bulk_job_completed": "bulk_job.completed",
    },
    # OutCallerAI: "event", "<resource>.<action>"; call and task actions are open-ended statuses.
    "outcaller": {
        "lead.created": "contact.created",
        "lead.updated": "contact.updated",
        "lead.deleted": "contact.deleted",
        "lead.bulk_deleted": "contact.deleted",
        "call.*": "call.*",
        "task.*": "task.*",
        "agent.created": "user.created",
        "agent.updated": "user.updated",
        "agent.deleted": "user.deleted",
    },
    # Outboundry: "event", kebab-case.
    "outboundry": {
        "invite-sent": "linkedin.invite_sent",
        "invite-accepted": "linkedin.invite_accepted",
        "message-sent": "linkedin.message_sent",
        "message-replied": "linkedin.message_replied",
        "inmail-sent": "linkedin.inmail_sent",
        "inmail-replied": "linkedin.inmail_replied",
        "email-sent": "email.sent",
        "email-opened": "email.opened",
        "email-clicked": "email.clicked",
        "email-replied": "email.replied",
    },
    # Mailstand: "type".
    "mailstand": {
        "send": "email.sent",
        "reply": "email.replied",
        "bounce": "email.bounced",
        "open": "email.opened",
        "click": "email.clicked",
        "unsubscribe": "email.unsubscribed",
        "pause": "campaign.paused",
        "resume": "campaign.resumed",
        "stage_change": "contact.stage_changed",
        "added_to_campaign": "campaign.added",
        "removed_from_campaign": "campaign.removed",
        "delete": "contact.deleted",
    },
}


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
