"""Who may use the console, and what every answer carries.

Access model (docs/console.md):

- With ``INGEST_CONSOLE_TOKEN`` set, people log in once with the token; the console then sets
  a session cookie, and API clients send ``Authorization: Bearer <token>``. Without it, the
  console serves only a loopback address (``ingest console`` refuses to start otherwise), and
  everyone who can reach that address may use it.
- The session cookie never holds the token: it is ``<issued at>.<nonce>.<mac>``, the MAC an
  HMAC-SHA256 over the first two parts under a key derived from the token (HMAC of the token
  with a fixed label). It is HttpOnly, SameSite=Strict, Secure when the request came over
  https, and lasts :data:`~ingest.constants.CONSOLE_SESSION_TTL`. Changing the token ends
  every session. Without a token, the key is random per process and every page visit gets a
  session by itself: it exists to carry the CSRF token, not to prove anything.
- Every form that changes something is a POST carrying a CSRF token: an HMAC of the session's
  nonce under the same key, so it is valid for that session only. The login form's token is
  bound the same way to a short-lived pre-login cookie. API POSTs carry the bearer token (a
  browser never adds it by itself) and must be ``application/json`` (a cross-site form cannot
  send that without a CORS preflight, which the console never grants).
- Without a token, requests must name a loopback host (``Host: 127.0.0.1:8001``,
  ``localhost``): a web page cannot use DNS rebinding to read the console through a name of
  its own.

Every answer carries a strict Content-Security-Policy (no script at all, styles from the
console itself), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
``X-Frame-Options: DENY`` and ``Cache-Control: no-store`` (pages hold personal data).

The console's access log names the route's pattern (``/records/{provider}/...``), the status
and the time taken: never a query string, a path's values, a form field or a header value, so
no email searched for and no credential reaches a log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ingest import constants

__all__ = ["CSRF_FIELD", "HEADERS", "LOGIN_COOKIE", "SESSION_COOKIE", "Guard", "SecurityHeaders",
           "is_loopback"]

log = logging.getLogger("ingest.console")

SESSION_COOKIE = "ingest_console"
LOGIN_COOKIE = "ingest_console_login"
CSRF_FIELD = "csrf"
# Seconds a login form stays valid.
_LOGIN_TTL = 3600

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
# The same, for an answer made outside the middleware (Starlette's last-resort 500 handler
# runs outside every middleware).
HEADERS = {name.decode(): value.decode() for name, value in _HEADERS}
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``: what only this machine reaches."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host part of a Host header (``[::1]:8001``, ``127.0.0.1:8001``, ``localhost``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The token check, sessions and CSRF tokens of one console process."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        secret = token.encode() if token is not None else secrets.token_bytes(32)
        self._key = hmac.new(secret, b"webhook-ingest console session v1", hashlib.sha256).digest()

    @property
    def open(self) -> bool:
        """No token: everyone who reaches the (loopback) address may use the console."""
        return self.token is None

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "|".join(parts).encode(), hashlib.sha256).hexdigest()

    def token_ok(self, presented: str | None) -> bool:
        if self.token is None:
            return True
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def bearer_ok(self, authorization: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    # -- sessions and the login form -------------------------------------------------------

    def _issue(self, kind: str, now: float | None) -> str:
        """``<issued at>.<nonce>.<mac>`` for a cookie of ``kind`` (session, login)."""
        issued = str(int(now if now is not None else time.time()))
        nonce = secrets.token_urlsafe(18)
        return f"{issued}.{nonce}.{self._mac(kind, issued, nonce)}"

    def _nonce(self, kind: str, cookie: str | None, ttl: float, now: float | None) -> str | None:
        """The nonce of a valid cookie of ``kind`` no older than ``ttl`` seconds, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        issued, nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(kind, issued, nonce)):
            return None
        try:
            age = (now if now is not None else time.time()) - int(issued)
        except ValueError:
            return None
        return nonce if 0 <= age <= ttl else None

    def new_session(self, now: float | None = None) -> str:
        return self._issue("session", now)

    def session_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        """The nonce of a valid, unexpired session cookie, else None."""
        return self._nonce("session", cookie, constants.CONSOLE_SESSION_TTL, now)

    def csrf_token(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_ok(self, nonce: str | None, presented: str | None) -> bool:
        return bool(nonce and presented) and hmac.compare_digest(
            str(presented), self.csrf_token(str(nonce)))

    def new_login(self, now: float | None = None) -> str:
        return self._issue("login", now)

    def login_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        return self._nonce("login", cookie, _LOGIN_TTL, now)

    def host_ok(self, host_header: str | None) -> bool:
        """Without a token, only a loopback name may be asked for (no DNS rebinding)."""
        if self.token is not None:
            return True
        return is_loopback(_host_of(host_header or ""))


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """ASGI middleware: the security headers on every answer, the Host check, and one access
    line per request naming the route's pattern only (never the path's values or the query
    string)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                names = {name for name, _ in _HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = headers + _HEADERS
            await send(message)

        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"),
                    None)
        try:
            if not self.guard.host_ok(host):
                await send_with_headers({"type": "http.response.start", "status": 421,
                                         "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body",
                            "body": b"This console answers only to 127.0.0.1 or localhost.\n"})
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            pattern = getattr(route, "path", None) or "(no route)"
            log.info("%s %s %d %.1f ms", scope.get("method", "?"), pattern, status,
                     (time.perf_counter() - started) * 1000,
                     extra={"route": pattern, "status": status})
