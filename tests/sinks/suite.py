"""The shared sink suite. Each sink's test module (and the example plugin's) subclasses
:class:`SinkSuite`, as each provider's subclasses tests/providers/suite.py's ProviderSuite.

Against the sink's real target (Postgres, an HTTP receiver, a file), through
:class:`sinks.registry.EnabledSink` as workers call it, it checks what the sink protocol
promises (sinks/base.py): a batch arrives once however often it is sent; a target that cannot
be reached is a transient error; an event the target refuses fails alone and permanently,
naming itself (RefusingTargetSuite, for a target that can refuse); raw deliveries reach a
sink that asks for them; close is safe; and, where the sink offers them, erase (one subject's data, a dry run changing nothing: ErasingSinkSuite) and
expire (ExpiringSinkSuite). A meta-test (tests/sinks/test_registry.py) fails when a
registered sink has no suite, or its suite leaves out a capability the sink offers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest

from ingest.events import Delivery, Event
from ingest.exceptions import PermanentSinkError, TransientSinkError
from ingest.providers import load_providers
from ingest.subjects import EmailSubject, Erasure
from sinks.base import ErasingSink, ExpiringSink, Sink
from sinks.registry import EnabledSink
from tests.sinks.conftest import outboundry_delivery


def sample_batch(n: int = 3) -> tuple[list[Event], dict[str, Delivery]]:
    """``n`` reply events, each from a delivery of its own, each about another person."""
    envelopes = [outboundry_delivery(name=f"Person{i} Suite") for i in range(n)]
    deliveries = {e["id"]: Delivery.from_dict(e) for e in envelopes}
    provider = load_providers()["outboundry"]
    return [ev for d in deliveries.values() for ev in provider.events(d)], deliveries


class SinkSuite:
    # The sink's registered name (its entry point).
    sink: ClassVar[str]

    # -- what each sink's module supplies --------------------------------------------------

    @pytest.fixture
    def target(self) -> Any:
        """The sink's real target, whatever the hooks below need to reach it."""
        raise NotImplementedError

    def make(self, target: Any) -> Sink:
        """The sink, built against ``target``."""
        raise NotImplementedError

    def delivered(self, target: Any, events: Sequence[Event]) -> list[str]:
        """The ids of ``events`` the target holds, once per copy it received."""
        raise NotImplementedError

    def unreachable(self, target: Any) -> Sink:
        """The sink, built against a target that cannot be reached."""
        raise NotImplementedError

    def raw_delivered(self, target: Any) -> set[str]:
        """Delivery ids the target holds (a sink with ``needs_raw``)."""
        raise NotImplementedError

    def store(self, sink: Sink, events: Sequence[Event],
              deliveries: Mapping[str, Delivery]) -> None:
        """Put ``events`` where the sink keeps data it erases or expires (default: send)."""
        EnabledSink(sink, ("*",)).send(events, deliveries)

    def held(self, target: Any, events: Sequence[Event]) -> set[str]:
        """The ids of ``events`` the sink still keeps (default: what the target holds)."""
        return set(self.delivered(target, events))

    # -- the contract ----------------------------------------------------------------------

    def _enabled(self, target: Any) -> EnabledSink:
        return EnabledSink(self.make(target), ("*",))

    def test_a_batch_sent_twice_arrives_once(self, target: Any) -> None:
        events, deliveries = sample_batch()
        enabled = self._enabled(target)
        try:
            enabled.send(events, deliveries)
            enabled.send(events, deliveries)
        finally:
            enabled.close()
        assert sorted(self.delivered(target, events)) == sorted(e.id for e in events)

    def test_a_target_that_cannot_be_reached_is_a_transient_error(self, target: Any) -> None:
        events, deliveries = sample_batch(1)
        enabled = EnabledSink(self.unreachable(target), ("*",))
        try:
            with pytest.raises(TransientSinkError):
                enabled.send(events, deliveries)
        finally:
            enabled.close()

    def test_raw_deliveries_reach_only_a_sink_that_asks_for_them(self, target: Any) -> None:
        events, deliveries = sample_batch(2)
        enabled = self._enabled(target)
        try:
            assert enabled.deliveries_for(events, deliveries) == (
                deliveries if enabled.needs_raw else None)
            enabled.send(events, deliveries)
        finally:
            enabled.close()
        if enabled.needs_raw:
            assert self.raw_delivered(target) >= set(deliveries)

    def test_close_is_safe_twice_and_a_new_sink_works_after_it(self, target: Any) -> None:
        events, deliveries = sample_batch(1)
        enabled = self._enabled(target)
        enabled.send(events, deliveries)
        enabled.close()
        enabled.close()
        again = self._enabled(target)
        try:
            again.send(events, deliveries)
        finally:
            again.close()
        assert self.delivered(target, events) == [events[0].id]


