"""Salesloft's webhook subscriptions API (``/v2/webhook_subscriptions``).

One subscription per event type (``person_updated``); no wildcards. A subscription, as the
API shows it (fields from Salesloft's API reference, as connector projects read them; no
captured answer was found)::

    {"user_guid": "51398ccd-...", "tenant_id": 16, "id": 1, "event_type": "person_updated",
     "enabled": true, "callback_url": "https://...", "callback_token": "..."}

The ``callback_token`` is the HMAC-SHA1 key of every delivery's ``x-salesloft-signature``:
the API shows it, so the plan compares it directly. ``PUT`` changes ``enabled`` and
``callback_url``; a new token means a new subscription (created first, then the old one
deleted). Salesloft marks a delivery failed after three retries; ``enabled: false`` is a
subscription it no longer delivers to.

Answers are read whether the API wraps them in ``data`` or not, and a list either as a plain
array or as ``{"data": [...], "metadata": {"paging": {"next_page": N}}}`` (the paging of
Salesloft's other v2 lists), followed with ``page`` and ``per_page``. Rate limits answer 429
(``Retry-After``, ``x-ratelimit-*``). Salesloft publishes no scope of its own for these
endpoints in the scope list we read; an OAuth app or API key needs read scope on each
resource whose events it subscribes to (``people:read`` for ``person_*``, ...), and
``email_with_body_and_subject_updated`` the privileged ``email_contents:read``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ingest.subscriptions.access import ApiDefaults
from ingest.subscriptions.adapter import ApiAdapter, unwrap
from ingest.subscriptions.model import ApiError, Remote

__all__ = ["SalesloftSubscriptions"]

_PATH = "/v2/webhook_subscriptions"
PAGE_SIZE = 100
MAX_PAGES = 100


class SalesloftSubscriptions(ApiAdapter):
    provider: ClassVar[str] = "salesloft"
    defaults: ClassVar[ApiDefaults] = ApiDefaults(
        prefix="SALESLOFT", api_url="https://api.salesloft.com",
        token_url="https://accounts.salesloft.com/oauth/token", static_setting="API_KEY")
    updates_secret: ClassVar[bool] = False
    updates_url: ClassVar[bool] = True

    @staticmethod
    def _remote(item: Any) -> Remote:
        if not isinstance(item, dict) or item.get("id") is None:
            raise ApiError("Salesloft's API answered a webhook subscription without an id")
        token = item.get("callback_token")
        return Remote(id=str(item["id"]), topic=str(item.get("event_type") or ""),
                      url=str(item.get("callback_url") or ""),
                      active=item.get("enabled") is not False,
                      secret=token if isinstance(token, str) and token else None)

    def list(self) -> list[Remote]:
        out: list[Remote] = []
        target = f"{_PATH}?per_page={PAGE_SIZE}"
        for _ in range(MAX_PAGES):
            doc = self.client.call("GET", target)
            items = unwrap(doc)
            if not isinstance(items, list):
                raise ApiError("Salesloft's API answered the list of webhook subscriptions "
                               "without an array")
            out += [self._remote(item) for item in items]
            metadata = doc.get("metadata") if isinstance(doc, dict) else None
            paging = metadata.get("paging") if isinstance(metadata, dict) else None
            following = paging.get("next_page") if isinstance(paging, dict) else None
            if not isinstance(following, int) or following < 1:
                return out
            target = f"{_PATH}?page={following}&per_page={PAGE_SIZE}"
        raise ApiError(f"Salesloft's list of webhook subscriptions has more than {MAX_PAGES} "
                       "pages: not read to the end")

    def create(self, topic: str, url: str, secret: str) -> Remote:
        doc = self.client.call("POST", _PATH, {"event_type": topic, "callback_url": url,
                                               "callback_token": secret})
        return self._remote(unwrap(doc))

    def update(self, remote: Remote, *, url: str, secret: str | None) -> Remote:
        if secret is not None and secret != remote.secret:
            raise ApiError("Salesloft cannot change a subscription's callback token in place")
        doc = self.client.call("PUT", f"{_PATH}/{remote.id}", {"enabled": True,
                                                              "callback_url": url})
        return self._remote(unwrap(doc)) if doc else remote

    def delete(self, remote: Remote) -> None:
        self.client.call("DELETE", f"{_PATH}/{remote.id}")
