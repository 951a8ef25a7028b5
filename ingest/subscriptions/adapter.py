"""What the built-in API adapters share, and a plugin's adapter may reuse: building the
client from the settings, and the topics a provider's kind table wants.

A provider offers its subscriptions API through the optional capability
:class:`ingest.providers.base.SubscriptionSource`: ``provider.subscriptions(settings, redis)``
returns an object satisfying :class:`ingest.subscriptions.model.SubscriptionAPI`, or None when
the deployment configured no API access for it. Subclassing :class:`ApiAdapter` gives the
settings (``<PREFIX>_API_URL``, a static token or an OAuth grant, ``<PREFIX>_SUBSCRIPTION_EVENTS``),
the HTTP client (ingest.subscriptions.http) and the token source (ingest.subscriptions.tokens);
the subclass writes ``list``, ``create``, ``update``, ``delete`` and ``covers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from redis import Redis

from ingest.config import Settings
from ingest.subscriptions.access import ApiAccess, ApiDefaults, api_access, select_topics
from ingest.subscriptions.http import ApiClient, TokenSource
from ingest.subscriptions.tokens import OAuthTokens, StaticToken

__all__ = ["ApiAdapter", "unwrap"]


def unwrap(doc: Any) -> Any:
    """A resource from an answer that may wrap it in ``data`` or not."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), (dict, list)):
        return doc["data"]
    return doc


class ApiAdapter:
    """Base of a provider's subscriptions adapter (see the module docstring)."""

    provider: ClassVar[str]
    defaults: ClassVar[ApiDefaults]
    media_type: ClassVar[str] = "application/json"
    updates_secret: ClassVar[bool] = False
    updates_url: ClassVar[bool] = False

    def __init__(self, client: ApiClient, access: ApiAccess) -> None:
        self.client = client
        self.access = access

    @classmethod
    def from_settings(cls, settings: Settings, redis: Redis | None) -> ApiAdapter | None:
        """The adapter for this deployment's settings, or None without API access."""
        access = api_access(settings, cls.provider, cls.defaults)
        if access is None:
            return None
        auth: TokenSource
        if access.token is not None:
            auth = StaticToken(access.token)
        else:
            assert access.oauth is not None
            auth = OAuthTokens(cls.provider, access.oauth, redis, settings.names,
                               cls.defaults.prefix)
        client = ApiClient(cls.provider, access.api_url, auth, media_type=cls.media_type,
                           redact=[*settings.secrets_for(cls.provider), *access.credentials()])
        return cls(client, access)

    def topics(self, kinds: Mapping[str, str]) -> list[str]:
        """One topic per event name the kind table maps, as ``<P>_SUBSCRIPTION_EVENTS``
        selects them."""
        return select_topics(sorted(kinds), self.access.events)

    def covers(self, remote_topic: str, topic: str) -> bool:
        return remote_topic == topic

    def close(self) -> None:
        """Close the API client's kept connections."""
        self.client.close()
