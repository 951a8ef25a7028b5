"""How erase recognizes a subject (ingest.subjects), without servers: every JSON
spelling of an address, only whole addresses, and the rewriting of a delivery that holds
several people's events."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from ingest.subjects import (
    EmailSubject,
    ResourceSubject,
    escaped_pattern,
    parse_resource,
    without_subject,
)
from ingest.events import Delivery
from ingest.providers import load_providers

JANE = "Jane.Doe@Example.com"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)

# The same address as raw JSON bodies may spell it.
SPELLINGS = [
    "jane.doe@example.com",
    "JANE.DOE@EXAMPLE.COM",
    r"jane.doe\u0040example.com",
    r"\u004Aane.Doe\u0040Example.com",
    r"\u004aane.doe\u0040example.com",
    r"\u006A\u0061\u006E\u0065\u002E\u0064\u006F\u0065\u0040\u0065\u0078\u0061\u006D\u0070"
    r"\u006C\u0065\u002E\u0063\u006F\u006D",
    r"jane.doe@example\u002Ecom",
]


def body(text: str) -> str:
    """A JSON body holding ``text`` as written (escapes and all) in a string."""
    return '{"person":{"email":"' + text + '","url":"https:\\/\\/x.example\\/p"}}'


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_json_spelling_is_found_in_a_body_a_spool_record_and_an_rq_job(
        spelling: str) -> None:
    subject = EmailSubject(JANE)
    raw = body(spelling)
    assert orjson.loads(raw)["person"]["email"].lower() == JANE.lower()  # what it decodes to
    envelope = {"id": "d", "provider": "p", "headers": {}, "body": raw}
    spool_record = orjson.dumps(envelope).decode()  # the body is JSON inside JSON here
    job = orjson.dumps(["ingest.process_batch", None, [[envelope]], {}]).decode()
    for text in (raw, spool_record, job):
        assert subject.might_be_in(text), text
        assert subject.in_text(text), text
    assert subject.in_envelope(envelope)
    assert subject.in_value(orjson.loads(job))


def test_an_address_with_a_slash_is_found_spelled_with_a_json_slash_escape() -> None:
    subject = EmailSubject("o/neil@example.com")
    assert subject.in_text(body(r"o\/neil@example.com"))
    assert subject.in_text(body(r"O\u002fNeil@Example.com"))
    assert not subject.in_text(body("o.neil@example.com"))


def test_only_the_whole_address_is_the_subject() -> None:
    subject = EmailSubject(JANE)
    for other in ("mary.jane.doe@example.com", "jane.doe@example.community",
                  "jane.doe@example.com.au", "xjane.doe@example.com", "jane.doe@example.co",
                  r"mary.jane.doe\u0040example.com"):
        assert not subject.in_text(body(other)), other
        assert not subject.in_value({"a": [other.replace("\\u0040", "@")]}), other
    for mention in ("<jane.doe@example.com>", "mailto:jane.doe@example.com",
                    "?email=jane.doe@example.com&x=1", "write to jane.doe@example.com.",
                    "'jane.doe@example.com'", "/people/jane.doe@example.com"):
        assert subject.in_value({"text": mention}), mention


def test_escapes_elsewhere_do_not_make_a_text_a_candidate() -> None:
    subject = EmailSubject(JANE)
    text = body(r"bob\u0040example.org") + r'"caf\u00e9 \/ \n"'
    assert not subject.might_be_in(text)
    assert not subject.in_text(text)


def test_free_text_with_an_escaped_address_counts_and_a_deep_body_does_not_crash() -> None:
    subject = EmailSubject(JANE)
    trace = "NormalizationError: {'body': '{\"e\": \"jane.doe\\\\u0040example.com\"}'}"
    assert subject.in_text(trace)
    deep: Any = "jane.doe@example.com"
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    assert subject.in_value(deep)


def test_the_pattern_reads_the_same_in_python_and_names_no_address_in_clear() -> None:
    pattern = escaped_pattern("a.b@c")
    assert "@" not in pattern and "." not in pattern.replace("(?:", "")
    assert re.fullmatch(pattern, r"A\u002eb\\\u0040C", re.IGNORECASE)


def test_a_resource_is_a_cheap_candidate_only_where_its_id_is_spelled() -> None:
    subject = parse_resource("salesloft:person:1042")
    assert subject.might_be_in('{"id":1042}') and subject.might_be_in(r'{"id":"\u0031042"}')
    assert not subject.might_be_in('{"id":1043}')
    with pytest.raises(ValueError) as raised:
        parse_resource("jane@example.com")
    assert "jane" not in str(raised.value)  # the value may be personal data: never echoed
    assert "1042" not in repr(EmailSubject(JANE)) and "jane" not in repr(EmailSubject(JANE))


# -- rewriting one delivery -------------------------------------------------------------------


def person(n: int, email: str, name: str) -> dict[str, Any]:
    return {"id": n, "updated_at": "2026-06-01T10:00:00Z", "email_address": email,
            "display_name": name, "phone": f"+1 415 555 01{n:02d}"}


def salesloft(*people: dict[str, Any], raw: str | None = None) -> dict[str, Any]:
    text = raw or orjson.dumps({"event_type": "person_updated", "data": list(people)}).decode()
    return Delivery(id=str(uuid.uuid4()), provider="salesloft", received_at=NOW,
                    headers={"x-salesloft-event": "person_updated"}, body=text).to_dict()


def events_of(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    provider = load_providers()[envelope["provider"]]
    return [e.to_job() for e in provider.events(Delivery.from_dict(envelope))]


def test_a_salesloft_array_loses_the_subjects_element_and_keeps_the_others_events() -> None:
    jane, bob, carol = (person(1, JANE, "Jane Doe"), person(2, "bob@example.org", "Bob Stone"),
                        person(3, "carol@example.net", "Carol Hart"))
    raw = orjson.dumps({"event_type": "person_updated", "data": [bob, jane, carol]}).decode()
    envelope = salesloft(raw=raw.replace(JANE, r"\u004Aane.Doe\u0040Example.com"))
    before = events_of(envelope)

    new = without_subject(envelope, EmailSubject(JANE), load_providers(), NOW)

    assert new is not None and new is not envelope
    assert new["erased_at"] == "2026-06-01T12:00:00Z" and "erased_at" not in envelope
    assert orjson.loads(new["body"])["data"] == [bob, carol]
    assert "Jane" not in new["body"]
    assert events_of(new) == [before[0], before[2]]  # the same events, ids and all
    assert Delivery.from_dict(new).erased_at == NOW
    # Erasing Bob next keeps the first erasure's time.
    later = without_subject(new, EmailSubject("bob@example.org"), load_providers(),
                            datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert later is not None and later["erased_at"] == new["erased_at"]
    assert events_of(later) == [before[2]]


def test_what_cannot_be_split_goes_whole_and_what_does_not_mention_stays_as_is() -> None:
    subject, providers = EmailSubject(JANE), load_providers()
    only_jane = salesloft(person(1, JANE, "Jane Doe"))
    assert without_subject(only_jane, subject, providers, NOW) is None
    # One element that names two people: that event is Jane's as well, so it goes; Carol stays.
    both = dict(person(2, "bob@example.org", "Bob Stone"), assistant=JANE)
    carol = person(3, "carol@example.net", "Carol Hart")
    new = without_subject(salesloft(both, carol), subject, providers, NOW)
    assert new is not None and orjson.loads(new["body"])["data"] == [carol]
    # Jane in a header: no rewrite of the body can remove her.
    in_header = dict(salesloft(person(2, "bob@example.org", "B"), carol),
                     headers={"x-salesloft-event": "person_updated", "x-by": JANE})
    assert without_subject(in_header, subject, providers, NOW) is None
    # A bare resource is one event: it goes whole.
    bare = salesloft(raw=orjson.dumps(dict(person(1, JANE, "Jane Doe"))).decode())
    assert without_subject(bare, subject, providers, NOW) is None
    # A provider that is not installed: nothing can check a rewrite, it goes whole.
    assert without_subject(dict(salesloft(carol, both), provider="retired"), subject,
                           providers, NOW) is None
    untouched = salesloft(carol, person(4, "mary.jane.doe@example.com", "Mary"))
    assert without_subject(untouched, subject, providers, NOW) is untouched


def test_a_record_is_cut_out_of_an_array_by_its_normalized_event() -> None:
    bob, carol = person(2, "bob@example.org", "Bob"), person(3, "carol@example.net", "Carol")
    envelope = salesloft(bob, carol)
    subject = ResourceSubject("salesloft", "person", "3")
    assert subject.in_envelope(envelope)
    new = without_subject(envelope, subject, load_providers(), NOW)
    assert new is not None and orjson.loads(new["body"])["data"] == [bob]
    assert not subject.in_envelope(new)
    assert without_subject(envelope, ResourceSubject("salesloft", "person", "9"),
                           load_providers(), NOW) is envelope