class RefusingTargetSuite(SinkSuite):
    """The suite of a sink whose target can refuse an event for good (a database's
    constraint, a receiver's 4xx): every built-in's. A target that takes whatever it is given
    (the example plugin's file) has nothing to refuse and leaves it out."""

    def refuse(self, target: Any, event: Event) -> Event:
        """Make the target refuse ``event`` for good; the event to send (it may need to be
        made refusable)."""
        raise NotImplementedError

    def test_an_event_the_target_refuses_fails_alone_and_permanently(self, target: Any) -> None:
        events, deliveries = sample_batch()
        bad = self.refuse(target, events[1])
        events[1] = bad
        enabled = self._enabled(target)
        try:
            with pytest.raises(PermanentSinkError) as info:
                enabled.send(events, deliveries)
        finally:
            enabled.close()
        assert info.value.event_ids == [bad.id]
        assert sorted(self.delivered(target, events)) == sorted(
            e.id for e in events if e.id != bad.id)


class ErasingSinkSuite(SinkSuite):
    """The suite of a sink that keeps data about people (``erase``, sinks/base.py ErasingSink):
    a sink's suite subclasses it exactly when the sink offers erase (tests/sinks/test_registry.py
    checks), so no capability goes untested and none is skipped."""

    def test_erase_removes_one_subjects_data_and_a_dry_run_nothing(self, target: Any) -> None:
        sink = self.make(target)
        assert isinstance(sink, ErasingSink), f"the {self.sink} sink offers no erase()"
        enabled = EnabledSink(sink, ("*",))
        events, deliveries = sample_batch()
        try:
            self.store(sink, events, deliveries)
            theirs = events[1]
            assert theirs.contact is not None and theirs.contact.email
            subject = EmailSubject(theirs.contact.email)
            dry = enabled.erase(Erasure(subject, dry_run=True))
            assert set(dry) <= set(enabled.erases) and sum(dry.values()) >= 1
            assert self.held(target, events) == {e.id for e in events}
            done = enabled.erase(Erasure(subject, places=enabled.erases))
            assert done == dry
        finally:
            enabled.close()
        assert self.held(target, events) == {e.id for e in events} - {theirs.id}


class ExpiringSinkSuite(SinkSuite):
    """The suite of a sink whose stored data expires (``expire``, sinks/base.py ExpiringSink),
    subclassed exactly when the sink offers it."""

    def test_expire_removes_what_is_older_than_its_retention(self, target: Any) -> None:
        sink = self.make(target)
        assert isinstance(sink, ExpiringSink), f"the {self.sink} sink offers no expire()"
        enabled = EnabledSink(sink, ("*",))
        events, deliveries = sample_batch()
        past = datetime.now(timezone.utc) - timedelta(days=1)
        future = datetime.now(timezone.utc) + timedelta(days=1)
        kinds = set(enabled.expires.values())
        try:
            self.store(sink, events, deliveries)
            assert not any(n for _, n in enabled.expire(dict.fromkeys(kinds, past)))
            assert self.held(target, events) == {e.id for e in events}
            dry = dict(enabled.expire(dict.fromkeys(kinds, future), dry_run=True))
            assert set(dry) == set(enabled.expires) and all(dry.values())
            assert self.held(target, events) == {e.id for e in events}
            removed: dict[str, int] = {}
            for place, rows in enabled.expire(dict.fromkeys(kinds, future), batch=2):
                removed[place] = removed.get(place, 0) + rows
            assert removed == dry
        finally:
            enabled.close()
        assert self.held(target, events) == set()
