"""Realistic, correctly signed sample deliveries, from every loaded provider that builds them.

Each provider module holds its own builder (``sample()``, see
:class:`ingest.providers.base.SampleSource`): built-ins and plugins alike. Used by
``ingest send`` (and so by ``ingest dev``'s sample command and bench/).
"""

from __future__ import annotations

import random

from ingest.providers import load_providers
from ingest.providers.base import Sample, SampleSource

__all__ = ["Sample", "build_sample", "sample_sources"]


def sample_sources() -> dict[str, SampleSource]:
    """The loaded providers that build samples, by name."""
    return {name: provider for name, provider in load_providers().items()
            if isinstance(provider, SampleSource)}


def build_sample(provider: str, secret: str, rng: random.Random | None = None) -> Sample:
    sources = sample_sources()
    try:
        source = sources[provider]
    except KeyError:
        raise ValueError(f"no sample payloads for provider {provider!r} "
                         f"(have: {', '.join(sorted(sources))})") from None
    return source.sample(rng or random.Random(), secret)
