"""Arguments checked against what exists, with the choices listed when one is wrong.

``--provider bogus`` or ``--kind 'emial.*'`` would otherwise select nothing and print zeros,
which reads like "nothing happened" rather than "you mistyped": each check returns the one
line to print (exit status 2), or None when the value is fine.
"""

from __future__ import annotations

import fnmatch

from ingest.kinds import UNKNOWN, VOCABULARY

__all__ = ["known_kinds", "kind_problem", "provider_problem"]


def known_kinds() -> tuple[set[str], set[str]]:
    """(kinds every installed provider's table or the vocabulary names, subjects whose every
    action is kept as the provider sends it: a table's ``call.*`` -> ``call.*``)."""
    from ingest.providers import load_providers

    kinds = set(VOCABULARY) | {UNKNOWN}
    open_subjects: set[str] = set()
    for provider in load_providers().values():
        for kind in getattr(provider, "kinds", {}).values():
            if kind.endswith(".*"):
                open_subjects.add(kind[:-2])
            else:
                kinds.add(kind)
    return kinds, open_subjects


def kind_problem(glob: str) -> str | None:
    """Why ``glob`` (``email.*``, ``meeting.booked``) selects no kind any installed provider
    produces, or None when it selects some."""
    kinds, open_subjects = known_kinds()
    if any(fnmatch.fnmatchcase(kind, glob) for kind in kinds):
        return None
    subject = glob.partition(".")[0]
    if any(fnmatch.fnmatchcase(s, subject) for s in open_subjects):
        return None
    subjects = sorted({k.partition(".")[0] for k in kinds} | open_subjects)
    return (f"no kind matches {glob!r}: kinds are <subject>.<action>, subjects "
            f"{', '.join(subjects)} (see docs/providers.md)")


def provider_problem(name: str) -> str | None:
    """Why ``name`` is no installed provider, or None."""
    from ingest.providers import load_providers

    known = sorted(load_providers())
    return None if name in known else f"no provider {name!r} (have: {', '.join(known)})"
