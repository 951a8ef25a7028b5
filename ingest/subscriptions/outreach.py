"""Outreach's webhooks API (``/api/v2/webhooks``, JSON:API).

One webhook per resource + action pair (``prospect`` + ``created``); either may be ``*``.
A webhook resource, as the API shows it::

    {"type": "webhook", "id": 31,
     "attributes": {"action": "*", "active": true, "createdAt": "2018-12-06T13:53:44.000Z",
                    "resource": "*", "secret": null, "updatedAt": "...", "url": "https://...",
                    "disabledReason": null, "disabledSince": null, "disabledUntil": null,
                    "payloadVersion": 2},
     "relationships": {...}, "links": {"self": "https://api.outreach.io/api/v2/webhooks/31"}}

(tests/samples/outreach_api: two answers a connector kept as test fixtures; the ``disabled*``
and ``payloadVersion`` attributes are from Outreach's API reference, newer than those
fixtures.) Outreach suspends a webhook for a minute after a DNS failure and an hour after its
host resolved to a private address (``disabledUntil`` in the future, ``active`` still true),
and deactivates one that stayed failing for seven days (``active: false``); any update clears
``disabledReason``/``disabledSince``/``disabledUntil``. So re-enabling is a PATCH with
``active: true``, which also carries the current secret and URL. Whether a list shows a
webhook's ``secret`` is not documented (the fixtures show ``null``): the plan compares it when
shown and otherwise uses the fingerprint of the secret this deployment last pushed.

Lists are paged with ``page[size]`` and followed through ``links.next`` (cursor pages).
Rate limits answer 429 with ``X-RateLimit-*`` headers (``X-RateLimit-Reset``) and, when sent,
``Retry-After``. Scopes: ``webhooks.read`` for ``plan``, ``webhooks.all`` for ``apply``
(Outreach's scopes are not additive: ``webhooks.write`` alone cannot read).
Webhooks are created with ``payloadVersion`` 2, so updates carry ``beforeUpdate`` (the
normalized event's ``previous``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ingest.subscriptions.access import ApiDefaults
from ingest.subscriptions.adapter import ApiAdapter, unwrap
from ingest.subscriptions.model import ApiError, Remote

__all__ = ["OutreachSubscriptions"]

_PATH = "/api/v2/webhooks"
# Webhooks per page asked for, and most pages followed.
PAGE_SIZE = 100
MAX_PAGES = 100
# The payload version webhooks are created with (2 adds beforeUpdate).
PAYLOAD_VERSION = 2


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int, float)) and str(value).strip() else None


class OutreachSubscriptions(ApiAdapter):
    provider: ClassVar[str] = "outreach"
    defaults: ClassVar[ApiDefaults] = ApiDefaults(
        prefix="OUTREACH", api_url="https://api.outreach.io",
        token_url="https://api.outreach.io/oauth/token", static_setting="API_TOKEN",
        redirect_uri=True)
    media_type: ClassVar[str] = "application/vnd.api+json"
    updates_secret: ClassVar[bool] = True
    updates_url: ClassVar[bool] = True

    def topics(self, kinds: Mapping[str, str]) -> list[str]:
        return [t for t in super().topics(kinds) if "." in t.strip(".")]

    def covers(self, remote_topic: str, topic: str) -> bool:
        have_resource, _, have_action = remote_topic.rpartition(".")
        resource, _, action = topic.rpartition(".")
        return have_resource in ("*", resource) and have_action in ("*", action)

    @staticmethod
    def _remote(item: Any) -> Remote:
        if not isinstance(item, dict) or item.get("id") is None:
            raise ApiError("Outreach's API answered a webhook without an id")
        found = item.get("attributes")
        attrs: dict[str, Any] = found if isinstance(found, dict) else {}
        secret = attrs.get("secret")
        return Remote(
            id=str(item["id"]),
            topic=f"{_text(attrs.get('resource')) or '*'}.{_text(attrs.get('action')) or '*'}",
            url=_text(attrs.get("url")) or "",
            active=attrs.get("active") is not False,
            disabled_reason=_text(attrs.get("disabledReason")),
            disabled_since=_text(attrs.get("disabledSince")),
            disabled_until=_text(attrs.get("disabledUntil")),
            secret=secret if isinstance(secret, str) and secret else None)

    def list(self) -> list[Remote]:
        out: list[Remote] = []
        target = f"{_PATH}?page%5Bsize%5D={PAGE_SIZE}"
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = self.client.call("GET", target)
            data = doc.get("data") if isinstance(doc, dict) else None
            if not isinstance(data, list):
                raise ApiError("Outreach's API answered the list of webhooks without a data "
                               "array")
            out += [self._remote(item) for item in data]
            links = doc.get("links") if isinstance(doc.get("links"), dict) else {}
            following = links.get("next")
            if not isinstance(following, str) or not following or following in seen:
                return out
            seen.add(following)
            target = following
        raise ApiError(f"Outreach's list of webhooks has more than {MAX_PAGES} pages of "
                       f"{PAGE_SIZE}: not read to the end")

    def create(self, topic: str, url: str, secret: str) -> Remote:
        resource, _, action = topic.rpartition(".")
        doc = self.client.call("POST", _PATH, {"data": {"type": "webhook", "attributes": {
            "resource": resource, "action": action, "url": url, "secret": secret,
            "payloadVersion": PAYLOAD_VERSION}}})
        return self._remote(unwrap(doc))

    def update(self, remote: Remote, *, url: str, secret: str | None) -> Remote:
        attrs: dict[str, Any] = {"active": True, "url": url}
        if secret is not None:
            attrs["secret"] = secret
        ident: int | str = int(remote.id) if remote.id.isdigit() else remote.id
        doc = self.client.call("PATCH", f"{_PATH}/{remote.id}", {"data": {
            "type": "webhook", "id": ident, "attributes": attrs}})
        return self._remote(unwrap(doc)) if doc else remote

    def delete(self, remote: Remote) -> None:
        self.client.call("DELETE", f"{_PATH}/{remote.id}")
