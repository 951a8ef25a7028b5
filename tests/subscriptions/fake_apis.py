"""Local fakes of Outreach's and Salesloft's webhook-subscription APIs, for real HTTP tests.

Built from documentation, not from captured bodies, except where tests/samples/SOURCES.md
says otherwise: the Outreach webhook resource follows the two answers a connector kept
(tests/samples/outreach_api/, integer ids, ``"secret": null``, relationships, ``links.self``)
plus the attributes Outreach's API reference adds (``disabledReason``, ``disabledSince``,
``disabledUntil``, ``payloadVersion``); everything else (paging, errors, 429 headers, the token
endpoints, every Salesloft body) is built from the providers' documentation and from how
public connector code reads them, as SOURCES.md lists. Never present these shapes as captured.

Each fake keeps what a real provider keeps (subscriptions, their secrets, tokens), checks what
a real one checks (bearer token, media type, body shape), and records every request it served
(method, path, the token presented) so tests can assert what the client did. ``script`` holds
answers to give before serving normally (a 429 with its headers, a 500).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

JSONAPI = "application/vnd.api+json"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Tokens:
    """OAuth and static credentials of one fake: what its token endpoint issued."""

    client_id: str = "fake-client-id"
    client_secret: str = "fake-client-secret-0123456789"
    refresh_tokens: set[str] = field(default_factory=set)
    access_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (time)
    static: set[str] = field(default_factory=set)
    lifetime: float = 7200.0
    rotate: bool = False  # a refresh revokes the refresh token used (Salesloft)
    grants: int = 0

    def new_refresh_token(self) -> str:
        token = "rt-" + secrets.token_hex(16)
        self.refresh_tokens.add(token)
        return token

    def valid(self, token: str) -> bool:
        return token in self.static or self.access_tokens.get(token, 0) > time.time()

    def expire_all(self) -> None:
        self.access_tokens = {t: 0.0 for t in self.access_tokens}


@dataclass
class _Fake:
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    tokens: _Tokens = field(default_factory=_Tokens)
    answered: dict[int, int] = field(default_factory=dict)  # status -> how many scripted
    echo_credentials: bool = False  # a 401 quotes the token it refused (a hostile API)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _bearer(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def _gate(self, request: Request, path: str) -> Response | None:
        """Record the request; a scripted answer, or 401, or None to serve it."""
        token = self._bearer(request)
        with self.lock:
            self.requests.append((request.method, path, token))
            if self.script:
                status, headers = self.script.pop(0)
                self.answered[status] = self.answered.get(status, 0) + 1
                return self.scripted(status, headers)
            if not self.tokens.valid(token):
                detail = f"token {token} is not valid" if self.echo_credentials else \
                    "the access token is invalid or expired"
                return self.unauthorized(detail)
        return None

    def scripted(self, status: int, headers: dict[str, str]) -> Response:
        return JSONResponse({"error": "scripted"}, status_code=status, headers=headers)

    def unauthorized(self, detail: str) -> Response:
        return JSONResponse({"error": detail}, status_code=401)

    def token_endpoint(self) -> Route:
        async def token(request: Request) -> Response:
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            with self.lock:
                self.requests.append(("POST", "/oauth/token", ""))
                if self.script and self.script[0][0] == 429:
                    status, headers = self.script.pop(0)
                    self.answered[status] = self.answered.get(status, 0) + 1
                    return self.scripted(status, headers)
                t = self.tokens
                if (form.get("client_id") != t.client_id
                        or form.get("client_secret") != t.client_secret):
                    return JSONResponse({"error": "invalid_client"}, status_code=401)
                used = form.get("refresh_token", "")
                if form.get("grant_type") != "refresh_token" or used not in t.refresh_tokens:
                    return JSONResponse({"error": "invalid_grant", "error_description":
                                         "The provided authorization grant is invalid, "
                                         "expired, revoked"}, status_code=400)
                if t.rotate:
                    t.refresh_tokens.discard(used)
                access = "at-" + secrets.token_hex(16)
                t.access_tokens[access] = time.time() + t.lifetime
                t.grants += 1
                refresh = t.new_refresh_token() if t.rotate else used
                return JSONResponse({"access_token": access, "token_type": "bearer",
                                     "expires_in": int(t.lifetime), "refresh_token": refresh,
                                     "scope": "webhooks.all", "created_at": int(time.time())})
        return Route("/oauth/token", token, methods=["POST"])

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(prefix))


@dataclass
class FakeOutreach(_Fake):
    """Outreach's ``/api/v2/webhooks`` and ``/oauth/token``."""

    webhooks: dict[int, dict[str, Any]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    max_page: int = 1000  # Outreach's largest page[size]
    echo_secret: bool = False
    base: str = ""  # set by the server: links are absolute

    def scripted(self, status: int, headers: dict[str, str]) -> Response:
        ident = {429: "rateLimitExceeded", 500: "internalServerError"}.get(status, "error")
        return JSONResponse({"errors": [{"id": ident, "title": "scripted",
                                         "detail": f"scripted {status}"}]},
                            status_code=status, headers=headers, media_type=JSONAPI)

    def unauthorized(self, detail: str) -> Response:
        return JSONResponse({"errors": [{"id": "unauthorized", "title": "Unauthorized",
                                         "detail": detail}]}, status_code=401,
                            media_type=JSONAPI)

    # -- what an operator or Outreach itself does ---------------------------------------------

    def add(self, resource: str, action: str, url: str, secret: str | None = None,
            active: bool = True) -> int:
        """A webhook someone made (the Outreach UI, another tool)."""
        with self.lock:
            wid = next(self.ids)
            self.webhooks[wid] = {"resource": resource, "action": action, "url": url,
                                  "secret": secret, "active": active, "payloadVersion": 1,
                                  "createdAt": _now_iso(), "updatedAt": _now_iso(),
                                  "disabledReason": None, "disabledSince": None,
                                  "disabledUntil": None}
            return wid

    def deactivate(self, wid: int, reason: str, since: str) -> None:
        """What Outreach does to a webhook left failing for seven days."""
        with self.lock:
            self.webhooks[wid].update(active=False, disabledReason=reason, disabledSince=since)

    def find(self, resource: str, action: str) -> list[int]:
        return [i for i, w in self.webhooks.items()
                if w["resource"] == resource and w["action"] == action]

    # -- the API --------------------------------------------------------------------------------

    def _resource(self, wid: int) -> dict[str, Any]:
        w = self.webhooks[wid]
        attrs = {k: w[k] for k in ("action", "active", "createdAt", "disabledReason",
                                   "disabledSince", "disabledUntil", "payloadVersion",
                                   "resource", "updatedAt", "url")}
        attrs["secret"] = w["secret"] if self.echo_secret else None
        user = {"data": {"type": "user", "id": 1}}
        return {"type": "webhook", "id": wid, "attributes": attrs,
                "relationships": {"authorizer": user, "creator": user, "updater": user},
                "links": {"self": f"{self.base}/api/v2/webhooks/{wid}"}}

    def _error(self, status: int, ident: str, detail: str) -> Response:
        return JSONResponse({"errors": [{"id": ident, "title": ident, "detail": detail}]},
                            status_code=status, media_type=JSONAPI)

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        if request.headers.get("content-type", "").split(";")[0] != JSONAPI:
            return self._error(415, "unsupportedMediaType",
                               f"Expected Content-Type header to be '{JSONAPI}'.")
        try:
            doc = await request.json()
            data = doc["data"]
            assert data["type"] == "webhook" and isinstance(data["attributes"], dict)
            return dict(data)
        except Exception:
            return self._error(422, "validationError", "data must be a webhook resource")

    def app(self) -> Starlette:
        async def collection(request: Request) -> Response:
            refused = self._gate(request, "/api/v2/webhooks")
            if refused is not None:
                return refused
            if request.method == "GET":
                size = min(int(request.query_params.get("page[size]", "50")), self.max_page)
                after = int(request.query_params.get("page[after]", "0"))
                with self.lock:
                    ids = sorted(i for i in self.webhooks if i > after)
                    page = ids[:size]
                    body: dict[str, Any] = {"data": [self._resource(i) for i in page],
                                            "meta": {"count": len(self.webhooks)}}
                query = {"page[size]": str(size)}
                body["links"] = {"first": f"{self.base}/api/v2/webhooks?{urlencode(query)}"}
                if len(ids) > size:
                    body["links"]["next"] = (f"{self.base}/api/v2/webhooks?"
                                             f"{urlencode({**query, 'page[after]': page[-1]})}")
                return JSONResponse(body, media_type=JSONAPI)
            data = await self._body(request)
            if isinstance(data, Response):
                return data
            attrs = data["attributes"]
            if not all(isinstance(attrs.get(k), str) and attrs[k]
                       for k in ("resource", "action", "url")):
                return self._error(422, "validationError", "resource, action and url are "
                                                           "required")
            wid = self.add(attrs["resource"], attrs["action"], attrs["url"],
                           attrs.get("secret"))
            with self.lock:
                self.webhooks[wid]["payloadVersion"] = attrs.get("payloadVersion", 1)
                return JSONResponse({"data": self._resource(wid)}, status_code=201,
                                    media_type=JSONAPI)

        async def member(request: Request) -> Response:
            wid = int(request.path_params["wid"])
            refused = self._gate(request, f"/api/v2/webhooks/{wid}")
            if refused is not None:
                return refused
            if wid not in self.webhooks:
                return self._error(404, "resourceNotFound", f"webhook {wid} not found")
            if request.method == "GET":
                return JSONResponse({"data": self._resource(wid)}, media_type=JSONAPI)
            if request.method == "DELETE":
                with self.lock:
                    del self.webhooks[wid]
                return Response(status_code=204)
            data = await self._body(request)
            if isinstance(data, Response):
                return data
            if data.get("id") != wid:
                return self._error(422, "validationError", "data.id must match the URL")
            with self.lock:
                w = self.webhooks[wid]
                for key in ("url", "secret", "active", "resource", "action", "payloadVersion"):
                    if key in data["attributes"]:
                        w[key] = data["attributes"][key]
                # Any update resets the disabled* attributes (Outreach's reference).
                w.update(disabledReason=None, disabledSince=None, disabledUntil=None,
                         updatedAt=_now_iso())
                return JSONResponse({"data": self._resource(wid)}, media_type=JSONAPI)

        return Starlette(routes=[
            Route("/api/v2/webhooks", collection, methods=["GET", "POST"]),
            Route("/api/v2/webhooks/{wid:int}", member, methods=["GET", "PATCH", "DELETE"]),
            self.token_endpoint(),
        ])


@dataclass
class FakeSalesloft(_Fake):
    """Salesloft's ``/v2/webhook_subscriptions`` and ``/oauth/token`` (rotating refresh
    tokens). ``paged``: answer lists in Salesloft's usual v2 envelope, ``per_page`` at most
    ``max_page``, instead of a plain array."""

    subscriptions: dict[int, dict[str, Any]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(101))
    paged: bool = False
    max_page: int = 100

    def __post_init__(self) -> None:
        self.tokens.rotate = True

    def add(self, event_type: str, url: str, token: str, enabled: bool = True) -> int:
        with self.lock:
            sid = next(self.ids)
            self.subscriptions[sid] = {
                "user_guid": "51398ccd-309e-467f-aae2-4b0f66b5c11d", "tenant_id": 16,
                "id": sid, "event_type": event_type, "enabled": enabled,
                "callback_url": url, "callback_token": token}
            return sid

    def disable(self, sid: int) -> None:
        with self.lock:
            self.subscriptions[sid]["enabled"] = False

    def find(self, event_type: str) -> list[int]:
        return [i for i, s in self.subscriptions.items() if s["event_type"] == event_type]

    def app(self) -> Starlette:
        async def collection(request: Request) -> Response:
            refused = self._gate(request, "/v2/webhook_subscriptions")
            if refused is not None:
                return refused
            if request.method == "GET":
                with self.lock:
                    items = [dict(self.subscriptions[i]) for i in sorted(self.subscriptions)]
                if not self.paged:
                    return JSONResponse(items)
                per_page = min(int(request.query_params.get("per_page", "25")), self.max_page)
                page = int(request.query_params.get("page", "1"))
                chunk = items[(page - 1) * per_page: page * per_page]
                more = page * per_page < len(items)
                return JSONResponse({"metadata": {"filtering": {}, "sorting": {}, "paging": {
                    "per_page": per_page, "current_page": page,
                    "next_page": page + 1 if more else None,
                    "prev_page": page - 1 if page > 1 else None}}, "data": chunk})
            body = await request.json()
            if not all(isinstance(body.get(k), str) and body[k]
                       for k in ("event_type", "callback_url", "callback_token")):
                return JSONResponse({"errors": {"event_type": ["can't be blank"]}},
                                    status_code=422)
            sid = self.add(body["event_type"], body["callback_url"], body["callback_token"])
            return JSONResponse(self.subscriptions[sid])

        async def member(request: Request) -> Response:
            sid = int(request.path_params["sid"])
            refused = self._gate(request, f"/v2/webhook_subscriptions/{sid}")
            if refused is not None:
                return refused
            if sid not in self.subscriptions:
                return JSONResponse({"error": "Not Found"}, status_code=404)
            if request.method == "GET":
                return JSONResponse(self.subscriptions[sid])
            if request.method == "DELETE":
                with self.lock:
                    del self.subscriptions[sid]
                return Response(status_code=204)
            body = await request.json()
            with self.lock:
                for key in ("enabled", "callback_url"):
                    if key in body:
                        self.subscriptions[sid][key] = body[key]
                return JSONResponse(self.subscriptions[sid])

        return Starlette(routes=[
            Route("/v2/webhook_subscriptions", collection, methods=["GET", "POST"]),
            Route("/v2/webhook_subscriptions/{sid:int}", member,
                  methods=["GET", "PUT", "DELETE"]),
            self.token_endpoint(),
        ])
